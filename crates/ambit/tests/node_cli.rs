//! `ambit node` and `ambit config` as processes, against `ambit control`.

#![allow(clippy::unwrap_used)] // test helpers: a failure should stop the test

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ambit");

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
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.10, ports: [{port: 80, targetPort: 8080}]}
";

/// A child process killed on drop, with its JSON log lines.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .env("AMBIT_CONSOLE_ADDR", "off")
            .args(["--log-format", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn wait_for(&self, message: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {message:?} within 20 s"));
            if v["message"] == message {
                return v;
            }
        }
    }
}

fn config(run_dir: &Path, what: &str, output: &str) -> String {
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "config",
            what,
            "--node",
            "node-a",
            "-o",
            output,
            "--run-dir",
        ])
        .arg(run_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_node_proxy_process_syncs_and_ambit_config_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("mesh.yaml"), MESH).unwrap();
    let state = dir.path().join("state");
    let cp = Proc::spawn(&[
        "control",
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--manifests",
        manifests.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let grpc = cp.wait_for("control plane ready")["grpc"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = dir.path().join("node-a.token");
    let minted = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "token", "--node", "node-a", "--state-dir"])
        .arg(&state)
        .arg("--output")
        .arg(&token)
        .output()
        .unwrap();
    assert!(minted.status.success());
    let run_dir = dir.path().join("run");
    let _node = Proc::spawn(&[
        "node",
        "--node-name",
        "node-a",
        "--control-plane",
        &grpc,
        "--server-name",
        "localhost",
        "--ca-root",
        state.join("ca/root-cert.pem").to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    _node.wait_for("discovery stream open");

    let start = Instant::now();
    let table = loop {
        let t = config(&run_dir, "workloads", "table");
        if t.contains("echo-1") {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never synced:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(
        table.contains("198.18.1.10")
            && table.contains("HBONE")
            && table.contains("spiffe://cluster.local/ns/demo/sa/echo"),
        "{table}"
    );
    let services = config(&run_dir, "services", "table");
    assert!(
        services.contains("198.19.0.10") && services.contains("80->8080"),
        "{services}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&config(&run_dir, "workloads", "json")).unwrap();
    assert_eq!(json[0]["uid"], "Kubernetes//Pod/demo/echo-1");
    let yaml = config(&run_dir, "services", "yaml");
    assert!(
        yaml.contains("hostname: echo.demo.svc.cluster.local"),
        "{yaml}"
    );

    // An unknown node is a clear error.
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["config", "workloads", "--node", "nope", "--run-dir"])
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node proxy for node nope"));
}

#[test]
fn ambit_node_refuses_a_missing_token_file_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, "").unwrap();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["node", "--node-name", "n", "--ca-root"])
        .arg(&root)
        .args(["--token-file", "/nonexistent/token"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no certificate") || err.contains("token"),
        "{err}"
    );
}

/// `ambit node --pod ...` as a process: two pods on one node, enrolled (redirection
/// rules installed), served from the flag; traffic between them crosses the bridge in
/// HBONE and shows in the process's access log and metrics; SIGTERM drains and exits 0.
/// Needs root, iproute2 and nftables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_proxy_process_serves_pods_from_the_pod_flag() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut topo = ambit_testenv::Topology::new().unwrap();
    let sleep = topo
        .pod("node-a", std::net::Ipv4Addr::new(198, 18, 1, 20))
        .unwrap();
    let echo = topo
        .pod("node-a", std::net::Ipv4Addr::new(198, 18, 1, 10))
        .unwrap();
    topo.enroll(&sleep).unwrap();
    topo.enroll(&echo).unwrap();
    let listener = echo.listen(8080).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mesh = format!(
        "{MESH}---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: demo, labels: {{app: sleep}}}}
spec: {{nodeName: node-a, serviceAccountName: sleep}}
status: {{podIP: {}}}
",
        sleep.ip
    );
    std::fs::write(manifests.join("mesh.yaml"), mesh).unwrap();
    let state = dir.path().join("state");
    let cp = Proc::spawn(&[
        "control",
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--manifests",
        manifests.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let grpc = cp.wait_for("control plane ready")["grpc"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = dir.path().join("node-a.token");
    let minted = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "token", "--node", "node-a", "--state-dir"])
        .arg(&state)
        .arg("--output")
        .arg(&token)
        .output()
        .unwrap();
    assert!(minted.status.success());
    let pod_flag = |ns_name_sa: &str, pod: &ambit_testenv::Pod| {
        format!("{ns_name_sa}={}", pod.netns_path().display())
    };
    let mut node = Proc::spawn(&[
        "node",
        "--node-name",
        "node-a",
        "--control-plane",
        &grpc,
        "--server-name",
        "localhost",
        "--ca-root",
        state.join("ca/root-cert.pem").to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
        "--run-dir",
        dir.path().join("run").to_str().unwrap(),
        "--drain-timeout",
        "1s",
        "--pod",
        &pod_flag("demo/sleep/sleep", &sleep),
        "--pod",
        &pod_flag("demo/echo-1/echo", &echo),
    ]);
    let started = node.wait_for("node proxy started");
    let readiness: std::net::SocketAddr = started["readiness"].as_str().unwrap().parse().unwrap();
    let metrics: std::net::SocketAddr = started["metrics"].as_str().unwrap().parse().unwrap();
    let begin = Instant::now();
    loop {
        let (status, body) = ambit_admin::get(readiness, "/healthz/ready").await.unwrap();
        if status == 200 {
            break;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(20),
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut conn = sleep
        .connect(std::net::SocketAddr::from((echo.ip, 8080)))
        .await
        .unwrap();
    conn.write_all(b"through the process").await.unwrap();
    let mut back = [0u8; 19];
    conn.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through the process");
    drop(conn);

    let inbound = loop {
        let v = node.wait_for("connection complete");
        if v["direction"] == "inbound" {
            break v;
        }
    };
    assert_eq!(
        inbound["src.identity"],
        "spiffe://cluster.local/ns/demo/sa/sleep"
    );
    assert_eq!(inbound["dst.workload"], "demo/echo-1");
    assert_eq!(inbound["bytes_sent"], 19);
    let (_, page) = ambit_admin::get(metrics, "/metrics").await.unwrap();
    assert!(
        page.lines().any(|l| l
            .starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/sleep\"")
            && l.ends_with(" 1")),
        "{page}"
    );

    // SIGTERM: pods drain, the process exits cleanly.
    let pid = node.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    node.wait_for("shutting down: draining pods");
    let begin = Instant::now();
    let status = loop {
        if let Some(s) = node.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

/// `ambit --version` names the cryptography library the build links, so an operator can
/// tell an aws-lc-rs build from a ring one.
#[test]
fn version_names_the_cryptography_library() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!(
            "ambit {} (TLS: rustls with {})",
            env!("CARGO_PKG_VERSION"),
            if cfg!(feature = "aws-lc") {
                "aws-lc-rs"
            } else {
                "ring"
            }
        )
    );
}
