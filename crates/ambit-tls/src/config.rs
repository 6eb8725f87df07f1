//! The crypto provider and the rustls configurations built from it.
//!
//! Ambit uses exactly one provider, the one of the build's cryptography library (aws-lc-rs
//! by default, ring with the `ring` feature: see `ambit_core::crypto`), passed explicitly
//! to every configuration rather than installed process-wide, so no code path depends on
//! global state. Every mesh connection Ambit makes or accepts is TLS 1.3 with the two
//! AES-GCM suites, in the order Istio uses (AES-256 first), and the same key exchange
//! groups whichever library is linked (X25519, then P-256 and P-384), so the two builds
//! look the same on the wire.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as provider;
#[cfg(all(feature = "ring", not(feature = "aws-lc")))]
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;

/// ALPN of gRPC and HBONE: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a rustls configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no usable trust anchor: {0}")]
    Roots(String),
}

/// The mesh's crypto provider: TLS 1.3 AES-256-GCM and AES-128-GCM only.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
            provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![
            provider::kx_group::X25519,
            provider::kx_group::SECP256R1,
            provider::kx_group::SECP384R1,
        ],
        ..provider::default_provider()
    })
}

/// The library's provider with all its defaults (TLS 1.2 suites included), for
/// connections outside the mesh: fetching an issuer's keys over HTTPS. (The Kubernetes
/// client installs the library's default provider for itself.)
pub fn default_crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// Wraps a chain and its private key for rustls.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, ConfigError> {
    let key = crypto_provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// A server configuration that needs no client certificate (the control plane's gRPC
/// port: callers authenticate with bearer tokens), TLS 1.3, ALPN h2.
pub fn server_config_without_client_auth(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, ConfigError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client configuration that trusts only `roots` and checks the server's DNS name or IP
/// (a client of the control plane), TLS 1.3, ALPN h2.
pub fn client_config_with_roots(
    roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, ConfigError> {
    client_config_with_bundle(&crate::bundle::TrustBundle::new(roots)?)
}

/// Like [`client_config_with_roots`], with the anchors the bundle holds at each handshake
/// (a root rotation needs no new configuration).
pub fn client_config_with_bundle(
    bundle: &crate::bundle::TrustBundle,
) -> Result<rustls::ClientConfig, ConfigError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LiveWebPki(bundle.clone())))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Web PKI verification (chain, validity, server name) against the bundle's current
/// anchors; an empty bundle trusts nothing.
#[derive(Debug)]
struct LiveWebPki(crate::bundle::TrustBundle);

impl LiveWebPki {
    fn verifier(&self) -> Result<Arc<rustls::client::WebPkiServerVerifier>, rustls::Error> {
        self.0
            .load()
            .web_pki
            .clone()
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
    }
}

impl rustls::client::danger::ServerCertVerifier for LiveWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server certificate that can be replaced while the server runs: handshakes read the
/// current one without blocking each other (an `ArcSwap`-like read of one pointer).
#[derive(Debug)]
pub struct ReloadableCert {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    pub fn new(initial: Arc<CertifiedKey>) -> Self {
        Self {
            current: std::sync::RwLock::new(initial),
        }
    }

    /// Replaces the certificate used by new handshakes.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut guard) => *guard = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}
