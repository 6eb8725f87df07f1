//! The `ambit control` binary end to end: started as a process, called over TLS gRPC.

#![allow(clippy::unwrap_used)] // test helpers: a failure should stop the test

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use ambit_core::SpiffeId;
use ambit_tls::client::{CaClient, TokenSource};
use ambit_tls::csr::{build_csr, generate_key};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const BIN: &str = env!("CARGO_BIN_EXE_ambit");

const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: sleep}
status: {podIP: 198.18.0.5}
";

/// A running `ambit control`, killed on drop.
struct Control {
    child: Child,
    grpc: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("pods.yaml"), PODS).unwrap();
    let state = dir.path().join("state");
    (dir, manifests, state)
}

fn start(manifests: &Path, state: &Path) -> Control {
    let mut child = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "--log-format",
            "json",
            "control",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .args(["--monitoring-addr", "127.0.0.1:0", "--manifests"])
        .arg(manifests)
        .arg("--state-dir")
        .arg(state)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Owned by the guard from here on, so a failure below still kills the process.
    let mut control = Control {
        child,
        grpc: SocketAddr::from(([0, 0, 0, 0], 0)),
        lines,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = control
            .lines
            .recv_timeout(left)
            .expect("ambit control did not report ready within 20 s");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if v["message"] == "control plane ready" {
            control.grpc = v["grpc"].as_str().unwrap().parse().unwrap();
            return control;
        }
    }
}

fn token(state: &Path, node: &str) -> String {
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "control",
            "token",
            "--node",
            node,
            "--ttl",
            "10m",
            "--state-dir",
        ])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn root(state: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(state.join("ca/root-cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

async fn request(
    control: &Control,
    state: &Path,
    node: &str,
) -> Result<Vec<String>, tonic::Status> {
    let client = CaClient::new(
        &control.grpc.to_string(),
        &ambit_tls::spiffe::TrustBundle::new(&root(state)).unwrap(),
        Some("localhost"),
        TokenSource::Static(token(state, node)),
        Duration::from_secs(5),
    )
    .unwrap();
    let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
    let csr = build_csr(&generate_key().unwrap(), &id).unwrap();
    client
        .create_certificate_raw(&csr, Duration::from_secs(3600), Some(&id))
        .await
}

fn verify(chain: &[String], roots: &[CertificateDer<'static>]) {
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    ambit_tls::x509::verify_leaf(&leaf, &[], roots, SystemTime::now()).unwrap();
}

#[tokio::test]
async fn a_node_obtains_a_certificate_from_the_running_binary() {
    let (_dir, manifests, state) = dirs();
    let control = start(&manifests, &state);
    let chain = request(&control, &state, "node-a").await.unwrap();
    verify(&chain, &root(&state));
    let refused = request(&control, &state, "node-b").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // The issuance and the refusal were logged, without the token or any key.
    let mut logged = Vec::new();
    while let Ok(line) = control.lines.recv_timeout(Duration::from_millis(500)) {
        logged.push(line);
    }
    let all = logged.join("\n");
    assert!(all.contains("certificate issued"), "{all}");
    assert!(all.contains("certificate request refused"), "{all}");
    // Each names the caller's address.
    for what in ["certificate issued", "certificate request refused"] {
        let line = logged.iter().find(|l| l.contains(what)).unwrap();
        assert!(
            line.contains("\"peer\":\"127.0.0.1:"),
            "no caller address: {line}"
        );
    }
    assert!(
        !all.contains("PRIVATE KEY") && !all.contains("eyJ"),
        "secrets in logs:\n{all}"
    );
}

#[tokio::test]
async fn the_root_survives_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, manifests, state) = dirs();
    let first = start(&manifests, &state);
    let root_before = root(&state);
    let chain_before = request(&first, &state, "node-a").await.unwrap();
    drop(first);
    let mode = std::fs::metadata(state.join("ca/root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let second = start(&manifests, &state);
    assert_eq!(root(&state), root_before, "same root after restart");
    let chain_after = request(&second, &state, "node-a").await.unwrap();
    verify(&chain_after, &root_before);
    verify(&chain_before, &root(&state));
    // A token minted before the restart still works: the signing key persisted too.
    assert_eq!(chain_after.last(), chain_before.last());
}

#[test]
fn corrupt_key_material_stops_the_start_with_a_clear_error() {
    let (_dir, manifests, state) = dirs();
    drop(start(&manifests, &state));
    std::fs::write(
        state.join("ca/root-key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "control",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--manifests",
        ])
        .arg(&manifests)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root-key.pem"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: certificate authority")),
        "{err}"
    );
}

#[test]
fn validate_reports_file_line_and_field() {
    let (dir, manifests, _state) = dirs();
    std::fs::write(
        manifests.join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "validate", "--manifests"])
        .arg(&manifests)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "bad.yaml: line 6, column 11, field spec.ports[0].port: port 0 is out of range"
        ),
        "{text}"
    );
    assert!(text.contains("1 file refused"), "{text}");
    drop(dir);
}

#[test]
fn validate_reports_every_error_of_a_document_and_exits_as_documented() {
    let (dir, manifests, _state) = dirs();
    std::fs::write(
        manifests.join("policy.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo}
spec:
  action: DENNY
  rules:
  - from: [{source: {principals: [a], bogus: 1}}]
    to: [{operation: {ports: [\"notaport\"]}}]
",
    )
    .unwrap();
    // The folder as a positional argument.
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "validate"])
        .arg(&manifests)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("policy.yaml: line"))
        .collect();
    assert_eq!(errors.len(), 3, "{text}");
    assert!(
        errors[0].contains("line 5, column 11, field spec.action: unknown variant `DENNY`"),
        "{text}"
    );
    assert!(
        errors[1].contains("line 7")
            && errors[1].contains("field spec.rules[0].from[0].source.bogus"),
        "{text}"
    );
    assert!(
        errors[2].contains(
            "field spec.rules[0].to[0].operation.ports[0]: \"notaport\" is not a port number"
        ),
        "{text}"
    );
    assert!(!text.contains('\\'), "escaped quotes: {text}");

    // Clean: 0.
    std::fs::remove_file(manifests.join("policy.yaml")).unwrap();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "validate"])
        .arg(&manifests)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Usage: 2 (no folder, two folders, a folder that is not there).
    for args in [
        vec!["control".to_owned(), "validate".to_owned()],
        vec![
            "control".to_owned(),
            "validate".to_owned(),
            manifests.display().to_string(),
            "--manifests".to_owned(),
            manifests.display().to_string(),
        ],
        vec![
            "control".to_owned(),
            "validate".to_owned(),
            dir.path().join("missing").display().to_string(),
        ],
    ] {
        let out = Command::new(BIN)
            .env("AMBIT_CONSOLE_ADDR", "off")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "validate", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status: 0"));
    drop(dir);
}

#[test]
fn validate_says_which_policies_nothing_enforces() {
    let (dir, manifests, _state) = dirs();
    std::fs::write(
        manifests.join("policies.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-the-waypoint, namespace: demo}
spec: {targetRefs: [{kind: Service, group: '', name: echo}], action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: demo}
spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
",
    )
    .unwrap();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "validate", "--manifests"])
        .arg(&manifests)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: demo/for-the-waypoint: NOT ENFORCED for Service echo: it is not bound to a waypoint"),
        "{text}"
    );
    assert!(
        text.contains("warning: demo/ext: NOT ENFORCED: action CUSTOM"),
        "{text}"
    );
    // Warnings are not refusals.
    assert_eq!(out.status.code(), Some(0), "{text}");
    drop(dir);
}

#[test]
fn token_to_a_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _manifests, state) = dirs();
    let file = dir.path().join("node.token");
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "token", "--node", "node-a", "--state-dir"])
        .arg(&state)
        .arg("--output")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The token alone, as Kubernetes writes token files: a trailing newline would end up
    // in the authorization header of a client that reads the file as it is.
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written.split('.').count(), 3);
    assert_eq!(written.trim(), written, "{written:?}");
    let bad = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "token", "--node", "Not_A_Node", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid node name"));
}

#[test]
fn the_waypoint_refuses_a_bad_identity_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let (root, token) = (dir.path().join("root.pem"), dir.path().join("token"));
    std::fs::write(&token, "x").unwrap();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "waypoint",
            "run",
            "--node-name",
            "n",
            "--name",
            "Bad_Name",
            "-n",
            "demo",
        ])
        .arg("--ca-root")
        .arg(&root)
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-root"), "{err}");
}

#[test]
fn the_node_agent_names_missing_tools() {
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "cni",
            "--node-name",
            "n",
            "--ca-root",
            "/nonexistent",
            "--token-file",
            "/nonexistent",
        ])
        .args(["--nft", "/nonexistent/nft"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing /nonexistent/nft (package nftables)")
            && err.contains("apt-get install -y nftables"),
        "{err}"
    );
}

#[test]
fn a_failed_start_leaves_no_keys_and_names_the_flag() {
    let (dir, manifests, state) = dirs();
    // The gRPC port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "--grpc-addr", &format!("localhost:{port}")])
        .args(["--monitoring-addr", "127.0.0.1:0", "--manifests"])
        .arg(&manifests)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // `localhost:PORT` is understood, and the error names the flag to change.
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")) && err.contains("--grpc-addr"),
        "{err}"
    );
    assert!(
        !state.exists(),
        "a failed start created {}",
        state.display()
    );

    // A default lifetime above the maximum is refused, before anything is created.
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "--grpc-addr", "localhost:0", "--cert-ttl", "48h"])
        .args(["--monitoring-addr", "127.0.0.1:0", "--manifests"])
        .arg(&manifests)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cert-ttl 2days is longer than --max-cert-ttl 1day"),
        "{err}"
    );
    assert!(!state.exists());

    // So is a token lifetime out of range.
    let out = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args([
            "control",
            "token",
            "--node",
            "node-a",
            "--ttl",
            "400d",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!state.exists());
    drop(taken);
    drop(dir);
}

/// `ambit dashboard` finds a running console and prints its address; with none there it
/// says what to do.
#[test]
fn ambit_dashboard_prints_the_consoles_address_or_says_what_to_start() {
    let (_dir, manifests, state) = dirs();
    let mut child = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "127.0.0.1:0")
        .args([
            "--log-format",
            "json",
            "control",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .args(["--monitoring-addr", "127.0.0.1:0", "--manifests"])
        .arg(&manifests)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut console = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "control plane ready" {
            console = v["console"].as_str().map(str::to_owned);
            break;
        }
    }
    let url = console.expect("the control plane said where its console is");
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let out = Command::new(BIN)
        .args(["dashboard", "--addr", &addr])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("The mesh console: {url}")
    );
    // Nothing there now: a clear error that names what to run.
    let out = Command::new(BIN)
        .args(["dashboard", "--addr", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no console at") && err.contains("ambit control"),
        "{err}"
    );
}
