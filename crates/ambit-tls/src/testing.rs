//! A throwaway mesh PKI for tests of the crates that use TLS (feature `testing`).

use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::ca::{CaOptions, CertificateAuthority, ServerNames};
use crate::config::certified_key;
use crate::spiffe::TrustBundle;

/// A self-signed mesh CA in a temporary folder.
pub struct TestPki {
    pub ca: CertificateAuthority,
    _dir: Option<tempfile::TempDir>,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let ca = CertificateAuthority::load_or_create(
            dir.path(),
            CaOptions {
                max_ttl: Duration::from_secs(366 * 24 * 3600),
                ..CaOptions::default()
            },
        )
        .expect("test CA");
        Self {
            ca,
            _dir: Some(dir),
        }
    }

    /// The CA whose files are in `dir` (a running control plane's `<state>/ca`), to
    /// issue certificates a test client presents to the mesh.
    pub fn load(dir: &std::path::Path) -> Self {
        let ca = CertificateAuthority::load_or_create(dir, CaOptions::default())
            .expect("the CA in the given folder");
        Self { ca, _dir: None }
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots().to_vec()
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.ca.roots()).expect("bundle")
    }

    /// A workload certificate (chain without the root) and key for `identity`.
    pub fn issue(&self, identity: &SpiffeId, ttl: Duration) -> Arc<CertifiedKey> {
        let key = crate::csr::generate_key().expect("key");
        let issued = self
            .ca
            .issue(
                &key,
                &ServerNames {
                    identity: Some(identity.clone()),
                    ..ServerNames::default()
                },
                ttl,
            )
            .expect("issue");
        let mut chain = vec![issued.leaf];
        chain.extend(self.ca.intermediates());
        certified_key(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into())).expect("key")
    }

    /// The trust domains a test server accepts clients from: the default one.
    pub fn trust_domains() -> Vec<String> {
        vec!["cluster.local".to_owned()]
    }

    /// An identity in the default trust domain.
    pub fn id(namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", namespace, service_account).expect("valid identity")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves one fixed certificate to every TLS client (a test server's identity).
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
