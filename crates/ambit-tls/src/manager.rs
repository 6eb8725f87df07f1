//! The workload certificate manager used by node proxies.
//!
//! For each identity it is asked about, the manager runs one background task that
//! generates a key locally (the key never leaves the process), sends a CSR through a
//! [`CertificateProvider`], checks what comes back (the leaf is over our key, names exactly
//! the identity asked for, and chains to the trust bundle), and keeps it. The certificate
//! is renewed at half of its remaining life (with jitter so a node's certificates do not
//! all renew at once); failures are retried with exponential backoff, and the old
//! certificate keeps being served until a new one arrives or it expires. An expired
//! certificate is never handed out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ambit_core::SpiffeId;
use async_trait::async_trait;
use rcgen::PublicKeyData;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::certified_key;
use crate::csr::{build_csr, generate_key};
use crate::x509;

/// Something that signs CSRs: the control plane's CA over gRPC in production
/// ([`crate::client::CaClient`]), an in-process CA in tests.
#[async_trait]
pub trait CertificateProvider: Send + Sync + 'static {
    /// Requests a certificate for `identity` over the key of `csr_pem`, valid for `ttl`.
    /// Returns PEM certificates, leaf first and root last.
    async fn create_certificate(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, FetchError>;
}

/// Why a certificate request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The CA answered and said no (gRPC status other than unavailable).
    #[error("the CA refused: {0}")]
    Refused(String),
    /// The CA could not be reached or did not answer in time.
    #[error("the CA is unreachable: {0}")]
    Unavailable(String),
    /// The CA answered with something we will not use.
    #[error("the CA's answer is unusable: {0}")]
    BadResponse(String),
    /// Local failure (key generation, CSR encoding).
    #[error("local failure: {0}")]
    Local(String),
}

/// Why the manager cannot hand out a certificate now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity}: {error}")]
    Failed {
        identity: SpiffeId,
        error: FetchError,
    },
    #[error("the certificate for {identity} expired and renewal keeps failing: {error}")]
    Expired { identity: SpiffeId, error: String },
    #[error("the certificate manager stopped tracking {0}")]
    Stopped(SpiffeId),
}

/// A workload certificate with its private key, ready for rustls.
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    /// Leaf first, then intermediates; the root is not included.
    pub chain: Vec<CertificateDer<'static>>,
    /// The root(s) the chain leads to, from the CA's answer.
    pub roots: Vec<CertificateDer<'static>>,
    /// Serial number as lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The chain with its key, for rustls. Holds the private key: never logged.
    pub certified_key: Arc<CertifiedKey>,
}

impl WorkloadCertificate {
    /// Whether the certificate is inside its validity period at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_after", &crate::ca::humantime_rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

/// How the manager requests and renews.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// Lifetime asked for in each request (the CA may cap it).
    pub requested_ttl: Duration,
    /// Renewal happens at half the remaining life, +/- this fraction.
    pub jitter: f64,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Never renew sooner than this after receiving a certificate.
    pub min_renewal_delay: Duration,
    /// Trust anchors the issued chain must lead to (as they are when it arrives). `None`:
    /// trust the root the CA returns (only for in-process use; a node proxy always
    /// configures its bundle).
    pub trust_bundle: Option<crate::bundle::TrustBundle>,
    /// Where the per-identity tasks run (key generation, CSRs, calls to the CA, chain
    /// checks); `None`: the runtime of the caller that first asks for the identity. A
    /// node proxy puts them on its control runtime, never on a data-path thread.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            requested_ttl: Duration::from_secs(24 * 3600),
            jitter: 0.05,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            min_renewal_delay: Duration::from_secs(1),
            trust_bundle: None,
            runtime: None,
        }
    }
}

/// What the manager holds for one identity, for the admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub identity: String,
    /// `pending`, `ready`, `renewal-failing`, `failed` or `expired`.
    pub state: &'static str,
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// Seconds until the next renewal or retry, when one is scheduled.
    pub next_attempt_in_secs: Option<u64>,
    pub last_error: Option<String>,
    pub renewals: u64,
}

/// One identity's certificate, as the manager keeps it. Reading it takes no lock the
/// manager holds; it stays current as the manager renews.
#[derive(Clone)]
pub struct CertHandle {
    identity: SpiffeId,
    rx: watch::Receiver<Slot>,
}

impl std::fmt::Debug for CertHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertHandle")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl CertHandle {
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The certificate now, if one is held and valid.
    pub fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.rx
            .borrow()
            .current
            .as_ref()
            .filter(|c| c.is_valid_at(SystemTime::now()))
            .cloned()
    }

    /// The certificate, waiting for the first attempt if none has finished yet.
    pub async fn get(&self) -> Result<Arc<WorkloadCertificate>, CertError> {
        let mut rx = self.rx.clone();
        let identity = &self.identity;
        loop {
            {
                let slot = rx.borrow_and_update();
                if let Some(cert) = &slot.current {
                    if cert.is_valid_at(SystemTime::now()) {
                        return Ok(cert.clone());
                    }
                    if slot.attempted {
                        return Err(CertError::Expired {
                            identity: identity.clone(),
                            error: slot
                                .last_error
                                .as_ref()
                                .map(|e| e.to_string())
                                .unwrap_or_else(|| "renewal pending".into()),
                        });
                    }
                } else if let Some(error) = &slot.last_error {
                    return Err(CertError::Failed {
                        identity: identity.clone(),
                        error: error.clone(),
                    });
                }
            }
            if rx.changed().await.is_err() {
                return Err(CertError::Stopped(identity.clone()));
            }
        }
    }
}

/// The manager. Cheap to clone; clones share state. Dropping the last clone stops every
/// background task.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<dyn CertificateProvider>,
    options: ManagerOptions,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

struct Entry {
    state: watch::Receiver<Slot>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Default)]
struct Slot {
    current: Option<Arc<WorkloadCertificate>>,
    last_error: Option<FetchError>,
    /// Whether at least one attempt has finished.
    attempted: bool,
    next_attempt: Option<Instant>,
    renewals: u64,
}

impl CertManager {
    pub fn new(provider: Arc<dyn CertificateProvider>, options: ManagerOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                provider,
                options,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The certificate for `identity`, requesting it first if the manager does not hold it
    /// yet. Waits for the first attempt; afterwards answers at once.
    pub async fn fetch(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCertificate>, CertError> {
        self.handle(identity).get().await
    }

    /// A handle on `identity`'s certificate (tracking it from now on), for callers that
    /// need the current certificate without waiting, such as a TLS handshake.
    pub fn handle(&self, identity: &SpiffeId) -> CertHandle {
        CertHandle {
            identity: identity.clone(),
            rx: self.watch(identity),
        }
    }

    /// Stops tracking `identity`: its renewal task ends and its certificate is dropped.
    pub fn forget(&self, identity: &SpiffeId) -> bool {
        self.lock().remove(identity).is_some()
    }

    /// The identities tracked and the state of each, sorted by identity.
    pub fn status(&self) -> Vec<CertStatus> {
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let mut out: Vec<CertStatus> = self
            .lock()
            .iter()
            .map(|(id, entry)| {
                let slot = entry.state.borrow();
                let state = match (&slot.current, &slot.last_error) {
                    (None, None) => "pending",
                    (None, Some(_)) => "failed",
                    (Some(c), _) if !c.is_valid_at(now_wall) => "expired",
                    (Some(_), Some(_)) => "renewal-failing",
                    (Some(_), None) => "ready",
                };
                CertStatus {
                    identity: id.to_string(),
                    state,
                    serial: slot.current.as_ref().map(|c| c.serial.clone()),
                    not_before: slot
                        .current
                        .as_ref()
                        .map(|c| crate::ca::humantime_rfc3339(c.not_before)),
                    not_after: slot
                        .current
                        .as_ref()
                        .map(|c| crate::ca::humantime_rfc3339(c.not_after)),
                    next_attempt_in_secs: slot
                        .next_attempt
                        .map(|at| at.saturating_duration_since(now).as_secs()),
                    last_error: slot.last_error.as_ref().map(|e| e.to_string()),
                    renewals: slot.renewals,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        // The map is only ever mutated by whole-value inserts and removes, so a panic in
        // another holder cannot leave it inconsistent.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn watch(&self, identity: &SpiffeId) -> watch::Receiver<Slot> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get(identity) {
            return entry.state.clone();
        }
        let (tx, rx) = watch::channel(Slot::default());
        let work = run(
            identity.clone(),
            self.inner.provider.clone(),
            self.inner.options.clone(),
            tx,
        );
        let task = match &self.inner.options.runtime {
            Some(rt) => rt.spawn(work),
            None => tokio::spawn(work),
        };
        entries.insert(
            identity.clone(),
            Entry {
                state: rx.clone(),
                task,
            },
        );
        rx
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("identities", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// The per-identity loop: fetch, keep, sleep until renewal; on failure back off and retry.
async fn run(
    identity: SpiffeId,
    provider: Arc<dyn CertificateProvider>,
    options: ManagerOptions,
    tx: watch::Sender<Slot>,
) {
    let mut failures: u32 = 0;
    loop {
        let result = fetch_once(&identity, provider.as_ref(), &options).await;
        let delay = match result {
            Ok(cert) => {
                failures = 0;
                let delay = renewal_delay(&cert, &options);
                tracing::info!(
                    identity = %identity,
                    serial = %cert.serial,
                    not_after = %crate::ca::humantime_rfc3339(cert.not_after),
                    renew_in_secs = delay.as_secs(),
                    "workload certificate received"
                );
                tx.send_modify(|slot| {
                    if slot.current.is_some() {
                        slot.renewals += 1;
                    }
                    slot.current = Some(Arc::new(cert));
                    slot.last_error = None;
                });
                delay
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures, &options);
                tracing::warn!(
                    identity = %identity,
                    %error,
                    attempt = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "workload certificate request failed; will retry"
                );
                tx.send_modify(|slot| slot.last_error = Some(error));
                delay
            }
        };
        let at = Instant::now() + delay;
        tx.send_modify(|slot| {
            slot.attempted = true;
            slot.next_attempt = Some(at);
        });
        tokio::time::sleep_until(at).await;
    }
}

async fn fetch_once(
    identity: &SpiffeId,
    provider: &dyn CertificateProvider,
    options: &ManagerOptions,
) -> Result<WorkloadCertificate, FetchError> {
    use ambit_core::datapath::{OffPathWork, carried_connections, check};
    if !check(OffPathWork::Certificate) {
        tracing::error!(
            %identity,
            connections = carried_connections(),
            "a certificate was fetched on a data-path thread, delaying its connections (a defect: please report it)"
        );
    }
    let key = generate_key().map_err(|e| FetchError::Local(e.to_string()))?;
    let csr = build_csr(&key, identity).map_err(|e| FetchError::Local(e.to_string()))?;
    let pems = provider
        .create_certificate(identity, &csr, options.requested_ttl)
        .await?;
    let private_key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    accept_chain(
        identity,
        &pems,
        &key.subject_public_key_info(),
        private_key,
        options.trust_bundle.as_ref().map(|b| b.roots()).as_deref(),
    )
}

/// Checks a CA answer and turns it into a [`WorkloadCertificate`].
fn accept_chain(
    identity: &SpiffeId,
    pems: &[String],
    our_spki: &[u8],
    private_key: PrivateKeyDer<'static>,
    trust_bundle: Option<&[CertificateDer<'static>]>,
) -> Result<WorkloadCertificate, FetchError> {
    let bad = |what: String| FetchError::BadResponse(what);
    if pems.len() < 2 {
        return Err(bad(format!(
            "expected a leaf and a root, got {} certificate(s)",
            pems.len()
        )));
    }
    let mut certs = Vec::with_capacity(pems.len());
    for (i, pem) in pems.iter().enumerate() {
        let mut parsed = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate #{i} is not PEM: {e}")))?;
        if parsed.len() != 1 {
            return Err(bad(format!(
                "entry #{i} holds {} certificates, expected 1",
                parsed.len()
            )));
        }
        certs.push(parsed.remove(0));
    }
    let Some(root) = certs.pop() else {
        return Err(bad("empty chain".into()));
    };
    let leaf_info = x509::inspect(&certs[0]).map_err(bad)?;
    if leaf_info.spki_der != our_spki {
        return Err(bad("the leaf is not over the key we sent".into()));
    }
    let want = identity.to_string();
    if leaf_info.uris != [want.clone()] {
        return Err(bad(format!(
            "the leaf names {:?}, expected exactly {want}",
            leaf_info.uris
        )));
    }
    let anchors: &[CertificateDer<'static>] = match trust_bundle {
        Some(bundle) => bundle,
        None => std::slice::from_ref(&root),
    };
    x509::verify_leaf(&certs[0], &certs[1..], anchors, SystemTime::now())
        .map_err(|e| bad(format!("the chain does not verify: {e}")))?;
    let certified_key =
        certified_key(certs.clone(), private_key).map_err(|e| FetchError::Local(e.to_string()))?;
    Ok(WorkloadCertificate {
        identity: identity.clone(),
        chain: certs,
        roots: vec![root],
        serial: leaf_info.serial,
        not_before: leaf_info.not_before,
        not_after: leaf_info.not_after,
        certified_key,
    })
}

/// Half of the remaining life, +/- jitter, at least `min_renewal_delay`.
fn renewal_delay(cert: &WorkloadCertificate, options: &ManagerOptions) -> Duration {
    let remaining = cert
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let half = remaining.as_secs_f64() / 2.0;
    let jitter = options.jitter.clamp(0.0, 0.5);
    let factor = 1.0 + jitter * (fastrand::f64() * 2.0 - 1.0);
    Duration::from_secs_f64(half * factor).max(options.min_renewal_delay)
}

/// Exponential backoff with +/-20% jitter: initial * 2^(failures-1), capped.
fn backoff(failures: u32, options: &ManagerOptions) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = options
        .initial_backoff
        .saturating_mul(1u32 << exp)
        .min(options.max_backoff);
    base.mul_f64(0.8 + 0.4 * fastrand::f64())
}

#[cfg(test)]
mod tests;
