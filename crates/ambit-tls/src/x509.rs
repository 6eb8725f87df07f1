//! Reading certificates: the facts Ambit needs from one, and chain verification.

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What Ambit reads from a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Serial number as lowercase hex, without leading zero bytes.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// URI subject alternative names (SPIFFE IDs for workload certificates).
    pub uris: Vec<String>,
    /// basicConstraints CA:TRUE.
    pub is_ca: bool,
    /// keyUsage allows keyCertSign (or keyUsage is absent).
    pub can_sign_certs: bool,
    /// The DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
}

/// Parses one DER certificate. The error says what is wrong in plain words.
pub fn inspect(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let mut uris = Vec::new();
    let mut can_sign_certs = true;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push((*uri).to_owned());
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => can_sign_certs = ku.key_cert_sign(),
            _ => {}
        }
    }
    let serial = cert
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(CertInfo {
        serial,
        not_before: to_system_time(cert.validity().not_before.timestamp()),
        not_after: to_system_time(cert.validity().not_after.timestamp()),
        uris,
        is_ca: cert.is_ca(),
        can_sign_certs,
        spki_der: cert.public_key().raw.to_vec(),
    })
}

fn to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Verifies that `leaf` chains through `intermediates` to one of `roots` at `now`, for
/// use as a TLS client and server certificate, the way a peer will check it.
pub fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), String> {
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the root is not usable as a trust anchor: {e}"))?;
    let end_entity =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("bad leaf certificate: {e}"))?;
    let algs = crate::config::crypto_provider()
        .signature_verification_algorithms
        .all;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_owned())?,
    );
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        end_entity
            .verify_for_usage(algs, &anchors, intermediates, now, usage, None, None)
            .map_err(|e| format!("{e}"))?;
    }
    Ok(())
}
