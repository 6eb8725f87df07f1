//! L4 authorization end to end: policies written as Istio users write them, through the
//! control plane and discovery, enforced by the destination node proxy on real
//! connections between network namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use ambit_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The usual cast plus a second client in `demo` (service account `other`) and a client
/// in namespace `prod`, both on node-a.
fn authz_cast() -> Vec<PodSpec> {
    let mut specs = cast();
    specs.push(PodSpec {
        name: "other",
        namespace: "demo",
        service_account: "other",
        app: "other",
        node: "node-a",
        ip: Ipv4Addr::new(198, 18, 1, 11),
        enrolled: true,
        in_model: true,
    });
    specs.push(PodSpec {
        name: "client",
        namespace: "prod",
        service_account: "client",
        app: "client",
        node: "node-a",
        ip: Ipv4Addr::new(198, 18, 1, 12),
        enrolled: true,
        in_model: true,
    });
    specs
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n---\n"
    )
}

/// Whether an echo round from `client` to echo-1 works.
async fn reaches(mesh: &Mesh, client: &str) -> bool {
    let addr = mesh.addr("echo-1", APP_PORT);
    matches!(exchange(mesh.pod(client), addr, b"ping").await, Ok(b) if b == b"ping")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_on_one_principal_stops_that_client_and_not_another() {
    logs::init();
    let mesh = Mesh::start(authz_cast()).await;
    let peers = mesh.echo_app("echo-1", APP_PORT);
    assert!(reaches(&mesh, "other").await, "before the policy");

    mesh.apply_policies(
        &policy(
            "deny-other",
            "{selector: {matchLabels: {app: echo}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/other]}}]}]}",
        ),
        &["demo/deny-other"],
    )
    .await;
    let served_before = peers.all().len();
    assert!(!reaches(&mesh, "other").await, "other is denied");
    assert_eq!(
        peers.all().len(),
        served_before,
        "nothing of a denied connection reaches the application"
    );
    assert!(reaches(&mesh, "sleep").await, "sleep still works");

    // The destination says which policy decided; the source saw the 401.
    let line = logs::wait_access("denied inbound", |v| {
        v["direction"] == "inbound"
            && v["src.identity"] == "spiffe://cluster.local/ns/demo/sa/other"
            && v["authz"] == "denied by demo/deny-other"
    })
    .await;
    assert_eq!(line["bytes_sent"], 0);
    let dst = mesh.metrics("node-b").await;
    let denied = [
        ("reporter", "destination"),
        ("source_workload", "other"),
        ("response_flags", "DENY"),
    ];
    assert_eq!(
        sum(&dst, "istio_tcp_connections_closed_total", &denied),
        1.0,
        "{dst}"
    );
    let src = mesh.metrics("node-a").await;
    let denied = [
        ("reporter", "source"),
        ("source_workload", "other"),
        ("response_flags", "DENY"),
    ];
    assert_eq!(
        sum(&src, "istio_tcp_connections_closed_total", &denied),
        1.0,
        "{src}"
    );
    // A refusal by policy is a denial on both sides, never a failure to connect.
    assert_eq!(
        sum(
            &dst,
            "ambit_node_policy_denials_total",
            &[("direction", "inbound")]
        ),
        1.0,
        "{dst}"
    );
    assert_eq!(
        sum(
            &src,
            "ambit_node_policy_denials_total",
            &[("direction", "outbound")]
        ),
        1.0,
        "{src}"
    );
    for page in [&src, &dst] {
        let failures = samples(page, "ambit_node_connect_failures_total", &[]);
        assert_eq!(failures.len(), 1, "{page}");
        assert_eq!(failures[0].1, 0.0, "{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_admits_only_listed_namespaces() {
    logs::init();
    let mesh = Mesh::start(authz_cast()).await;
    let _peers = mesh.echo_app("echo-1", APP_PORT);
    assert!(reaches(&mesh, "client").await, "before the policy");
    mesh.apply_policies(
        &policy(
            "only-demo",
            "{rules: [{from: [{source: {namespaces: [demo]}}]}]}",
        ),
        &["demo/only-demo"],
    )
    .await;
    assert!(reaches(&mesh, "sleep").await);
    assert!(reaches(&mesh, "other").await);
    assert!(!reaches(&mesh, "client").await, "prod is not listed");
    // Plaintext has no namespace: not on the list either.
    assert!(!reaches(&mesh, "legacy").await);
    logs::wait_access("prod refused", |v| {
        v["direction"] == "inbound"
            && v["src.identity"] == "spiffe://cluster.local/ns/prod/sa/client"
            && v["authz"] == "denied: no ALLOW policy matched"
    })
    .await;

    // Removing the policy opens the door again.
    mesh.apply_policies("", &[]).await;
    assert!(reaches(&mesh, "client").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_refuses_an_unenrolled_client() {
    logs::init();
    let mesh = Mesh::start(authz_cast()).await;
    let _peers = mesh.echo_app("echo-1", APP_PORT);
    assert!(reaches(&mesh, "legacy").await, "PERMISSIVE by default");
    mesh.apply_policies(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
        &["demo/ambit_peer_authentication_default"],
    )
    .await;
    assert!(!reaches(&mesh, "legacy").await, "plaintext is refused");
    assert!(reaches(&mesh, "sleep").await, "mTLS still works");
    let line = logs::wait_access("plaintext refused", |v| {
        v["direction"] == "inbound"
            && v["mtls"] == false
            && v["authz"] == "denied by demo/ambit_peer_authentication_default"
    })
    .await;
    assert_eq!(line["src.workload"], "legacy/legacy");

    // A port-level PERMISSIVE exception on the workload lets plaintext in again.
    mesh.apply_policies(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: echo, namespace: demo}\nspec: {selector: {matchLabels: {app: echo}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}\n",
        &[
            "demo/ambit_peer_authentication_default",
            "demo/ambit_peer_authentication_echo",
        ],
    )
    .await;
    assert!(reaches(&mesh, "legacy").await, "port 8080 is PERMISSIVE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_while_a_connection_is_open_closes_it() {
    logs::init();
    let mesh = Mesh::start(authz_cast()).await;
    let _peers = mesh.echo_app("echo-1", APP_PORT);
    let addr = mesh.addr("echo-1", APP_PORT);
    let mut sleep_conn = mesh.pod("sleep").connect(addr).await.unwrap();
    let mut other_conn = mesh.pod("other").connect(addr).await.unwrap();
    let mut legacy_conn = mesh.pod("legacy").connect(addr).await.unwrap();
    for c in [&mut sleep_conn, &mut other_conn, &mut legacy_conn] {
        assert_eq!(round(c, b"before").await.unwrap(), b"before");
    }

    // Deny sleep (mTLS) and require mTLS (legacy is plaintext); other is untouched.
    mesh.apply_policies(
        &(policy(
            "deny-sleep",
            "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]}",
        ) + "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n"),
        &["demo/deny-sleep", "demo/ambit_peer_authentication_default"],
    )
    .await;
    for (what, c) in [("sleep", &mut sleep_conn), ("legacy", &mut legacy_conn)] {
        assert!(
            closed(c).await,
            "{what}'s open connection is closed by the new policy"
        );
    }
    assert_eq!(round(&mut other_conn, b"after").await.unwrap(), b"after");
    let line = logs::wait_access("revoked", |v| {
        v["direction"] == "inbound"
            && v["src.identity"] == "spiffe://cluster.local/ns/demo/sa/sleep"
            && v["error"]
                .as_str()
                .unwrap_or("")
                .contains("denied by demo/deny-sleep (policies changed)")
    })
    .await;
    // "before" (6 bytes), and the 1-byte probe `closed` writes when it crossed before
    // the revocation reached this connection (the policy is in the store when
    // `apply_policies` returns; closing open connections follows asynchronously).
    let sent = line["bytes_sent"].as_u64();
    assert!(
        matches!(sent, Some(6 | 7)),
        "the bytes before the change are counted: {sent:?}"
    );
    let dst = mesh.metrics("node-b").await;
    let revoked = [
        ("reporter", "destination"),
        ("source_workload", "sleep"),
        ("response_flags", "DENY"),
    ];
    assert_eq!(
        sum(&dst, "istio_tcp_connections_closed_total", &revoked),
        1.0,
        "{dst}"
    );
    // New connections follow the new policy too.
    assert!(!reaches(&mesh, "sleep").await);
}

/// One echo round on an open connection.
async fn round(conn: &mut tokio::net::TcpStream, what: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.write_all(what).await?;
    let mut back = vec![0u8; what.len()];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no echo within 5 s"))??;
    Ok(back)
}

/// Whether the connection ends (EOF or reset) within 5 s.
/// Whether `conn` is closed within 5 s. The 1-byte probe it writes may cross before the
/// revocation reaches the connection and come back echoed: that is not an answer, so it
/// reads on until the end of the stream (closed) or the deadline (still open).
async fn closed(conn: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let _ = conn.write_all(b"x").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}
