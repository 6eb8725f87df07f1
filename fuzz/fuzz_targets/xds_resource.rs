//! Arbitrary bytes as a discovery resource body (an `istio.workload.Address` or an
//! `istio.security.Authorization`), decoded and converted the way the node proxy does:
//! never a panic; what converts must be consistent.
#![no_main]

use ambit_xds::convert::{self, Interner};
use ambit_proto::prost::Message;
use ambit_proto::{security, workload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let mut i = Interner::default();
    if which & 1 == 0 {
        let Ok(address) = workload::Address::decode(body) else {
            return;
        };
        match address.r#type {
            Some(workload::address::Type::Workload(w)) => {
                let name: std::sync::Arc<str> = w.uid.as_str().into();
                if let Ok(w) = convert::workload(&name, w, &mut i) {
                    assert_eq!(w.uid, name);
                    let _ = w.identity();
                }
            }
            Some(workload::address::Type::Service(s)) => {
                let name = format!("{}/{}", s.namespace, s.hostname);
                if let Ok(s) = convert::service(&name, s, &mut i) {
                    assert_eq!(s.key(), name);
                }
            }
            None => {}
        }
    } else if let Ok(a) = security::Authorization::decode(body) {
        let name = format!("{}/{}", a.namespace, a.name);
        if let Ok(p) = convert::authorization(&name, a, &mut i) {
            assert_eq!(p.key(), name);
        }
    }
    i.prune();
});
