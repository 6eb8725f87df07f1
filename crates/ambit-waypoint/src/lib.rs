//! Ambit's waypoint (`ambit waypoint`): the optional, shared L7 proxy of ambient mode.
//!
//! A node proxy sends traffic for a service (or workload) bound to this waypoint here,
//! over HBONE, with the original destination as the CONNECT authority. The waypoint:
//!
//! - [`serve`]: terminates HBONE (the client's SPIFFE ID is the source principal),
//!   accepts only authorities it serves (a bound service's VIP and port, or a bound
//!   workload's IP: it is not an open proxy), then detects the protocol inside the
//!   tunnel: HTTP/1.1 or HTTP/2 (prior knowledge) to [`http`], anything else as opaque
//!   TCP.
//! - [`http`]: per request, picks a ready endpoint of the service and forwards the
//!   request over HBONE to that endpoint's node proxy with the waypoint's own identity,
//!   keeping upstream connections pooled ([`upstream`]). Bodies stream both ways; no
//!   request or response is buffered whole.
//! - [`metrics`]: Istio's HTTP metrics (`istio_requests_total`, ...) with
//!   `reporter="waypoint"` and Istio's label set ([`ambit_core::telemetry`], shared with
//!   the node proxy), and one access-log line per request.
//!
//! Discovery and certificates are the node proxy's ([`ambit_xds`], [`ambit_tls`]); the
//! HBONE server and client are [`ambit_hbone`]'s; endpoints are chosen by the node
//! proxy's routing ([`ambit_core::route`]), so both decide the same way.

pub mod admin;
mod authn;
pub mod authz;
pub mod extauthz;
pub mod headers;
pub mod http;
pub mod metrics;
mod routing;
pub mod serve;
pub mod tee;
/// Span export (shared with the node proxy).
pub use ambit_xds::trace;
pub mod traffic;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_core::state::Store;
use ambit_hbone::socket::{Netns, SocketOptions};
use ambit_hbone::{Pool, PoolConfig, Server, ServerConfig};
use ambit_tls::client::CaClient;
use ambit_tls::manager::ManagerOptions;
use ambit_tls::spiffe::hbone_server_config;
use ambit_tls::{CertHandle, CertManager};
use ambit_xds::{XdsClient, XdsConfig, XdsState};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Everything `ambit waypoint` is configured with.
#[derive(Debug, Clone)]
pub struct WaypointConfig {
    pub xds: XdsConfig,
    /// Where to ask for certificates (`host:port`); default: the discovery address.
    pub ca_address: Option<String>,
    /// The waypoint's Gateway: its name (also its service account) and namespace.
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    /// Other trust domains whose clients are the mesh's own.
    pub trust_domain_aliases: Vec<String>,
    /// The network of the mesh's addresses (Istio's default network is empty).
    pub network: String,
    /// HBONE (15008): what node proxies send here.
    pub hbone_addr: SocketAddr,
    /// `/config_dump`, localhost only by default.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    pub readiness_addr: SocketAddr,
    /// Open every socket (listeners and upstream connections) in this network namespace
    /// (tests run a waypoint inside a pod's namespace from the test process; the
    /// binary runs inside its pod and leaves it unset).
    pub netns: Option<Netns>,
    /// The PEM file `xds.roots` came from, re-read every 10 s.
    pub trust_bundle_file: Option<PathBuf>,
    pub limits: Limits,
    /// `host:port` of an OTLP/gRPC collector for the waypoint's spans; `None`: no traces.
    pub otlp_endpoint: Option<String>,
    /// The share of requests starting a trace here that are sampled, in percent
    /// (Istio's default: 1). A request that arrives in a trace keeps its sampled flag.
    pub trace_sampling: f64,
}

/// Bounds on what one client can make the waypoint hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long to wait for a tunnel's first bytes to tell HTTP from other TCP; a
    /// protocol where the server speaks first is opaque TCP after this.
    pub sniff_timeout: Duration,
    /// A request's headers must arrive within this (a slow client is closed: 408 on
    /// HTTP/1.1).
    pub header_timeout: Duration,
    /// Largest request head (HTTP/1.1: request line and headers; HTTP/2: header list);
    /// beyond it, 431.
    pub max_header_bytes: usize,
    /// Opening an upstream tunnel (TCP, TLS, HTTP/2, CONNECT) must finish within this.
    pub connect_timeout: Duration,
    /// Idle pooled HTTP/1.1 connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            sniff_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_idle_per_endpoint: 64,
        }
    }
}

impl WaypointConfig {
    /// Istio's ports and defaults around a discovery configuration.
    pub fn new(xds: XdsConfig, namespace: &str, name: &str) -> Self {
        Self {
            xds,
            ca_address: None,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            trust_domain: ambit_core::DEFAULT_TRUST_DOMAIN.to_owned(),
            trust_domain_aliases: Vec::new(),
            network: String::new(),
            hbone_addr: SocketAddr::from(([0, 0, 0, 0], ambit_hbone::HBONE_PORT)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            netns: None,
            trust_bundle_file: None,
            limits: Limits::default(),
            otlp_endpoint: None,
            trace_sampling: 1.0,
        }
    }

    /// The waypoint's identity: `spiffe://<td>/ns/<namespace>/sa/<name>`, as Istio's.
    pub fn identity(&self) -> Result<SpiffeId, StartError> {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.name)
            .map_err(|e| StartError::Identity(e.to_string()))
    }

    pub(crate) fn trust_domains(&self) -> Vec<String> {
        std::iter::once(self.trust_domain.clone())
            .chain(self.trust_domain_aliases.iter().cloned())
            .collect()
    }

    fn socket(&self) -> SocketOptions {
        SocketOptions {
            netns: self.netns.clone(),
            ..SocketOptions::default()
        }
    }
}

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("the waypoint's identity: {0}")]
    Identity(String),
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("certificate authority client: {0}")]
    Ca(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What every connection and request of the waypoint reads.
pub(crate) struct Shared {
    pub config: WaypointConfig,
    pub identity: SpiffeId,
    pub store: Arc<Store>,
    pub cert: CertHandle,
    /// Keeps `cert` renewed (a handle alone does not).
    pub _certs: CertManager,
    pub pool: Pool,
    pub upstreams: upstream::Upstreams,
    pub in_flight: upstream::InFlight,
    /// DestinationRule and LocalRateLimit state.
    pub traffic: traffic::Traffic,
    pub metrics: Arc<Metrics>,
    /// Connections are refused until discovery has synced: before that the waypoint
    /// cannot tell what it serves.
    pub synced: watch::Receiver<XdsState>,
    /// The mesh's trust domain, then its aliases.
    pub trust_domains: Vec<String>,
    /// The span exporter, when traces are on.
    pub tracer: Option<Arc<trace::Tracer>>,
    /// Traces started here are sampled at this rate (per million).
    pub sample_per_million: u32,
    /// JSON Web Tokens verified recently (RequestAuthentication).
    pub tokens: ambit_core::jwt::TokenCache,
}

/// A running waypoint.
pub struct Waypoint {
    shared: Arc<Shared>,
    xds: watch::Receiver<XdsState>,
    hbone_addr: SocketAddr,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    server: Option<ambit_hbone::server::ServerHandle>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Waypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waypoint")
            .field("identity", &self.shared.identity)
            .field("hbone_addr", &self.hbone_addr)
            .finish_non_exhaustive()
    }
}

fn listen(
    addr: SocketAddr,
    what: &str,
    flag: &str,
    opts: &SocketOptions,
) -> Result<tokio::net::TcpListener, StartError> {
    let opts = SocketOptions {
        reuse_port: false,
        ..opts.clone()
    };
    ambit_hbone::socket::listen(addr, &opts, 1024).map_err(|e| {
        StartError::Listen(std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for the {what}: {e}; free the port or choose another with {flag}"),
        ))
    })
}

impl Waypoint {
    /// Binds every port, then starts discovery, the certificate and the HBONE server on
    /// the current (multi-threaded) runtime.
    pub async fn start(config: WaypointConfig) -> Result<Self, StartError> {
        let identity = config.identity()?;
        let bundle = config.xds.roots.clone();
        if bundle.roots().is_empty() {
            return Err(StartError::Bundle("the trust bundle is empty".into()));
        }
        let socket = config.socket();
        // Ports first: a start that fails asks the control plane for nothing.
        let hbone = listen(config.hbone_addr, "HBONE port", "--hbone-addr", &socket)?;
        let admin = listen(config.admin_addr, "admin port", "--admin-addr", &socket)?;
        let metrics_l = listen(
            config.metrics_addr,
            "metrics port",
            "--metrics-addr",
            &socket,
        )?;
        let ready_l = listen(
            config.readiness_addr,
            "readiness port",
            "--readiness-addr",
            &socket,
        )?;
        let local = |l: &tokio::net::TcpListener| l.local_addr().map_err(StartError::Listen);
        let (hbone_addr, admin_addr, metrics_addr, readiness_addr) = (
            local(&hbone)?,
            local(&admin)?,
            local(&metrics_l)?,
            local(&ready_l)?,
        );

        let ca = CaClient::new(
            config.ca_address.as_deref().unwrap_or(&config.xds.address),
            &config.xds.roots,
            config.xds.server_name.as_deref(),
            config.xds.token.clone(),
            Duration::from_secs(10),
        )
        .map_err(|e| StartError::Ca(e.to_string()))?;
        let certs = CertManager::new(
            Arc::new(ca),
            ManagerOptions {
                trust_bundle: Some(bundle.clone()),
                ..ManagerOptions::default()
            },
        );
        let cert = certs.handle(&identity);
        {
            let cert = cert.clone();
            tokio::spawn(async move {
                if let Err(e) = cert.get().await {
                    tracing::warn!(error = %e, "no certificate for the waypoint yet; will retry");
                }
            });
        }

        let store = Arc::new(Store::new());
        let (stop, stop_rx) = watch::channel(false);
        let (client, xds) = XdsClient::with_kinds(
            config.xds.clone(),
            store.clone(),
            &ambit_xds::ResourceKind::WAYPOINT,
        );
        let client = client.for_waypoint(format!("{}/{}", config.namespace, config.name));
        let mut tasks = vec![tokio::spawn(client.run(stop_rx.clone()))];
        if let Some(path) = &config.trust_bundle_file {
            tasks.push(tokio::spawn(ambit_tls::bundle::follow_file(
                bundle.clone(),
                path.clone(),
                Duration::from_secs(10),
                stop_rx.clone(),
            )));
        }
        let metrics = Arc::new(Metrics::default());
        if !(0.0..=100.0).contains(&config.trace_sampling) || config.trace_sampling.is_nan() {
            return Err(StartError::Config(format!(
                "trace sampling {} is not a percentage (0 to 100)",
                config.trace_sampling
            )));
        }
        let sample_per_million = (config.trace_sampling * 10_000.0).round() as u32;
        let tracer = config.otlp_endpoint.as_deref().map(|endpoint| {
            trace::Tracer::start(
                endpoint,
                "ambit-waypoint",
                vec![
                    trace::attr(
                        "service.name",
                        format!("{}.{}", config.name, config.namespace),
                    ),
                    trace::attr("k8s.namespace.name", config.namespace.clone()),
                    trace::attr("istio.mesh_id", config.trust_domain.clone()),
                ],
                stop_rx.clone(),
            )
        });
        let shared = Arc::new(Shared {
            tracer,
            sample_per_million,
            tokens: Default::default(),
            pool: Pool::new(PoolConfig::default(), bundle.clone()),
            upstreams: upstream::Upstreams::default(),
            in_flight: upstream::InFlight::default(),
            traffic: traffic::Traffic::default(),
            identity: identity.clone(),
            store,
            cert: cert.clone(),
            _certs: certs,
            metrics: metrics.clone(),
            synced: xds.clone(),
            trust_domains: config.trust_domains(),
            config,
        });

        let tls = hbone_server_config(
            Arc::new(OwnCert(cert)),
            &bundle,
            &shared.config.trust_domains(),
        )
        .map_err(|e| StartError::Ca(e.to_string()))?;
        let server_config = ServerConfig {
            admission: Some(Arc::new(ambit_hbone::admission::Admission::new(
                ambit_hbone::admission::Limits::default(),
                |_| {},
            ))),
            ..ServerConfig::default()
        };
        let server =
            Server::new(tls, server_config).serve(hbone, Arc::new(serve::Handler(shared.clone())));

        tasks.push(tokio::spawn(ambit_admin::serve(
            admin,
            admin::handler(shared.clone()),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(ambit_admin::serve(
            metrics_l,
            admin::metrics_handler(metrics),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(ambit_admin::serve(
            ready_l,
            admin::readiness_handler(shared.clone()),
            stop_rx.clone(),
        )));
        // Reports for the control plane's mesh console.
        {
            let metrics = shared.metrics.clone();
            let shared2 = shared.clone();
            tasks.push(tokio::spawn(ambit_xds::telemetry::report(
                shared.config.xds.clone(),
                ambit_xds::telemetry::Source {
                    component: "waypoint",
                    name: format!("{}/{}", shared.config.namespace, shared.config.name),
                    metrics: Arc::new(move || metrics.encode()),
                    certificates: Arc::new(move || {
                        ambit_xds::telemetry::cert_infos(&shared2._certs)
                    }),
                    traces: shared.tracer.clone().map(|t| {
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
        tasks.push(tokio::spawn(upstream::sweep(shared.clone(), stop_rx)));
        tracing::info!(
            identity = %identity,
            hbone = %hbone_addr,
            metrics = %metrics_addr,
            readiness = %readiness_addr,
            "waypoint started"
        );
        Ok(Self {
            shared,
            xds,
            hbone_addr,
            admin_addr,
            metrics_addr,
            readiness_addr,
            server: Some(server),
            stop,
            tasks,
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.shared.identity
    }

    pub fn hbone_addr(&self) -> SocketAddr {
        self.hbone_addr
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

    /// The mesh as the waypoint sees it now.
    pub fn state(&self) -> Arc<ambit_core::state::State> {
        self.shared.store.load()
    }

    /// Discovery's state (synced, errors).
    pub fn xds(&self) -> watch::Receiver<XdsState> {
        self.xds.clone()
    }

    /// Whether the waypoint serves: discovery synced and its certificate obtained.
    pub fn is_ready(&self) -> bool {
        admin::not_ready(&self.shared).is_empty()
    }

    /// The Prometheus page.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Stops accepting, lets open tunnels finish for up to `deadline`, then stops.
    pub async fn shutdown(mut self, deadline: Duration) {
        if let Some(server) = self.server.take() {
            server.shutdown(deadline).await;
        }
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves the waypoint's current certificate to HBONE handshakes; none yet: the
/// handshake fails and the client retries.
#[derive(Debug)]
struct OwnCert(CertHandle);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current().map(|c| c.certified_key.clone())
    }
}
