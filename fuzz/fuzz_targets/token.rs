//! Arbitrary strings as bearer tokens: verification must never panic and never accept.
#![no_main]

use std::sync::OnceLock;

use ambit_control::auth::{NodeTokenAuthenticator, TokenSigner};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static NodeTokenAuthenticator {
    static V: OnceLock<(NodeTokenAuthenticator, tempfile::TempDir)> = OnceLock::new();
    &V.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = TokenSigner::load_or_create(dir.path()).expect("signer");
        (signer.verifier(), dir)
    })
    .0
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    // Forging a signature by chance is not a thing a fuzzer can do: anything accepted is a bug.
    assert!(verifier().verify(token, 1_700_000_000).is_err());
});
