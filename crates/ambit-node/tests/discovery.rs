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
    until_within(node, what, Duration::from_secs(10), f).await
}

/// [`until`], with a deadline of its own (for pushes of thousands of workloads, which a
/// loaded 2-core machine can take longer than 10 s to translate and apply).
async fn until_within(
    node: &NodeProxy,
    what: &str,
    limit: Duration,
    f: impl Fn(&State) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if f(&node.store().load()) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
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
    env.token("node-a").authorize(&mut request).await.unwrap();
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

/// One response as a raw subscriber saw it.
#[derive(Debug, Clone)]
struct Seen {
    type_url: String,
    names: Vec<String>,
    removed: Vec<String>,
    version_info: String,
}

/// A raw delta ADS subscriber for node-a that ACKs everything and records each response
/// in arrival order. `types` are subscribed in the order given.
async fn raw_subscriber(
    env: &Env,
    types: &[ResourceType],
) -> (
    Arc<std::sync::Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    use ambit_proto::discovery::DeltaDiscoveryRequest;
    use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let channel = ambit_tls::client::control_plane_channel(
        &env.grpc.to_string(),
        &env.roots(),
        Some("localhost"),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for t in types {
        tx.send(DeltaDiscoveryRequest {
            type_url: t.type_url().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    env.token("node-a").authorize(&mut request).await.unwrap();
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(r)) = responses.message().await {
            log.lock().unwrap().push(Seen {
                type_url: r.type_url.clone(),
                names: r.resources.iter().map(|x| x.name.clone()).collect(),
                removed: r.removed_resources.clone(),
                version_info: r.system_version_info.clone(),
            });
            let ack = DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                return;
            }
        }
    });
    (seen, task)
}

async fn wait_seen(seen: &std::sync::Mutex<Vec<Seen>>, what: &str, f: impl Fn(&[Seen]) -> bool) {
    let start = Instant::now();
    while !f(&seen.lock().unwrap()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}: {:#?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn policies_reach_a_subscriber_before_the_workloads_that_name_them_and_leave_after() {
    let env = Env::start().await;
    // Workloads subscribed first on purpose: the order on the stream is the server's.
    let (seen, task) =
        raw_subscriber(&env, &[ResourceType::Address, ResourceType::Authorization]).await;
    let auth = ResourceType::Authorization.type_url();
    let addr = ResourceType::Address.type_url();
    wait_seen(&seen, "the first pushes", |s| {
        s.iter().any(|r| r.type_url == auth) && s.iter().any(|r| r.type_url == addr)
    })
    .await;
    let start = seen.lock().unwrap().len();

    // A new selector policy for echo-1: echo-1's workload names it from now on.
    let policy = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: new-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {namespaces: [prod]}}]}]
";
    std::fs::write(env.manifest(), format!("{MESH}{policy}")).unwrap();
    let position = |s: &[Seen], f: &dyn Fn(&Seen) -> bool| s[start..].iter().position(f);
    let policy_sent = |r: &Seen| r.type_url == auth && r.names.iter().any(|n| n == "demo/new-deny");
    let echo_sent =
        |r: &Seen| r.type_url == addr && r.names.iter().any(|n| n == "Kubernetes//Pod/demo/echo-1");
    wait_seen(&seen, "the policy and the workload", |s| {
        position(s, &policy_sent).is_some() && position(s, &echo_sent).is_some()
    })
    .await;
    {
        let s = seen.lock().unwrap();
        assert!(
            position(&s, &policy_sent) < position(&s, &echo_sent),
            "the workload came before the policy it names: {:#?}",
            &s[start..]
        );
    }

    // Removed again: the workload stops naming it before it goes.
    let start = seen.lock().unwrap().len();
    std::fs::write(env.manifest(), MESH).unwrap();
    let policy_removed =
        |r: &Seen| r.type_url == auth && r.removed.iter().any(|n| n == "demo/new-deny");
    wait_seen(&seen, "the removal", |s| {
        position(s, &policy_removed).is_some() && position(s, &echo_sent).is_some()
    })
    .await;
    let s = seen.lock().unwrap();
    assert!(
        position(&s, &echo_sent) < position(&s, &policy_removed),
        "the policy went before the workload stopped naming it: {:#?}",
        &s[start..]
    );
    drop(s);
    task.abort();
}

#[tokio::test]
async fn a_first_push_split_in_several_responses_says_which_is_last() {
    let env = Env::start().await;
    // Enough workloads for more than one ~1 MiB response.
    let mut many = String::from(MESH);
    for i in 0..12000u32 {
        many.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: demo, labels: {{app: bulk, version: v1}}}}\nspec: {{nodeName: node-b, serviceAccountName: bulk}}\nstatus: {{podIP: 198.18.{}.{}}}\n",
            100 + i / 250,
            i % 250 + 1
        ));
    }
    std::fs::write(env.manifest(), many).unwrap();
    let node = env.node("node-a").await;
    until_within(&node, "the bulk pods", Duration::from_secs(90), |st| {
        st.counts().0 >= 12002
    })
    .await;
    let (seen, task) = raw_subscriber(&env, &[ResourceType::Address]).await;
    wait_seen(&seen, "the whole first push", |s| {
        s.iter().any(|r| !r.version_info.ends_with("/more"))
    })
    .await;
    let s = seen.lock().unwrap().clone();
    task.abort();
    let last = s
        .iter()
        .position(|r| !r.version_info.ends_with("/more"))
        .unwrap();
    assert!(last >= 1, "expected several responses: {}", s.len());
    let total: usize = s[..=last].iter().map(|r| r.names.len()).sum();
    assert!(total >= 12002, "{total} resources in the push");
    // The real client counts itself in sync only after the last one.
    assert!(node.xds_state().borrow().synced);
}

#[tokio::test]
async fn policies_with_ambit_extensions_go_to_ambit_node_proxies_only() {
    let env = Env::start().await;
    let audit = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: demo}
spec: {action: AUDIT, rules: [{}]}
";
    std::fs::write(env.manifest(), format!("{MESH}{audit}")).unwrap();
    // Ambit's node proxy (node id ambit~...) holds it, as an AUDIT policy.
    let node = env.node("node-a").await;
    until(&node, "the audit policy", |st| {
        st.policy("demo/audit-all")
            .is_some_and(|p| p.action == PolicyAction::Audit)
    })
    .await;
    // Another client (Istio's ztunnel) is sent the policies without it.
    let (seen, task) = raw_subscriber(&env, &[ResourceType::Authorization]).await;
    wait_seen(&seen, "the first push", |s| !s.is_empty()).await;
    let names: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.names.clone())
        .collect();
    assert!(names.contains(&"demo/deny-sleep".to_owned()), "{names:?}");
    assert!(!names.contains(&"demo/audit-all".to_owned()), "{names:?}");
    task.abort();
    node.shutdown().await;
}
