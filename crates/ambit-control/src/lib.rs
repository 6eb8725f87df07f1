//! Ambit's control plane (`ambit control`, Istio's istiod role).
//!
//! - [`model`]: the mesh as Kubernetes-style objects, and the manifest parser.
//! - [`source`]: the watched folder of manifests that feeds the model.
//! - [`auth`]: who is calling (node tokens) and which identities they may obtain.
//! - [`ca_service`]: Istio's CSR API on the gRPC port.
//! - [`server`], [`metrics`]: the gRPC port and the metrics; the monitoring port is served
//!   by `ambit-admin`.
//!
//! [`ControlPlane::start`] wires these together; the `ambit` binary only parses flags.

pub mod auth;
pub mod ca_service;
pub mod console;
pub mod jwks;
pub mod loglimit;
pub mod metrics;
pub mod model;
pub mod server;
pub mod source;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use ambit_tls::config::{ReloadableCert, server_config_without_client_auth};
use ambit_tls::{CaError, CaOptions, CertificateAuthority};
use http::StatusCode;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Authenticator, TokenSigner};
use crate::ca_service::CaService;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::source::{FileSource, FileSourceOptions, Source, SourceStatus};
use crate::xds::server::{AdsService, Registry};
use crate::xds::snapshot::Snapshot;
use crate::xds::translate::TranslateOptions;
use ambit_admin::{Page, Ready};
use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

/// Largest gRPC request message accepted.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Sub-folder of the state folder holding the self-signed root.
pub const CA_SUBDIR: &str = "ca";

/// Everything `ambit control` is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The folder of YAML manifests (watched).
    pub manifests: PathBuf,
    /// Where the control plane keeps its keys (created with mode 0700).
    pub state_dir: PathBuf,
    /// An operator-supplied intermediate CA in Istio's `cacerts` layout, instead of the
    /// self-signed root.
    pub plugin_ca_dir: Option<PathBuf>,
    /// The gRPC port (CSR API; discovery later).
    pub grpc_addr: SocketAddr,
    /// `/metrics`, `/ready`, `/debug/*`.
    pub monitoring_addr: SocketAddr,
    pub trust_domain: String,
    /// Where mesh-wide resources live, and the namespace of the control plane's identity.
    pub root_namespace: String,
    /// Lifetime of a workload certificate when the request names none.
    pub default_cert_ttl: Duration,
    /// Longest workload certificate lifetime issued.
    pub max_cert_ttl: Duration,
    /// Extra DNS names for the serving certificate.
    pub server_names: Vec<String>,
    /// Istio's cluster ID, part of every workload's discovery name.
    pub cluster_id: String,
    /// Service hostnames are `<name>.<namespace>.svc.<domain_suffix>`.
    pub domain_suffix: String,
    /// Model changes closer together than this are pushed as one.
    pub push_debounce: Duration,
    /// The mesh console's port (`None`: no console).
    pub console_addr: Option<SocketAddr>,
    /// The console's bearer token: required when it is bound beyond loopback.
    pub console_token: Option<String>,
    /// A trace viewer's URL with `{trace_id}`, for the console's trace links.
    pub console_trace_url: Option<String>,
}

impl Config {
    pub fn new(manifests: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            manifests: manifests.into(),
            state_dir: state_dir.into(),
            plugin_ca_dir: None,
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 15012)),
            monitoring_addr: SocketAddr::from(([127, 0, 0, 1], 15014)),
            trust_domain: ambit_core::DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: "istio-system".to_owned(),
            default_cert_ttl: Duration::from_secs(24 * 3600),
            max_cert_ttl: Duration::from_secs(24 * 3600),
            server_names: Vec::new(),
            cluster_id: "Kubernetes".to_owned(),
            domain_suffix: "cluster.local".to_owned(),
            push_debounce: Duration::from_millis(100),
            // The command line serves it on 127.0.0.1:15080 by default; embedders choose.
            console_addr: None,
            console_token: None,
            console_trace_url: None,
        }
    }

    fn translate_options(&self) -> TranslateOptions {
        TranslateOptions {
            trust_domain: self.trust_domain.clone(),
            cluster_id: self.cluster_id.clone(),
            domain_suffix: self.domain_suffix.clone(),
            root_namespace: self.root_namespace.clone(),
            jwks: Default::default(),
        }
    }

    /// The control plane's own SPIFFE identity.
    pub fn identity(&self) -> Result<SpiffeId, ambit_core::IdentityError> {
        SpiffeId::new(
            self.trust_domain.clone(),
            self.root_namespace.clone(),
            "ambit-control",
        )
    }

    /// DNS names put into the serving certificate.
    pub fn serving_dns_names(&self) -> Vec<String> {
        let mut names = vec![
            "localhost".to_owned(),
            "ambit-control".to_owned(),
            format!("ambit-control.{}.svc", self.root_namespace),
            // The name Istio's node proxy uses for its CA by default.
            "istiod.istio-system.svc".to_owned(),
        ];
        for n in &self.server_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("node token key: {0}")]
    TokenKey(#[from] auth::KeyError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("serving certificate: {0}")]
    ServingCert(String),
}

/// A running control plane. Dropping it does not stop it; call [`ControlPlane::shutdown`].
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    monitoring_addr: SocketAddr,
    console_addr: Option<SocketAddr>,
    ca: Arc<CertificateAuthority>,
    source: Box<dyn Source>,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("grpc_addr", &self.grpc_addr)
            .field("monitoring_addr", &self.monitoring_addr)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Loads (or creates) the CA and the token key, reads the manifests, binds the ports
    /// and starts serving. Every problem with key material, flags or ports is an error
    /// here, before anything is served.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, None, None).await
    }

    /// Like [`ControlPlane::start`], with the model from `source` (a Kubernetes API
    /// server, say) instead of the manifest folder in `config`. The source's first model
    /// must be complete: the control plane serves it as the whole mesh. Credentials that
    /// are not Ambit node tokens go to `authenticator` when given (a cluster's
    /// service-account tokens, through TokenReview).
    pub async fn start_with_source(
        config: Config,
        source: Box<dyn Source>,
        authenticator: Option<Arc<dyn Authenticator>>,
    ) -> Result<Self, StartError> {
        Self::start_with(config, Some(source), authenticator).await
    }

    async fn start_with(
        config: Config,
        source: Option<Box<dyn Source>>,
        extra_authenticator: Option<Arc<dyn Authenticator>>,
    ) -> Result<Self, StartError> {
        let identity = config
            .identity()
            .map_err(|e| StartError::Config(e.to_string()))?;
        // Ports and manifests first: a start that fails on them leaves nothing behind (no
        // new keys in the state folder).
        let grpc_listener =
            ambit_admin::bind(config.grpc_addr, "gRPC port (CSR API)", "--grpc-addr")
                .await
                .map_err(StartError::Listen)?;
        let monitoring_listener = ambit_admin::bind(
            config.monitoring_addr,
            "monitoring port",
            "--monitoring-addr",
        )
        .await
        .map_err(StartError::Listen)?;
        let console_listener = match config.console_addr {
            None => None,
            Some(addr) => {
                if !console::server::is_local(addr)
                    && config.console_token.as_deref().is_none_or(str::is_empty)
                {
                    return Err(StartError::Config(format!(
                        "the console would be served on {addr}, beyond this machine, without a token: give it one (--console-token-file) or bind it to 127.0.0.1"
                    )));
                }
                Some(
                    ambit_admin::bind(addr, "console port", "--console-addr")
                        .await
                        .map_err(StartError::Listen)?,
                )
            }
        };
        let source: Box<dyn Source> = match source {
            Some(source) => source,
            None => Box::new(FileSource::start(FileSourceOptions::new(&config.manifests)).await?),
        };
        let ca_options = CaOptions {
            trust_domain: config.trust_domain.clone(),
            default_ttl: config.default_cert_ttl.min(config.max_cert_ttl),
            max_ttl: config.max_cert_ttl,
        };
        let ca = Arc::new(match &config.plugin_ca_dir {
            Some(dir) => CertificateAuthority::load_plugin(dir, ca_options)?,
            None => {
                CertificateAuthority::load_or_create(&config.state_dir.join(CA_SUBDIR), ca_options)?
            }
        });
        let signer = TokenSigner::load_or_create(&config.state_dir)?;
        let authenticator: Arc<dyn Authenticator> = match extra_authenticator {
            None => Arc::new(signer.verifier()),
            Some(second) => Arc::new(auth::EitherAuthenticator {
                first: Arc::new(signer.verifier()),
                second,
            }),
        };
        let metrics = Arc::new(Metrics::default());

        let grpc_addr = grpc_listener.local_addr().map_err(StartError::Listen)?;
        let monitoring_addr = monitoring_listener
            .local_addr()
            .map_err(StartError::Listen)?;
        let console_addr = match &console_listener {
            Some(l) => Some(l.local_addr().map_err(StartError::Listen)?),
            None => None,
        };

        let dns = config.serving_dns_names();
        let ips = server::serving_ips(grpc_addr);
        let serving = server::issue_serving_cert(&ca, &identity, &dns, &ips)
            .map_err(|e| StartError::ServingCert(e.to_string()))?;
        let serving = Arc::new(ReloadableCert::new(serving));
        let tls = server_config_without_client_auth(serving.clone())
            .map_err(|e| StartError::ServingCert(e.to_string()))?;

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(server::renew_serving_cert(
            ca.clone(),
            identity.clone(),
            dns,
            ips,
            serving,
            stop_rx.clone(),
        )));

        let service = CaService::new(
            ca.clone(),
            authenticator.clone(),
            source.model(),
            metrics.clone(),
        );

        // Discovery: snapshots of the translated model, served over delta ADS.
        let (snapshot_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let options = config.translate_options();
        // RequestAuthentication key sets named by URI, fetched for the translator.
        tasks.push(tokio::spawn(options.jwks.clone().run(stop_rx.clone())));
        tasks.push(tokio::spawn(xds::snapshot::publish(
            source.model(),
            options,
            config.push_debounce,
            snapshot_tx,
            stop_rx.clone(),
        )));
        // Serve discovery only once the model has been translated, so the first push a
        // node proxy gets is the whole mesh, not an empty placeholder.
        let mut first = snapshots.clone();
        if first.wait_for(|s| s.generation > 0).await.is_err() {
            return Err(StartError::Config(
                "the discovery translation stopped before its first result".into(),
            ));
        }
        // The mesh console, fed by the proxies' reports.
        let console = Arc::new(
            console::Console::new(
                source.model(),
                snapshots.clone(),
                config.translate_options(),
            )
            .with_trace_url(config.console_trace_url.clone()),
        );
        if let Some(listener) = console_listener {
            tasks.push(tokio::spawn(console::server::serve(
                listener,
                console.clone(),
                config.console_token.clone(),
                stop_rx.clone(),
            )));
        }
        let telemetry = console::telemetry::TelemetryService::new(console, authenticator.clone());
        let registry = Arc::new(Registry::default());
        let ads = AdsService::new(
            snapshots.clone(),
            source.model(),
            authenticator,
            registry.clone(),
            metrics.clone(),
        );
        let incoming = server::tls_incoming(
            grpc_listener,
            TlsAcceptor::from(Arc::new(tls)),
            stop_rx.clone(),
        );
        let mut grpc_stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .timeout(Duration::from_secs(30))
                .concurrency_limit_per_connection(64)
                .add_service(
                    // A CSR is under 1 KiB; nothing legitimate comes near this bound.
                    IstioCertificateServiceServer::new(service)
                        .max_decoding_message_size(MAX_REQUEST_BYTES),
                )
                .add_service(
                    AggregatedDiscoveryServiceServer::new(ads)
                        .max_decoding_message_size(xds::server::MAX_REQUEST_BYTES),
                )
                .add_service(
                    ambit_proto::telemetry::telemetry_server::TelemetryServer::new(telemetry)
                        .max_decoding_message_size(console::telemetry::MAX_REPORT_BYTES),
                )
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stop.changed().await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the gRPC server stopped");
            }
        }));

        // Keep the configuration and discovery gauges in step.
        let ready = Arc::new(Ready::default());
        {
            let metrics = metrics.clone();
            let mut model = source.model();
            let mut status = source.status();
            let mut snaps = snapshots.clone();
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    metrics.observe_config(&model.borrow_and_update(), &status.borrow_and_update());
                    metrics.observe_snapshot(&snaps.borrow_and_update());
                    tokio::select! {
                        r = model.changed() => if r.is_err() { return },
                        r = status.changed() => if r.is_err() { return },
                        r = snaps.changed() => if r.is_err() { return },
                        _ = stop.changed() => return,
                    }
                }
            }));
        }

        let handler = debug_pages(DebugSources {
            metrics: metrics.clone(),
            ready: ready.clone(),
            model: source.model(),
            status: source.status(),
            ca: ca.clone(),
            snapshots: snapshots.clone(),
            registry: registry.clone(),
        });
        tasks.push(tokio::spawn(ambit_admin::serve(
            monitoring_listener,
            handler,
            stop_rx,
        )));
        ready.set(true);
        tracing::info!(
            grpc = %grpc_addr,
            monitoring = %monitoring_addr,
            console = %console_addr.map_or_else(|| "off".to_owned(), |a| format!("http://{a}/")),
            trust_domain = %config.trust_domain,
            ca = ?ca.kind(),
            manifests = %config.manifests.display(),
            objects = source.model().borrow().len(),
            "control plane ready"
        );
        Ok(Self {
            grpc_addr,
            monitoring_addr,
            console_addr,
            ca,
            source,
            metrics,
            snapshots,
            registry,
            stop,
            tasks,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring_addr
    }

    /// The mesh console's address, when it is served.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console_addr
    }

    /// The trust anchors clients of this control plane (and of its certificates) use.
    pub fn roots_pem(&self) -> String {
        self.ca.roots_pem()
    }

    pub fn model(&self) -> watch::Receiver<Arc<Model>> {
        self.source.model()
    }

    pub fn source_status(&self) -> watch::Receiver<Arc<SourceStatus>> {
        self.source.status()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current discovery snapshot; `changed()` wakes on each new one.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Who is subscribed to discovery.
    pub fn subscribers(&self) -> &Registry {
        &self.registry
    }

    /// Stops serving and waits for the servers to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

struct DebugSources {
    metrics: Arc<Metrics>,
    ready: Arc<Ready>,
    model: watch::Receiver<Arc<Model>>,
    status: watch::Receiver<Arc<SourceStatus>>,
    ca: Arc<CertificateAuthority>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
}

fn debug_pages(d: DebugSources) -> ambit_admin::Handler {
    let DebugSources {
        metrics,
        ready,
        model,
        status,
        ca,
        snapshots,
        registry,
    } = d;
    Arc::new(move |path: &str| {
        Some(match path {
            "/metrics" => Page {
                headers: Vec::new(),
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: metrics.encode(),
            },
            "/ready" => {
                let reader = status.borrow().failing.clone();
                let translation = snapshots.borrow().failing.clone();
                if !ready.get() {
                    Page::text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                } else if let Some(e) = reader {
                    Page::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: the manifest reader failed ({e}); the last good model stays in force\n"
                        ),
                    )
                } else if let Some(e) = translation {
                    Page::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: discovery translation failed ({e}); the last good resources stay in force\n"
                        ),
                    )
                } else {
                    Page::text(StatusCode::OK, "ready\n")
                }
            }
            "/debug/config" => {
                let model = model.borrow().clone();
                let status = status.borrow().clone();
                Page::json(&serde_json::json!({
                    "generation": model.generation,
                    "objects": model.counts().into_iter().map(|(k, n)| (k.as_str(), n)).collect::<std::collections::BTreeMap<_, _>>(),
                    "source": &*status,
                }))
            }
            "/debug/model" => {
                let model = model.borrow().clone();
                Page::json(&model.objects().collect::<Vec<_>>())
            }
            "/debug/ca" => {
                let roots: Vec<serde_json::Value> = ca
                    .roots()
                    .iter()
                    .filter_map(|r| ambit_tls::x509::inspect(r).ok())
                    .map(|info| {
                        serde_json::json!({
                            "serial": info.serial,
                            "not_before": ambit_tls::ca::humantime_rfc3339(info.not_before),
                            "not_after": ambit_tls::ca::humantime_rfc3339(info.not_after),
                        })
                    })
                    .collect();
                Page::json(&serde_json::json!({
                    "kind": format!("{:?}", ca.kind()),
                    "trust_domain": ca.options().trust_domain,
                    "default_ttl_secs": ca.options().default_ttl.as_secs(),
                    "max_ttl_secs": ca.options().max_ttl.as_secs(),
                    "roots": roots,
                }))
            }
            "/debug/xds" => {
                let snap = snapshots.borrow().clone();
                Page::json(&serde_json::json!({
                    "generation": snap.generation,
                    "resources": {
                        "Address": snap.resources(xds::translate::ResourceType::Address).len(),
                        "Authorization": snap.resources(xds::translate::ResourceType::Authorization).len(),
                    },
                    "policy_warnings": &*snap.warnings,
                    "subscribers": registry.list(),
                }))
            }
            "/" => Page::text(
                StatusCode::OK,
                "ambit control: /metrics /ready /debug/config /debug/model /debug/ca /debug/xds\n",
            ),
            _ => return None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_which_component_is_failing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(
            CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap(),
        );
        let ready = Arc::new(Ready::default());
        ready.set(true);
        let (_model_tx, model) = watch::channel(Arc::new(Model::default()));
        let (status_tx, status) = watch::channel(Arc::new(SourceStatus::default()));
        let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let pages = debug_pages(DebugSources {
            metrics: Arc::new(Metrics::default()),
            ready,
            model,
            status,
            ca,
            snapshots,
            registry: Arc::new(Registry::default()),
        });
        let ready_page = || {
            let p = pages("/ready").unwrap();
            (p.status, p.body)
        };
        assert_eq!(ready_page().0, StatusCode::OK);
        status_tx.send_replace(Arc::new(SourceStatus {
            failing: Some("boom".into()),
            ..SourceStatus::default()
        }));
        let (code, body) = ready_page();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("manifest reader failed (boom)"), "{body}");
        status_tx.send_replace(Arc::new(SourceStatus::default()));
        let mut failing = Snapshot::default();
        failing.failing = Some("bang".into());
        snap_tx.send_replace(Arc::new(failing));
        let (code, body) = ready_page();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("translation failed (bang)"), "{body}");
    }
}
