//! The node proxy's data path end to end, across network namespaces: real pods (network
//! namespaces on a bridge) with the redirection rules installed, two node proxies, the
//! control plane and its CA, real TLS and HTTP/2 on the wire.
//!
//! Needs root, iproute2, nftables and tcpdump (CI installs them); without them each test
//! fails saying what is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ambit_cni::zds::{PodRef, ZdsListener};
use ambit_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SLEEP_ID: &str = "spiffe://cluster.local/ns/demo/sa/sleep";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ip_and_service_vip_across_nodes_carry_the_client_identity() {
    let mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    let sleep = mesh.pod("sleep");

    // By pod IP.
    let payload = pattern(1, 100_000);
    let back = exchange(sleep, mesh.addr("echo-1", APP_PORT), &payload)
        .await
        .unwrap();
    assert!(back == payload, "echo by pod IP returned other bytes");
    // By service VIP (80 -> 8080).
    let payload = pattern(2, 5_000);
    let back = exchange(sleep, ECHO_VIP, &payload).await.unwrap();
    assert!(back == payload, "echo by VIP returned other bytes");

    // The application saw the client pod's own address both times.
    assert_eq!(peers.ips(), vec![IpAddr::V4(mesh.spec("sleep").ip); 2]);

    // The destination's access log names the client's SPIFFE ID, the source's the
    // service and both identities.
    let inbound = logs::wait_access("inbound from sleep", |v| {
        v["direction"] == "inbound" && v["src.identity"] == SLEEP_ID
    })
    .await;
    assert_eq!(inbound["mtls"], true);
    assert_eq!(inbound["dst.workload"], "demo/echo-1");
    assert_eq!(inbound["error"], "");
    let outbound = logs::wait_access("outbound to the VIP", |v| {
        v["direction"] == "outbound" && v["dst.service"] == "echo.demo.svc.cluster.local"
    })
    .await;
    assert_eq!(outbound["src.identity"], SLEEP_ID);
    assert_eq!(outbound["dst.identity"], ECHO_ID);
    // As Istio logs them: the tunnel's address, and the application's inside it.
    assert_eq!(
        outbound["dst.addr"],
        format!("{}:15008", mesh.spec("echo-1").ip)
    );
    assert_eq!(
        outbound["dst.hbone_addr"],
        format!("{}:{APP_PORT}", mesh.spec("echo-1").ip)
    );
    assert_eq!(
        inbound["dst.addr"],
        format!("{}:15008", mesh.spec("echo-1").ip)
    );
    assert_eq!(
        inbound["dst.hbone_addr"],
        format!("{}:{APP_PORT}", mesh.spec("echo-1").ip)
    );
    assert_eq!(outbound["bytes_sent"], 5_000);
    assert_eq!(outbound["bytes_received"], 5_000);

    // Metrics on both sides, with Istio's labels.
    let dst = mesh.metrics("node-b").await;
    let labels = [
        ("reporter", "destination"),
        ("source_principal", SLEEP_ID),
        ("destination_principal", ECHO_ID),
        ("source_workload", "sleep"),
        ("destination_workload", "echo-1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        sum(&dst, "istio_tcp_connections_opened_total", &labels),
        2.0,
        "{dst}"
    );
    assert_eq!(
        sum(&dst, "istio_tcp_connections_closed_total", &labels),
        2.0
    );
    assert_eq!(
        sum(&dst, "istio_tcp_received_bytes_total", &labels),
        105_000.0
    );
    assert_eq!(sum(&dst, "istio_tcp_sent_bytes_total", &labels), 105_000.0);
    let src = mesh.metrics("node-a").await;
    let vip = [
        ("reporter", "source"),
        ("destination_service", "echo.demo.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        sum(&src, "istio_tcp_connections_opened_total", &vip),
        1.0,
        "{src}"
    );
    // The destination knows the service from the CONNECT's `forwarded: host=`.
    let vip = [
        ("reporter", "destination"),
        ("destination_service", "echo.demo.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "demo"),
    ];
    assert_eq!(
        sum(&dst, "istio_tcp_connections_opened_total", &vip),
        1.0,
        "{dst}"
    );

    // While a connection is open, the server pod holds it on 15008 from the client's
    // address, and the application's socket has the client's address too.
    let mut open = sleep.connect(mesh.addr("echo-1", APP_PORT)).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).await.unwrap();
    let conns = mesh.pod("echo-1").tcp_connections().unwrap();
    let client_ip = IpAddr::V4(mesh.spec("sleep").ip);
    assert!(
        conns
            .iter()
            .any(|(local, peer)| local.port() == 15008 && peer.ip() == client_ip),
        "no HBONE connection from the client in the server pod: {conns:?}"
    );
    assert!(
        conns
            .iter()
            .any(|(local, peer)| local.port() == APP_PORT && peer.ip() == client_ip),
        "the application's connection does not carry the client address: {conns:?}"
    );

    // The admin port lists the pods served and their certificates.
    let (_, dump) = ambit_admin::get(mesh.node("node-b").admin_addr(), "/config_dump")
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["pods"][0]["name"], "echo-1");
    assert_eq!(dump["pods"][0]["certificate_ready"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_between_nodes_are_tls_on_15008_never_plaintext() {
    let mesh = Mesh::start(cast()).await;
    mesh.echo_app("echo-1", APP_PORT);
    let marker = b"AMBIT-PLAINTEXT-MARKER-7f3a9c".repeat(200);

    let capture = mesh.topo.capture().unwrap();
    let back = exchange(mesh.pod("sleep"), mesh.addr("echo-1", APP_PORT), &marker)
        .await
        .unwrap();
    assert!(back == marker);
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, &marker)
        .await
        .unwrap();
    assert!(back == marker);
    // The control: an un-enrolled client sends the same bytes in the clear, and the
    // capture must see them (so a capture that saw nothing proves nothing).
    let back = exchange(mesh.pod("legacy"), mesh.addr("echo-1", APP_PORT), &marker)
        .await
        .unwrap();
    assert!(back == marker);
    let segments = capture.stop().unwrap();

    let sleep = SocketAddr::new(IpAddr::V4(mesh.spec("sleep").ip), 0).ip();
    let legacy = IpAddr::V4(mesh.spec("legacy").ip);
    let finder = memchr_like(b"AMBIT-PLAINTEXT-MARKER");
    let mesh_segments: Vec<_> = segments
        .iter()
        .filter(|s| s.src.ip() == sleep || s.dst.ip() == sleep)
        .collect();
    assert!(
        mesh_segments.len() > 4,
        "the capture saw too little of the mesh traffic: {} of {} segments",
        mesh_segments.len(),
        segments.len()
    );
    for s in &mesh_segments {
        assert!(
            s.has_port(15008),
            "a segment between the client and the server not on 15008: {} -> {}",
            s.src,
            s.dst
        );
        assert!(
            !finder(&s.payload),
            "plaintext crossed the wire: {} -> {}",
            s.src,
            s.dst
        );
    }
    // Each tunnel starts with a TLS handshake record from the client (0x16 0x03).
    let first_from_client = mesh_segments
        .iter()
        .find(|s| s.src.ip() == sleep && !s.payload.is_empty())
        .expect("no payload from the client");
    assert_eq!(
        &first_from_client.payload[..2],
        &[0x16, 0x03],
        "the first bytes on 15008 are not a TLS handshake"
    );
    // The control: the un-enrolled client's bytes were visible.
    assert!(
        segments
            .iter()
            .any(|s| s.src.ip() == legacy && finder(&s.payload)),
        "the capture did not see the plaintext control traffic: {} of {} segments from the un-enrolled client, {} payload bytes",
        segments.iter().filter(|s| s.src.ip() == legacy).count(),
        segments.len(),
        segments
            .iter()
            .filter(|s| s.src.ip() == legacy)
            .map(|s| s.payload.len())
            .sum::<usize>()
    );
}

/// A substring search for the marker (payloads are split across segments, but the
/// marker repeats, so each segment longer than it holds a whole copy if plaintext).
fn memchr_like(needle: &'static [u8]) -> impl Fn(&[u8]) -> bool {
    move |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_outside_the_mesh_pass_through_as_plain_tcp() {
    let mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("outside", APP_PORT);
    let payload = pattern(3, 50_000);
    let back = exchange(mesh.pod("sleep"), mesh.addr("outside", APP_PORT), &payload)
        .await
        .unwrap();
    assert!(back == payload);
    // Plain TCP straight from the pod: the host outside the mesh sees the pod's address.
    assert_eq!(peers.ips(), vec![IpAddr::V4(mesh.spec("sleep").ip)]);
    let line = logs::wait_access("passthrough", |v| {
        v["direction"] == "outbound" && v["dst.addr"] == mesh.addr("outside", APP_PORT).to_string()
    })
    .await;
    assert_eq!(line["mtls"], false);
    assert_eq!(line["dst.hbone_addr"], "");
    assert_eq!(line["bytes_sent"], 50_000);
    let src = mesh.metrics("node-a").await;
    let labels = [
        ("reporter", "source"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
        ("destination_workload", "unknown"),
    ];
    assert_eq!(
        sum(&src, "istio_tcp_sent_bytes_total", &labels),
        50_000.0,
        "{src}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_client_arrives_on_the_plaintext_port() {
    let mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    let legacy = mesh.pod("legacy");
    let mut conn = legacy.connect(mesh.addr("echo-1", APP_PORT)).await.unwrap();
    conn.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    // Inside the server pod, the client's connection ends on 15006 (where the rules
    // sent it), and the application sees the client's address.
    let legacy_ip = IpAddr::V4(mesh.spec("legacy").ip);
    let conns = mesh.pod("echo-1").tcp_connections().unwrap();
    assert!(
        conns
            .iter()
            .any(|(local, peer)| local.port() == 15006 && peer.ip() == legacy_ip),
        "{conns:?}"
    );
    assert_eq!(peers.ips(), vec![legacy_ip]);
    drop(conn);
    let line = logs::wait_access("plaintext inbound", |v| {
        v["direction"] == "inbound"
            && v["src.addr"]
                .as_str()
                .unwrap_or("")
                .starts_with("198.18.1.20:")
    })
    .await;
    assert_eq!(line["mtls"], false);
    assert_eq!(line["src.identity"], "");
    assert_eq!(line["src.workload"], "legacy/legacy");
    let dst = mesh.metrics("node-b").await;
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "legacy"),
        ("connection_security_policy", "none"),
        ("source_principal", "unknown"),
    ];
    assert_eq!(
        sum(&dst, "istio_tcp_connections_opened_total", &labels),
        1.0,
        "{dst}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pod_loses_its_listeners_and_keeps_its_connections() {
    let mesh = Mesh::start(cast()).await;
    mesh.echo_app("echo-1", APP_PORT);
    let echo = mesh.pod("echo-1");
    let ports = |pod: &ambit_testenv::Pod| -> Vec<u16> {
        let mut p: Vec<u16> = pod
            .tcp_listeners()
            .unwrap()
            .iter()
            .map(SocketAddr::port)
            .filter(|p| [15001, 15006, 15008].contains(p))
            .collect();
        // (Each port is listened on for IPv4 and IPv6.)
        p.sort();
        p.dedup();
        p
    };
    assert_eq!(ports(echo), [15001, 15006, 15008]);

    // A connection open when the pod goes.
    let mut open = mesh
        .pod("sleep")
        .connect(mesh.addr("echo-1", APP_PORT))
        .await
        .unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    let node = mesh.node("node-b");
    assert!(node.pods().remove(&mesh.spec("echo-1").uid()));
    // Listeners go at once.
    let started = Instant::now();
    while !ports(echo).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "listeners still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(node.pods().status().is_empty());
    // The open connection is not cut, even well past the drain timeout (2 s here), which
    // applies only when the node proxy itself shuts down.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    open.write_all(b"during").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    assert_eq!(node.pods().draining(), 1);
    // The tunnel still belongs to the pod: its certificate is kept for it.
    let echo_id = mesh.spec("echo-1").spiffe();
    let holds = |node: &ambit_node::NodeProxy| {
        let node = node.admin_addr();
        let echo_id = echo_id.clone();
        async move {
            let (_, dump) = ambit_admin::get(node, "/config_dump").await.unwrap();
            let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
            dump["certificates"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["identity"] == echo_id.as_str())
        }
    };
    assert!(
        holds(node).await,
        "the certificate went while a tunnel was open"
    );
    // It ends when its client ends it; then nothing of the pod is left.
    drop(open);
    eventually("the removed pod's last connection to end", || {
        node.pods().draining() == 0
    })
    .await;
    assert!(!holds(node).await, "the certificate outlived the pod");

    // Served again, with a connection open when the node proxy shuts down: that one
    // gets the drain timeout, then is closed.
    let spec = mesh.spec("echo-1");
    node.pods().add(spec.info(), echo.netns.clone()).unwrap();
    assert_eq!(ports(echo), [15001, 15006, 15008]);
    wait_ready(node).await;
    let mut open = mesh
        .pod("sleep")
        .connect(mesh.addr("echo-1", APP_PORT))
        .await
        .unwrap();
    open.write_all(b"again!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    let mut mesh = mesh;
    let node = mesh.nodes.remove("node-b").unwrap();
    let started = Instant::now();
    let shutdown = tokio::spawn(node.shutdown());
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(
        end.is_ok(),
        "the connection outlived the node proxy's drain"
    );
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed before the drain timeout: {closed_after:?}"
    );
    // ... and at it (2 s here), inbound tunnel included, not whenever the process ends.
    assert!(
        closed_after < Duration::from_millis(4500),
        "the inbound tunnel outlived the drain deadline: {closed_after:?}"
    );
    shutdown.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_keep_every_byte() {
    let mesh = Mesh::start(cast()).await;
    mesh.echo_app("echo-1", APP_PORT);
    let sleep = mesh.pod("sleep").clone();
    const CONNS: usize = 1000;
    const BYTES: usize = 32 * 1024;

    // All connections open first, then all transfer at once.
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let to = if i % 2 == 0 {
            mesh.addr("echo-1", APP_PORT)
        } else {
            ECHO_VIP
        };
        conns.push(sleep.connect(to).await.unwrap());
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CONNS));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            let payload = pattern(1000 + i as u64, BYTES);
            let back = round_trip(&mut conn, &payload).await?;
            Ok::<bool, std::io::Error>(back == payload)
        });
    }
    let mut good = 0;
    while let Some(r) = tasks.join_next().await {
        let same = r.unwrap().expect("a connection failed");
        assert!(same, "a connection got back other bytes than it sent");
        good += 1;
    }
    assert_eq!(good, CONNS);
    let dst = mesh.metrics("node-b").await;
    let labels = [("reporter", "destination"), ("source_principal", SLEEP_ID)];
    // Connections are counted closed once both proxies have seen them end.
    let mut closed = 0.0;
    for _ in 0..100 {
        closed = sum(
            &mesh.metrics("node-b").await,
            "istio_tcp_connections_closed_total",
            &labels,
        );
        if closed == CONNS as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(closed, CONNS as f64, "{dst}");
    let received = sum(
        &mesh.metrics("node-b").await,
        "istio_tcp_received_bytes_total",
        &labels,
    );
    assert_eq!(received, (CONNS * BYTES) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_destinations_fail_fast_and_are_counted() {
    let mesh = Mesh::start(cast()).await;
    // A mesh workload with nothing listening on the port: the far proxy cannot connect
    // to the application and refuses the tunnel.
    let sleep = mesh.pod("sleep");
    let started = Instant::now();
    let result = exchange(sleep, mesh.addr("echo-1", 9999), b"anyone?").await;
    match result {
        Ok(back) => assert!(back.is_empty(), "got bytes from nowhere"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
            ) || e.to_string().contains("reset"),
            "{e}"
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // A plain destination where nobody answers (no such host on the bridge).
    let started = Instant::now();
    let result = exchange(sleep, "198.18.9.9:80".parse().unwrap(), b"anyone?").await;
    assert!(
        result.map(|b| b.is_empty()).unwrap_or(true),
        "got bytes from nowhere"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let src = mesh.metrics("node-a").await;
    let failures: f64 = src
        .lines()
        .find(|l| l.starts_with("ambit_node_connect_failures_total "))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(failures, 2.0, "{src}");
    assert_eq!(
        sum(
            &src,
            "istio_tcp_connections_closed_total",
            &[("reporter", "source"), ("response_flags", "CONNECT")]
        ),
        2.0,
        "{src}"
    );
    let dst = mesh.metrics("node-b").await;
    assert_eq!(
        sum(
            &dst,
            "istio_tcp_connections_closed_total",
            &[("response_flags", "CONNECT")]
        ),
        1.0,
        "{dst}"
    );
}

async fn accept(listener: &mut ZdsListener) -> ambit_cni::zds::ZdsSession {
    tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the node proxy did not connect")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_adds_and_removes_pods_over_zds() {
    // node-b has no local pods: it connects to an agent's socket (served here by the
    // test, as `ambit cni` serves it) and learns about echo-1 over ZDS.
    let mut specs = cast();
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("ztunnel/ztunnel.sock");
    let path = socket.clone();
    let start = Mesh::start_with(specs.clone(), |c| {
        if c.xds.node_name == "node-b" {
            c.local_pods.clear();
            c.zds_socket = Some(path.clone());
        }
    });
    // The node proxy starts before the agent listens and keeps retrying; it is ready
    // once the agent's (here empty) snapshot has arrived.
    let agent_side = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut listener = ZdsListener::bind(&socket, &[0], Duration::from_secs(5)).unwrap();
        let agent = accept(&mut listener).await;
        agent.snapshot_sent().await.unwrap();
        (listener, agent)
    };
    let (mesh, (mut listener, agent)) = tokio::join!(start, agent_side);
    specs.retain(|s| s.name == "echo-1");
    let echo = mesh.pod("echo-1");
    let spec = mesh.spec("echo-1");
    let peers = mesh.echo_app("echo-1", APP_PORT);
    let pod = PodRef {
        uid: spec.uid(),
        name: spec.name.into(),
        namespace: spec.namespace.into(),
        service_account: spec.service_account.into(),
    };
    let listening = |pod: &ambit_testenv::Pod| {
        pod.tcp_listeners()
            .unwrap()
            .iter()
            .any(|a| a.port() == 15008)
    };
    assert!(!listening(echo));

    // Bad requests get an error, not a crash: an add without a namespace descriptor,
    // and the node proxy's own (here: the host's) namespace.
    let netns = std::fs::File::open(echo.netns_path()).unwrap();
    let not_a_netns = std::fs::File::open("/dev/null").unwrap();
    let err = agent.add(&pod, not_a_netns.as_fd()).await.unwrap_err();
    assert!(err.to_string().contains("not a network namespace"), "{err}");
    let own = std::fs::File::open("/proc/self/ns/net").unwrap();
    let err = agent.add(&pod, own.as_fd()).await.unwrap_err();
    assert!(err.to_string().contains("own network namespace"), "{err}");
    assert!(!listening(echo));
    agent.add(&pod, netns.as_fd()).await.unwrap();
    assert!(listening(echo));
    wait_ready(mesh.node("node-b")).await;
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"over zds")
        .await
        .unwrap();
    assert_eq!(back, b"over zds");
    assert_eq!(peers.ips(), vec![IpAddr::V4(mesh.spec("sleep").ip)]);

    // Losing the agent changes nothing; the proxy connects again by itself.
    drop(agent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(listening(echo));
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"still")
        .await
        .unwrap();
    assert_eq!(back, b"still");

    // The new session's snapshot keeps the pod: nothing changes either.
    let agent = accept(&mut listener).await;
    agent.keep(&pod.uid).await.unwrap();
    agent.snapshot_sent().await.unwrap();
    assert!(listening(echo));
    // A snapshot sent twice on one session is refused.
    assert!(agent.snapshot_sent().await.is_err());
    drop(agent);

    // A snapshot without the pod: its listeners close.
    let agent = accept(&mut listener).await;
    agent.snapshot_sent().await.unwrap();
    assert!(!listening(echo));
    assert!(mesh.node("node-b").pods().status().is_empty());

    // Added again, then deleted.
    agent.add(&pod, netns.as_fd()).await.unwrap();
    assert!(listening(echo));
    agent.del(&pod.uid).await.unwrap();
    assert!(!listening(echo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_placed_on_another_node_gets_no_identity_and_is_not_ready() {
    let mesh = Mesh::start(cast()).await;
    // node-c claims to serve echo-1 (which the model places on node-b), in the
    // namespace of the host outside the mesh.
    let mut config = mesh.node_config("node-c");
    let mut claimed = mesh.spec("echo-1").info();
    claimed.uid = "uid-impostor".into();
    config.local_pods = vec![(claimed, mesh.pod("outside").netns_path())];
    let impostor = ambit_node::NodeProxy::start(config).await.unwrap();

    // The control plane refuses the certificate, so the node never becomes ready and
    // says why.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = ambit_admin::get(impostor.readiness_addr(), "/healthz/ready")
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for its certificate"), "{body}");
    let (_, dump) = ambit_admin::get(impostor.admin_addr(), "/config_dump")
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["pods"][0]["certificate_ready"], false);

    // Its HBONE port presents nothing: a TLS ClientHello gets an alert where a real
    // pod (the control) answers with its ServerHello.
    let legacy = mesh.pod("legacy");
    assert_eq!(
        first_tls_record(legacy, mesh.addr("echo-1", 15008), &mesh.roots()).await,
        0x16,
        "the real pod should answer with a handshake record"
    );
    assert_eq!(
        first_tls_record(legacy, mesh.addr("outside", 15008), &mesh.roots()).await,
        0x15,
        "the impostor answered a TLS handshake"
    );
    impostor.shutdown().await;
}

/// Sends a real TLS 1.3 ClientHello from `from` to `to`; returns the content type of
/// the first record that comes back (0x16 handshake, 0x15 alert).
async fn first_tls_record(
    from: &ambit_testenv::Pod,
    to: SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> u8 {
    let config = ambit_tls::config::client_config_with_roots(roots).unwrap();
    let mut tls = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::try_from("pod").unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    let mut conn = from.connect(to).await.unwrap();
    conn.write_all(&hello).await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut first))
        .await
        .expect("no answer to a ClientHello")
        .expect("the connection closed without a TLS record");
    first[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_must_name_an_address_of_the_pod() {
    use ambit_hbone::socket::SocketOptions;
    use ambit_hbone::{ConnectHeaders, ConnectRequest, Pool, PoolConfig};
    use ambit_tls::testing::TestPki;

    let mesh = Mesh::start(cast()).await;
    mesh.echo_app("echo-1", APP_PORT);
    // A genuine mesh client: a certificate from the mesh CA for sleep's identity, the
    // tunnel opened from a pod without redirection so it reaches 15008 as is.
    let pki = TestPki::load(&mesh.dir.path().join("state/ca"));
    let sleep_id = TestPki::id("demo", "sleep");
    let cert = pki.issue(&sleep_id, Duration::from_secs(600));
    let pool = Pool::new(PoolConfig::default(), pki.bundle());
    let request = |authority: SocketAddr| ConnectRequest {
        source: sleep_id.clone(),
        source_cert: cert.clone(),
        destination: mesh.addr("echo-1", 15008),
        expected: vec![TestPki::id("demo", "echo")],
        authority,
        headers: ConnectHeaders::default(),
        socket: SocketOptions {
            netns: Some(mesh.pod("legacy").netns.clone()),
            ..SocketOptions::default()
        },
    };
    // The control: the pod's own address works.
    let stream = pool.connect(request(mesh.addr("echo-1", APP_PORT))).await;
    assert!(stream.is_ok(), "{:?}", stream.err());
    // Another pod's address, or the proxy's own ports: 400, nothing reaches anyone.
    for authority in [
        mesh.addr("outside", APP_PORT),
        mesh.addr("sleep", APP_PORT),
        mesh.addr("echo-1", 15008),
        mesh.addr("echo-1", 15006),
    ] {
        let err = pool.connect(request(authority)).await.unwrap_err();
        assert_eq!(
            err.status().map(|s| s.as_u16()),
            Some(400),
            "{authority}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_trust_domain_under_the_mesh_root_is_refused_at_the_handshake() {
    use ambit_hbone::socket::SocketOptions;
    use ambit_hbone::{ConnectHeaders, ConnectRequest, Pool, PoolConfig};
    use ambit_tls::testing::TestPki;

    let mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    // The mesh CA's own root, but an identity in another trust domain (as a second
    // cluster sharing the root would have).
    let pki = TestPki::load(&mesh.dir.path().join("state/ca"));
    let pool = Pool::new(PoolConfig::default(), pki.bundle());
    let attempt = |id: ambit_core::SpiffeId| {
        let request = ConnectRequest {
            source: id.clone(),
            source_cert: pki.issue(&id, Duration::from_secs(600)),
            destination: mesh.addr("echo-1", 15008),
            expected: vec![TestPki::id("demo", "echo")],
            authority: mesh.addr("echo-1", APP_PORT),
            headers: ConnectHeaders::default(),
            socket: SocketOptions {
                netns: Some(mesh.pod("legacy").netns.clone()),
                ..SocketOptions::default()
            },
        };
        pool.connect(request)
    };
    let foreign = ambit_core::SpiffeId::new("other.example", "demo", "sleep").unwrap();
    let err = attempt(foreign).await.unwrap_err();
    assert!(
        err.status().is_none(),
        "refused in the handshake, not by a CONNECT status: {err}"
    );
    assert!(peers.all().is_empty(), "nothing reached the application");
    // The control: the same root, the mesh's trust domain.
    assert!(attempt(TestPki::id("demo", "sleep")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_bound_to_a_waypoint_that_is_not_running_is_refused_not_bypassed() {
    logs::init();
    let mesh = Mesh::start(cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    assert_eq!(
        exchange(mesh.pod("sleep"), ECHO_VIP, b"before")
            .await
            .unwrap(),
        b"before"
    );

    // The echo Service names a waypoint that does not exist.
    let path = mesh.dir.path().join("manifests/mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let labelled = text.replace(
        "metadata: {name: echo, namespace: demo}",
        "metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}",
    );
    assert_ne!(text, labelled);
    std::fs::write(&path, labelled).unwrap();
    let node = mesh.node("node-a");
    eventually("the service's waypoint to reach node-a", || {
        node.store()
            .load()
            .services()
            .any(|s| s.name.as_ref() == "echo" && s.waypoint.is_some())
    })
    .await;

    let served = peers.all().len();
    assert!(
        exchange(mesh.pod("sleep"), ECHO_VIP, b"around")
            .await
            .is_err(),
        "the connection went around the waypoint"
    );
    assert_eq!(peers.all().len(), served);
    let line = logs::wait_access("the refusal", |v| {
        v["direction"] == "outbound"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("waypoint demo/waypoint.demo.svc.cluster.local"))
    })
    .await;
    assert_eq!(line["dst.service"], "echo.demo.svc.cluster.local");
    // The pod itself is not bound (the waypoint would take services only).
    let direct = exchange(mesh.pod("sleep"), mesh.addr("echo-1", APP_PORT), b"pod").await;
    assert_eq!(direct.unwrap(), b"pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_series_of_a_workload_that_is_gone_disappear() {
    let mesh = Mesh::start_with(cast(), |c| {
        c.dataplane.metrics_retention = Duration::from_millis(500);
    })
    .await;
    mesh.echo_app("echo-1", APP_PORT);
    let back = exchange(mesh.pod("sleep"), mesh.addr("echo-1", APP_PORT), b"x").await;
    assert_eq!(back.unwrap(), b"x");
    let names_echo = |page: &str| {
        page.lines()
            .any(|l| l.starts_with("istio_tcp_") && l.contains("destination_workload=\"echo-1\""))
    };
    eventually_async("node-a's series for echo-1", || async {
        names_echo(&mesh.metrics("node-a").await)
    })
    .await;

    // echo-1 leaves the mesh (its pod is deleted from the manifests).
    let path = mesh.dir.path().join("manifests/mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<&str> = text
        .split("\n---\n")
        .filter(|d| !d.contains("name: echo-1,"))
        .collect();
    assert!(
        docs.len() < text.split("\n---\n").count(),
        "echo-1 not found in {text}"
    );
    std::fs::write(&path, docs.join("\n---\n")).unwrap();
    eventually_async("node-a's series for echo-1 to be removed", || async {
        !names_echo(&mesh.metrics("node-a").await)
    })
    .await;
    // sleep's other series stay.
    let page = mesh.metrics("node-a").await;
    assert!(page.contains("ambit_node_pods 1"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_talk_over_ipv6_through_the_mesh() {
    use std::net::Ipv6Addr;
    logs::init();
    let mesh = Mesh::start(cast()).await;
    let sleep6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 1, 0x10);
    let echo6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 2, 0x10);
    let vip6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0xf, 0x10);
    mesh.topo.add_ipv6(mesh.pod("sleep"), sleep6).unwrap();
    mesh.topo.add_ipv6(mesh.pod("echo-1"), echo6).unwrap();
    // The model learns both addresses of each pod and both VIPs of the service.
    let path = mesh.dir.path().join("manifests/mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let dual = text
        .replace(
            "podIP: 198.18.1.10,",
            &format!("podIP: 198.18.1.10, podIPs: [{{ip: 198.18.1.10}}, {{ip: '{sleep6}'}}],"),
        )
        .replace(
            "podIP: 198.18.2.10,",
            &format!("podIP: 198.18.2.10, podIPs: [{{ip: 198.18.2.10}}, {{ip: '{echo6}'}}],"),
        )
        .replace(
            "clusterIP: 198.19.0.10",
            &format!("clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, '{vip6}']"),
        );
    assert_ne!(dual, text);
    std::fs::write(&path, dual).unwrap();
    let node = mesh.node("node-a");
    eventually("both pods' IPv6 addresses to reach node-a", || {
        let st = node.store().load();
        st.workload_by_ip("", IpAddr::V6(echo6)).is_some()
            && st.workload_by_ip("", IpAddr::V6(sleep6)).is_some()
            && st.service_by_vip("", IpAddr::V6(vip6)).is_some()
    })
    .await;
    let peers = mesh.echo_app_on(
        "echo-1",
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), APP_PORT),
    );
    let capture = mesh.topo.capture().unwrap();

    // By pod address and by service VIP, over IPv6, through both node proxies.
    for (to, what) in [
        (SocketAddr::new(echo6.into(), APP_PORT), "pod"),
        (SocketAddr::new(vip6.into(), 80), "vip"),
    ] {
        let back = exchange(mesh.pod("sleep"), to, what.as_bytes()).await;
        assert_eq!(back.unwrap(), what.as_bytes(), "{to}");
    }
    // The application saw sleep's own IPv6 address.
    assert!(
        peers.ips().iter().all(|ip| *ip == IpAddr::V6(sleep6)),
        "{:?}",
        peers.ips()
    );
    // The destination authenticated sleep, the tunnel being [echo-1]:15008.
    let line = logs::wait_access("inbound over IPv6", |v| {
        v["direction"] == "inbound"
            && v["src.identity"] == "spiffe://cluster.local/ns/demo/sa/sleep"
            && v["dst.hbone_addr"] == format!("[{echo6}]:{APP_PORT}")
    })
    .await;
    assert_eq!(line["dst.addr"], format!("[{echo6}]:15008"));
    assert_eq!(line["mtls"], true);
    // Only TLS on 15008 crossed between the pods.
    let packets = capture.stop().unwrap();
    assert!(
        packets
            .iter()
            .any(|p| p.dst.ip() == IpAddr::V6(echo6) && p.dst.port() == 15008),
        "no IPv6 HBONE packet seen"
    );
    assert!(
        !packets
            .iter()
            .any(|p| p.dst.ip() == IpAddr::V6(echo6) && p.dst.port() == APP_PORT),
        "plaintext crossed the bridge to the application port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_when_done_is_an_ordinary_close() {
    logs::init();
    let mesh = Mesh::start(cast()).await;
    let _peers = mesh.echo_app("echo-1", APP_PORT);
    let mut conn = mesh
        .pod("sleep")
        .connect(mesh.addr("echo-1", APP_PORT))
        .await
        .unwrap();
    // One request and its answer, then a reset instead of a close, as load generators
    // and many clients end their connections.
    conn.write_all(b"last request").await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"last request");
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(conn);

    for direction in ["outbound", "inbound"] {
        let line = logs::wait_access(direction, |v| {
            v["direction"] == direction && v["src.identity"] == SLEEP_ID && v["bytes_sent"] == 12
        })
        .await;
        assert_eq!(line["error"], "", "{direction}: {line}");
        assert_eq!(line["bytes_received"], 12, "{direction}: {line}");
    }
    for (node, reporter) in [("node-a", "source"), ("node-b", "destination")] {
        let page = mesh.metrics(node).await;
        assert_eq!(
            sum(
                &page,
                "istio_tcp_connections_closed_total",
                &[("reporter", reporter), ("response_flags", "-")]
            ),
            1.0,
            "{page}"
        );
    }
}

/// Collections the node proxies ran on a data-path thread (the binary's allocator
/// collection, replaced by a counter).
static DATA_THREAD_COLLECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_collection() {
    if ambit_core::datapath::on_data_thread() {
        DATA_THREAD_COLLECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What delays every connection on a thread stays off the data path: certificates are
/// fetched on the control thread, and a data thread returns free memory only while it
/// carries no connection. Both are counted when broken
/// (`ambit_node_data_path_violations_total`), here with collection ticks every 20 ms
/// while a connection is carried through both proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_threads_never_fetch_certificates_or_collect_while_serving() {
    let mesh = Mesh::start_with(cast(), |c| {
        c.release_memory = Some(count_collection);
        c.release_memory_every = Duration::from_millis(20);
    })
    .await;
    let _peers = mesh.echo_app("echo-1", APP_PORT);
    let mut conn = mesh
        .pod("sleep")
        .connect(mesh.addr("echo-1", APP_PORT))
        .await
        .unwrap();
    // Half a second of echoes on one connection: ~25 collection ticks on its threads.
    let start = Instant::now();
    let mut round = 0u64;
    while start.elapsed() < Duration::from_millis(500) {
        round += 1;
        let payload = pattern(round, 4096);
        conn.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
            .await
            .expect("no echo within 5 s")
            .unwrap();
        assert!(back == payload, "round {round}: other bytes came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for node in ["node-a", "node-b"] {
        let page = mesh.metrics(node).await;
        for work in ["certificate", "allocator_collection"] {
            let line = format!("ambit_node_data_path_violations_total{{work=\"{work}\"}} 0");
            assert!(
                page.lines().any(|l| l == line),
                "{node}: expected `{line}`:\n{}",
                page.lines()
                    .filter(|l| l.contains("data_path") || l.contains("worker_connections"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        // The connection is counted on one of the node's data threads.
        assert!(
            page.lines()
                .any(|l| l.starts_with("ambit_node_worker_connections{") && l.ends_with(" 1")),
            "{node}: no worker carries the connection"
        );
    }
    // The idle data threads did collect (the test's counter stands in for the allocator).
    assert!(DATA_THREAD_COLLECTIONS.load(std::sync::atomic::Ordering::Relaxed) > 0);
    drop(conn);
}
