//! Ambit's end-to-end tests (in `tests/`) and the small mesh they run on: network
//! namespaces on a bridge (ambit-testenv), a control plane with its CA, node proxies and
//! node agents, all in the test process. Pods are real network namespaces with the
//! redirection rules installed; applications are tasks listening and connecting inside
//! them.
//!
//! Needs root, iproute2, nftables and tcpdump (CI installs them); without them each test
//! fails saying what is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod xds_filter;

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ambit_cni::agent::{Agent, AgentConfig, PodPhase};
use ambit_control::auth::TokenSigner;
use ambit_control::{Config, ControlPlane};
use ambit_node::{NodeConfig, NodeProxy, PodInfo, XdsConfig};
use ambit_testenv::{Pod, Topology};
use ambit_tls::client::TokenSource;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The port the test applications listen on.
pub const APP_PORT: u16 = 8080;
/// The service VIP in front of the `echo` pods, and its port.
pub const ECHO_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)), 80);

/// A pod of the test mesh.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: &'static str,
    pub namespace: &'static str,
    pub service_account: &'static str,
    pub app: &'static str,
    pub node: &'static str,
    pub ip: Ipv4Addr,
    /// Redirection rules installed and served by its node proxy.
    pub enrolled: bool,
    /// Written into the manifests (a pod outside them is unknown to the mesh).
    pub in_model: bool,
}

impl PodSpec {
    pub fn uid(&self) -> String {
        format!("uid-{}-{}", self.namespace, self.name)
    }

    pub fn info(&self) -> PodInfo {
        PodInfo {
            uid: self.uid(),
            name: self.name.into(),
            namespace: self.namespace.into(),
            service_account: self.service_account.into(),
        }
    }

    pub fn spiffe(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// The usual cast: an enrolled client on node-a, an enrolled echo server on node-b, an
/// un-enrolled client on node-a (namespace without the ambient label) and a host
/// outside the mesh.
pub fn cast() -> Vec<PodSpec> {
    vec![
        PodSpec {
            name: "sleep",
            namespace: "demo",
            service_account: "sleep",
            app: "sleep",
            node: "node-a",
            ip: Ipv4Addr::new(198, 18, 1, 10),
            enrolled: true,
            in_model: true,
        },
        PodSpec {
            name: "echo-1",
            namespace: "demo",
            service_account: "echo",
            app: "echo",
            node: "node-b",
            ip: Ipv4Addr::new(198, 18, 2, 10),
            enrolled: true,
            in_model: true,
        },
        PodSpec {
            name: "legacy",
            namespace: "legacy",
            service_account: "legacy",
            app: "legacy",
            node: "node-a",
            ip: Ipv4Addr::new(198, 18, 1, 20),
            enrolled: false,
            in_model: true,
        },
        PodSpec {
            name: "outside",
            namespace: "none",
            service_account: "none",
            app: "outside",
            node: "node-c",
            ip: Ipv4Addr::new(198, 18, 3, 10),
            enrolled: false,
            in_model: false,
        },
    ]
}

fn manifests(pods: &[PodSpec], ambient: bool) -> String {
    let label = if ambient {
        "labels: {istio.io/dataplane-mode: ambient}"
    } else {
        "labels: {}"
    };
    let mut out = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: demo, {label}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: prod, {label}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: legacy}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  selector: {{app: echo}}
  clusterIP: 198.19.0.10
  ports: [{{name: tcp-echo, port: 80, targetPort: 8080}}]
",
    );
    for p in pods.iter().filter(|p| p.in_model) {
        out.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, ports: [{{containerPort: {port}}}]}}]}}
status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}
",
            name = p.name,
            ns = p.namespace,
            app = p.app,
            node = p.node,
            sa = p.service_account,
            ip = p.ip,
            port = APP_PORT,
        ));
    }
    out
}

/// The running mesh. Agents and node proxies stop before the namespaces are deleted.
pub struct Mesh {
    pub specs: Vec<PodSpec>,
    pub agents: HashMap<&'static str, Agent>,
    pub nodes: HashMap<&'static str, NodeProxy>,
    pub cp: ControlPlane,
    pub dir: tempfile::TempDir,
    pub pods: HashMap<&'static str, Pod>,
    pub topo: Topology,
}

impl Mesh {
    /// Builds the topology, starts the control plane and one node proxy per node that
    /// has an enrolled pod, and waits until every node proxy is ready.
    pub async fn start(specs: Vec<PodSpec>) -> Mesh {
        Self::start_with(specs, |_| {}).await
    }

    pub async fn start_with(specs: Vec<PodSpec>, tune: impl Fn(&mut NodeConfig)) -> Mesh {
        Self::start_full(specs, true, tune).await
    }

    async fn start_full(
        specs: Vec<PodSpec>,
        ambient: bool,
        tune: impl Fn(&mut NodeConfig),
    ) -> Mesh {
        logs::init();
        let mut topo = Topology::new().expect("building the test topology");
        let mut pods = HashMap::new();
        for s in &specs {
            let pod = topo.pod(s.node, s.ip).unwrap();
            if s.enrolled {
                topo.enroll(&pod).unwrap();
            }
            pods.insert(s.name, pod);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        std::fs::write(
            dir.path().join("manifests/mesh.yaml"),
            manifests(&specs, ambient),
        )
        .unwrap();
        let mut config = Config::new(dir.path().join("manifests"), dir.path().join("state"));
        config.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.monitoring_addr = "127.0.0.1:0".parse().unwrap();
        config.push_debounce = Duration::from_millis(20);
        config.console_addr = Some("127.0.0.1:0".parse().unwrap());
        let cp = ControlPlane::start(config).await.unwrap();

        let mut mesh = Mesh {
            specs,
            agents: HashMap::new(),
            nodes: HashMap::new(),
            cp,
            dir,
            pods,
            topo,
        };
        let mut nodes: Vec<&'static str> = mesh
            .specs
            .iter()
            .filter(|s| s.enrolled)
            .map(|s| s.node)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        for node in nodes {
            let mut config = mesh.node_config_with_pods(node);
            tune(&mut config);
            let proxy = NodeProxy::start(config).await.unwrap();
            mesh.nodes.insert(node, proxy);
        }
        for node in mesh.nodes.values() {
            wait_ready(node).await;
        }
        mesh
    }

    /// A mesh run the way a node runs it: each node has a node proxy listening for its
    /// agent on ZDS and a node agent that enrolls pods from discovery. Nothing is
    /// enrolled by hand; `ambient` says whether namespace `demo` starts with the label.
    /// Waits until every agent has a session with its node proxy.
    pub async fn start_agents(
        specs: Vec<PodSpec>,
        ambient: bool,
        tune: impl Fn(&mut AgentConfig),
    ) -> Mesh {
        let mut specs = specs;
        for s in &mut specs {
            s.enrolled = false;
        }
        let mut mesh = Self::start_full(specs, ambient, |_| {}).await;
        // The agents find namespaces as `<dir>/<namespace>.<name>`.
        let netns_dir = mesh.dir.path().join("netns");
        std::fs::create_dir(&netns_dir).unwrap();
        for s in &mesh.specs {
            std::os::unix::fs::symlink(
                mesh.pods[s.name].netns_path(),
                netns_dir.join(format!("{}.{}", s.namespace, s.name)),
            )
            .unwrap();
        }
        let mut nodes: Vec<&'static str> = mesh
            .specs
            .iter()
            .filter(|s| s.in_model)
            .map(|s| s.node)
            .collect();
        nodes.sort();
        nodes.dedup();
        for node in nodes {
            mesh.start_node(node).await;
            let agent = mesh.start_agent(node, &tune).await;
            mesh.agents.insert(node, agent);
        }
        for agent in mesh.agents.values() {
            let start = Instant::now();
            while !agent.status().node_proxy_connected {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "agent never reached its node proxy: {:?}",
                    agent.status()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        mesh
    }

    /// The ZDS socket of a node's proxy.
    pub fn zds_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.zds.sock"))
    }

    /// Starts (or restarts) a node's proxy listening for its agent.
    pub async fn start_node(&mut self, node: &'static str) {
        let mut config = self.node_config(node);
        config.zds_socket = Some(self.zds_socket(node));
        let proxy = NodeProxy::start(config).await.unwrap();
        self.nodes.insert(node, proxy);
    }

    /// Starts a node's agent (not registered in `agents`).
    pub async fn start_agent(&self, node: &str, tune: &impl Fn(&mut AgentConfig)) -> Agent {
        let mut config = AgentConfig::new(self.node_config(node).xds, self.zds_socket(node));
        config.netns_dir = self.dir.path().join("netns");
        config.reconcile_interval = Duration::from_millis(500);
        config.admin_addr = "127.0.0.1:0".parse().unwrap();
        tune(&mut config);
        Agent::start(config).await.unwrap()
    }

    /// Rewrites the manifests with or without the ambient label on namespace `demo`.
    pub fn write_manifests(&self, ambient: bool) {
        self.write_manifests_edited(ambient, |m| m);
    }

    /// Rewrites the mesh's manifests, changed by `edit` (for example to annotate a
    /// namespace).
    pub fn write_manifests_edited(&self, ambient: bool, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("manifests/mesh.yaml");
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, edit(manifests(&self.specs, ambient))).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Replaces the policy manifests (AuthorizationPolicy, PeerAuthentication) and waits
    /// until every node proxy holds exactly the policies named in `expect`
    /// (`<namespace>/<name>` of the node-proxy resources). `expect` must differ from
    /// what the node proxies held before, or this returns at once.
    pub async fn apply_policies(&self, yaml: &str, expect: &[&str]) {
        let path = self.dir.path().join("manifests/policies.yaml");
        let tmp = self.dir.path().join("policies.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, path).unwrap();
        let mut want: Vec<String> = expect.iter().map(|s| s.to_string()).collect();
        want.sort();
        for (name, node) in &self.nodes {
            let start = Instant::now();
            loop {
                let state = node.store().load();
                let mut have: Vec<String> = state.policies().map(|p| p.key()).collect();
                have.sort();
                if have == want {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{name} holds policies {have:?}, expected {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Waits until the node's agent reports the pod in `phase` (or, with `None`, no
    /// longer tracks it).
    pub async fn wait_phase(&self, pod: &str, phase: Option<PodPhase>) {
        let spec = self.spec(pod);
        let uid = format!("Kubernetes//Pod/{}/{}", spec.namespace, spec.name);
        let agent = &self.agents[spec.node];
        let start = Instant::now();
        loop {
            let status = agent.status();
            let now = status.pods.iter().find(|p| p.uid == uid).map(|p| p.phase);
            if now == phase {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{pod}: wanted {phase:?}, agent says {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(self.dir.path().join("state/ca/root-cert.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// The configuration `start_with` gives a node: [`Mesh::node_config`] serving the
    /// node's enrolled pods.
    pub fn node_config_with_pods(&self, node: &str) -> NodeConfig {
        let mut config = self.node_config(node);
        config.local_pods = self
            .specs
            .iter()
            .filter(|s| s.enrolled && s.node == node)
            .map(|s| (s.info(), self.pods[s.name].netns_path()))
            .collect();
        config
    }

    /// A node proxy configuration with every port on an ephemeral loopback port.
    pub fn node_config(&self, node: &str) -> NodeConfig {
        let signer = TokenSigner::load_or_create(&self.dir.path().join("state")).unwrap();
        let mut config = NodeConfig::new(XdsConfig {
            address: self.cp.grpc_addr().to_string(),
            roots: ambit_tls::spiffe::TrustBundle::new(&self.roots()).unwrap(),
            server_name: Some("localhost".into()),
            token: TokenSource::Static(signer.mint(node, Duration::from_secs(600)).unwrap()),
            node_name: node.into(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        });
        config.admin_addr = "127.0.0.1:0".parse().unwrap();
        config.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.readiness_addr = "127.0.0.1:0".parse().unwrap();
        config.worker_threads = 2;
        config.dataplane.connect_timeout = Duration::from_secs(2);
        config.dataplane.drain_timeout = Duration::from_secs(2);
        config
    }

    pub fn spec(&self, name: &str) -> &PodSpec {
        self.specs.iter().find(|s| s.name == name).unwrap()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    pub fn node(&self, name: &str) -> &NodeProxy {
        &self.nodes[name]
    }

    pub fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.spec(pod).ip), port)
    }

    /// Starts an echo application in `pod` on `port`; returns the addresses its
    /// connections came from, as the application saw them.
    pub fn echo_app(&self, pod: &str, port: u16) -> Peers {
        self.echo_app_on(pod, SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// An echo application in `pod` listening on `addr` (`[::]:port` for IPv6).
    pub fn echo_app_on(&self, pod: &str, addr: SocketAddr) -> Peers {
        let listener = self.pod(pod).listen_on(addr).unwrap();
        let peers = Peers::default();
        let seen = peers.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, peer)) = listener.accept().await else {
                    return;
                };
                seen.0.lock().unwrap().push(peer);
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        peers
    }

    /// The text of a node proxy's `/metrics`.
    pub async fn metrics(&self, node: &str) -> String {
        let (status, body) = ambit_admin::get(self.node(node).metrics_addr(), "/metrics")
            .await
            .unwrap();
        assert_eq!(status, 200);
        body
    }
}

/// Where an application's connections came from.
#[derive(Debug, Clone, Default)]
pub struct Peers(Arc<Mutex<Vec<SocketAddr>>>);

impl Peers {
    pub fn all(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap().clone()
    }

    pub fn ips(&self) -> Vec<IpAddr> {
        self.all().iter().map(SocketAddr::ip).collect()
    }
}

/// Waits for the node proxy's readiness endpoint to say 200.
pub async fn wait_ready(node: &NodeProxy) {
    let start = Instant::now();
    loop {
        let (status, body) = ambit_admin::get(node.readiness_addr(), "/healthz/ready")
            .await
            .unwrap();
        if status == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node proxy not ready after 20 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` until it holds (10 s at most).
pub async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`eventually`], for a condition that has to await (reading a metrics page).
pub async fn eventually_async<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `payload` on a new connection from `from` to `to`, half-closes, and returns
/// everything the other side sent back.
pub async fn exchange(from: &Pod, to: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = tokio::time::timeout(Duration::from_secs(10), from.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    round_trip(&mut conn, payload).await
}

/// Writes `payload`, half-closes, and reads to the end, all within 20 s.
pub async fn round_trip(conn: &mut TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let work = async {
        let (mut r, mut w) = conn.split();
        let write = async {
            w.write_all(payload).await?;
            w.shutdown().await
        };
        let mut back = Vec::with_capacity(payload.len());
        let read = r.read_to_end(&mut back);
        let (wrote, read) = tokio::join!(write, read);
        wrote?;
        read?;
        Ok(back)
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .map_err(|_| std::io::Error::other("exchange timed out"))?
}

/// A payload that differs per connection, so crossed streams would be caught.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// The lines of a Prometheus text page for `metric` whose labels include all `labels`.
pub fn samples(page: &str, metric: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
    page.lines()
        .filter(|l| {
            l.starts_with(metric)
                && (l[metric.len()..].starts_with('{') || l[metric.len()..].starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            Some((head.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the matching samples.
pub fn sum(page: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(page, metric, labels).iter().map(|(_, v)| v).sum()
}

/// An OTLP/gRPC collector on loopback that keeps every span it is sent.
#[derive(Clone, Default)]
pub struct Collector {
    pub spans: Arc<Mutex<Vec<ambit_proto::otlp::Span>>>,
    pub resources: Arc<Mutex<Vec<ambit_proto::otlp::Resource>>>,
    /// The instrumentation scope each span came with (same order as `spans`).
    pub scopes: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    /// Serves a collector on an ephemeral loopback port; returns it and its `host:port`.
    pub async fn start() -> (Collector, String) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    ambit_proto::otlp::trace_service_server::TraceServiceServer::new(
                        collector.clone(),
                    ),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, endpoint)
    }
}

#[tonic::async_trait]
impl ambit_proto::otlp::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ambit_proto::otlp::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ambit_proto::otlp::ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            if let Some(r) = rs.resource {
                self.resources.lock().unwrap().push(r);
            }
            for ss in rs.scope_spans {
                let scope = ss.scope.map(|s| s.name).unwrap_or_default();
                let n = ss.spans.len();
                self.spans.lock().unwrap().extend(ss.spans);
                self.scopes
                    .lock()
                    .unwrap()
                    .extend(std::iter::repeat_n(scope, n));
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Lower-case hex of bytes (trace and span ids).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span's string attribute, empty when absent.
pub fn span_tag(span: &ambit_proto::otlp::Span, key: &str) -> String {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(ambit_proto::otlp::any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Log capture: every event goes to stderr (shown when a test fails) and access-log
/// events are kept for assertions.
pub mod logs {
    use super::*;

    static LINES: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

    struct Tee;

    impl Write for Tee {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LINES
                .get_or_init(Default::default)
                .lock()
                .unwrap()
                .extend_from_slice(buf);
            std::io::stderr().write_all(buf)?;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub fn init() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let _ = tracing_subscriber::fmt()
                .json()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,h2=warn,tonic=warn,hyper=warn".into()),
                )
                .with_writer(|| Tee)
                .try_init();
        });
    }

    /// Access-log events so far, as their JSON `fields`.
    pub fn access() -> Vec<serde_json::Value> {
        let bytes = LINES.get_or_init(Default::default).lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "ambit::access")
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// Waits for an access-log line matching `f`.
    pub async fn wait_access(
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(v) = access().into_iter().find(|v| f(v)) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no access log line for: {what}; have: {:#?}",
                access()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The directory of a pod's namespace file.
pub fn netns_path(pod: &Pod) -> PathBuf {
    pod.netns_path()
}
