//! The node agent end to end: pods enrolled and un-enrolled by a label in the manifests,
//! through discovery, redirection rules and ZDS, with applications running throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_cni::agent::PodPhase;
use ambit_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLEEP_ID: &str = "spiffe://cluster.local/ns/demo/sa/sleep";

/// One echo round on an open connection.
async fn ping(conn: &mut TcpStream, what: &[u8]) {
    conn.write_all(what).await.unwrap();
    let mut back = vec![0u8; what.len()];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
        .await
        .expect("no echo within 5 s")
        .expect("the connection broke");
    assert_eq!(back, what);
}

/// Whether the server pod holds a connection from the client on `port`.
fn server_sees(mesh: &Mesh, port: u16) -> bool {
    let client = IpAddr::V4(mesh.spec("sleep").ip);
    mesh.pod("echo-1")
        .tcp_connections()
        .unwrap()
        .iter()
        .any(|(local, peer)| local.port() == port && peer.ip() == client)
}

/// Inbound mTLS connections from sleep logged so far.
fn mtls_inbound() -> usize {
    logs::access()
        .iter()
        .filter(|v| v["direction"] == "inbound" && v["src.identity"] == SLEEP_ID)
        .count()
}

fn rules_in(mesh: &Mesh, pod: &str) -> bool {
    let file = std::fs::File::open(mesh.pod(pod).netns_path()).unwrap();
    ambit_cni::redirect::installed(&file).unwrap()
}

fn in_mesh(specs: Vec<PodSpec>) -> Vec<PodSpec> {
    // Only namespace demo and its pods; the agent is what enrolls.
    specs
        .into_iter()
        .filter(|s| s.namespace == "demo")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_enrolls_and_unenrolls_running_pods_without_breaking_connections() {
    let mesh = Mesh::start_agents(in_mesh(cast()), false, |_| {}).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    let sleep = mesh.pod("sleep");
    let echo_addr = mesh.addr("echo-1", APP_PORT);

    // Before: plain TCP, straight to the application.
    let mut before = sleep.connect(echo_addr).await.unwrap();
    ping(&mut before, b"plain").await;
    assert!(!rules_in(&mesh, "sleep") && !rules_in(&mesh, "echo-1"));
    assert!(server_sees(&mesh, APP_PORT));
    assert!(!server_sees(&mesh, 15008));

    // Label the namespace: both pods are enrolled, nothing restarts.
    mesh.write_manifests(true);
    mesh.wait_phase("sleep", Some(PodPhase::Enrolled)).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    assert!(rules_in(&mesh, "sleep") && rules_in(&mesh, "echo-1"));
    wait_ready(mesh.node("node-a")).await;
    wait_ready(mesh.node("node-b")).await;
    // The connection opened before enrollment keeps working as it was.
    ping(&mut before, b"still plain").await;
    // A new one goes through both node proxies in mTLS.
    let tunnels = mtls_inbound();
    let mut during = sleep.connect(echo_addr).await.unwrap();
    ping(&mut during, b"in the mesh").await;
    assert!(
        server_sees(&mesh, 15008),
        "no HBONE connection in the server pod"
    );
    let via_vip = exchange(sleep, ECHO_VIP, b"by VIP").await.unwrap();
    assert_eq!(via_vip, b"by VIP");
    drop(via_vip);
    eventually("the mesh connection to show in the access log", || {
        mtls_inbound() > tunnels
    })
    .await;
    // The application saw sleep's own address every time.
    assert!(
        peers
            .ips()
            .iter()
            .all(|ip| *ip == IpAddr::V4(mesh.spec("sleep").ip))
    );

    // Remove the label: un-enrolled, and the connection carried by the proxies lives on.
    mesh.write_manifests(false);
    mesh.wait_phase("sleep", Some(PodPhase::Draining)).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Draining)).await;
    assert!(mesh.node("node-a").pods().status().is_empty());
    assert!(mesh.node("node-b").pods().status().is_empty());
    for i in 0..3 {
        ping(&mut during, format!("after un-enrollment {i}").as_bytes()).await;
        ping(&mut before, format!("plain {i}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // New connections are plain again.
    let tunnels = mtls_inbound();
    let mut after = sleep.connect(echo_addr).await.unwrap();
    ping(&mut after, b"plain again").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        mtls_inbound(),
        tunnels,
        "a new connection went through the mesh"
    );
    drop(after);

    // While the proxied connection is open the pods keep their draining rules; once it
    // ends, the agent removes them.
    assert!(rules_in(&mesh, "sleep") && rules_in(&mesh, "echo-1"));
    drop(during);
    mesh.wait_phase("sleep", None).await;
    mesh.wait_phase("echo-1", None).await;
    assert!(!rules_in(&mesh, "sleep") && !rules_in(&mesh, "echo-1"));
    ping(&mut before, b"plain to the end").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_reconciles_without_disturbing_traffic() {
    let mut mesh = Mesh::start_agents(in_mesh(cast()), true, |_| {}).await;
    mesh.echo_app("echo-1", APP_PORT);
    mesh.wait_phase("sleep", Some(PodPhase::Enrolled)).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    wait_ready(mesh.node("node-b")).await;
    let sleep = mesh.pod("sleep").clone();
    let mut open = sleep.connect(ECHO_VIP).await.unwrap();
    ping(&mut open, b"before the restart").await;
    let served_before = mesh.node("node-b").pods().status();

    // The agent of node-b goes away; traffic does not notice.
    let agent = mesh.agents.remove("node-b").unwrap();
    agent.shutdown().await;
    ping(&mut open, b"agent away").await;
    let back = exchange(&sleep, ECHO_VIP, b"new while away").await.unwrap();
    assert_eq!(back, b"new while away");

    // Its rules drift meanwhile (someone deletes the table).
    let echo = mesh.pod("echo-1").clone();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &echo.netns_name,
            "nft",
            "delete",
            "table",
            "inet",
            "ambit",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A new agent: same snapshot, the pod is not restarted on the proxy, the open
    // connection is untouched, and the rules are back.
    let agent = mesh.start_agent("node-b", &|_| {}).await;
    mesh.agents.insert("node-b", agent);
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    eventually("the rules to be back", || rules_in(&mesh, "echo-1")).await;
    let served_after = mesh.node("node-b").pods().status();
    assert_eq!(served_before.len(), 1);
    assert_eq!(served_after.len(), 1);
    assert_eq!(served_before[0].info, served_after[0].info);
    assert_eq!(
        mesh.node("node-b").pods().draining(),
        0,
        "the pod was restarted on the proxy"
    );
    ping(&mut open, b"after the restart").await;
    let tunnels = mtls_inbound();
    let back = exchange(&sleep, mesh.addr("echo-1", APP_PORT), b"new after")
        .await
        .unwrap();
    assert_eq!(back, b"new after");
    eventually("new connections to be in the mesh again", || {
        mtls_inbound() > tunnels
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_proxy_gets_the_snapshot_back() {
    let mut mesh = Mesh::start_agents(in_mesh(cast()), true, |_| {}).await;
    mesh.echo_app("echo-1", APP_PORT);
    // Both ends served before the first connection.
    mesh.wait_phase("sleep", Some(PodPhase::Enrolled)).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    wait_ready(mesh.node("node-a")).await;
    wait_ready(mesh.node("node-b")).await;
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"one").await.unwrap();
    assert_eq!(back, b"one");

    let old = mesh.nodes.remove("node-b").unwrap();
    old.shutdown().await;
    let listening = |mesh: &Mesh| {
        mesh.pod("echo-1")
            .tcp_listeners()
            .unwrap()
            .iter()
            .any(|a| a.port() == 15008)
    };
    assert!(!listening(&mesh));
    mesh.start_node("node-b").await;
    // The agent notices the session ended, reconnects and re-sends its snapshot.
    eventually("the new node proxy to serve echo-1 again", || {
        mesh.node("node-b").pods().status().len() == 1
    })
    .await;
    assert!(listening(&mesh));
    wait_ready(mesh.node("node-b")).await;
    let tunnels = mtls_inbound();
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"two").await.unwrap();
    assert_eq!(back, b"two");
    eventually("traffic through the new node proxy", || {
        mtls_inbound() > tunnels
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_install_failure_is_reported_and_retried() {
    // nft through a wrapper that fails while a flag file exists.
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("fail");
    let wrapper = dir.path().join("nft");
    std::fs::write(&flag, "").unwrap();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e {} ] && [ \"$1\" = \"-f\" ]; then echo 'injected failure' >&2; exit 1; fi\nexec nft \"$@\"\n",
            flag.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let nft = wrapper.clone();
    let mesh = Mesh::start_agents(in_mesh(cast()), true, move |c| {
        c.redirector.nft = nft.clone();
    })
    .await;
    mesh.echo_app("echo-1", APP_PORT);

    // Reported: pending with the reason, counted, and never half-configured: no rules
    // and not served by the proxy.
    let start = Instant::now();
    let status = loop {
        let status = mesh.agents["node-b"].status();
        if status
            .pods
            .iter()
            .any(|p| p.name == "echo-1" && p.attempts >= 2)
        {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{status:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pod = status.pods.iter().find(|p| p.name == "echo-1").unwrap();
    assert_eq!(pod.phase, PodPhase::Pending);
    assert!(
        pod.error
            .as_deref()
            .unwrap_or("")
            .contains("injected failure"),
        "{pod:?}"
    );
    assert!(!rules_in(&mesh, "echo-1"));
    assert!(mesh.node("node-b").pods().status().is_empty());
    let (_, page) = ambit_admin::get(mesh.agents["node-b"].admin_addr(), "/metrics")
        .await
        .unwrap();
    let failures: f64 = page
        .lines()
        .find(|l| l.starts_with("ambit_cni_rule_failures_total "))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap();
    assert!(failures >= 2.0, "{page}");
    // Meanwhile plain traffic still reaches the application.
    let back = exchange(mesh.pod("sleep"), mesh.addr("echo-1", APP_PORT), b"plain")
        .await
        .unwrap_or_default();
    assert!(back == b"plain" || back.is_empty());

    // The fault goes away: the next retry enrolls the pod.
    std::fs::remove_file(&flag).unwrap();
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    assert!(rules_in(&mesh, "echo-1"));
    wait_ready(mesh.node("node-b")).await;
    let tunnels = mtls_inbound();
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"mesh")
        .await
        .unwrap();
    assert_eq!(back, b"mesh");
    eventually("traffic in the mesh", || mtls_inbound() > tunnels).await;
    let _ = SocketAddr::from(([0, 0, 0, 0], 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drifted_rules_are_repaired_and_counted() {
    let mesh = Mesh::start_agents(in_mesh(cast()), true, |_| {}).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    let echo = mesh.pod("echo-1").clone();
    // Someone flushes the outbound chain: the table is there but wrong.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &echo.netns_name])
        .args(["nft", "flush", "chain", "inet", "ambit", "output_nat"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = mesh.agents["node-b"].admin_addr();
    let start = Instant::now();
    loop {
        let (_, page) = ambit_admin::get(admin, "/metrics").await.unwrap();
        if page.lines().any(|l| l == "ambit_cni_repairs_total 1") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listing = std::process::Command::new("ip")
        .args(["netns", "exec", &echo.netns_name])
        .args(["nft", "list", "chain", "inet", "ambit", "output_nat"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("redirect to :15001"), "{listing}");
    // The admin port says what the agent tracks.
    let (status, pods) = ambit_admin::get(admin, "/debug/pods").await.unwrap();
    assert_eq!(status, 200);
    let pods: serde_json::Value = serde_json::from_str(&pods).unwrap();
    assert_eq!(pods["pods"][0]["name"], "echo-1");
    assert_eq!(pods["pods"][0]["phase"], "enrolled");
    let (status, _) = ambit_admin::get(admin, "/healthz/ready").await.unwrap();
    assert_eq!(status, 200);
}

/// The reconcile loop's passes so far, from the agent's metrics.
async fn reconcile_passes(mesh: &Mesh, node: &str) -> u64 {
    let (_, page) = ambit_admin::get(mesh.agents[node].admin_addr(), "/metrics")
        .await
        .unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix("ambit_cni_reconcile_passes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reconcile pass counter:\n{page}"))
}

/// Without a CNI socket (local mode) the plugin's request channel is closed from the
/// start; an agent that kept polling it spun a core. Idle, the loop only wakes for its
/// periodic tick (every 500 ms): a handful of passes in two seconds, not thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_sleeps_between_ticks() {
    let mesh = Mesh::start_agents(in_mesh(cast()), true, |_| {}).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    let before = reconcile_passes(&mesh, "node-b").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let passes = reconcile_passes(&mesh, "node-b").await - before;
    assert!(
        passes <= 20,
        "{passes} reconcile passes in 2 s of idling: the loop is spinning"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_after_unlabeling_removes_leftover_rules() {
    let mut mesh = Mesh::start_agents(in_mesh(cast()), true, |_| {}).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    let agent = mesh.agents.remove("node-b").unwrap();
    agent.shutdown().await;
    mesh.write_manifests(false);
    // node-a's agent un-enrolls sleep; node-b has no agent, so echo-1 keeps its rules.
    mesh.wait_phase("sleep", None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rules_in(&mesh, "echo-1"));
    let agent = mesh.start_agent("node-b", &|_| {}).await;
    mesh.agents.insert("node-b", agent);
    eventually("echo-1's leftover rules to be removed", || {
        !rules_in(&mesh, "echo-1")
    })
    .await;
    // The node proxy reconnects to the new agent and its snapshot leaves echo-1 out.
    eventually("node-b's proxy to stop serving echo-1", || {
        mesh.node("node-b").pods().status().is_empty()
    })
    .await;
}

/// A socket bound (not listening) on `port` in the pod, without SO_REUSEADDR: nothing
/// else can bind the port while it lives, and connections to it are refused.
fn squat(mesh: &Mesh, pod: &str, port: u16) -> socket2::Socket {
    use socket2::{Domain, SockAddr, Socket, Type};
    let netns = ambit_hbone::socket::Netns::open(mesh.pod(pod).netns_path()).unwrap();
    netns
        .run(|| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], port))))?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap()
}

fn pod_status(mesh: &Mesh, node: &str, pod: &str) -> Option<ambit_cni::agent::PodStatus> {
    mesh.agents[node]
        .status()
        .pods
        .into_iter()
        .find(|p| p.name == pod)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_node_proxy_cannot_serve_is_redirected_and_refused_never_bypassed() {
    let mesh = Mesh::start_agents(in_mesh(cast()), false, |_| {}).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    let echo_addr = mesh.addr("echo-1", APP_PORT);
    // Something holds sleep's outbound capture port, so the node proxy cannot open its
    // listeners there.
    let squatter = squat(&mesh, "sleep", 15001);
    mesh.write_manifests(true);
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    eventually("the node proxy's refusal to show in sleep's status", || {
        pod_status(&mesh, "node-a", "sleep").is_some_and(|p| {
            p.phase == PodPhase::Pending
                && p.error
                    .as_deref()
                    .is_some_and(|e| e.contains("15001") && e.contains("in use"))
        })
    })
    .await;
    // The rules are in place regardless: sleep's traffic is refused, it does not go
    // around the mesh to the application.
    assert!(rules_in(&mesh, "sleep"));
    let refused = mesh.pod("sleep").connect(echo_addr).await;
    assert!(
        refused.is_err(),
        "a connection left the pod outside the mesh"
    );
    assert!(peers.ips().is_empty(), "the application saw a connection");
    // Retries back off instead of hammering every half second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = pod_status(&mesh, "node-a", "sleep").unwrap().attempts;
    assert!(
        (2..=4).contains(&attempts),
        "{attempts} attempts in ~4 s: retries should back off (1 s, 2 s, ...)"
    );
    // Once the port is free, the pod is served.
    drop(squatter);
    mesh.wait_phase("sleep", Some(PodPhase::Enrolled)).await;
    wait_ready(mesh.node("node-a")).await;
    let tunnels = mtls_inbound();
    let back = exchange(mesh.pod("sleep"), echo_addr, b"served")
        .await
        .unwrap();
    assert_eq!(back, b"served");
    eventually("the connection to cross the mesh", || {
        mtls_inbound() > tunnels
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_proxy_takes_over_while_the_old_one_still_runs() {
    let mut mesh = Mesh::start_agents(in_mesh(cast()), true, |_| {}).await;
    mesh.echo_app("echo-1", APP_PORT);
    // Both ends served before the first connection (the client's rules refuse
    // connections until its node proxy listens in it).
    mesh.wait_phase("sleep", Some(PodPhase::Enrolled)).await;
    mesh.wait_phase("echo-1", Some(PodPhase::Enrolled)).await;
    wait_ready(mesh.node("node-a")).await;
    wait_ready(mesh.node("node-b")).await;
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"old").await.unwrap();
    assert_eq!(back, b"old");
    // A connection carried by the old proxy.
    let mut open = mesh.pod("sleep").connect(ECHO_VIP).await.unwrap();
    ping(&mut open, b"through the old proxy").await;

    // The replacement starts while the old proxy still listens in echo-1: it connects
    // to the agent, gets the snapshot and opens echo-1's listeners at once.
    let old = mesh.nodes.remove("node-b").unwrap();
    mesh.start_node("node-b").await;
    eventually("the new node proxy to serve echo-1", || {
        mesh.node("node-b").pods().status().len() == 1
    })
    .await;
    wait_ready(mesh.node("node-b")).await;
    // The old one leaves; traffic goes on through the new one.
    old.shutdown().await;
    let tunnels = mtls_inbound();
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"new").await.unwrap();
    assert_eq!(back, b"new");
    eventually("traffic through the new node proxy", || {
        mtls_inbound() > tunnels
    })
    .await;
    drop(open);
}
