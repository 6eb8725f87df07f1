//! Ambit's node proxy (`ambit node`, Istio's ztunnel role).
//!
//! - discovery ([`ambit_xds`]) keeps the node's view of the mesh
//!   ([`ambit_core::state::Store`]) current.
//! - [`dataplane`]: per-pod listeners inside each pod's network namespace, outbound
//!   ([`route`]) and inbound handling, HBONE both ways.
//! - [`authz`]: L4 authorization (AuthorizationPolicy, PeerAuthentication) at the
//!   destination.
//! - [`pods`]: the pods served; [`zds`]: the node agent tells which.
//! - [`metrics`], [`admin`]: Istio's TCP metrics, the admin port, readiness.
//!
//! The data path runs on its own threads ([`ambit_hbone::Workers`]: one single-threaded
//! runtime per thread, connections spread over them as they are accepted); discovery,
//! the node agent session and the admin, metrics and readiness ports run on a separate
//! runtime, so a slow scrape or a burst of discovery updates never delays a connection.

pub mod admin;
pub mod authz;
pub mod dataplane;
pub mod l7;
pub mod metrics;
pub mod pods;
pub mod sniff;
pub mod zds;

/// Where an outbound connection goes (shared with the waypoint).
pub use ambit_core::route;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::datapath::OffPathWork;
use ambit_core::state::Store;
use ambit_hbone::Workers;
use ambit_hbone::socket::Netns;
use ambit_tls::CertManager;
use ambit_tls::client::CaClient;
use ambit_tls::manager::ManagerOptions;
use serde::Serialize;
use tokio::sync::watch;

pub use ambit_hbone::admission::Limits as HboneLimits;
pub use ambit_xds::{XdsClient, XdsConfig, XdsState};
pub use dataplane::{Authorizer, DataPlaneConfig, InboundConn, PodInfo};

use crate::dataplane::DataPlane;
use crate::metrics::Metrics;
use crate::pods::Pods;

/// Everything `ambit node` is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub xds: XdsConfig,
    /// Where to ask for certificates (`host:port`); default: the discovery address.
    pub ca_address: Option<String>,
    /// The admin port (`/config_dump`), localhost only by default.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    pub readiness_addr: SocketAddr,
    /// Where the node proxy announces its admin address for `ambit config --node`.
    pub run_dir: Option<PathBuf>,
    pub dataplane: DataPlaneConfig,
    /// The node agent's socket to connect to; `None` serves only `local_pods`.
    pub zds_socket: Option<PathBuf>,
    /// Pods to serve without a node agent: their description and network namespace path.
    pub local_pods: Vec<(PodInfo, PathBuf)>,
    /// The PEM file `xds.roots` came from: re-read every [`TRUST_BUNDLE_RELOAD`] and
    /// applied to every new handshake when its certificates change.
    pub trust_bundle_file: Option<PathBuf>,
    /// Threads of the data-path runtime.
    pub worker_threads: usize,
    /// Returns the calling thread's freed memory to the operating system (the binary
    /// knows its allocator). Called on the control thread, and on every data-path thread
    /// carrying no connection, every [`NodeConfig::release_memory_every`]: an allocator
    /// keeps freed pages for reuse, and a thread gone idle after a burst of connections
    /// never allocates again to trigger that itself.
    pub release_memory: Option<fn()>,
    /// How often [`NodeConfig::release_memory`] runs ([`RELEASE_MEMORY_EVERY`]).
    pub release_memory_every: Duration,
    /// An OTLP/gRPC collector (`host:port`) for the spans of requests seen where request
    /// metrics are on; `None`: no spans.
    pub otlp_endpoint: Option<String>,
}

/// How often [`NodeConfig::trust_bundle_file`] is re-read.
pub const TRUST_BUNDLE_RELOAD: Duration = Duration::from_secs(10);

/// How often [`NodeConfig::release_memory`] runs.
pub const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(5);

/// Checks that `work` may run on this thread (see [`ambit_core::datapath`]); logs a
/// violation, which `ambit_node_data_path_violations_total` also counts.
pub fn off_data_path(work: OffPathWork) {
    if !ambit_core::datapath::check(work) {
        tracing::error!(
            work = work.as_str(),
            connections = ambit_core::datapath::carried_connections(),
            "work that must stay off the data path ran on a data-path thread, delaying its connections (a defect: please report it)"
        );
    }
}

impl NodeConfig {
    /// Istio's ports and defaults around a discovery configuration.
    pub fn new(xds: XdsConfig) -> Self {
        Self {
            xds,
            ca_address: None,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            run_dir: None,
            dataplane: DataPlaneConfig::default(),
            zds_socket: None,
            local_pods: Vec::new(),
            trust_bundle_file: None,
            worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            release_memory: None,
            release_memory_every: RELEASE_MEMORY_EVERY,
            otlp_endpoint: None,
        }
    }
}

/// Why the node proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("cannot write {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("certificate authority client: {0}")]
    Ca(String),
    #[error("pod {pod}: {reason}")]
    Pod { pod: String, reason: String },
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
}

/// What `<run_dir>/nodes/<node>.json` holds.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Announcement {
    pub node: String,
    pub admin: SocketAddr,
    pub pid: u32,
}

/// A running node proxy.
pub struct NodeProxy {
    store: Arc<Store>,
    xds: watch::Receiver<XdsState>,
    pods: Arc<Pods>,
    metrics: Arc<Metrics>,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    announcement: Option<PathBuf>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    runtimes: Option<(Workers, tokio::runtime::Runtime)>,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
    rt: &tokio::runtime::Handle,
) -> Result<tokio::net::TcpListener, StartError> {
    rt.spawn(async move { ambit_admin::bind(addr, what, flag).await })
        .await
        .map_err(|e| StartError::Listen(std::io::Error::other(e)))?
        .map_err(StartError::Listen)
}

/// Raises the open-file limit to the hard limit: every proxied connection holds two or
/// three descriptors, and the usual soft limit (1024) would cap a node at a few hundred
/// connections. Returns the new limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard)
}

/// Descriptors the node proxy may need at its configured caps: two sockets for each of
/// the HBONE connections it admits (the tunnel and the application's side), plus room for
/// listeners, outbound connections' pools, logs and the admin ports.
pub fn fd_needed(limits: &HboneLimits) -> u64 {
    2 * limits.connections as u64 + 4096
}

impl NodeProxy {
    pub async fn start(config: NodeConfig) -> Result<Self, StartError> {
        let needed = fd_needed(&config.dataplane.hbone_limits);
        match raise_fd_limit() {
            Ok(limit) if limit < needed => tracing::warn!(
                limit,
                needed,
                "the open-file limit is below what the connection caps need: past about limit/2 proxied connections (two sockets each), new ones fail. Raise the hard limit: LimitNOFILE=1048576 in the systemd unit, `ulimit -Hn 1048576` in the shell that starts it, or --ulimit nofile=1048576 for a container"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                needed,
                "cannot raise the open-file limit to its hard limit; raise the soft limit (`ulimit -n`) before starting"
            ),
        }
        let data =
            Workers::start(config.worker_threads, "ambit-data").map_err(StartError::Runtime)?;
        let control = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ambit-control")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let ch = control.handle().clone();
        if let Some(release) = config.release_memory {
            let every = config.release_memory_every;
            let ticks = move || {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            };
            // A data thread collects only while it carries no connection: a collection
            // (and the page faults that follow it) would delay every connection on the
            // thread. A busy thread reuses its free pages anyway; one gone idle after a
            // burst is the one holding memory nobody uses.
            let workers = data.clone();
            data.spawn_each(move |i| {
                let (workers, mut tick) = (workers.clone(), ticks());
                async move {
                    loop {
                        tick.tick().await;
                        if workers.load(i) == 0 {
                            off_data_path(OffPathWork::AllocatorCollection);
                            release();
                        }
                    }
                }
            });
            let mut tick = ticks();
            ch.spawn(async move {
                loop {
                    tick.tick().await;
                    release();
                }
            });
        }

        let store = Arc::new(Store::new());
        let metrics = Arc::new(Metrics::default());
        let (stop, stop_rx) = watch::channel(false);
        let node = config.xds.node_name.clone();
        // One bundle for every TLS configuration of the process (HBONE both ways, issued
        // chains, the control plane), so a reload reaches all of them.
        let bundle = config.xds.roots.clone();
        if bundle.roots().is_empty() {
            return Err(StartError::Bundle("the trust bundle is empty".into()));
        }

        let ca = {
            let _g = ch.enter();
            CaClient::new(
                config.ca_address.as_deref().unwrap_or(&config.xds.address),
                &config.xds.roots,
                config.xds.server_name.as_deref(),
                config.xds.token.clone(),
                Duration::from_secs(10),
            )
            .map_err(|e| StartError::Ca(e.to_string()))?
        };
        let certs = CertManager::new(
            Arc::new(ca),
            ManagerOptions {
                trust_bundle: Some(bundle.clone()),
                // Certificate work stays off the data path.
                runtime: Some(ch.clone()),
                ..ManagerOptions::default()
            },
        );
        // One set of limits for every pod's port 15008.
        let admission = {
            // Weak: the metrics hold the admission (for its gauges).
            let metrics = Arc::downgrade(&metrics);
            Arc::new(ambit_hbone::admission::Admission::new(
                config.dataplane.hbone_limits,
                move |r| {
                    if let Some(m) = metrics.upgrade() {
                        m.hbone_refused(r.as_str());
                    }
                },
            ))
        };
        let _ = metrics.admission.set(admission.clone());
        let _ = metrics.workers.set(data.clone());
        let mut dataplane = config.dataplane.clone();
        dataplane.hbone_server.admission = Some(admission);
        let tracer = config.otlp_endpoint.as_deref().map(|endpoint| {
            use ambit_xds::trace::{Tracer, attr};
            // The exporter runs on the control thread.
            let _on_control = ch.enter();
            l7::NodeTracer {
                tracer: Tracer::start(
                    endpoint,
                    "ambit-node",
                    vec![
                        attr("service.name", format!("ambit-node.{node}")),
                        attr("k8s.node.name", node.clone()),
                        attr("istio.mesh_id", config.dataplane.trust_domain.clone()),
                    ],
                    stop_rx.clone(),
                ),
                node: node.as_str().into(),
                mesh_id: config.dataplane.trust_domain.as_str().into(),
            }
        });
        let dp = Arc::new(
            DataPlane::new(
                dataplane,
                store.clone(),
                certs.clone(),
                bundle.clone(),
                metrics.clone(),
                Arc::new(authz::Policies::new(
                    config.dataplane.trust_domains(),
                    metrics.clone(),
                )),
            )
            .with_tracer(tracer.clone()),
        );
        let pods = Arc::new(Pods::new(dp, data.clone()));

        let (client, xds) = XdsClient::new(config.xds.clone(), store.clone());
        let mut tasks = vec![ch.spawn(client.run(stop_rx.clone()))];
        // Reports for the control plane's mesh console (on the control thread).
        {
            let metrics = metrics.clone();
            let certs = certs.clone();
            tasks.push(ch.spawn(ambit_xds::telemetry::report(
                config.xds.clone(),
                ambit_xds::telemetry::Source {
                    component: "node",
                    name: node.clone(),
                    metrics: Arc::new(move || metrics.encode()),
                    certificates: Arc::new(move || ambit_xds::telemetry::cert_infos(&certs)),
                    traces: tracer.map(|t| {
                        let t = t.tracer;
                        Arc::new(move || t.recent())
                            as Arc<
                                dyn Fn() -> Vec<ambit_proto::telemetry::TracedRequest>
                                    + Send
                                    + Sync,
                            >
                    }),
                },
                stop_rx.clone(),
            )));
        }
        if let Some(path) = &config.trust_bundle_file {
            tasks.push(ch.spawn(ambit_tls::bundle::follow_file(
                bundle.clone(),
                path.clone(),
                TRUST_BUNDLE_RELOAD,
                stop_rx.clone(),
            )));
        }
        {
            // The data path's gate opens with the first complete sync.
            let dp = pods.dataplane().clone();
            let mut xds = xds.clone();
            ch.spawn(async move {
                if xds.wait_for(|s| s.synced).await.is_ok() {
                    dp.synced.open();
                    tracing::info!("discovery synced; serving connections");
                }
            });
        }
        {
            // Series of workloads that are gone are dropped, so pod churn does not grow
            // the metrics without bound.
            let (metrics, store) = (metrics.clone(), store.clone());
            let retention = config.dataplane.metrics_retention;
            let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
            ch.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let state = store.load();
                    let present: std::collections::HashSet<metrics::WorkloadKey<'_>> = state
                        .workloads()
                        .map(|w| metrics::WorkloadKey::of(w))
                        .collect();
                    let removed = metrics.forget_gone(|k| present.contains(k), retention);
                    if removed > 0 {
                        tracing::debug!(
                            removed,
                            "metric series of workloads that are gone removed"
                        );
                    }
                }
            });
        }
        ch.spawn(authz::follow_policy_changes(
            store.clone(),
            xds.clone(),
            pods.dataplane().clone(),
        ));

        let admin = bind(config.admin_addr, "admin port", "--admin-addr", &ch).await?;
        let admin_addr = admin.local_addr().map_err(StartError::Listen)?;
        let zds_state = config.zds_socket.as_ref().map(|path| {
            watch::Sender::new(zds::ZdsState {
                socket: path.clone(),
                ..zds::ZdsState::default()
            })
        });
        let handler = admin::handler(admin::Sources {
            node: node.clone(),
            store: store.clone(),
            xds: xds.clone(),
            certificates: Some(certs),
            pods: pods.clone(),
            zds: zds_state.as_ref().map(watch::Sender::subscribe),
        });
        tasks.push(ch.spawn(ambit_admin::serve(admin, handler, stop_rx.clone())));

        let metrics_listener =
            bind(config.metrics_addr, "metrics port", "--metrics-addr", &ch).await?;
        let metrics_addr = metrics_listener.local_addr().map_err(StartError::Listen)?;
        tasks.push(ch.spawn(ambit_admin::serve(
            metrics_listener,
            admin::metrics_handler(metrics.clone()),
            stop_rx.clone(),
        )));
        let ready_listener = bind(
            config.readiness_addr,
            "readiness port",
            "--readiness-addr",
            &ch,
        )
        .await?;
        let readiness_addr = ready_listener.local_addr().map_err(StartError::Listen)?;
        tasks.push(ch.spawn(ambit_admin::serve(
            ready_listener,
            admin::readiness_handler(
                xds.clone(),
                zds_state.as_ref().map(watch::Sender::subscribe),
                pods.clone(),
            ),
            stop_rx.clone(),
        )));

        if let (Some(path), Some(state)) = (&config.zds_socket, zds_state) {
            tasks.push(ch.spawn(zds::run(path.clone(), pods.clone(), state, stop_rx.clone())));
        }
        for (info, path) in &config.local_pods {
            let pod = format!("{}/{}", info.namespace, info.name);
            let netns = Netns::open(path).map_err(|e| StartError::Pod {
                pod: pod.clone(),
                reason: e.to_string(),
            })?;
            pods.add(info.clone(), netns)
                .map_err(|reason| StartError::Pod { pod, reason })?;
        }

        let announcement = match &config.run_dir {
            Some(dir) => Some(announce(dir, &node, admin_addr)?),
            None => None,
        };
        tracing::info!(
            %node,
            admin = %admin_addr,
            metrics = %metrics_addr,
            readiness = %readiness_addr,
            pods = config.local_pods.len(),
            "node proxy started"
        );
        Ok(Self {
            store,
            xds,
            pods,
            metrics,
            admin_addr,
            metrics_addr,
            readiness_addr,
            announcement,
            stop,
            tasks,
            runtimes: Some((data, control)),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn xds_state(&self) -> watch::Receiver<XdsState> {
        self.xds.clone()
    }

    pub fn pods(&self) -> &Arc<Pods> {
        &self.pods
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness_addr
    }

    /// Stops serving pods (draining their connections), then everything else.
    pub async fn shutdown(mut self) {
        self.pods.clear().await;
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Some(path) = self.announcement.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for NodeProxy {
    fn drop(&mut self) {
        if let Some((data, control)) = self.runtimes.take() {
            // Dropping a runtime waits for its tasks; from inside another runtime that is
            // not allowed, so let them wind down in the background.
            data.shutdown();
            control.shutdown_background();
        }
    }
}

/// The file `ambit config --node <node>` reads to find this proxy's admin port.
pub fn announcement_path(run_dir: &std::path::Path, node: &str) -> PathBuf {
    run_dir.join("nodes").join(format!("{node}.json"))
}

fn announce(
    run_dir: &std::path::Path,
    node: &str,
    admin: SocketAddr,
) -> Result<PathBuf, StartError> {
    let path = announcement_path(run_dir, node);
    let err = |source| StartError::RunDir {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let body = serde_json::to_vec_pretty(&Announcement {
        node: node.to_owned(),
        admin,
        pid: std::process::id(),
    })
    .map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&path, body).map_err(err)?;
    Ok(path)
}
