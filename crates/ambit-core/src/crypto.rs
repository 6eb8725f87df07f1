//! The cryptography library: aws-lc-rs (the default) or ring, one per build.
//!
//! Every Ambit crate has the features `aws-lc` (default) and `ring`, and each turns on
//! the same choice in every crate it depends on, rustls, rcgen, x509-parser, webpki and
//! the Kubernetes client included, so a build of the `ambit` binary links exactly one
//! library. Code that needs a primitive (signatures for JWTs and node tokens, digests,
//! random bytes) takes it from here, never from either library by name. The two expose
//! the same API for what Ambit uses; where they differ, a function here hides it.
//!
//! A build that turns on both (a workspace-wide test build, where the crypto benchmark
//! asks for both) uses aws-lc-rs.

#[cfg(feature = "aws-lc")]
use aws_lc_rs as library;
#[cfg(all(feature = "ring", not(feature = "aws-lc")))]
use ring as library;

#[cfg(not(any(feature = "aws-lc", feature = "ring")))]
compile_error!(
    "ambit-core needs a cryptography library: build with the `aws-lc` (default) or `ring` feature"
);

pub use library::{digest, error, rand, signature};

/// The library this build links, for logs and `ambit --version`.
#[cfg(feature = "aws-lc")]
pub const LIBRARY: &str = "aws-lc-rs";
#[cfg(all(feature = "ring", not(feature = "aws-lc")))]
pub const LIBRARY: &str = "ring";

/// Reads an ECDSA key pair from PKCS#8 (ring's signature takes a random source there,
/// aws-lc-rs's does not).
pub fn ecdsa_key_pair_from_pkcs8(
    alg: &'static signature::EcdsaSigningAlgorithm,
    pkcs8: &[u8],
) -> Result<signature::EcdsaKeyPair, error::KeyRejected> {
    #[cfg(feature = "aws-lc")]
    {
        signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8)
    }
    #[cfg(all(feature = "ring", not(feature = "aws-lc")))]
    {
        signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8, &rand::SystemRandom::new())
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

/// Fills `buf` from the operating system's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<(), error::Unspecified> {
    rand::SecureRandom::fill(&rand::SystemRandom::new(), buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use signature::KeyPair;

    #[test]
    fn sha256_is_the_standard_digest() {
        // FIPS 180-2's "abc" example.
        assert_eq!(
            sha256(b"abc")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_ecdsa_key_round_trips_through_pkcs8_and_signs() {
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let doc = signature::EcdsaKeyPair::generate_pkcs8(alg, &rand::SystemRandom::new())
            .expect("generate");
        let pair = ecdsa_key_pair_from_pkcs8(alg, doc.as_ref()).expect("read back");
        let sig = pair
            .sign(&rand::SystemRandom::new(), b"message")
            .expect("sign");
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref(),
        );
        public.verify(b"message", sig.as_ref()).expect("verifies");
        assert!(public.verify(b"other message", sig.as_ref()).is_err());
        assert!(ecdsa_key_pair_from_pkcs8(alg, &doc.as_ref()[1..]).is_err());
    }

    #[test]
    fn random_bytes_differ() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill_random(&mut a).expect("random");
        fill_random(&mut b).expect("random");
        assert_ne!(a, b);
    }
}
