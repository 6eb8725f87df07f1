//! The data path: per-pod listeners inside each pod's network namespace, and what each
//! connection does.
//!
//! For each pod the node proxy serves it opens, inside the pod's namespace:
//! - `127.0.0.1:15001` (outbound): connections the pod makes, redirected here. The
//!   original destination decides ([`crate::route`]): HBONE to the destination's node
//!   proxy with this pod's certificate, from inside this pod's namespace (so the tunnel's
//!   source address is the pod's), or plain TCP for destinations outside the mesh.
//! - `0.0.0.0:15008` (inbound HBONE): mutual TLS with this pod's certificate; the
//!   CONNECT authority must be one of this pod's addresses; the peer's SPIFFE ID is the
//!   source principal; the authorization hook decides (a refusal is a 401, nothing
//!   reaches the application); the proxy then connects to the application from inside
//!   the namespace with the client's address as the source.
//! - `0.0.0.0:15006` (inbound plaintext): connections from outside the mesh, redirected
//!   here; forwarded to the application the same way, if the hook allows them (a
//!   STRICT PeerAuthentication does not).
//!
//! Every allowed inbound connection is checked again whenever the policies change, and
//! closed if they now deny it.
//!
//! The proxy's own sockets carry the mark 0x539, which the redirection rules skip.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_core::SpiffeId;
use ambit_core::discovery::{Service, Workload};
use ambit_core::policy::Evaluation;
use ambit_core::state::{State, Store};
use ambit_hbone::server::{ServerConfig, ServerHandle};
use ambit_hbone::socket::{Netns, PROXY_MARK, SocketOptions};
use ambit_hbone::stream::{CopyError, copy_bidirectional_tapped};

use crate::l7::RequestTap;
use ambit_hbone::{
    ConnectHandler, ConnectHeaders, ConnectRequest, IncomingConnect, Pool, PoolConfig, Server,
    Workers,
};
use ambit_tls::spiffe::{TrustBundle, hbone_server_config};
use ambit_tls::{CertHandle, CertManager};
use http::StatusCode;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{ConnFacts, ConnLabels, ConnMetrics, Metrics, Reporter, describe};
use ambit_core::route::{Route, route};

/// Ports inside each pod.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// A pod the node proxy serves, as the node agent (or local configuration) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// Settings of the data path.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    pub trust_domain: String,
    /// Other trust domains whose identities count as the mesh's own (during a trust
    /// domain migration): accepted at the HBONE handshake and matched by policies.
    pub trust_domain_aliases: Vec<String>,
    /// Istio's cluster ID: a pod's workload is `<cluster_id>//Pod/<ns>/<name>`.
    pub cluster_id: String,
    /// The network this node is on (empty: the default one).
    pub network: String,
    /// An upstream connection (direct, HBONE, or to the application) must be established
    /// within this time.
    pub connect_timeout: Duration,
    /// When a pod is removed, its connections may finish for this long.
    pub drain_timeout: Duration,
    /// Until discovery has synced, a connection waits this long for it, then is refused.
    pub sync_timeout: Duration,
    /// Metric series naming a workload discovery no longer knows are removed after this.
    pub metrics_retention: Duration,
    pub hbone_server: ServerConfig,
    /// Limits on port 15008, every pod's together.
    pub hbone_limits: ambit_hbone::admission::Limits,
    pub pool: PoolConfig,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            trust_domain: ambit_core::DEFAULT_TRUST_DOMAIN.to_owned(),
            trust_domain_aliases: Vec::new(),
            cluster_id: "Kubernetes".to_owned(),
            network: String::new(),
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(5),
            metrics_retention: Duration::from_secs(300),
            hbone_server: ServerConfig::default(),
            hbone_limits: ambit_hbone::admission::Limits::default(),
            pool: PoolConfig::default(),
        }
    }
}

/// An inbound connection, as the authorization hook sees it.
#[derive(Debug)]
pub struct InboundConn<'a> {
    pub state: &'a State,
    /// The workload being connected to (this pod), if discovery knows it.
    pub destination: Option<&'a Workload>,
    pub destination_addr: SocketAddr,
    pub source_addr: SocketAddr,
    /// The client's SPIFFE ID, for mTLS (HBONE) connections.
    pub source_identity: Option<&'a SpiffeId>,
}

/// Decides inbound connections (see [`crate::authz::Policies`]).
pub trait Authorizer: Send + Sync + 'static {
    fn check<'s>(&self, conn: &InboundConn<'s>) -> Evaluation<'s>;
}

/// What every pod's connections share.
pub struct DataPlane {
    pub config: DataPlaneConfig,
    pub store: Arc<Store>,
    pub pool: Pool,
    pub certs: CertManager,
    pub bundle: TrustBundle,
    pub metrics: Arc<Metrics>,
    pub authorizer: Arc<dyn Authorizer>,
    /// The policy epoch of the state (see [`State::policy_epoch`]); open inbound
    /// connections watch it and re-check themselves when it moves.
    pub policy_changes: watch::Sender<u64>,
    /// Opens once discovery has delivered a complete first push of every type.
    pub synced: SyncGate,
    /// How many pods hold each identity (certificates are released with the last one).
    cert_refs: Mutex<HashMap<SpiffeId, usize>>,
    /// Spans of the requests seen where request metrics are on (`--otlp-endpoint`).
    pub tracer: Option<crate::l7::NodeTracer>,
}

/// Closed until the node proxy knows the mesh (discovery synced), then open for good.
///
/// Before that, a connection cannot be classified: its destination may be a mesh
/// workload that must get mTLS, and a destination's policies are unknown. Connections
/// therefore wait (bounded) and are refused if it does not open in time; nothing goes
/// out in plaintext or in unchecked. The open gate costs one atomic load.
#[derive(Debug, Default)]
pub struct SyncGate {
    open: std::sync::atomic::AtomicBool,
    opened: tokio::sync::Notify,
}

impl SyncGate {
    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
        self.opened.notify_waiters();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the gate is open, waiting up to `timeout` for it.
    pub async fn wait(&self, timeout: Duration) -> bool {
        if self.is_open() {
            return true;
        }
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if self.is_open() {
            return true;
        }
        tokio::time::timeout(timeout, opened).await.is_ok() || self.is_open()
    }
}

impl DataPlaneConfig {
    /// The mesh's trust domain followed by its aliases.
    pub fn trust_domains(&self) -> Vec<String> {
        let mut all = vec![self.trust_domain.clone()];
        all.extend(self.trust_domain_aliases.iter().cloned());
        all
    }
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").finish_non_exhaustive()
    }
}

impl DataPlane {
    pub fn new(
        config: DataPlaneConfig,
        store: Arc<Store>,
        certs: CertManager,
        bundle: TrustBundle,
        metrics: Arc<Metrics>,
        authorizer: Arc<dyn Authorizer>,
    ) -> Self {
        Self {
            pool: Pool::new(config.pool.clone(), bundle.clone()),
            config,
            store,
            certs,
            bundle,
            metrics,
            authorizer,
            policy_changes: watch::Sender::new(0),
            synced: SyncGate::default(),
            cert_refs: Mutex::new(HashMap::new()),
            tracer: None,
        }
    }

    /// Exports a span for each sampled request seen where request metrics are on.
    pub fn with_tracer(mut self, tracer: Option<crate::l7::NodeTracer>) -> Self {
        self.tracer = tracer;
        self
    }

    fn acquire(&self, id: &SpiffeId) -> CertHandle {
        let mut refs = self.cert_refs.lock().unwrap_or_else(|p| p.into_inner());
        *refs.entry(id.clone()).or_insert(0) += 1;
        self.certs.handle(id)
    }

    fn release(&self, id: &SpiffeId) {
        let mut refs = self.cert_refs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = refs.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                refs.remove(id);
                self.certs.forget(id);
                tracing::info!(identity = %id, "last pod with this identity left; certificate released");
            }
        }
    }
}

/// One pod's context, shared by its connections.
pub struct PodCtx {
    pub info: PodInfo,
    pub identity: SpiffeId,
    pub netns: Netns,
    pub cert: CertHandle,
    dp: Arc<DataPlane>,
    /// The pod's workload name in discovery.
    uid: String,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl PodCtx {
    fn workload(&self, state: &State) -> Option<Arc<Workload>> {
        state.workload(&self.uid).cloned()
    }

    fn inside(&self) -> SocketOptions {
        SocketOptions {
            netns: Some(self.netns.clone()),
            mark: Some(PROXY_MARK),
            ..SocketOptions::default()
        }
    }

    /// Connects to the application in the pod with `client` as the source address.
    async fn connect_app(&self, app: SocketAddr, client: IpAddr) -> io::Result<TcpStream> {
        let opts = SocketOptions {
            bind: Some(client),
            transparent: true,
            ..self.inside()
        };
        tokio::time::timeout(
            self.dp.config.connect_timeout,
            ambit_hbone::socket::connect(app, &opts),
        )
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connecting to the application timed out",
            )
        })?
    }
}

/// A pod being served.
pub struct RunningPod {
    pub ctx: Arc<PodCtx>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// One HBONE server per address family.
    hbone: Vec<ServerHandle>,
}

impl RunningPod {
    /// Opens the pod's listeners inside its namespace and starts serving them: the
    /// listeners on the first worker, each accepted connection on the next in turn.
    pub fn start(
        dp: Arc<DataPlane>,
        info: PodInfo,
        netns: Netns,
        workers: &Workers,
    ) -> Result<Self, String> {
        let rt = workers.handle();
        let identity = SpiffeId::new(
            dp.config.trust_domain.clone(),
            info.namespace.clone(),
            info.service_account.clone(),
        )
        .map_err(|e| format!("pod {}/{}: {e}", info.namespace, info.name))?;
        let _guard = rt.enter();
        let opts = SocketOptions {
            netns: Some(netns.clone()),
            reuse_port: true,
            ..SocketOptions::default()
        };
        let listen = |addr: SocketAddr| {
            ambit_hbone::socket::listen(addr, &opts, 1024)
                .map_err(|e| format!("cannot listen on {addr} in {}: {e}", netns.name()))
        };
        // Both families: IPv4 always, IPv6 where the pod has it (a namespace with IPv6
        // disabled has no ::1 to bind; its IPv6 traffic cannot exist either).
        let both = |v4: IpAddr, v6: IpAddr, port: u16| -> Result<Vec<TcpListener>, String> {
            let mut out = vec![listen(SocketAddr::new(v4, port))?];
            match ambit_hbone::socket::listen(SocketAddr::new(v6, port), &opts, 1024) {
                Ok(l) => out.push(l),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AddrNotAvailable | io::ErrorKind::Unsupported
                    ) || e.raw_os_error() == Some(97) =>
                {
                    tracing::debug!(error = %e, "no IPv6 in the pod's namespace; IPv4 only");
                }
                Err(e) => {
                    return Err(format!(
                        "cannot listen on [{v6}]:{port} in {}: {e}",
                        netns.name()
                    ));
                }
            }
            Ok(out)
        };
        let outbound = both(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            OUTBOUND_PORT,
        )?;
        let plaintext = both(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            INBOUND_PLAINTEXT_PORT,
        )?;
        let hbone = both(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            HBONE_PORT,
        )?;

        let cert = dp.acquire(&identity);
        let ctx = Arc::new(PodCtx {
            uid: format!(
                "{}//Pod/{}/{}",
                dp.config.cluster_id, info.namespace, info.name
            ),
            info,
            identity,
            netns,
            cert: cert.clone(),
            dp: dp.clone(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        // Ask for the certificate now, so the first connection does not wait for it.
        {
            let cert = cert.clone();
            rt.spawn(async move {
                if let Err(e) = cert.get().await {
                    tracing::warn!(error = %e, "no certificate yet for a new pod; will retry");
                }
            });
        }
        let tls = hbone_server_config(
            Arc::new(PodCert(cert)),
            &dp.bundle,
            &dp.config.trust_domains(),
        )
        .map_err(|e| e.to_string())?;
        let inbound = Arc::new(Inbound(ctx.clone()));
        let hbone = hbone
            .into_iter()
            .map(|l| {
                Server::new(tls.clone(), dp.config.hbone_server.clone())
                    .with_workers(workers.clone())
                    .serve(l, inbound.clone())
            })
            .collect();
        let mut accept_tasks = Vec::new();
        for (listeners, direction) in [
            (outbound, Direction::Outbound),
            (plaintext, Direction::InboundPlaintext),
        ] {
            for l in listeners {
                accept_tasks.push(rt.spawn(accept(l, ctx.clone(), direction, workers.clone())));
            }
        }
        dp.metrics.pods.inc();
        tracing::info!(
            pod = %format!("{}/{}", ctx.info.namespace, ctx.info.name),
            uid = %ctx.info.uid,
            identity = %ctx.identity,
            netns = %ctx.netns.name(),
            "serving pod"
        );
        Ok(Self {
            ctx,
            accept_tasks,
            hbone,
        })
    }

    /// Closes the listeners at once and returns what is left: the pod's open
    /// connections, which keep running until they end (see [`Draining::finish`]).
    pub fn stop(self) -> Draining {
        for t in &self.accept_tasks {
            t.abort();
        }
        self.ctx.tracker.close();
        self.ctx.dp.metrics.pods.dec();
        tracing::info!(
            pod = %format!("{}/{}", self.ctx.info.namespace, self.ctx.info.name),
            uid = %self.ctx.info.uid,
            connections = self.ctx.tracker.len(),
            "stopped serving pod; its open connections may finish"
        );
        Draining {
            ctx: self.ctx,
            hbone: self.hbone,
        }
    }
}

/// A pod no longer served whose open connections may still be running.
pub struct Draining {
    ctx: Arc<PodCtx>,
    hbone: Vec<ServerHandle>,
}

impl Draining {
    /// Open connections left.
    pub fn connections(&self) -> usize {
        self.ctx.tracker.len()
    }

    /// Lets the connections run until they end. Once `stop` fires (the node proxy is
    /// shutting down) they get `drain` more, then the rest are closed. Then the pod's
    /// certificate is released.
    pub async fn finish(self, stop: CancellationToken, drain: Duration) {
        let ctx = self.ctx;
        // No deadline on the HBONE server itself: it stops accepting and sends GOAWAY
        // now; its streams end with the connection tasks below.
        let servers: Vec<_> = self
            .hbone
            .into_iter()
            .map(|server| tokio::spawn(server.shutdown(Duration::MAX)))
            .collect();
        let hbone = async move {
            for server in servers {
                let _ = server.await;
            }
        };
        let drained = tokio::select! {
            _ = ctx.tracker.wait() => true,
            _ = stop.cancelled() => tokio::time::timeout(drain, ctx.tracker.wait()).await.is_ok(),
        };
        if !drained {
            ctx.cancel.cancel();
            ctx.tracker.wait().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), hbone)
            .await
            .is_err()
        {
            tracing::warn!(uid = %ctx.info.uid, "HBONE server of a removed pod did not close within 5 s");
        }
        ctx.dp.release(&ctx.identity);
        tracing::info!(
            pod = %format!("{}/{}", ctx.info.namespace, ctx.info.name),
            uid = %ctx.info.uid,
            forced = !drained,
            "removed pod's connections have ended"
        );
    }
}

/// Serves a pod's current certificate to HBONE handshakes.
#[derive(Debug)]
struct PodCert(CertHandle);

impl rustls::server::ResolvesServerCert for PodCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // No certificate yet: the handshake fails and the client retries; nothing is
        // served without the pod's own identity.
        self.0.current().map(|c| c.certified_key.clone())
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Outbound,
    InboundPlaintext,
}

async fn accept(listener: TcpListener, ctx: Arc<PodCtx>, direction: Direction, workers: Workers) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let (worker, moving) = match workers.dispatch(conn) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot move a connection to its worker");
                continue;
            }
        };
        let c = ctx.clone();
        ctx.tracker.spawn_on(
            async move {
                // `_load` counts the connection against this worker for its life.
                let (conn, _load) = match moving.arrive() {
                    Ok(arrived) => arrived,
                    Err(e) => {
                        tracing::warn!(error = %e, %peer, "cannot move a connection to its worker");
                        return;
                    }
                };
                let cancel = c.cancel.clone();
                tokio::select! {
                    _ = async {
                        match direction {
                            Direction::Outbound => outbound(&c, conn, peer).await,
                            Direction::InboundPlaintext => inbound_plaintext(&c, conn, peer).await,
                        }
                    } => {}
                    _ = cancel.cancelled() => {}
                }
            },
            worker,
        );
    }
}

/// The destination a redirected connection was addressed to.
fn original_dst(conn: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(conn);
    let addr = if conn.local_addr()?.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

/// Closes a client connection with a reset, so the application sees a failure rather
/// than a clean end.
fn reset(conn: &TcpStream) {
    let _ = socket2::SockRef::from(conn).set_linger(Some(Duration::ZERO));
}

fn is_proxy_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | HBONE_PORT)
}

/// Baggage Istio's node proxy sends with a CONNECT.
fn baggage(source: Option<&Workload>) -> Vec<(String, String)> {
    let Some(w) = source else { return Vec::new() };
    vec![
        ("k8s.namespace.name".into(), w.profile.namespace.to_string()),
        ("k8s.pod.name".into(), w.name.to_string()),
        ("service.name".into(), w.profile.canonical_name.to_string()),
        (
            "service.version".into(),
            w.profile.canonical_revision.to_string(),
        ),
        ("k8s.cluster.name".into(), w.profile.cluster_id.to_string()),
    ]
}

/// Everything the access log says about a connection.
struct Access<'a> {
    direction: &'static str,
    src: SocketAddr,
    src_workload: Option<&'a Workload>,
    src_identity: Option<String>,
    dst: SocketAddr,
    hbone: Option<SocketAddr>,
    dst_workload: Option<&'a Workload>,
    dst_service: Option<&'a Service>,
    mtls: bool,
    started: Instant,
    /// The authorization decision (inbound only): what decided, what the dry-run
    /// policies would have decided, which AUDIT policy matched.
    authz: Option<(String, Option<String>, Option<String>)>,
}

impl Access<'_> {
    fn decided(&mut self, e: &Evaluation<'_>) {
        self.authz = Some((
            e.verdict.to_string(),
            e.dry_run.map(|v| v.to_string()),
            e.audit.map(|p| format!("{}/{}", p.namespace, p.name)),
        ));
    }

    fn log(&self, from_source: u64, to_source: u64, error: Option<&str>) {
        let dst_identity = if self.mtls {
            self.dst_workload
                .and_then(Workload::identity)
                .map(|i| i.to_string())
        } else {
            None
        };
        let (authz, dry_run, audit) = match &self.authz {
            Some((a, d, u)) => (a.as_str(), d.as_deref(), u.as_deref()),
            None => ("", None, None),
        };
        tracing::info!(
            target: "ambit::access",
            direction = self.direction,
            src.addr = %self.src,
            src.workload = %describe(self.src_workload),
            src.identity = self.src_identity.as_deref().unwrap_or(""),
            // As Istio's node proxy logs them: `dst.addr` is the address the connection
            // itself went to (the tunnel's, for HBONE), `dst.hbone_addr` the application
            // address the tunnel carries to (empty without HBONE).
            dst.addr = %self.hbone.unwrap_or(self.dst),
            dst.hbone_addr = %self.hbone.map(|_| self.dst.to_string()).unwrap_or_default(),
            dst.workload = %describe(self.dst_workload),
            dst.identity = dst_identity.as_deref().unwrap_or(""),
            dst.service = self.dst_service.map(|s| s.hostname.as_ref()).unwrap_or(""),
            mtls = self.mtls,
            bytes_sent = from_source,
            bytes_received = to_source,
            duration_ms = self.started.elapsed().as_millis() as u64,
            authz,
            authz.dry_run = dry_run.unwrap_or(""),
            authz.audit = audit.unwrap_or(""),
            error = error.unwrap_or(""),
            "connection complete"
        );
    }
}

/// Waits (bounded) for discovery to have synced; `false` (after logging the refusal)
/// when it did not, and the connection must be refused.
async fn synced(dp: &DataPlane, direction: &'static str, src: SocketAddr, dst: SocketAddr) -> bool {
    if dp.synced.wait(dp.config.sync_timeout).await {
        return true;
    }
    dp.metrics.unsynced_refusals.inc();
    tracing::info!(
        target: "ambit::access",
        direction,
        src.addr = %src,
        dst.addr = %dst,
        error = "refused: the node proxy has not synced with the control plane yet",
        "connection complete"
    );
    false
}

async fn outbound(ctx: &PodCtx, mut conn: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let original = match original_dst(&conn) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "outbound connection without an original destination; closing");
            return;
        }
    };
    if original.ip().is_loopback() && is_proxy_port(original.port()) {
        tracing::warn!(%original, "a connection addressed to the proxy itself; closing");
        return;
    }
    let dp = &ctx.dp;
    // Unsynced, a mesh destination cannot be told from any other: never guess.
    if !synced(dp, "outbound", peer, original).await {
        reset(&conn);
        return;
    }
    let state = dp.store.load();
    let source = ctx.workload(&state);
    match route(
        &state,
        &dp.config.network,
        source.as_deref(),
        original,
        HBONE_PORT,
    ) {
        Route::Hbone {
            workload,
            service,
            target,
            hbone,
        } => {
            let access = Access {
                direction: "outbound",
                src: peer,
                src_workload: source.as_deref(),
                src_identity: Some(ctx.identity.to_string()),
                dst: target,
                hbone: Some(hbone),
                dst_workload: Some(&workload),
                dst_service: service.as_deref(),
                mtls: true,
                started,
                authz: None,
            };
            let facts = ConnFacts {
                reporter: Reporter::Source,
                source: source.as_deref(),
                source_principal: Some(ctx.identity.to_string()),
                destination: Some(&workload),
                destination_service: service.as_deref(),
                mutual_tls: true,
                request_protocol: "tcp",
            };
            let metrics = ConnMetrics::open(dp.metrics.clone(), ConnLabels::new(&facts, "-"));
            let Some(expected) = workload.identity() else {
                fail(
                    &conn,
                    metrics,
                    &access,
                    "the destination has no valid identity",
                );
                return;
            };
            let cert = match ctx.cert.get().await {
                Ok(c) => c,
                Err(e) => {
                    fail(
                        &conn,
                        metrics,
                        &access,
                        &format!("no certificate for this pod: {e}"),
                    );
                    return;
                }
            };
            let request = ConnectRequest {
                source: ctx.identity.clone(),
                source_cert: cert.certified_key.clone(),
                destination: hbone,
                expected: vec![expected],
                authority: target,
                headers: ConnectHeaders {
                    forwarded_for: Some(peer.into()),
                    forwarded_host: service.as_ref().map(|s| s.hostname.to_string()),
                    baggage: baggage(source.as_deref()),
                    traceparent: None,
                },
                socket: ctx.inside(),
            };
            let stream =
                match tokio::time::timeout(dp.config.connect_timeout, dp.pool.connect(request))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let flag = if e.status() == Some(StatusCode::UNAUTHORIZED) {
                            "DENY"
                        } else {
                            "CONNECT"
                        };
                        fail_with(&conn, metrics, &access, &e.to_string(), flag);
                        return;
                    }
                    Err(_) => {
                        fail(&conn, metrics, &access, "HBONE connect timed out");
                        return;
                    }
                };
            let tap = request_tap(dp, source.as_deref(), &metrics, true);
            let (r, w) = conn.split();
            let (stats, result) =
                copy_bidirectional_tapped(r, w, stream, std::future::pending(), &tap).await;
            let error = result.err().and_then(|e| {
                if e.is_peer_reset() || matches!(e, CopyError::Tunnel(_)) {
                    reset(&conn);
                }
                (!e.is_reset_by_an_end()).then(|| e.to_string())
            });
            metrics.close(stats.sent, stats.received, None);
            access.log(stats.sent, stats.received, error.as_deref());
        }
        Route::Direct {
            workload,
            service,
            target,
        } => {
            let (access, metrics) = plain_outbound(
                dp,
                peer,
                source.as_deref(),
                target,
                workload.as_deref(),
                service.as_deref(),
                started,
            );
            let upstream = tokio::time::timeout(
                dp.config.connect_timeout,
                ambit_hbone::socket::connect(target, &ctx.inside()),
            )
            .await;
            let mut upstream = match upstream {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    fail(
                        &conn,
                        metrics,
                        &access,
                        &format!("cannot connect to {target}: {e}"),
                    );
                    return;
                }
                Err(_) => {
                    fail(
                        &conn,
                        metrics,
                        &access,
                        &format!("connecting to {target} timed out"),
                    );
                    return;
                }
            };
            let tap = request_tap(dp, source.as_deref(), &metrics, true);
            let (from_source, to_source, error) =
                copy_plain(&mut conn, &mut upstream, tap.as_ref()).await;
            metrics.close(from_source, to_source, None);
            access.log(from_source, to_source, error.as_deref());
        }
        Route::NoEndpoint { service } => {
            let (access, metrics) = plain_outbound(
                dp,
                peer,
                source.as_deref(),
                original,
                None,
                Some(&service),
                started,
            );
            fail_with(
                &conn,
                metrics,
                &access,
                "the service has no ready endpoint for this port",
                "NR",
            );
        }
        // Only a waypoint's balancer names subsets; a node proxy never gets this.
        Route::NoSubset { subset, .. } => {
            tracing::warn!(%subset, %original, "a subset route at the node proxy; refused");
            reset(&conn);
        }
        Route::NoWaypoint {
            waypoint,
            service,
            workload,
        } => {
            // Named a waypoint that cannot be reached: refused, never sent around it.
            let (access, metrics) = plain_outbound(
                dp,
                peer,
                source.as_deref(),
                original,
                workload.as_deref(),
                service.as_deref(),
                started,
            );
            fail_with(
                &conn,
                metrics,
                &access,
                &format!(
                    "the destination is bound to waypoint {waypoint}, which has no ready endpoint; refused rather than sent around it"
                ),
                "NR",
            );
        }
    }
}

/// The access-log entry and the metrics of an outbound connection that is not mTLS (plain
/// TCP, or refused before any tunnel).
fn plain_outbound<'a>(
    dp: &DataPlane,
    peer: SocketAddr,
    source: Option<&'a Workload>,
    dst: SocketAddr,
    workload: Option<&'a Workload>,
    service: Option<&'a Service>,
    started: Instant,
) -> (Access<'a>, ConnMetrics) {
    let access = Access {
        direction: "outbound",
        src: peer,
        src_workload: source,
        src_identity: None,
        dst,
        hbone: None,
        dst_workload: workload,
        dst_service: service,
        mtls: false,
        started,
        authz: None,
    };
    let facts = ConnFacts {
        reporter: Reporter::Source,
        source,
        source_principal: None,
        destination: workload,
        destination_service: service,
        mutual_tls: false,
        request_protocol: "tcp",
    };
    let metrics = ConnMetrics::open(dp.metrics.clone(), ConnLabels::new(&facts, "-"));
    (access, metrics)
}

fn fail(conn: &TcpStream, metrics: ConnMetrics, access: &Access<'_>, error: &str) {
    fail_with(conn, metrics, access, error, "CONNECT");
}

fn fail_with(
    conn: &TcpStream,
    metrics: ConnMetrics,
    access: &Access<'_>,
    error: &str,
    flag: &'static str,
) {
    reset(conn);
    metrics.close(0, 0, Some(flag));
    access.log(0, 0, Some(error));
}

/// A request tap for a connection of this pod, if the pod turned request metrics on.
/// `socket_is_client`: the pod's socket is the client side (outbound).
fn request_tap(
    dp: &DataPlane,
    pod: Option<&Workload>,
    metrics: &ConnMetrics,
    socket_is_client: bool,
) -> Option<RequestTap> {
    pod.filter(|w| w.profile.l7_metrics).map(|_| {
        RequestTap::new(
            dp.metrics.clone(),
            metrics.labels(),
            socket_is_client,
            dp.tracer.clone(),
        )
    })
}

/// Copies both ways between two plain sockets (`a` the client's); returns bytes
/// (a -> b, b -> a).
async fn copy_plain(
    a: &mut TcpStream,
    b: &mut TcpStream,
    tap: Option<&RequestTap>,
) -> (u64, u64, Option<String>) {
    let mut from = Counted::new(a, tap, true);
    let mut to = Counted::new(b, tap, false);
    let result = tokio::io::copy_bidirectional(&mut from, &mut to).await;
    let (ab, ba) = (from.read, to.read);
    match result {
        Ok(_) => (ab, ba, None),
        Err(e) => {
            if e.kind() == io::ErrorKind::ConnectionReset {
                reset(a);
                reset(b);
            }
            // An end that resets is an ordinary close (see CopyError::is_reset_by_an_end).
            let error = (!ambit_hbone::stream::is_reset(&e)).then(|| e.to_string());
            (ab, ba, error)
        }
    }
}

/// Resolves, with the new decision, once a policy change denies an open inbound
/// connection; never resolves otherwise.
async fn revoked(
    ctx: &PodCtx,
    mut changes: watch::Receiver<u64>,
    source_addr: SocketAddr,
    source_identity: Option<SpiffeId>,
    destination_addr: SocketAddr,
) -> String {
    while changes.changed().await.is_ok() {
        let state = ctx.dp.store.load();
        let destination = ctx.workload(&state);
        let e = ctx.dp.authorizer.check(&InboundConn {
            state: &state,
            destination: destination.as_deref(),
            destination_addr,
            source_addr,
            source_identity: source_identity.as_ref(),
        });
        if !e.verdict.allowed {
            tracing::info!(
                src = %source_addr,
                dst = %destination_addr,
                decision = %e.verdict,
                "closing an open connection the changed policies deny"
            );
            return format!("{} (policies changed)", e.verdict);
        }
    }
    std::future::pending().await
}

/// A socket that counts what is read from it (so the bytes of a copy that is cut short
/// are still known), and shows it to a request tap if there is one.
struct Counted<'a> {
    inner: &'a mut TcpStream,
    read: u64,
    tap: Option<&'a RequestTap>,
    /// This socket's reads are the client's (else the server's).
    client: bool,
}

impl<'a> Counted<'a> {
    fn new(inner: &'a mut TcpStream, tap: Option<&'a RequestTap>, client: bool) -> Self {
        Self {
            inner,
            read: 0,
            tap,
            client,
        }
    }
}

impl tokio::io::AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining();
        let r = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        self.read += new.len() as u64;
        if let Some(tap) = self.tap
            && let std::task::Poll::Ready(Ok(())) = r
        {
            if new.is_empty() {
                if room > 0 && !self.client {
                    // EOF from the server: ends a response delimited by the close.
                    tap.server_closed();
                }
            } else if self.client {
                tap.client(new);
            } else {
                tap.server(new);
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

async fn inbound_plaintext(ctx: &PodCtx, mut conn: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let original = match original_dst(&conn) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "inbound connection without an original destination; closing");
            return;
        }
    };
    if is_proxy_port(original.port()) {
        return;
    }
    let dp = &ctx.dp;
    if !synced(dp, "inbound", peer, original).await {
        reset(&conn);
        return;
    }
    // Subscribed before the decision, so a change right after it is not missed.
    let mut changes = dp.policy_changes.subscribe();
    changes.borrow_and_update();
    let state = dp.store.load();
    let destination = ctx.workload(&state);
    let source = state.workload_by_ip(&dp.config.network, peer.ip()).cloned();
    let mut access = Access {
        direction: "inbound",
        src: peer,
        src_workload: source.as_deref(),
        src_identity: None,
        dst: original,
        hbone: None,
        dst_workload: destination.as_deref(),
        dst_service: None,
        mtls: false,
        started,
        authz: None,
    };
    let facts = ConnFacts {
        reporter: Reporter::Destination,
        source: source.as_deref(),
        source_principal: None,
        destination: destination.as_deref(),
        destination_service: None,
        mutual_tls: false,
        request_protocol: "tcp",
    };
    let metrics = ConnMetrics::open(dp.metrics.clone(), ConnLabels::new(&facts, "-"));
    let decision = dp.authorizer.check(&InboundConn {
        state: &state,
        destination: destination.as_deref(),
        destination_addr: original,
        source_addr: peer,
        source_identity: None,
    });
    access.decided(&decision);
    dp.metrics.decided(&decision);
    if !decision.verdict.allowed {
        reset(&conn);
        metrics.close(0, 0, Some("DENY"));
        access.log(0, 0, Some(&decision.verdict.to_string()));
        return;
    }
    let mut app = match ctx.connect_app(original, peer.ip()).await {
        Ok(a) => a,
        Err(e) => {
            fail(
                &conn,
                metrics,
                &access,
                &format!("cannot connect to the application at {original}: {e}"),
            );
            return;
        }
    };
    let tap = request_tap(dp, destination.as_deref(), &metrics, false);
    let mut from = Counted::new(&mut conn, tap.as_ref(), true);
    let mut to = Counted::new(&mut app, tap.as_ref(), false);
    let outcome = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut from, &mut to) => Ok(r),
        reason = revoked(ctx, changes, peer, None, original) => Err(reason),
    };
    let (from_source, to_source) = (from.read, to.read);
    match outcome {
        Ok(Ok(_)) => {
            metrics.close(from_source, to_source, None);
            access.log(from_source, to_source, None);
        }
        Ok(Err(e)) => {
            if e.kind() == io::ErrorKind::ConnectionReset {
                reset(&conn);
                reset(&app);
            }
            metrics.close(from_source, to_source, None);
            access.log(from_source, to_source, Some(&e.to_string()));
        }
        Err(reason) => {
            reset(&conn);
            reset(&app);
            metrics.close(from_source, to_source, Some("DENY"));
            access.log(from_source, to_source, Some(&format!("closed: {reason}")));
        }
    }
}

/// The service the client addressed, as its CONNECT's `forwarded: host=` names it, if
/// this pod really backs that service (a client cannot pin metrics on a service the pod
/// is not part of).
fn addressed_service<'s>(
    state: &'s State,
    headers: &ConnectHeaders,
    destination: Option<&Workload>,
) -> Option<&'s Arc<Service>> {
    let host = headers.forwarded_host.as_deref()?;
    let destination = destination?;
    state.services_by_hostname(host).find(|s| {
        let key = s.key();
        destination
            .profile
            .services
            .iter()
            .any(|(k, _)| k.as_ref() == key)
    })
}

/// The pod's inbound HBONE handler.
struct Inbound(Arc<PodCtx>);

impl ConnectHandler for Inbound {
    async fn handle(&self, c: IncomingConnect) {
        let ctx = &self.0;
        // An inbound tunnel belongs to its pod like the pod's other connections: counted
        // by the pod's tracker (its drain waits for it, its certificate is kept for it)
        // and ended by the pod's cancellation when the drain deadline passes.
        let _counted = ctx.tracker.token();
        tokio::select! {
            _ = inbound_hbone(ctx, c) => {}
            _ = ctx.cancel.cancelled() => {}
        }
    }
}

async fn inbound_hbone(ctx: &PodCtx, c: IncomingConnect) {
    let started = Instant::now();
    let dp = &ctx.dp;
    if !synced(dp, "inbound", c.peer.addr, c.authority).await {
        c.refuse(StatusCode::SERVICE_UNAVAILABLE);
        return;
    }
    let mut changes = dp.policy_changes.subscribe();
    changes.borrow_and_update();
    let state = dp.store.load();
    let destination = ctx.workload(&state);
    let source = state
        .workload_by_ip(&dp.config.network, c.peer.addr.ip())
        .cloned();
    let authority = c.authority;
    let own = authority.ip() == c.peer.local.ip()
        || destination
            .as_ref()
            .is_some_and(|w| w.addresses.contains(&authority.ip()));
    let principal = c.peer.identity.to_string();
    let service = addressed_service(&state, &c.headers, destination.as_deref());
    let mut access = Access {
        direction: "inbound",
        src: c.peer.addr,
        src_workload: source.as_deref(),
        src_identity: Some(principal.clone()),
        dst: authority,
        hbone: Some(c.peer.local),
        dst_workload: destination.as_deref(),
        dst_service: service.map(|s| &**s),
        mtls: true,
        started,
        authz: None,
    };
    if !own || is_proxy_port(authority.port()) {
        tracing::warn!(%authority, peer = %c.peer.identity, "refusing a tunnel to an address that is not this pod's");
        access.log(0, 0, Some("the authority is not an address of this pod"));
        c.refuse(StatusCode::BAD_REQUEST);
        return;
    }
    let facts = ConnFacts {
        reporter: Reporter::Destination,
        source: source.as_deref(),
        source_principal: Some(principal),
        destination: destination.as_deref(),
        destination_service: service.map(|s| &**s),
        mutual_tls: true,
        request_protocol: "tcp",
    };
    let metrics = ConnMetrics::open(dp.metrics.clone(), ConnLabels::new(&facts, "-"));
    let decision = dp.authorizer.check(&InboundConn {
        state: &state,
        destination: destination.as_deref(),
        destination_addr: authority,
        source_addr: c.peer.addr,
        source_identity: Some(&c.peer.identity),
    });
    access.decided(&decision);
    dp.metrics.decided(&decision);
    if !decision.verdict.allowed {
        metrics.close(0, 0, Some("DENY"));
        access.log(0, 0, Some(&decision.verdict.to_string()));
        c.refuse(StatusCode::UNAUTHORIZED);
        return;
    }
    let (peer_addr, peer_identity) = (c.peer.addr, c.peer.identity.clone());
    let app = match ctx.connect_app(authority, c.peer.addr.ip()).await {
        Ok(a) => a,
        Err(e) => {
            metrics.close(0, 0, Some("CONNECT"));
            access.log(
                0,
                0,
                Some(&format!(
                    "cannot connect to the application at {authority}: {e}"
                )),
            );
            c.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let stream = match c.accept() {
        Ok(s) => s,
        Err(e) => {
            metrics.close(0, 0, Some("CONNECT"));
            access.log(0, 0, Some(&e.to_string()));
            return;
        }
    };
    let mut app = app;
    let tap = request_tap(dp, destination.as_deref(), &metrics, false);
    let (r, w) = app.split();
    let revocation = revoked(ctx, changes, peer_addr, Some(peer_identity), authority);
    let (stats, result) = copy_bidirectional_tapped(r, w, stream, revocation, &tap).await;
    let mut flag = None;
    let error = result.err().and_then(|e| {
        if matches!(e, CopyError::Tunnel(_) | CopyError::Stopped(_)) {
            reset(&app);
        }
        if matches!(e, CopyError::Stopped(_)) {
            flag = Some("DENY");
        }
        (!e.is_reset_by_an_end()).then(|| e.to_string())
    });
    // Here the application is the destination: what it sent went to the source.
    metrics.close(stats.received, stats.sent, flag);
    access.log(stats.received, stats.sent, error.as_deref());
}
