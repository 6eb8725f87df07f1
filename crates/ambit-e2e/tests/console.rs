//! The mesh console against a real mesh (two nodes of network namespaces, real node
//! proxies reporting to the real control plane): its JSON API, and the page itself in
//! headless Chromium (Debian's `chromium` package), with screenshots kept as artefacts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::*;
use serde_json::Value;

const APP_PORT: u16 = 8080;

async fn api(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = ambit_admin::get(addr, path).await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A mesh where sleep talks to echo-1 in mutual TLS, and legacy (not in the mesh) is
/// denied by echo-1's policy; returns it once the console shows both edges.
async fn mesh_with_traffic() -> (Mesh, SocketAddr) {
    logs::init();
    let mesh = Mesh::start(cast()).await;
    let console = mesh.cp.console_addr().expect("the console is served");
    mesh.echo_app("echo-1", APP_PORT);
    mesh.apply_policies(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-from-demo, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {namespaces: [demo]}}]}]
",
        &["demo/echo-from-demo"],
    )
    .await;
    let to = mesh.addr("echo-1", APP_PORT);
    for _ in 0..3 {
        exchange(mesh.pod("sleep"), to, b"hello").await.unwrap();
    }
    // From outside the mesh: plaintext, refused by echo-1's node proxy.
    assert!(exchange(mesh.pod("legacy"), to, b"hello").await.is_err());
    eventually_async("both edges in the console", || async {
        let g = api(console, "/api/graph").await;
        let edges = g["edges"].as_array().cloned().unwrap_or_default();
        let find = |src: &str| {
            edges
                .iter()
                .find(|e| e["source"] == src && e["destination"] == "demo/echo-1")
                .cloned()
        };
        find("demo/sleep").is_some_and(|e| e["security"] == "mutual_tls")
            && find("legacy/legacy").is_some_and(|e| e["security"] == "denied")
    })
    .await;
    (mesh, console)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_api_shows_the_graph_workloads_policies_and_search() {
    let (mesh, console) = mesh_with_traffic().await;
    let g = api(console, "/api/graph").await;
    let edge = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"] == "demo/sleep" && e["destination"] == "demo/echo-1")
        .unwrap()
        .clone();
    assert_eq!(
        edge["source_principal"],
        "spiffe://cluster.local/ns/demo/sa/sleep"
    );
    assert_eq!(
        edge["destination_principal"],
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    assert!(edge["connections_total"].as_f64().unwrap() >= 3.0, "{edge}");
    assert!(edge["bytes_total"].as_f64().unwrap() > 0.0, "{edge}");
    let reporters = g["reporters"].as_array().unwrap();
    assert_eq!(
        reporters.len(),
        2,
        "both node proxies report: {reporters:?}"
    );
    // The workload page: identity, node, addresses, its policy and its certificate.
    let w = api(console, "/api/workload?namespace=demo&name=echo-1").await;
    assert_eq!(w["identity"], "spiffe://cluster.local/ns/demo/sa/echo");
    assert_eq!(w["node"], "node-b");
    assert_eq!(w["ips"], serde_json::json!(["198.18.2.10"]));
    assert_eq!(w["services"], serde_json::json!(["echo"]));
    assert_eq!(w["policies"][0]["name"], "echo-from-demo");
    let serial = w["certificate"]["serial"].as_str().unwrap_or_default();
    assert!(!serial.is_empty(), "{w}");
    // The serial is the one node-b's proxy holds for that identity.
    let (_, dump) = ambit_admin::get(mesh.node("node-b").admin_addr(), "/config_dump")
        .await
        .unwrap();
    assert!(
        dump.contains(serial),
        "{serial} not in node-b's config dump"
    );
    let (status, _) = ambit_admin::get(console, "/api/workload?namespace=demo&name=nope")
        .await
        .unwrap();
    assert_eq!(status, 404);
    // Policies, with what they select.
    let p = api(console, "/api/policies").await;
    let policy = &p["policies"][0];
    assert_eq!(policy["name"], "echo-from-demo");
    assert_eq!(policy["enforced"], true);
    assert_eq!(policy["selects"], "pods in demo labelled app=echo");
    // Its decisions, as echo-1's node proxy counted them: sleep's three connections.
    eventually_async("the policy's decisions", || async {
        let p = api(console, "/api/policies").await;
        p["policies"][0]["decisions"]["allow"].as_f64() == Some(3.0)
    })
    .await;
    // Search.
    let found = api(console, "/api/search?q=ECHO").await;
    let names: Vec<&str> = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"demo/echo-1") && names.contains(&"demo/echo-from-demo"),
        "{names:?}"
    );
    // The page and its script come from the binary, with a strict content policy.
    let (status, page) = ambit_admin::get(console, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"/app.js\""));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing from elsewhere"
    );
    let (status, _) = ambit_admin::get(console, "/app.js").await.unwrap();
    assert_eq!(status, 200);
}

/// The page in real headless Chromium: the graph with the demo's workloads and the edge
/// between them in mutual TLS, the denied edge, and the workload page's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_renders_in_headless_chromium() {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("headless Chromium is needed for this test: apt-get install -y chromium");
    let (_mesh, console) = mesh_with_traffic().await;
    let artefacts = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&artefacts).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let run = |url: String, shot: &str| {
        let chromium = chromium.to_owned();
        let shot = artefacts.join(shot);
        let profile = profile.path().to_owned();
        async move {
            let common = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1400,900",
                "--virtual-time-budget=4000",
            ];
            let invoke = |extra: Vec<String>| {
                let chromium = chromium.clone();
                let mut args: Vec<String> = common.iter().map(|a| a.to_string()).collect();
                args.push(format!("--user-data-dir={}", profile.display()));
                args.extend(extra);
                tokio::task::spawn_blocking(move || {
                    std::process::Command::new(&chromium)
                        .args(&args)
                        .output()
                        .unwrap()
                })
            };
            let dom = invoke(vec!["--dump-dom".into(), url.clone()])
                .await
                .unwrap();
            let shot_run = invoke(vec![
                format!("--screenshot={}", shot.display()),
                url.clone(),
            ])
            .await
            .unwrap();
            assert!(
                shot_run.status.success(),
                "{}",
                String::from_utf8_lossy(&shot_run.stderr)
            );
            assert!(
                std::fs::metadata(&shot).unwrap().len() > 1000,
                "a screenshot of {url}"
            );
            String::from_utf8_lossy(&dom.stdout).into_owned()
        }
    };
    let dom = tokio::time::timeout(
        Duration::from_secs(120),
        run(format!("http://{console}/#/graph"), "graph.png"),
    )
    .await
    .expect("chromium finished");
    for node in ["demo/sleep", "demo/echo-1", "legacy/legacy"] {
        assert!(
            dom.contains(&format!("data-id=\"{node}\"")),
            "node {node} in {dom}"
        );
    }
    assert!(
        dom.contains(
            "data-source=\"demo/sleep\" data-target=\"demo/echo-1\" data-security=\"mutual_tls\""
        ),
        "the mTLS edge in {dom}"
    );
    assert!(
        dom.contains(
            "data-source=\"legacy/legacy\" data-target=\"demo/echo-1\" data-security=\"denied\""
        ),
        "the denied edge in {dom}"
    );
    let dom = tokio::time::timeout(
        Duration::from_secs(120),
        run(
            format!("http://{console}/#/workload/demo/echo-1"),
            "workload.png",
        ),
    )
    .await
    .expect("chromium finished");
    assert!(
        dom.contains("spiffe://cluster.local/ns/demo/sa/echo"),
        "{dom}"
    );
    let cert = dom
        .split("id=\"certificate\"")
        .nth(1)
        .unwrap_or_default()
        .split("</dd>")
        .next()
        .unwrap_or_default();
    assert!(
        cert.contains("serial ") && cert.contains("valid until"),
        "{cert}"
    );
}

/// Beyond loopback the console needs its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    let mut config =
        ambit_control::Config::new(dir.path().join("manifests"), dir.path().join("state"));
    config.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.monitoring_addr = "127.0.0.1:0".parse().unwrap();
    config.console_addr = Some("0.0.0.0:0".parse().unwrap());
    let e = ambit_control::ControlPlane::start(config.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("without a token"), "{e}");
    config.console_token = Some("a-long-enough-console-token".into());
    let cp = ambit_control::ControlPlane::start(config).await.unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], cp.console_addr().unwrap().port()));
    let (status, body) = ambit_admin::get(addr, "/api/graph").await.unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, _) = ambit_admin::get(addr, "/login?token=wrong").await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = ambit_admin::get(addr, "/login?token=a-long-enough-console-token")
        .await
        .unwrap();
    assert_eq!(status, 303);
    cp.shutdown().await;
}
