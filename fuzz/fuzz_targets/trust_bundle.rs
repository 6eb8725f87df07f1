//! Arbitrary bytes as the trust bundle file (`--ca-root`, re-read while the node proxy
//! runs): parsed the way the node proxy does, never a panic; what parses holds at least
//! one root, and replacing a running bundle with it keeps it usable.
#![no_main]

use ambit_tls::bundle::{TrustBundle, parse_pem};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(roots) = parse_pem(data) else {
        return;
    };
    assert!(!roots.is_empty());
    if let Ok(bundle) = TrustBundle::new(&roots) {
        assert_eq!(bundle.roots().len(), roots.len());
        let empty = TrustBundle::empty();
        assert!(empty.replace(&roots).is_ok());
        assert!(empty.replace(&[]).is_err());
    }
});
