//! Arbitrary bytes as a message from the node agent (ZDS `WorkloadRequest`), decoded
//! and checked the way the node proxy does: never a panic; an accepted `add` names a pod
//! with non-empty, bounded fields.
#![no_main]

use ambit_node::zds::{Request, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Add(pod)) = decode(data) {
        assert!(!pod.uid.is_empty() && !pod.name.is_empty() && !pod.namespace.is_empty());
        assert!(!pod.service_account.is_empty());
        for f in [&pod.name, &pod.namespace, &pod.service_account] {
            assert!(f.len() <= 253 && !f.contains('/'));
        }
        assert!(pod.uid.len() <= 253 && !pod.uid.chars().any(char::is_control));
    }
});
