//! The node agent: follows the control plane's view of the pods on its node and keeps
//! the node proxy and each pod's redirection rules in line with it.
//!
//! A pod is enrolled when discovery says it runs on this node with tunnel protocol HBONE
//! (the control plane's reading of `istio.io/dataplane-mode=ambient`). Enrolling installs
//! the pod's redirection rules first, then hands its network namespace to the node proxy
//! over ZDS. From the moment the rules are in, the pod's traffic goes to the proxy or
//! nowhere: while the proxy is away, or cannot open the pod's listeners, connections are
//! refused (nothing listens on the redirect ports) rather than sent around the mesh in
//! plaintext. Un-enrolling does the reverse: redirection stops first (the rules are
//! reduced to their draining form, which keeps connections the proxy already carries
//! working), then the proxy is told `del`; once no connection in the pod depends on the
//! rules any more, they are removed entirely.
//!
//! The agent serves the ZDS socket and node proxies connect to it ([`crate::zds`]); each
//! new connection gets the full snapshot, so a restarted or upgraded node proxy learns
//! every pod at once. The newest connection receives additions; removals go to every
//! connected proxy (an old one being replaced still serves pods until it exits).
//!
//! The agent acts only on a synced discovery view, so a restart never un-enrolls pods
//! because it has not heard of them yet, and the snapshot it sends is complete. Every
//! `--reconcile-interval` it compares each pod's rules with what it installed and
//! repairs drift.
//!
//! In local mode a pod's network namespace is found at `<netns_dir>/<namespace>.<name>`
//! (`/run/netns/demo.sleep`): namespace names cannot contain a dot, so the name is
//! unambiguous.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_admin::{Handler, Page};
use ambit_core::discovery::{TunnelProtocol, Workload, WorkloadType};
use ambit_core::state::Store;
use ambit_xds::{XdsClient, XdsConfig, XdsState};
use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;

use crate::events::{Event, EventsError};
use crate::netns::{self, AddressIndex, LookupError};
use crate::plugin::{EventCommand, EventReply, PodEvent};
use crate::redirect::{Mode, RedirectError, Redirector, proxied_connections};
use crate::zds::{PodRef, ZdsError, ZdsListener, ZdsSession};

/// Everything `ambit cni` is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub xds: XdsConfig,
    /// The ZDS socket node proxies connect to.
    pub zds_socket: PathBuf,
    /// User ids allowed to connect as the node proxy (root by default).
    pub zds_allowed_uids: Vec<u32>,
    /// Where pods' network namespaces are (`<dir>/<namespace>.<name>`).
    pub netns_dir: PathBuf,
    /// How often installed rules are checked for drift and draining pods for their last
    /// connection.
    pub reconcile_interval: Duration,
    pub redirector: Redirector,
    /// `/metrics`, `/healthz/ready`, `/debug/pods`.
    pub admin_addr: SocketAddr,
    /// Where the CNI plugin reaches the agent when the runtime creates a pod (cluster
    /// mode); none in local mode.
    pub cni_socket: Option<PathBuf>,
    /// Where to look for a pod's network namespace by its addresses when neither the CNI
    /// plugin reported it nor `<netns_dir>/<namespace>.<name>` exists (cluster mode).
    pub netns_search: Option<netns::Search>,
    /// Decides, from the pod's labels, whether a pod the runtime is creating is in the
    /// mesh, before discovery has heard of it (cluster mode: the API server).
    pub enrollment: Option<Arc<dyn PodEnrollment>>,
}

/// Whether a pod is in the mesh, read from where its labels live.
pub trait PodEnrollment: Send + Sync + std::fmt::Debug {
    fn is_enrolled<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>;
}

impl AgentConfig {
    pub fn new(xds: XdsConfig, zds_socket: PathBuf) -> Self {
        Self {
            xds,
            zds_socket,
            zds_allowed_uids: vec![0],
            netns_dir: PathBuf::from("/run/netns"),
            reconcile_interval: Duration::from_secs(10),
            redirector: Redirector::default(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15030)),
            cni_socket: None,
            netns_search: None,
            enrollment: None,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Listen(std::io::Error),
    #[error(transparent)]
    Zds(#[from] ZdsError),
    #[error(transparent)]
    Events(#[from] EventsError),
}

/// Where a pod stands, as `/debug/pods` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodPhase {
    /// Rules installed and the node proxy serves it.
    Enrolled,
    /// Should be enrolled; waiting for its network namespace or the node proxy, or
    /// retrying after a failure.
    Pending,
    /// Un-enrolled; draining rules stay until the proxy's last connection in it ends.
    Draining,
}

impl PodPhase {
    fn label(self) -> &'static str {
        match self {
            PodPhase::Enrolled => "enrolled",
            PodPhase::Pending => "pending",
            PodPhase::Draining => "draining",
        }
    }
}

/// One pod the agent tracks.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub netns: PathBuf,
    pub phase: PodPhase,
    /// The last failure, while pending.
    pub error: Option<String>,
    pub attempts: u32,
}

/// What `/debug/pods` returns.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStatus {
    pub node: String,
    pub discovery_synced: bool,
    pub node_proxy_connected: bool,
    pub pods: Vec<PodStatus>,
}

#[derive(Debug, Default)]
struct Metrics {
    registry: Registry,
    pods: Family<PhaseLabel, Gauge>,
    rule_failures: Counter,
    repairs: Counter,
    proxy_connected: Gauge,
    passes: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Metrics::default();
        let r = m.registry.sub_registry_with_prefix("ambit_cni");
        r.register(
            "pods",
            "Pods tracked by the node agent, by phase",
            m.pods.clone(),
        );
        r.register(
            "rule_failures",
            "Failed attempts to install or change a pod's redirection rules",
            m.rule_failures.clone(),
        );
        r.register(
            "repairs",
            "Pods whose rules had drifted and were re-installed",
            m.repairs.clone(),
        );
        r.register(
            "node_proxy_connected",
            "Whether the ZDS session with the node proxy is up",
            m.proxy_connected.clone(),
        );
        r.register(
            "reconcile_passes",
            "Passes of the reconcile loop: one per change, event, session or periodic tick (about two a second when idle)",
            m.passes.clone(),
        );
        m
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A running node agent.
pub struct Agent {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    status: Arc<Mutex<AgentStatus>>,
    admin_addr: SocketAddr,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts discovery, the ZDS socket, the admin port and the reconcile loop on the
    /// current runtime.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let store = Arc::new(Store::new());
        let (stop, stop_rx) = watch::channel(false);
        let zds = ZdsListener::bind(&config.zds_socket, &config.zds_allowed_uids, ZDS_TIMEOUT)?;
        let (client, xds) = XdsClient::new(config.xds.clone(), store.clone());
        let metrics = Arc::new(Metrics::new());
        let status = Arc::new(Mutex::new(AgentStatus {
            node: config.xds.node_name.clone(),
            ..AgentStatus::default()
        }));
        let listener =
            ambit_admin::bind(config.admin_addr, "node agent admin port", "--admin-addr")
                .await
                .map_err(AgentError::Listen)?;
        let admin_addr = listener.local_addr().map_err(AgentError::Listen)?;
        let (events_tx, events) = tokio::sync::mpsc::channel(64);
        let events_listener = match &config.cni_socket {
            Some(path) => Some(crate::events::bind(path)?),
            None => None,
        };
        let mut tasks = vec![tokio::spawn(client.run(stop_rx.clone()))];
        if let Some(l) = events_listener {
            tasks.push(tokio::spawn(crate::events::serve(
                l,
                events_tx,
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(ambit_admin::serve(
            listener,
            handler(status.clone(), metrics.clone()),
            stop_rx.clone(),
        )));
        let (sessions_tx, sessions) = tokio::sync::mpsc::channel(4);
        tasks.push(tokio::spawn(accept_node_proxies(
            zds,
            sessions_tx,
            stop_rx.clone(),
        )));
        tracing::info!(
            node = %config.xds.node_name,
            zds = %config.zds_socket.display(),
            netns_dir = %config.netns_dir.display(),
            cni_socket = ?config.cni_socket,
            admin = %admin_addr,
            "node agent started; waiting for discovery and the node proxy"
        );
        let reconciler = Reconciler {
            config,
            store,
            xds,
            metrics,
            status: status.clone(),
            pods: BTreeMap::new(),
            sessions,
            session: None,
            previous: Vec::new(),
            fresh: false,
            swept: false,
            events: Some(events),
            reported: HashMap::new(),
            precaptured: BTreeMap::new(),
            deleted: HashSet::new(),
            index: None,
        };
        tasks.push(tokio::spawn(reconciler.run(stop_rx)));
        Ok(Self {
            stop,
            tasks,
            status,
            admin_addr,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the agent. Pods stay as they are: rules in place, the node proxy serving
    /// them; a restarted agent picks them up without disturbing traffic.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// How long the agent waits for the node proxy to answer one message.
const ZDS_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts node proxies and hands each checked session (credentials, hello) to the
/// reconciler. A refused or broken connection is logged and the next one awaited.
async fn accept_node_proxies(
    mut listener: ZdsListener,
    sessions: tokio::sync::mpsc::Sender<ZdsSession>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok(session) => {
                tracing::info!(pid = session.peer_pid(), socket = %listener.path().display(), "node proxy connected");
                if sessions.send(session).await.is_err() {
                    return;
                }
            }
            Err(e @ ZdsError::Io(_)) => {
                tracing::warn!(error = %e, "ZDS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => tracing::warn!(error = %e, "refused a node proxy connection"),
        }
    }
}

fn handler(status: Arc<Mutex<AgentStatus>>, metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |path: &str| {
        let status = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match path {
            "/metrics" => Some(Page {
                headers: Vec::new(),
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: metrics.encode(),
            }),
            "/debug/pods" => Some(Page::json(&status)),
            "/healthz/ready" => Some(if status.discovery_synced && status.node_proxy_connected {
                Page::text(StatusCode::OK, "ready\n")
            } else {
                let mut why = Vec::new();
                if !status.discovery_synced {
                    why.push("discovery has not synced");
                }
                if !status.node_proxy_connected {
                    why.push("no session with the node proxy");
                }
                Page::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", why.join("; ")),
                )
            }),
            _ => None,
        }
    })
}

/// What the agent remembers of a pod.
#[derive(Debug)]
struct Tracked {
    pod: PodRef,
    netns: PathBuf,
    state: Tracking,
}

#[derive(Debug)]
enum Tracking {
    /// Rules in place and the node proxy serves it; `listing` is what the rules looked
    /// like right after install.
    Enrolled {
        listing: Option<String>,
    },
    /// Should be enrolled but is not served yet. `rules` is the listing once the
    /// redirection rules are in place (the pod's traffic is then refused until the
    /// proxy serves it, never sent around the mesh).
    Pending {
        rules: Option<Option<String>>,
        error: String,
        attempts: u32,
        retry_at: Instant,
    },
    Draining,
}

/// Why one pod could not be enrolled or un-enrolled.
#[derive(Debug, thiserror::Error)]
enum PodError {
    #[error("no network namespace at {0} (local mode names it <namespace>.<name>)")]
    NoNetns(PathBuf),
    #[error("cannot find the pod's network namespace: {0}")]
    Lookup(LookupError),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no node proxy is connected to {0}; the pod's traffic is refused until one is")]
    NoProxy(PathBuf),
    #[error("{0}")]
    Proxy(ZdsError),
    #[error("redirection rules: {0}")]
    Rules(RedirectError),
}

struct Reconciler {
    config: AgentConfig,
    store: Arc<Store>,
    xds: watch::Receiver<XdsState>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<AgentStatus>>,
    pods: BTreeMap<String, Tracked>,
    /// Node proxies that connected, checked, waiting to become the session.
    sessions: tokio::sync::mpsc::Receiver<ZdsSession>,
    /// The newest node proxy: gets the snapshot and every change.
    session: Option<ZdsSession>,
    /// Older node proxies still connected (being replaced): they only hear removals.
    previous: Vec<ZdsSession>,
    /// The session is new and has not had its snapshot yet.
    fresh: bool,
    /// Whether leftover rules of pods not enrolled have been looked for (once).
    swept: bool,
    /// Requests from the CNI plugin; none without a CNI socket (local mode) or once the
    /// plugin server has stopped.
    events: Option<tokio::sync::mpsc::Receiver<Event>>,
    /// Network namespaces the CNI plugin reported, by `(namespace, name)`, with the
    /// sandbox (container id) that reported them.
    reported: HashMap<(String, String), Reported>,
    /// Pods captured when the runtime created them, before discovery listed them.
    precaptured: BTreeMap<(String, String), Precaptured>,
    /// Pods the runtime deleted that discovery still lists (not enrolled again).
    deleted: HashSet<(String, String)>,
    /// The last scan of the node's network namespaces, and when it was taken.
    index: Option<(Arc<AddressIndex>, Instant)>,
}

/// The sandbox the runtime last created for a pod.
#[derive(Debug, Clone)]
struct Reported {
    netns: PathBuf,
    container_id: String,
}

/// A pod whose redirection rules went in at creation (its traffic refused until the node
/// proxy serves it), waiting for discovery to list it.
#[derive(Debug)]
struct Precaptured {
    netns: PathBuf,
    listing: Option<String>,
    since: Instant,
    warned: bool,
}

/// A pod discovery says should be enrolled.
#[derive(Debug, Clone)]
struct Want {
    pod: PodRef,
    addresses: Vec<IpAddr>,
}

/// How long a pod captured at creation may wait for discovery before it is reported.
const PRECAPTURE_WARN: Duration = Duration::from_secs(120);
/// A scan of the node's namespaces is reused this long when a lookup misses.
const RESCAN_AFTER: Duration = Duration::from_secs(2);

/// Retry delay after `attempts` failures: 1 s doubling to 16 s.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1 << attempts.min(5).saturating_sub(1)).min(Duration::from_secs(30))
}

/// Resolves with the index of the first session in `previous` that closes.
async fn first_closed(previous: &[ZdsSession]) -> usize {
    if previous.is_empty() {
        return std::future::pending().await;
    }
    let mut closing: Vec<_> = previous.iter().map(|s| Box::pin(s.closed())).collect();
    std::future::poll_fn(|cx| {
        for (i, f) in closing.iter_mut().enumerate() {
            if f.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(i);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The next request from the CNI plugin; never, when there is no channel.
async fn next_event(events: &mut Option<tokio::sync::mpsc::Receiver<Event>>) -> Option<Event> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Reconciler {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_check = Instant::now();
        loop {
            let lost = async {
                match &self.session {
                    Some(s) => s.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => break,
                changed = self.xds.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tick.tick() => {}
                event = next_event(&mut self.events) => match event {
                    Some((event, reply)) => {
                        let answer = self.on_event(event).await;
                        let _ = reply.send(answer);
                    }
                    // A closed channel is ready forever: stop listening to it, or this
                    // loop would spin.
                    None => self.events = None,
                },
                _ = lost => {
                    tracing::warn!("the node proxy closed the ZDS session; enrolled pods' traffic is refused until a node proxy connects and takes the snapshot");
                    self.session = None;
                }
                i = first_closed(&self.previous) => {
                    self.previous.swap_remove(i);
                    tracing::info!("a replaced node proxy disconnected");
                }
                session = self.sessions.recv() => {
                    let Some(session) = session else { break };
                    if let Some(old) = self.session.replace(session) {
                        tracing::info!("a new node proxy connected; it takes over, the previous one only hears removals from now on");
                        self.previous.push(old);
                    }
                    self.fresh = true;
                }
            }
            self.metrics.passes.inc();
            let synced = self.xds.borrow_and_update().synced;
            if synced {
                self.converge().await;
                if last_check.elapsed() >= self.config.reconcile_interval {
                    last_check = Instant::now();
                    self.check().await;
                }
            }
            self.publish(synced);
        }
    }

    fn netns_path(&self, namespace: &str, name: &str) -> PathBuf {
        self.config.netns_dir.join(format!("{namespace}.{name}"))
    }

    /// The pods that should be enrolled: on this node, HBONE, by uid; not those the
    /// runtime has deleted.
    fn desired(&self) -> BTreeMap<String, Want> {
        let state = self.store.load();
        state
            .workloads()
            .filter(|w| self.on_this_node(w) && w.tunnel == TunnelProtocol::Hbone)
            .map(|w| {
                let want = Want {
                    pod: pod_ref(w),
                    addresses: w.addresses.to_vec(),
                };
                (w.uid.to_string(), want)
            })
            .filter(|(_, w)| !self.deleted.contains(&key(&w.pod)))
            .collect()
    }

    /// Where a pod's network namespace is: where it already was, where the CNI plugin
    /// said, `<netns_dir>/<namespace>.<name>`, or (cluster mode) the one namespace on the
    /// node holding its addresses.
    async fn locate(&mut self, want: &Want) -> Result<PathBuf, PodError> {
        let pod = &want.pod;
        // The runtime's word first: a pod re-created under the same name has a new
        // sandbox while the old one may still exist.
        if let Some(r) = self.reported.get(&key(pod)) {
            return Ok(r.netns.clone());
        }
        if let Some(t) = self.pods.get(&pod.uid)
            && t.netns.exists()
        {
            return Ok(t.netns.clone());
        }
        let named = self.netns_path(&pod.namespace, &pod.name);
        let Some(search) = self.config.netns_search.clone() else {
            return Ok(named);
        };
        if named.exists() {
            return Ok(named);
        }
        let fresh_enough = |at: &Instant| at.elapsed() < RESCAN_AFTER;
        // A cached answer is used only while its namespace still exists.
        if let Some((index, _)) = &self.index
            && let Ok(p) = index.lookup(&want.addresses)
            && p.exists()
        {
            return Ok(p);
        }
        let index = match &self.index {
            Some((index, at)) if fresh_enough(at) => index.clone(),
            _ => {
                let scanned = tokio::task::spawn_blocking(move || AddressIndex::scan(&search))
                    .await
                    .unwrap_or_default();
                let scanned = Arc::new(scanned);
                self.index = Some((scanned.clone(), Instant::now()));
                scanned
            }
        };
        index.lookup(&want.addresses).map_err(PodError::Lookup)
    }

    /// The workload discovery lists for a pod of this node, by namespace and name.
    fn discovered(&self, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        let state = self.store.load();
        state
            .workloads()
            .find(|w| {
                self.on_this_node(w)
                    && w.name.as_ref() == name
                    && w.profile.namespace.as_ref() == namespace
            })
            .cloned()
    }

    /// The CNI plugin's ADD, CHECK or DEL.
    async fn on_event(&mut self, event: PodEvent) -> EventReply {
        let k = (event.namespace.clone(), event.name.clone());
        let label = format!("{}/{}", k.0, k.1);
        let fail = |error: String| EventReply {
            captured: false,
            error: Some(error),
        };
        match event.command {
            EventCommand::Add => {
                self.deleted.remove(&k);
                let path = PathBuf::from(&event.netns);
                if !path.is_absolute() {
                    return fail(format!(
                        "CNI_NETNS {:?} is not an absolute path",
                        event.netns
                    ));
                }
                self.reported.insert(
                    k.clone(),
                    Reported {
                        netns: path.clone(),
                        container_id: event.container_id.clone(),
                    },
                );
                // A new sandbox for a pod the node proxy serves in another namespace (the
                // old sandbox's DEL missed): the proxy lets go of the old one, and the pod
                // is enrolled again in the new one.
                let moved: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, t)| key(&t.pod) == k && t.netns != path)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in moved {
                    tracing::info!(pod = %label, netns = %path.display(), "the pod has a new sandbox; moving it");
                    self.tell_del(&uid).await;
                    self.pods.remove(&uid);
                }
                let known = self
                    .discovered(&k.0, &k.1)
                    .map(|w| w.tunnel == TunnelProtocol::Hbone);
                let enrolled = match &self.config.enrollment {
                    Some(oracle) => {
                        let asked = tokio::time::timeout(
                            Duration::from_secs(10),
                            oracle.is_enrolled(&k.0, &k.1),
                        )
                        .await
                        .unwrap_or_else(|_| Err("no answer within 10s".into()));
                        match (asked, known) {
                            (Ok(e), _) => e,
                            (Err(_), Some(e)) => e,
                            (Err(e), None) => {
                                return fail(format!(
                                    "cannot tell whether pod {label} is in the mesh: {e}"
                                ));
                            }
                        }
                    }
                    None => known.unwrap_or(false),
                };
                if !enrolled {
                    return EventReply {
                        captured: false,
                        error: None,
                    };
                }
                if self.pods.values().any(|t| {
                    key(&t.pod) == k && t.netns == path && !matches!(t.state, Tracking::Draining)
                }) {
                    return EventReply {
                        captured: true,
                        error: None,
                    };
                }
                let redirector = self.config.redirector.clone();
                let p = path.clone();
                let applied = tokio::task::spawn_blocking(move || {
                    let file = File::open(&p)
                        .map_err(|e| RedirectError::Proc(format!("{}: {e}", p.display())))?;
                    redirector.apply(&file, Mode::Enrolled)?;
                    redirector.listing(&file)
                })
                .await
                .unwrap_or(Err(RedirectError::Thread));
                match applied {
                    Ok(listing) => {
                        tracing::info!(pod = %label, netns = %path.display(), "pod captured at creation; the node proxy serves it once discovery lists it");
                        self.precaptured.insert(
                            k,
                            Precaptured {
                                netns: path,
                                listing,
                                since: Instant::now(),
                                warned: false,
                            },
                        );
                        EventReply {
                            captured: true,
                            error: None,
                        }
                    }
                    Err(e) => {
                        self.metrics.rule_failures.inc();
                        fail(format!(
                            "cannot install redirection rules in {}: {e}",
                            path.display()
                        ))
                    }
                }
            }
            EventCommand::Check => {
                let path = match (
                    self.precaptured.get(&k),
                    self.pods
                        .values()
                        .find(|t| key(&t.pod) == k && !matches!(t.state, Tracking::Draining)),
                ) {
                    (Some(p), _) => p.netns.clone(),
                    (None, Some(t)) => t.netns.clone(),
                    (None, None) => {
                        return EventReply {
                            captured: false,
                            error: None,
                        };
                    }
                };
                let redirector = self.config.redirector.clone();
                let listed = tokio::task::spawn_blocking(move || {
                    let file = File::open(&path)
                        .map_err(|e| RedirectError::Proc(format!("{}: {e}", path.display())))?;
                    redirector.listing(&file)
                })
                .await
                .unwrap_or(Err(RedirectError::Thread));
                match listed {
                    Ok(Some(_)) => EventReply {
                        captured: true,
                        error: None,
                    },
                    Ok(None) => fail(format!(
                        "pod {label} is in the mesh but its redirection rules are missing; the agent repairs them within its reconcile interval"
                    )),
                    Err(e) => fail(format!("cannot read pod {label}'s redirection rules: {e}")),
                }
            }
            EventCommand::Del => {
                // Runtimes repeat DEL, and an old sandbox's may come after the new one's
                // ADD: a DEL for another sandbox than the pod's current one changes
                // nothing.
                let stale = match self.reported.get(&k) {
                    Some(r) => r.container_id != event.container_id,
                    None => {
                        !event.netns.is_empty()
                            && self
                                .pods
                                .values()
                                .any(|t| key(&t.pod) == k && t.netns != Path::new(&event.netns))
                    }
                };
                if stale {
                    tracing::debug!(pod = %label, container = %event.container_id, "DEL of an older sandbox; the pod stays");
                    return EventReply {
                        captured: false,
                        error: None,
                    };
                }
                self.reported.remove(&k);
                self.precaptured.remove(&k);
                let uids: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, t)| key(&t.pod) == k)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                if self.discovered(&k.0, &k.1).is_some() {
                    self.deleted.insert(k);
                }
                for uid in uids {
                    self.unenroll(&uid).await;
                }
                EventReply {
                    captured: false,
                    error: None,
                }
            }
        }
    }

    /// Pods captured at creation: handed over when discovery lists them, released when
    /// discovery says they are not in the mesh after all.
    async fn settle_precaptured(&mut self, desired: &BTreeMap<String, Want>) {
        let keys: Vec<(String, String)> = self.precaptured.keys().cloned().collect();
        for k in keys {
            if desired.values().any(|w| key(&w.pod) == k) {
                continue; // enroll() takes it over
            }
            match self.discovered(&k.0, &k.1) {
                Some(w) if w.tunnel != TunnelProtocol::Hbone => {
                    let Some(pre) = self.precaptured.remove(&k) else {
                        continue;
                    };
                    let redirector = self.config.redirector.clone();
                    let removed = tokio::task::spawn_blocking(move || {
                        let file = File::open(&pre.netns)
                            .map_err(|e| RedirectError::Proc(e.to_string()))?;
                        redirector.remove(&file)
                    })
                    .await
                    .unwrap_or(Err(RedirectError::Thread));
                    if let Err(e) = removed {
                        tracing::warn!(pod = %format!("{}/{}", k.0, k.1), error = %e, "cannot remove the rules of a pod discovery says is not in the mesh");
                    } else {
                        tracing::info!(pod = %format!("{}/{}", k.0, k.1), "captured at creation, but discovery says it is not in the mesh; released");
                    }
                }
                _ => {
                    if let Some(pre) = self.precaptured.get_mut(&k)
                        && !pre.warned
                        && pre.since.elapsed() > PRECAPTURE_WARN
                    {
                        pre.warned = true;
                        tracing::warn!(pod = %format!("{}/{}", k.0, k.1), "captured at creation but discovery has not listed the pod after 2 minutes; its traffic is refused until the control plane reports it (is it running and does it see this pod?)");
                    }
                }
            }
        }
        self.deleted.retain(|(ns, name)| {
            self.store
                .load()
                .workloads()
                .any(|w| w.name.as_ref() == name && w.profile.namespace.as_ref() == ns)
        });
    }

    fn on_this_node(&self, w: &Workload) -> bool {
        w.node.as_ref() == self.config.xds.node_name && w.profile.workload_type == WorkloadType::Pod
    }

    async fn converge(&mut self) {
        let desired = self.desired();
        let fresh = std::mem::take(&mut self.fresh) && self.session.is_some();
        if fresh {
            tracing::info!(
                pods = desired.len(),
                "sending the snapshot to the node proxy"
            );
        }
        let now = Instant::now();
        for (uid, want) in &desired {
            let due = match self.pods.get(uid).map(|t| &t.state) {
                None | Some(Tracking::Draining) => true,
                Some(Tracking::Pending { retry_at, .. }) => *retry_at <= now || fresh,
                Some(Tracking::Enrolled { .. }) => fresh,
            };
            if due {
                self.enroll(want.clone()).await;
            }
        }
        self.settle_precaptured(&desired).await;
        if fresh && let Some(session) = &self.session {
            match session.snapshot_sent().await {
                Ok(()) => tracing::info!(pods = desired.len(), "snapshot sent to the node proxy"),
                Err(e) => self.lost(e),
            }
        }
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, t)| {
                !desired.contains_key(*uid) && !matches!(t.state, Tracking::Draining)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.unenroll(&uid).await;
        }
        if !self.swept {
            self.swept = true;
            self.sweep(&desired).await;
        }
    }

    fn lost(&mut self, e: ZdsError) {
        tracing::warn!(error = %e, "lost the node proxy; enrolled pods' traffic is refused until a node proxy connects and takes the snapshot");
        self.session = None;
    }

    /// Opens a pod's namespace file off the async thread (a filesystem call).
    async fn open_netns(path: &Path) -> Result<File, PodError> {
        let p = path.to_owned();
        let opened = tokio::task::spawn_blocking(move || File::open(p))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        opened.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PodError::NoNetns(path.to_owned())
            } else {
                PodError::Open {
                    path: path.to_owned(),
                    source,
                }
            }
        })
    }

    async fn enroll(&mut self, want: Want) {
        let pod = want.pod.clone();
        let located = self.locate(&want).await;
        let netns = match &located {
            Ok(p) => p.clone(),
            Err(_) => self.netns_path(&pod.namespace, &pod.name),
        };
        // Rules the CNI plugin's ADD already put in are not put in twice.
        let pre = self
            .precaptured
            .remove(&key(&pod))
            .filter(|p| p.netns == netns)
            .map(|p| p.listing);
        let (was_enrolled, rules, attempts, last_error) =
            match self.pods.get(&pod.uid).map(|t| &t.state) {
                Some(Tracking::Enrolled { listing }) => (true, Some(listing.clone()), 0, None),
                Some(Tracking::Pending {
                    rules,
                    attempts,
                    error,
                    ..
                }) => (false, rules.clone(), *attempts, Some(error.clone())),
                _ => (false, pre, 0, None),
            };
        let (rules, result) = match located {
            Ok(_) => self.try_enroll(&pod, &netns, rules).await,
            Err(e) => (rules, Err(e)),
        };
        let label = format!("{}/{}", pod.namespace, pod.name);
        let state = match (rules, result) {
            (Some(listing), Ok(())) => {
                if !was_enrolled {
                    tracing::info!(pod = %label, netns = %netns.display(), attempts = attempts + 1, "pod enrolled");
                }
                Tracking::Enrolled { listing }
            }
            (rules, result) => {
                let e = match result {
                    Err(e) => e,
                    Ok(()) => PodError::Rules(RedirectError::Thread),
                };
                let attempts = attempts + 1;
                let error = e.to_string();
                // Every change of reason is logged; the same reason again only while
                // the retries are still frequent.
                if last_error.as_deref() != Some(error.as_str()) || attempts <= 3 {
                    tracing::warn!(
                        pod = %label,
                        error = %error,
                        attempts,
                        redirected = rules.is_some(),
                        retry_in_s = backoff(attempts).as_secs(),
                        "cannot enroll pod; will retry"
                    );
                }
                if let PodError::Proxy(z) = e
                    && !matches!(z, ZdsError::Refused { .. })
                {
                    self.lost(z);
                }
                Tracking::Pending {
                    rules,
                    error,
                    attempts,
                    retry_at: Instant::now() + backoff(attempts),
                }
            }
        };
        self.pods
            .insert(pod.uid.clone(), Tracked { pod, netns, state });
    }

    /// The rules first, then the node proxy. Returns the rules' listing once they are in
    /// place, whatever the proxy answered: from then on the pod's traffic reaches the
    /// proxy or is refused, never bypasses the mesh.
    async fn try_enroll(
        &self,
        pod: &PodRef,
        path: &Path,
        installed: Option<Option<String>>,
    ) -> (Option<Option<String>>, Result<(), PodError>) {
        let file = match Self::open_netns(path).await {
            Ok(f) => f,
            Err(e) => return (None, Err(e)),
        };
        let listing = match installed {
            Some(listing) => listing,
            None => {
                let redirector = self.config.redirector.clone();
                let f = match file.try_clone() {
                    Ok(f) => f,
                    Err(source) => {
                        let e = PodError::Open {
                            path: path.to_owned(),
                            source,
                        };
                        return (None, Err(e));
                    }
                };
                let applied = tokio::task::spawn_blocking(move || {
                    redirector.apply(&f, Mode::Enrolled)?;
                    redirector.listing(&f)
                })
                .await
                .unwrap_or(Err(RedirectError::Thread));
                match applied {
                    Ok(listing) => listing,
                    Err(e) => {
                        self.metrics.rule_failures.inc();
                        return (None, Err(PodError::Rules(e)));
                    }
                }
            }
        };
        let Some(session) = self.session.as_ref() else {
            let e = PodError::NoProxy(self.config.zds_socket.clone());
            return (Some(listing), Err(e));
        };
        let added = session.add(pod, file.as_fd()).await;
        (Some(listing), added.map_err(PodError::Proxy))
    }

    /// Rules reduced to draining first, then `del` to every connected node proxy.
    async fn unenroll(&mut self, uid: &str) {
        let Some(t) = self.pods.get(uid) else { return };
        let (pod, path) = (t.pod.clone(), t.netns.clone());
        let was_enrolled = matches!(t.state, Tracking::Enrolled { .. });
        let label = format!("{}/{}", pod.namespace, pod.name);
        match Self::open_netns(&path).await {
            Ok(file) => {
                let redirector = self.config.redirector.clone();
                let r =
                    tokio::task::spawn_blocking(move || redirector.apply(&file, Mode::Draining))
                        .await
                        .unwrap_or(Err(RedirectError::Thread));
                if let Err(e) = r {
                    // Leave it enrolled (the proxy still serves it) and try again.
                    self.metrics.rule_failures.inc();
                    tracing::warn!(pod = %label, error = %e, "cannot stop redirecting an un-enrolled pod; will retry");
                    return;
                }
            }
            Err(PodError::NoNetns(_)) => {
                // The pod is gone: nothing to un-redirect.
                self.tell_del(uid).await;
                self.pods.remove(uid);
                tracing::info!(pod = %label, "pod gone; forgotten");
                return;
            }
            Err(e) => {
                tracing::warn!(pod = %label, error = %e, "cannot un-enroll pod; will retry");
                return;
            }
        }
        // A proxy that misses this forgets the pod anyway when its next snapshot leaves
        // it out.
        self.tell_del(uid).await;
        if was_enrolled {
            tracing::info!(pod = %label, "pod un-enrolled; its open connections may finish");
        }
        if let Some(t) = self.pods.get_mut(uid) {
            t.state = Tracking::Draining;
        }
    }

    /// Tells every connected node proxy to stop serving a pod.
    async fn tell_del(&mut self, uid: &str) {
        if let Some(session) = &self.session
            && let Err(e) = session.del(uid).await
        {
            self.lost(e);
        }
        let mut i = 0;
        while i < self.previous.len() {
            if self.previous[i].del(uid).await.is_err() {
                self.previous.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Once after start: pods on this node that are not enrolled but still hold Ambit's
    /// rules (un-enrolled while the agent was away) are tracked as draining.
    async fn sweep(&mut self, desired: &BTreeMap<String, Want>) {
        let state = self.store.load();
        let candidates: Vec<(PodRef, PathBuf)> = state
            .workloads()
            .filter(|w| self.on_this_node(w) && !desired.contains_key(w.uid.as_ref()))
            .filter(|w| !self.pods.contains_key(w.uid.as_ref()))
            .map(|w| {
                let pod = pod_ref(w);
                let path = self.netns_path(&pod.namespace, &pod.name);
                (pod, path)
            })
            .filter(|(_, path)| path.exists())
            .collect();
        for (pod, path) in candidates {
            let redirector = self.config.redirector.clone();
            let p = path.clone();
            let listing = tokio::task::spawn_blocking(move || {
                let file = File::open(&p).map_err(|e| RedirectError::Proc(e.to_string()))?;
                redirector.listing(&file)
            })
            .await
            .unwrap_or(Err(RedirectError::Thread));
            if let Ok(Some(_)) = listing {
                tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "found rules of a pod that is not enrolled; un-enrolling it");
                self.pods.insert(
                    pod.uid.clone(),
                    Tracked {
                        pod: pod.clone(),
                        netns: path,
                        state: Tracking::Enrolled { listing: None },
                    },
                );
                self.unenroll(&pod.uid).await;
            }
        }
    }

    /// Every reconcile interval: repair drifted rules; finish draining pods.
    async fn check(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let Some(t) = self.pods.get(&uid) else {
                continue;
            };
            let path = t.netns.clone();
            let label = format!("{}/{}", t.pod.namespace, t.pod.name);
            match &t.state {
                Tracking::Enrolled { listing } => {
                    let expected = listing.clone();
                    let redirector = self.config.redirector.clone();
                    let outcome = tokio::task::spawn_blocking(move || {
                        let file =
                            File::open(&path).map_err(|e| RedirectError::Proc(e.to_string()))?;
                        let now = redirector.listing(&file)?;
                        if now.is_some() && now == expected {
                            return Ok(None);
                        }
                        redirector.apply(&file, Mode::Enrolled)?;
                        let mut fixed = redirector.listing(&file)?;
                        if expected.is_some() && fixed != expected {
                            redirector.replace(&file)?;
                            fixed = redirector.listing(&file)?;
                        }
                        Ok(Some(fixed))
                    })
                    .await
                    .unwrap_or(Err(RedirectError::Thread));
                    match outcome {
                        Ok(None) => {}
                        Ok(Some(listing)) => {
                            self.metrics.repairs.inc();
                            tracing::warn!(pod = %label, "redirection rules had drifted; repaired");
                            if let Some(t) = self.pods.get_mut(&uid) {
                                t.state = Tracking::Enrolled { listing };
                            }
                        }
                        Err(e) => {
                            self.metrics.rule_failures.inc();
                            tracing::warn!(pod = %label, error = %e, "cannot check or repair the pod's rules; will retry");
                        }
                    }
                }
                Tracking::Draining => {
                    if !path.exists() {
                        self.pods.remove(&uid);
                        continue;
                    }
                    let redirector = self.config.redirector.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        let file =
                            File::open(&path).map_err(|e| RedirectError::Proc(e.to_string()))?;
                        if proxied_connections(&file)? > 0 {
                            return Ok(false);
                        }
                        redirector.remove(&file)?;
                        Ok(true)
                    })
                    .await
                    .unwrap_or(Err(RedirectError::Thread));
                    match done {
                        Ok(true) => {
                            tracing::info!(pod = %label, "no proxied connection left; rules removed");
                            self.pods.remove(&uid);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(pod = %label, error = %e, "cannot finish un-enrolling; will retry")
                        }
                    }
                }
                Tracking::Pending { .. } => {}
            }
        }
    }

    fn publish(&self, synced: bool) {
        let mut counts: BTreeMap<&'static str, i64> =
            [("enrolled", 0), ("pending", 0), ("draining", 0)].into();
        let pods: Vec<PodStatus> = self
            .pods
            .values()
            .map(|t| {
                let (phase, error, attempts) = match &t.state {
                    Tracking::Enrolled { .. } => (PodPhase::Enrolled, None, 0),
                    Tracking::Pending {
                        error, attempts, ..
                    } => (PodPhase::Pending, Some(error.clone()), *attempts),
                    Tracking::Draining => (PodPhase::Draining, None, 0),
                };
                *counts.entry(phase.label()).or_default() += 1;
                PodStatus {
                    uid: t.pod.uid.clone(),
                    namespace: t.pod.namespace.clone(),
                    name: t.pod.name.clone(),
                    netns: t.netns.clone(),
                    phase,
                    error,
                    attempts,
                }
            })
            .collect();
        for (phase, n) in counts {
            self.metrics
                .pods
                .get_or_create(&PhaseLabel { phase })
                .set(n);
        }
        self.metrics
            .proxy_connected
            .set(i64::from(self.session.is_some()));
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.discovery_synced = synced;
        status.node_proxy_connected = self.session.is_some();
        status.pods = pods;
    }
}

fn key(pod: &PodRef) -> (String, String) {
    (pod.namespace.clone(), pod.name.clone())
}

fn pod_ref(w: &Workload) -> PodRef {
    PodRef {
        uid: w.uid.to_string(),
        name: w.name.to_string(),
        namespace: w.profile.namespace.to_string(),
        service_account: w.profile.service_account.to_string(),
    }
}

/// The uids a status lists in `phase` (for tests and the CLI).
pub fn in_phase(status: &AgentStatus, phase: PodPhase) -> HashSet<String> {
    status
        .pods
        .iter()
        .filter(|p| p.phase == phase)
        .map(|p| p.uid.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(40), Duration::from_secs(16));
    }
}
