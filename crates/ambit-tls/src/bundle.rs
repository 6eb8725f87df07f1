//! The mesh's trust anchors, replaceable while everything runs.
//!
//! One [`TrustBundle`] is shared (cloned) by every TLS configuration of a process: the
//! HBONE server's client verifier, the HBONE client's server verifier, the certificate
//! manager's check of issued chains, and the connection to the control plane. Each
//! handshake reads the roots current at that moment (one atomic load), so replacing them
//! ([`TrustBundle::replace`], [`follow_file`]) takes effect for every new handshake at
//! once. A root rotation is: add the new root next to the old one (both trusted while
//! certificates of both are in use), switch the CA, then drop the old root.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, TrustAnchor};

use crate::config::{ConfigError, crypto_provider};

/// The mesh's trust anchors (see the module documentation).
#[derive(Clone)]
pub struct TrustBundle {
    current: Arc<ArcSwap<Roots>>,
}

/// One version of the anchors, with everything derived from them built once.
pub(crate) struct Roots {
    pub(crate) ders: Arc<[CertificateDer<'static>]>,
    pub(crate) anchors: Arc<[TrustAnchor<'static>]>,
    /// For servers named by DNS or IP (the control plane); `None` when empty.
    pub(crate) web_pki: Option<Arc<WebPkiServerVerifier>>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.current.load().ders.len())
            .finish()
    }
}

impl Roots {
    fn build(roots: &[CertificateDer<'static>]) -> Result<Self, ConfigError> {
        let mut store = rustls::RootCertStore::empty();
        let mut anchors = Vec::with_capacity(roots.len());
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| ConfigError::Roots(e.to_string()))?;
            anchors.push(
                webpki::anchor_from_trusted_cert(root)
                    .map_err(|e| ConfigError::Roots(e.to_string()))?
                    .to_owned(),
            );
        }
        let web_pki = if store.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), crypto_provider())
                    .build()
                    .map_err(|e| ConfigError::Roots(e.to_string()))?,
            )
        };
        Ok(Self {
            ders: roots.to_vec().into(),
            anchors: anchors.into(),
            web_pki,
        })
    }
}

impl TrustBundle {
    /// A bundle of `roots` (at least one).
    pub fn new(roots: &[CertificateDer<'static>]) -> Result<Self, ConfigError> {
        if roots.is_empty() {
            return Err(ConfigError::Roots("the trust bundle is empty".into()));
        }
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(Roots::build(roots)?)),
        })
    }

    /// A bundle that trusts nothing (every peer is refused) until replaced.
    pub fn empty() -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(Roots {
                ders: Arc::from(Vec::new()),
                anchors: Arc::from(Vec::new()),
                web_pki: None,
            })),
        }
    }

    /// Parses a PEM bundle (one or more certificates).
    pub fn from_pem(pem: &[u8]) -> Result<Self, ConfigError> {
        Self::new(&parse_pem(pem)?)
    }

    /// Replaces the anchors for every holder of this bundle; new handshakes use them at
    /// once, established connections are not touched. Refuses an empty set.
    pub fn replace(&self, roots: &[CertificateDer<'static>]) -> Result<(), ConfigError> {
        if roots.is_empty() {
            return Err(ConfigError::Roots("the trust bundle is empty".into()));
        }
        self.current.store(Arc::new(Roots::build(roots)?));
        Ok(())
    }

    /// The anchors now in force.
    pub fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        self.current.load().ders.clone()
    }

    pub(crate) fn load(&self) -> Arc<Roots> {
        self.current.load_full()
    }
}

/// The certificates of a PEM bundle, at least one.
pub fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Roots(format!("not a PEM certificate bundle: {e}")))?;
    if roots.is_empty() {
        return Err(ConfigError::Roots(
            "no certificate in the bundle (expected PEM CERTIFICATE blocks)".into(),
        ));
    }
    Ok(roots)
}

/// Re-reads `path` every `every` and replaces the bundle's anchors when the file's
/// certificates change. A file that cannot be read or parsed is reported and the current
/// anchors stay. Runs until `stop` fires.
pub async fn follow_file(
    bundle: TrustBundle,
    path: PathBuf,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let read = tokio::fs::read(&path).await;
        let parsed = read
            .map_err(|e| e.to_string())
            .and_then(|pem| parse_pem(&pem).map_err(|e| e.to_string()));
        match parsed {
            Ok(roots) if *roots == *bundle.roots() => last_error = None,
            Ok(roots) => match bundle.replace(&roots) {
                Ok(()) => {
                    last_error = None;
                    tracing::info!(
                        file = %path.display(),
                        roots = roots.len(),
                        "trust bundle reloaded; new handshakes use it"
                    );
                }
                Err(e) => report(&path, &e.to_string(), &mut last_error),
            },
            Err(e) => report(&path, &e, &mut last_error),
        }
    }
}

fn report(path: &std::path::Path, error: &str, last: &mut Option<String>) {
    if last.as_deref() != Some(error) {
        tracing::warn!(file = %path.display(), error, "cannot reload the trust bundle; keeping the current one");
        *last = Some(error.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn pem(roots: &[CertificateDer<'static>]) -> String {
        roots
            .iter()
            .map(|r| pem::encode(&pem::Pem::new("CERTIFICATE", r.to_vec())))
            .collect()
    }

    #[tokio::test]
    async fn a_changed_file_replaces_the_roots_and_a_bad_one_keeps_them() {
        let (old, new) = (TestPki::new(), TestPki::new());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("root-cert.pem");
        std::fs::write(&file, pem(&old.roots())).unwrap();
        let bundle = TrustBundle::from_pem(std::fs::read(&file).unwrap().as_slice()).unwrap();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(follow_file(
            bundle.clone(),
            file.clone(),
            Duration::from_millis(20),
            stop,
        ));
        let wait = |want: usize| {
            let bundle = bundle.clone();
            async move {
                for _ in 0..250 {
                    if bundle.roots().len() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("the bundle never held {want} roots");
            }
        };
        // The overlap of a rotation: both roots.
        let mut both = old.roots();
        both.extend(new.roots());
        std::fs::write(&file, pem(&both)).unwrap();
        wait(2).await;
        // A broken file changes nothing.
        std::fs::write(&file, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(bundle.roots().len(), 2);
        // The old root retired.
        std::fs::write(&file, pem(&new.roots())).unwrap();
        wait(1).await;
        assert_eq!(*bundle.roots(), *new.roots());
        let _ = stop_tx.send(true);
        task.await.unwrap();
    }
}
