//! A node proxy's discovery client against a real control plane, in one process, over
//! TLS and gRPC on loopback.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_control::auth::TokenSigner;
use ambit_control::xds::translate::ResourceType;
use ambit_control::{Config, ControlPlane};
use ambit_core::discovery::TunnelProtocol;
use ambit_core::policy::PolicyAction;
use ambit_core::state::State;
use ambit_node::{NodeConfig, NodeProxy, XdsConfig};
use ambit_tls::client::TokenSource;

const MESH: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {nodeName: node-a, serviceAccountName: echo}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo, labels: {app: sleep}}
spec: {nodeName: node-b, serviceAccountName: sleep}
status: {podIP: 198.18.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]
";

struct Env {
    dir: tempfile::TempDir,
    grpc: SocketAddr,
    cp: Option<ControlPlane>,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        std::fs::write(dir.path().join("manifests/mesh.yaml"), MESH).unwrap();
        let cp = start_cp(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
        Env {
            grpc: cp.grpc_addr(),
            dir,
            cp: Some(cp),
        }
    }

    fn manifest(&self) -> PathBuf {
        self.dir.path().join("manifests/mesh.yaml")
    }

    fn roots(&self) -> ambit_tls::spiffe::TrustBundle {
        let pem = std::fs::read(self.dir.path().join("state/ca/root-cert.pem")).unwrap();
        ambit_tls::spiffe::TrustBundle::from_pem(&pem).unwrap()
    }

    fn token(&self, node: &str) -> TokenSource {
        let signer = TokenSigner::load_or_create(&self.dir.path().join("state")).unwrap();
        TokenSource::Static(signer.mint(node, Duration::from_secs(600)).unwrap())
    }

    async fn node(&self, node: &str) -> NodeProxy {
        let mut config = NodeConfig::new(XdsConfig {
            address: self.grpc.to_string(),
            roots: self.roots(),
            server_name: Some("localhost".into()),
            token: self.token(node),
            node_name: node.into(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        });
        config.admin_addr = "127.0.0.1:0".parse().unwrap();
        config.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.readiness_addr = "127.0.0.1:0".parse().unwrap();
        config.worker_threads = 1;
        NodeProxy::start(config).await.unwrap()
    }

    fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().unwrap()
    }

    /// Resources sent to subscribers so far, all types together.
    fn resources_sent(&self) -> u64 {
        self.cp()
            .subscribers()
            .list()
            .iter()
            .flat_map(|s| s.types.values())
            .map(|t| t.resources_sent)
            .sum()
    }
}

async fn start_cp(dir: &Path, grpc: SocketAddr) -> ControlPlane {
    let mut config = Config::new(dir.join("manifests"), dir.join("state"));
    config.grpc_addr = grpc;
    config.monitoring_addr = "127.0.0.1:0".parse().unwrap();
    config.push_debounce = Duration::from_millis(20);
    ControlPlane::start(config).await.unwrap()
}

/// Waits until `f` holds for the node's current state.
async fn until(node: &NodeProxy, what: &str, f: impl Fn(&State) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f(&node.store().load()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn the_node_converges_on_the_model() {
    let env = Env::start().await;
    let node = env.node("node-a").await;
    until(&node, "the initial sync", |st| st.counts() == (2, 1, 1)).await;
    let st = node.store().load();

    let echo = st.workload_by_ip("", ip("198.18.1.10")).unwrap();
    assert_eq!(echo.uid.as_ref(), "Kubernetes//Pod/demo/echo-1");
    assert_eq!(echo.tunnel, TunnelProtocol::Hbone);
    assert_eq!(
        echo.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    assert_eq!(echo.node.as_ref(), "node-a");
    assert_eq!(echo.profile.authorization_policies.len(), 1);

    let svc = st.service_by_vip("", ip("198.19.0.10")).unwrap();
    assert_eq!(svc.hostname.as_ref(), "echo.demo.svc.cluster.local");
    let endpoints: Vec<_> = st
        .endpoints(&svc.key())
        .map(|w| w.name.to_string())
        .collect();
    assert_eq!(endpoints, ["echo-1"]);

    let policies: Vec<_> = st.policies_for(echo).collect();
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].action, PolicyAction::Deny);

    // The admin port shows the same.
    let (status, body) = ambit_admin::get(node.admin_addr(), "/config_dump")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 2);
    assert_eq!(
        dump["services"][0]["endpoints"][0],
        "Kubernetes//Pod/demo/echo-1"
    );
    assert_eq!(dump["xds"]["connected"], true);
    assert_eq!(dump["xds"]["synced"], true);

    // The control plane lists the subscriber.
    let subs = env.cp().subscribers().list();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].node, "node-a");
    // ... with the address it connects from.
    assert!(subs[0].peer.starts_with("127.0.0.1:"), "{:?}", subs[0].peer);
    node.shutdown().await;
}

#[tokio::test]
async fn changes_arrive_as_deltas() {
    let env = Env::start().await;
    let node = env.node("node-a").await;
    until(&node, "the initial sync", |st| st.counts() == (2, 1, 1)).await;
    let wait_acked = || async {
        // Let the ACK of the last push land.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_acked().await;
    let before = env.resources_sent();

    // Update: a pod moves to a new IP. Only that workload is sent.
    std::fs::write(env.manifest(), MESH.replace("198.18.2.10", "198.18.2.99")).unwrap();
    let took = until(&node, "the moved pod", |st| {
        st.workload_by_ip("", ip("198.18.2.99")).is_some()
    })
    .await;
    wait_acked().await;
    assert_eq!(
        env.resources_sent() - before,
        1,
        "one resource sent for one change"
    );
    assert!(
        node.store()
            .load()
            .workload_by_ip("", ip("198.18.2.10"))
            .is_none()
    );
    println!("update reached the node in {took:?}");

    // Add: a second echo pod, also listed by the service.
    let added = format!(
        "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: echo-2, namespace: demo, labels: {{app: echo}}}}\nspec: {{nodeName: node-a, serviceAccountName: echo}}\nstatus: {{podIP: 198.18.1.11}}\n",
        MESH.replace("198.18.2.10", "198.18.2.99")
    );
    std::fs::write(env.manifest(), &added).unwrap();
    until(&node, "the added pod", |st| {
        st.endpoints("demo/echo.demo.svc.cluster.local").count() == 2
    })
    .await;

    // Delete: the policy goes away.
    let without_policy = added.replace(
        MESH.split("---\napiVersion: security.istio.io/v1")
            .nth(1)
            .unwrap(),
        "",
    );
    let without_policy = without_policy.replace("---\napiVersion: security.istio.io/v1", "");
    std::fs::write(env.manifest(), without_policy).unwrap();
    until(&node, "the removed policy", |st| {
        st.policy("demo/deny-sleep").is_none()
    })
    .await;
    let st = node.store().load();
    assert!(
        st.workload_by_ip("", ip("198.18.1.10"))
            .unwrap()
            .profile
            .authorization_policies
            .is_empty()
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_node_keeps_its_state_while_the_control_plane_is_away_and_resyncs_only_the_difference()
{
    let mut env = Env::start().await;
    let node = env.node("node-a").await;
    until(&node, "the initial sync", |st| st.counts() == (2, 1, 1)).await;

    // The control plane goes away: the state stays.
    env.cp.take().unwrap().shutdown().await;
    let mut xds = node.xds_state();
    let start = Instant::now();
    while xds.borrow_and_update().connected {
        assert!(start.elapsed() < Duration::from_secs(5), "still connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.store().load().counts(), (2, 1, 1));

    // While it is away, one pod changes; it comes back on the same address.
    std::fs::write(env.manifest(), MESH.replace("198.18.2.10", "198.18.2.77")).unwrap();
    env.cp = Some(start_cp(env.dir.path(), env.grpc).await);
    until(&node, "the resync", |st| {
        st.workload_by_ip("", ip("198.18.2.77")).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Only the difference was sent: the moved workload, nothing it already had.
    assert_eq!(env.resources_sent(), 1);
    assert_eq!(node.xds_state().borrow().connects, 2);
    node.shutdown().await;
}

#[tokio::test]
async fn discovery_requires_a_valid_node_credential() {
    let env = Env::start().await;
    // No token.
    let (client, mut state) = ambit_node::XdsClient::new(
        XdsConfig {
            address: env.grpc.to_string(),
            roots: env.roots(),
            server_name: Some("localhost".into()),
            token: TokenSource::None,
            node_name: "node-a".into(),
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
        },
        Arc::new(ambit_core::state::Store::new()),
    );
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(client.run(stop));
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .last_error
    .clone()
    .unwrap();
    assert!(
        err.contains("Unauthenticated") || err.contains("bearer"),
        "{err}"
    );
    task.abort();

    // A token for node-b claiming to be node-a.
    let (client, mut state) = ambit_node::XdsClient::new(
        XdsConfig {
            address: env.grpc.to_string(),
            roots: env.roots(),
            server_name: Some("localhost".into()),
            token: env.token("node-b"),
            node_name: "node-a".into(),
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
        },
        Arc::new(ambit_core::state::Store::new()),
    );
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(client.run(stop));
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .last_error
    .clone()
    .unwrap();
    assert!(err.contains("NODE_NAME=node-a"), "{err}");
    task.abort();
}

#[tokio::test]
async fn a_nack_is_recorded_and_the_stream_goes_on() {
    use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use ambit_proto::discovery::{DeltaDiscoveryRequest, Status};
    let env = Env::start().await;
    let channel = ambit_tls::client::control_plane_channel(
        &env.grpc.to_string(),
        &env.roots(),
        Some("localhost"),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        type_url: ResourceType::Address.type_url().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    env.token("node-a").authorize(&mut request).unwrap();
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();

    // Reject the first push, as a proxy would a resource it cannot use.
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(first.resources.len(), 3);
    tx.send(DeltaDiscoveryRequest {
        type_url: first.type_url.clone(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(Status {
            code: 3,
            message: "Kubernetes//Pod/demo/sleep: deliberately rejected".into(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let subs = env.cp().subscribers().list();
    let info = &subs[0].types["Address"];
    assert_eq!(info.nacks, 1);
    assert!(
        info.last_nack
            .as_deref()
            .unwrap()
            .contains("deliberately rejected")
    );
    let metrics = ambit_admin::get(env.cp().monitoring_addr(), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics.contains("ambit_xds_nacks_total{type=\"Address\"} 1"),
        "{metrics}"
    );

    // Later changes still arrive on the same stream.
    std::fs::write(env.manifest(), MESH.replace("198.18.1.10", "198.18.1.55")).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.resources.len(), 1);
    assert_eq!(next.resources[0].name, "Kubernetes//Pod/demo/echo-1");
}
