//! Certificate signing requests: checking the ones the CA receives, building the ones the
//! certificate manager sends.

use ambit_core::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// The largest CSR accepted, in bytes of PEM. A P-256 CSR is well under 1 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// Why a CSR was refused. Every variant is the caller's fault (gRPC INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the CSR is not a PEM \"CERTIFICATE REQUEST\" block: {0}")]
    Pem(String),
    #[error("the CSR holds {0} PEM \"CERTIFICATE REQUEST\" blocks; send exactly one")]
    Several(usize),
    #[error("the CSR is not valid PKCS#10 DER: {0}")]
    Der(String),
    #[error("the CSR's signature does not verify with its own public key")]
    Signature,
    #[error("the CSR's key is {0}; only ECDSA P-256 keys are accepted")]
    KeyType(String),
}

/// Parses a PEM CSR, checks its self-signature, and returns its public key if it is an
/// ECDSA P-256 key. Nothing else in the CSR is used.
pub fn parse_csr(pem: &[u8]) -> Result<SubjectPublicKeyInfo, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let blocks = CertificateSigningRequestDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    let der = match blocks.as_slice() {
        [] => return Err(CsrError::Pem("no CERTIFICATE REQUEST block found".into())),
        [one] => one,
        many => return Err(CsrError::Several(many.len())),
    };
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!("{} trailing bytes", rest.len())));
    }
    let spki = &csr.certification_request_info.subject_pki;
    // Check the key type first: it gives the clearer message for a well-formed CSR with
    // an unsupported key.
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|_| CsrError::KeyType(describe_key(&csr)))?;
    if rcgen::PublicKeyData::algorithm(&key) != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::KeyType(describe_key(&csr)));
    }
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    Ok(key)
}

fn describe_key(csr: &X509CertificationRequest<'_>) -> String {
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    let registry = x509_parser::oid_registry::OidRegistry::default().with_all_crypto();
    let name = registry
        .get(alg)
        .map(|e| e.sn().to_owned())
        .unwrap_or_else(|| alg.to_id_string());
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| {
            registry
                .get(&oid)
                .map(|e| e.sn().to_owned())
                .unwrap_or_else(|| oid.to_id_string())
        });
    match curve {
        Some(curve) => format!("{name} ({curve})"),
        None => name,
    }
}

/// Builds a PEM CSR for `identity` signed by `key`: the SPIFFE ID as the only SAN, an empty
/// subject, as Istio's node proxy sends.
pub fn build_csr(key: &KeyPair, identity: &SpiffeId) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.serialize_request(key)?.pem()
}

/// A fresh ECDSA P-256 key pair, the only kind a workload certificate may have.
pub fn generate_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap()
    }

    #[test]
    fn accepts_a_p256_csr() {
        let key = generate_key().unwrap();
        let pem = build_csr(&key, &id()).unwrap();
        let spki = parse_csr(pem.as_bytes()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&spki),
            rcgen::PublicKeyData::der_bytes(&key)
        );
    }

    #[test]
    fn refuses_other_key_types() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let pem = build_csr(&key, &id()).unwrap();
        let err = parse_csr(pem.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, CsrError::KeyType(k) if k.contains("secp384r1")),
            "{err}"
        );

        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let pem = build_csr(&key, &id()).unwrap();
        assert!(matches!(
            parse_csr(pem.as_bytes()),
            Err(CsrError::KeyType(_))
        ));
    }

    #[test]
    fn refuses_a_bad_signature() {
        let key = generate_key().unwrap();
        let pem = build_csr(&key, &id()).unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // The signature is the last element; flip a bit in its final byte.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert_eq!(parse_csr(tampered.as_bytes()), Err(CsrError::Signature));
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(parse_csr(b""), Err(CsrError::Pem(_))));
        assert!(matches!(parse_csr(b"hello"), Err(CsrError::Pem(_))));
        let junk = pem::encode(&pem::Pem::new(
            "CERTIFICATE REQUEST",
            vec![0x30, 0x03, 1, 2, 3],
        ));
        assert!(matches!(parse_csr(junk.as_bytes()), Err(CsrError::Der(_))));
        let big = vec![b'a'; MAX_CSR_BYTES + 1];
        assert_eq!(parse_csr(&big), Err(CsrError::TooLarge(MAX_CSR_BYTES + 1)));
    }

    #[test]
    fn refuses_two_requests() {
        let key = generate_key().unwrap();
        let pem = build_csr(&key, &id()).unwrap();
        let two = format!("{pem}{pem}");
        assert_eq!(parse_csr(two.as_bytes()), Err(CsrError::Several(2)));
    }
}
