use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::ca::{CaOptions, CertificateAuthority};

/// A CA in the same process, with a switch to make it fail and a request counter.
struct LocalCa {
    ca: CertificateAuthority,
    calls: AtomicUsize,
    fail: AtomicBool,
    /// Sign this identity instead of the one asked for (a misbehaving CA).
    substitute: Option<SpiffeId>,
}

impl LocalCa {
    fn new(max_ttl: Duration) -> (Arc<Self>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(
            dir.path(),
            CaOptions {
                max_ttl,
                ..CaOptions::default()
            },
        )
        .unwrap();
        (
            Arc::new(Self {
                ca,
                calls: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
                substitute: None,
            }),
            dir,
        )
    }
}

#[async_trait]
impl CertificateProvider for LocalCa {
    async fn create_certificate(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, FetchError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(FetchError::Unavailable("switched off by the test".into()));
        }
        let identity = self.substitute.as_ref().unwrap_or(identity);
        self.ca
            .sign_csr(csr_pem.as_bytes(), identity, Some(ttl))
            .map(|issued| issued.chain_pem)
            .map_err(|e| FetchError::Refused(e.to_string()))
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn fast_options() -> ManagerOptions {
    ManagerOptions {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        ..ManagerOptions::default()
    }
}

#[tokio::test]
async fn fetches_once_and_caches() {
    let (ca, _dir) = LocalCa::new(Duration::from_secs(3600));
    let manager = CertManager::new(ca.clone(), fast_options());
    let first = manager.fetch(&id("a")).await.unwrap();
    let again = manager.fetch(&id("a")).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
    assert_eq!(first.identity, id("a"));
    assert_eq!(
        first.chain.len(),
        1,
        "self-signed CA: leaf only, root separate"
    );
    assert_eq!(first.roots, ca.ca.roots());
    x509::verify_leaf(&first.chain[0], &[], ca.ca.roots(), SystemTime::now()).unwrap();

    // A second identity is a second request and a different certificate.
    let other = manager.fetch(&id("b")).await.unwrap();
    assert_ne!(other.serial, first.serial);
    assert_eq!(ca.calls.load(Ordering::SeqCst), 2);

    let status = manager.status();
    assert_eq!(status.len(), 2);
    assert_eq!(status[0].identity, id("a").to_string());
    assert_eq!(status[0].state, "ready");
    assert_eq!(status[0].serial.as_deref(), Some(first.serial.as_str()));
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life_under_a_paused_clock() {
    // The CA caps lifetimes at 60 s, so renewal is due about 30 s after issuance.
    let (ca, _dir) = LocalCa::new(Duration::from_secs(60));
    let manager = CertManager::new(ca.clone(), fast_options());
    let first = manager.fetch(&id("a")).await.unwrap();
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);

    // Well before half life: nothing happens.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
    assert_eq!(manager.fetch(&id("a")).await.unwrap().serial, first.serial);

    // Past half life (30 s +/- 5%): renewed, new serial, the new one is served.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
    let second = manager.fetch(&id("a")).await.unwrap();
    assert_ne!(second.serial, first.serial);
    assert_eq!(manager.status()[0].renewals, 1);
}

#[tokio::test(start_paused = true)]
async fn keeps_the_old_certificate_while_renewal_fails() {
    let (ca, _dir) = LocalCa::new(Duration::from_secs(60));
    let manager = CertManager::new(ca.clone(), fast_options());
    let first = manager.fetch(&id("a")).await.unwrap();

    ca.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(35)).await;
    let calls_while_failing = ca.calls.load(Ordering::SeqCst);
    assert!(
        calls_while_failing >= 3,
        "retries with backoff: {calls_while_failing}"
    );
    let served = manager.fetch(&id("a")).await.unwrap();
    assert_eq!(served.serial, first.serial, "old certificate still served");
    let status = &manager.status()[0];
    assert_eq!(status.state, "renewal-failing");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("switched off")
    );

    // Backoff is capped (400 ms here), so recovery is picked up quickly.
    ca.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let renewed = manager.fetch(&id("a")).await.unwrap();
    assert_ne!(renewed.serial, first.serial);
    assert_eq!(manager.status()[0].state, "ready");
}

#[tokio::test(start_paused = true)]
async fn a_first_failure_is_reported_then_retried() {
    let (ca, _dir) = LocalCa::new(Duration::from_secs(3600));
    ca.fail.store(true, Ordering::SeqCst);
    let manager = CertManager::new(ca.clone(), fast_options());
    let err = manager.fetch(&id("a")).await.unwrap_err();
    assert!(matches!(err, CertError::Failed { .. }), "{err}");
    assert_eq!(manager.status()[0].state, "failed");

    ca.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    manager.fetch(&id("a")).await.unwrap();
}

#[tokio::test]
async fn refuses_a_certificate_for_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(LocalCa {
        ca: CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap(),
        calls: AtomicUsize::new(0),
        fail: AtomicBool::new(false),
        substitute: Some(id("someone-else")),
    });
    let manager = CertManager::new(ca, fast_options());
    let err = manager.fetch(&id("a")).await.unwrap_err();
    let CertError::Failed { error, .. } = err else {
        panic!("unexpected {err}");
    };
    assert!(
        matches!(&error, FetchError::BadResponse(m) if m.contains("someone-else")),
        "{error}"
    );
}

#[tokio::test]
async fn refuses_a_chain_from_an_untrusted_root() {
    let (ca, _dir) = LocalCa::new(Duration::from_secs(3600));
    let (other, _other_dir) = LocalCa::new(Duration::from_secs(3600));
    let bundle = crate::bundle::TrustBundle::new(other.ca.roots()).unwrap();
    let manager = CertManager::new(
        ca.clone(),
        ManagerOptions {
            trust_bundle: Some(bundle.clone()),
            ..fast_options()
        },
    );
    let err = manager.fetch(&id("a")).await.unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    // Rotation: with both roots in the bundle, the same manager accepts it.
    let mut both = other.ca.roots().to_vec();
    both.extend_from_slice(ca.ca.roots());
    bundle.replace(&both).unwrap();
    manager.fetch(&id("b")).await.unwrap();
}

#[test]
fn refuses_a_leaf_over_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    let theirs = generate_key().unwrap();
    let csr = build_csr(&theirs, &id("a")).unwrap();
    let issued = ca.sign_csr(csr.as_bytes(), &id("a"), None).unwrap();
    let ours = generate_key().unwrap();
    let err = accept_chain(
        &id("a"),
        &issued.chain_pem,
        &ours.subject_public_key_info(),
        PrivateKeyDer::Pkcs8(ours.serialize_der().into()),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not over the key"), "{err}");
}

#[tokio::test]
async fn forget_stops_tracking() {
    let (ca, _dir) = LocalCa::new(Duration::from_secs(3600));
    let manager = CertManager::new(ca.clone(), fast_options());
    manager.fetch(&id("a")).await.unwrap();
    assert!(manager.forget(&id("a")));
    assert!(!manager.forget(&id("a")));
    assert!(manager.status().is_empty());
    // Asking again is a fresh request.
    manager.fetch(&id("a")).await.unwrap();
    assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_expired_certificate_is_never_served() {
    // Real time: the CA gives 2-second certificates, then stops answering.
    let (ca, _dir) = LocalCa::new(Duration::from_secs(2));
    let manager = CertManager::new(
        ca.clone(),
        ManagerOptions {
            min_renewal_delay: Duration::from_millis(200),
            ..fast_options()
        },
    );
    manager.fetch(&id("a")).await.unwrap();
    ca.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let err = manager.fetch(&id("a")).await.unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
    assert_eq!(manager.status()[0].state, "expired");
}

/// Records the thread each request runs on.
struct ThreadRecorder {
    inner: Arc<LocalCa>,
    threads: std::sync::Mutex<Vec<String>>,
}

#[async_trait]
impl CertificateProvider for ThreadRecorder {
    async fn create_certificate(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, FetchError> {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        self.threads.lock().unwrap().push(name);
        self.inner.create_certificate(identity, csr_pem, ttl).await
    }
}

#[test]
fn certificate_work_runs_on_the_given_runtime_not_the_callers() {
    let (ca, _dir) = LocalCa::new(Duration::from_secs(3600));
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("the-control-thread")
        .enable_all()
        .build()
        .unwrap();
    let recorder = Arc::new(ThreadRecorder {
        inner: ca,
        threads: std::sync::Mutex::new(Vec::new()),
    });
    let manager = CertManager::new(
        recorder.clone(),
        ManagerOptions {
            runtime: Some(control.handle().clone()),
            ..fast_options()
        },
    );
    // The caller is a "data path" runtime of its own.
    let data = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    data.block_on(async { manager.fetch(&id("a")).await.unwrap() });
    assert_eq!(
        *recorder.threads.lock().unwrap(),
        ["the-control-thread".to_owned()]
    );
    drop(manager);
    control.shutdown_background();
}
