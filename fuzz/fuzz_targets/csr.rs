//! Arbitrary bytes as a certificate signing request, raw or wrapped in PEM: checking and
//! signing must never panic, and anything signed must chain to the root.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use ambit_core::SpiffeId;
use ambit_tls::{CaOptions, CertificateAuthority};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static (CertificateAuthority, tempfile::TempDir) {
    static CA: OnceLock<(CertificateAuthority, tempfile::TempDir)> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default())
            .expect("CA");
        (ca, dir)
    })
}

fuzz_target!(|data: &[u8]| {
    let (ca, _) = ca();
    let id = SpiffeId::new("cluster.local", "fuzz", "fuzz").expect("valid id");
    // Half the inputs go straight to the DER parser by arriving already PEM-wrapped.
    let input = match data.split_first() {
        Some((flag, rest)) if flag & 1 == 1 => {
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest.to_vec())).into_bytes()
        }
        _ => data.to_vec(),
    };
    if let Ok(issued) = ca.sign_csr(&input, &id, Some(Duration::from_secs(60))) {
        ambit_tls::x509::verify_leaf(&issued.leaf, &[], ca.roots(), SystemTime::now())
            .expect("an issued leaf verifies");
    }
});
