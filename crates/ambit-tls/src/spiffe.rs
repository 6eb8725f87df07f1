//! Mutual TLS between workloads, the way HBONE does it: both sides present workload
//! certificates that chain to the mesh root; the client checks that the server's SPIFFE ID
//! is one the destination may have; the server reads the client's SPIFFE ID as the source
//! principal. No DNS names are involved and no SNI is sent.

use std::sync::Arc;

use ambit_core::SpiffeId;
use rustls::DistinguishedName;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

use crate::config::{ALPN_H2, ConfigError, crypto_provider};

pub use crate::bundle::TrustBundle;

/// Why a peer certificate is not acceptable as a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate cannot be read: {0}")]
    Unreadable(String),
    #[error("the peer certificate has no SPIFFE ID")]
    NoSpiffeId,
    #[error("the peer certificate has {0} SPIFFE IDs; a workload certificate has exactly one")]
    SeveralSpiffeIds(usize),
    #[error("the peer's SPIFFE ID is not a workload identity: {0}")]
    NotAWorkload(String),
}

/// The SPIFFE ID of a leaf certificate: its one `spiffe://` URI SAN, in workload form.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let info = crate::x509::inspect(cert).map_err(PeerIdentityError::Unreadable)?;
    let mut ids = info.uris.iter().filter(|u| u.starts_with("spiffe://"));
    let first = ids.next().ok_or(PeerIdentityError::NoSpiffeId)?;
    let more = ids.count();
    if more > 0 {
        return Err(PeerIdentityError::SeveralSpiffeIds(more + 1));
    }
    first
        .parse()
        .map_err(|e: ambit_core::IdentityError| PeerIdentityError::NotAWorkload(e.to_string()))
}

/// The identity of the peer of an established TLS connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<SpiffeId, PeerIdentityError> {
    let certs = conn
        .peer_certificates()
        .ok_or(PeerIdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerIdentityError::NoCertificate)?;
    spiffe_id_of(leaf)
}

/// Server side of HBONE: presents the certificate `resolver` returns (the destination
/// workload's), requires a client certificate chaining to the bundle whose SPIFFE ID is
/// in one of `trust_domains` (the mesh's and its aliases), TLS 1.3, ALPN h2. A client
/// from any other trust domain fails the handshake, even under a root the bundle trusts.
pub fn hbone_server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    bundle: &TrustBundle,
    trust_domains: &[String],
) -> Result<rustls::ServerConfig, ConfigError> {
    let provider = crypto_provider();
    if trust_domains.is_empty() {
        return Err(ConfigError::Roots(
            "no trust domain to accept clients from".into(),
        ));
    }
    let verifier = Arc::new(SpiffeClientVerifier {
        bundle: bundle.clone(),
        trust_domains: trust_domains.into(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Tunnels are long-lived and pooled; resumption buys nothing and costs state.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Chain to the bundle's current roots with clientAuth, exactly one SPIFFE ID, in an
/// accepted trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: TrustBundle,
    trust_domains: Arc<[String]>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a workload has one certificate and sends it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = verified_identity(
            &self.bundle,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if self.trust_domains.iter().any(|td| td == id.trust_domain()) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(ForeignTrustDomain {
                    got: id,
                    accepted: self.trust_domains.to_vec(),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configuration allows TLS 1.3 only.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client identity from a trust domain this mesh does not accept.
#[derive(thiserror::Error)]
#[error("the client presented {got}, from a trust domain this mesh does not accept (accepted: {})", .accepted.join(", "))]
pub struct ForeignTrustDomain {
    pub got: SpiffeId,
    pub accepted: Vec<String>,
}

// rustls shows a custom certificate error with `Debug`: make that the readable sentence.
impl std::fmt::Debug for ForeignTrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Client side of HBONE: presents `client_cert` (the source workload's), accepts a server
/// certificate only if it chains to the bundle and names one of `expected`. No SNI.
pub fn hbone_client_config(
    client_cert: Arc<CertifiedKey>,
    bundle: &TrustBundle,
    expected: Vec<SpiffeId>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: bundle.clone(),
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedClientCert(client_cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Always presents the same client certificate.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain to the mesh root with serverAuth, then the SPIFFE ID must be an expected one.
/// The server name is ignored: mesh peers are named by SPIFFE ID, not DNS.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Vec<SpiffeId>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verified_identity(
            &self.bundle,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(UnexpectedIdentity {
                    got: id,
                    expected: self.expected.clone(),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configuration allows TLS 1.3 only.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server's identity is not one the destination may have.
#[derive(Debug, thiserror::Error)]
#[error("the server presented {got}, expected {}", list(.expected))]
pub struct UnexpectedIdentity {
    pub got: SpiffeId,
    pub expected: Vec<SpiffeId>,
}

fn list(ids: &[SpiffeId]) -> String {
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    if names.len() == 1 {
        names[0].clone()
    } else {
        format!("one of [{}]", names.join(", "))
    }
}

/// The SPIFFE ID of a peer certificate that chains to the bundle's current roots for
/// `usage`; the one check both HBONE ends make before their own.
fn verified_identity(
    bundle: &TrustBundle,
    algorithms: &rustls::crypto::WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Error> {
    let roots = bundle.load();
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    cert.verify_for_usage(
        algorithms.all,
        &roots.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    spiffe_id_of(end_entity).map_err(|e| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    })
}

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

#[cfg(test)]
mod tests;
