//! A node proxy that does not know the mesh yet (starting, the control plane away, or a
//! sync half done) must fail closed: it holds connections for a bounded time and then
//! refuses them; nothing goes out in plaintext and nothing comes in unchecked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ambit_e2e::xds_filter::XdsFilter;
use ambit_e2e::*;

fn deny_sleep() -> String {
    "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]
"
    .to_owned()
}

fn strict() -> String {
    "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"
    .to_owned()
}

/// Restarts `node`'s proxy with the same pods, its discovery pointed at `xds`.
async fn restart(mesh: &mut Mesh, node: &'static str, xds: String) {
    mesh.nodes.remove(node).unwrap().shutdown().await;
    let mut config = mesh.node_config_with_pods(node);
    config.ca_address = Some(mesh.cp.grpc_addr().to_string());
    config.xds.address = xds;
    config.dataplane.sync_timeout = Duration::from_secs(1);
    let proxy = ambit_node::NodeProxy::start(config).await.unwrap();
    mesh.nodes.insert(node, proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_proxy_lets_no_denied_client_through_while_the_control_plane_is_away() {
    logs::init();
    let mut mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    mesh.apply_policies(&deny_sleep(), &["demo/deny-sleep"])
        .await;
    let echo = mesh.addr("echo-1", APP_PORT);
    assert!(
        exchange(mesh.pod("sleep"), echo, b"x").await.is_err(),
        "denied while synced"
    );

    // sleep's node proxy restarts and cannot reach discovery.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = dead.local_addr().unwrap().to_string();
    drop(dead);
    restart(&mut mesh, "node-a", nowhere).await;
    let served = peers.all().len();
    let refused = exchange(mesh.pod("sleep"), echo, b"during sync").await;
    assert!(refused.is_err(), "a connection left the node unclassified");
    assert_eq!(peers.all().len(), served, "it reached the application");
    let line = logs::wait_access("the refusal", |v| {
        v["direction"] == "outbound"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("not synced"))
    })
    .await;
    assert_eq!(line["dst.addr"], echo.to_string());
    let metrics = mesh.metrics("node-a").await;
    let refusals = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ambit_node_unsynced_refusals_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(refusals.is_some_and(|n| n >= 1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_synced_destination_refuses_plaintext_under_strict_and_denied_peers() {
    logs::init();
    let mut mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    mesh.apply_policies(
        &format!("{}---\n{}", deny_sleep(), strict()),
        &["demo/deny-sleep", "demo/ambit_peer_authentication_strict"],
    )
    .await;
    let echo = mesh.addr("echo-1", APP_PORT);
    // echo-1's node proxy restarts behind a relay that delivers workloads and services
    // but withholds every policy.
    let filter = XdsFilter::start(
        mesh.cp.grpc_addr(),
        &mesh.dir.path().join("state"),
        ambit_tls::spiffe::TrustBundle::new(&mesh.roots()).unwrap(),
        ambit_proto::security::AUTHORIZATION_TYPE_URL,
    )
    .await;
    restart(&mut mesh, "node-b", filter.addr.to_string()).await;
    let node = mesh.node("node-b");
    eventually("echo-1's workload to arrive without its policies", || {
        let st = node.store().load();
        st.workloads().any(|w| w.name.as_ref() == "echo-1") && st.policies().next().is_none()
    })
    .await;
    assert!(!node.xds_state().borrow().synced);

    // Plaintext from outside the mesh (STRICT), and sleep (denied): both refused.
    let served = peers.all().len();
    assert!(exchange(mesh.pod("legacy"), echo, b"plain").await.is_err());
    assert!(exchange(mesh.pod("sleep"), echo, b"denied").await.is_err());
    assert_eq!(
        peers.all().len(),
        served,
        "something reached the application"
    );
    let _ = logs::wait_access("sleep's tunnel refused at echo's node", |v| {
        v["direction"] == "inbound"
            && v["src.addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&mesh.spec("sleep").ip.to_string()))
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("not synced"))
    })
    .await;
}
