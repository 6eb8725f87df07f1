//! The walk through the mesh: each step narrated, then checked against what it claims.

// Narration on standard output is what this module is for.
#![allow(clippy::print_stdout)]

use std::io::{IsTerminal as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambit_hbone::socket::Netns;
use http::StatusCode;

use crate::DemoError;
use crate::app::{Client, Echo};
use crate::cluster::{
    CONTROL_CONSOLE, CONTROL_GRPC, CONTROL_MONITORING, Cluster, ECHO, ECHO_PORT, ECHO_VIP,
    NAMESPACE, NODES, OTHER, PODS, PodDef, SLEEP, WAYPOINT, WAYPOINT_METRICS, WAYPOINT_READINESS,
    local, node_ports,
};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Exit non-zero if any step does not behave as narrated; never pause.
    pub check: bool,
    /// Leave the mesh running at the end.
    pub keep: bool,
    /// Pause for Enter between steps.
    pub interactive: bool,
    /// Where the manifests, state, logs and the demo's record go.
    pub dir: PathBuf,
    /// This binary, started for every component.
    pub exe: PathBuf,
}

const STEPS: usize = 9;

struct Narrator {
    interactive: bool,
    /// Standard output is a terminal (progress lines are rewritten in place).
    terminal: bool,
    failures: Vec<String>,
    started: Instant,
}

impl Narrator {
    fn step(&mut self, n: usize, title: &str) {
        say!();
        say!("[{n}/{STEPS}] {title}");
    }

    fn say(&self, text: &str) {
        for line in text.lines() {
            say!("      {line}");
        }
    }

    fn check(&mut self, ok: bool, claim: &str, otherwise: impl FnOnce() -> String) {
        if ok {
            say!("      ✓ {claim}");
        } else {
            let why = otherwise();
            say!("      ✗ {claim}: {why}");
            self.failures.push(format!("{claim}: {why}"));
        }
    }

    async fn pause(&self) {
        if !self.interactive {
            return;
        }
        let mut stdout = std::io::stdout();
        let _ = write!(stdout, "      (press Enter to continue) ");
        let _ = stdout.flush();
        // A plain thread, not the runtime's blocking pool: an interrupted demo must not
        // wait for a line that never comes before it can exit.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(std::io::stdin().read_line(&mut line));
        });
        let _ = rx.await;
    }

    /// A progress line, rewritten in place on a terminal; nothing otherwise (a file or a
    /// pipe gets the final line only).
    fn progress(&self, what: &str, since: Instant) {
        if !self.terminal {
            return;
        }
        let mut stdout = std::io::stdout();
        let _ = write!(
            stdout,
            "\r      … {what} ({:.1} s)",
            since.elapsed().as_secs_f64()
        );
        let _ = stdout.flush();
    }

    fn progress_done(&self, what: &str, since: Instant) {
        // On a terminal: back to the start of the progress line, and clear what is left
        // of it after the text.
        let (start, clear) = if self.terminal {
            ("\r", "\x1b[K")
        } else {
            ("", "")
        };
        say!(
            "{start}      … {what}: done in {:.1} s{clear}",
            since.elapsed().as_secs_f64()
        );
    }

    /// Ends a progress line cut short (a timeout) so the error starts on a line of its own.
    fn progress_abandoned(&self) {
        if self.terminal {
            say!();
        }
    }
}

fn manifests(ambient: bool) -> String {
    let label = if ambient {
        "\n  labels: {istio.io/dataplane-mode: ambient}"
    } else {
        ""
    };
    let mut out = format!(
        "# Written by `ambit demo`.
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}{label}
---
apiVersion: v1
kind: Node
metadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: zone-a}}}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-b, labels: {{topology.kubernetes.io/zone: zone-b}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NAMESPACE}}}
spec:
  selector: {{app: echo}}
  clusterIP: {ECHO_VIP}
  ports: [{{name: http, port: 80, targetPort: {ECHO_PORT}, appProtocol: http}}]
"
    );
    for sa in ["sleep", "other", "echo"] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {NAMESPACE}}}\n"
        ));
    }
    for pod in PODS {
        out.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {app}, version: v1}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}
",
            name = pod.name,
            app = pod.app,
            node = pod.node,
            sa = pod.service_account,
            ip = pod.ip,
        ));
    }
    out
}

fn write_manifests(dir: &Path, ambient: bool) -> Result<(), DemoError> {
    let folder = dir.join("manifests");
    std::fs::create_dir_all(&folder).map_err(|e| DemoError::Io(e.to_string()))?;
    let tmp = dir.join("mesh.yaml.tmp");
    std::fs::write(&tmp, manifests(ambient)).map_err(|e| DemoError::Io(e.to_string()))?;
    std::fs::rename(&tmp, folder.join("mesh.yaml")).map_err(|e| DemoError::Io(e.to_string()))
}

/// The policy of step 6.
fn deny_other_policy() -> String {
    format!(
        "# Written by `ambit demo`.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-other, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{NAMESPACE}/sa/other]}}}}]
"
    )
}

/// Writes (or, with `None`, removes) `manifests/policy.yaml`.
fn write_policy(dir: &Path, policy: Option<&str>) -> Result<(), DemoError> {
    let path = dir.join("manifests/policy.yaml");
    match policy {
        Some(text) => {
            let tmp = dir.join("policy.yaml.tmp");
            std::fs::write(&tmp, text).map_err(|e| DemoError::Io(e.to_string()))?;
            std::fs::rename(&tmp, &path).map_err(|e| DemoError::Io(e.to_string()))
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DemoError::Io(e.to_string())),
            _ => Ok(()),
        },
    }
}

/// Probes until the outcome (success or refusal) is `want`, for up to 10 s (the time a
/// policy change takes to reach the node proxy). Returns the last outcome.
async fn probe_until(from: &PodDef, target: &str, want_ok: bool) -> Result<Probe, DemoError> {
    let since = Instant::now();
    loop {
        let r = probe(from, target).await;
        if r.is_ok() == want_ok || since.elapsed() > Duration::from_secs(10) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Polls an HTTP endpoint until it answers 200, showing progress; fails if a process
/// died or 30 s pass.
async fn wait_ok(
    out: &Narrator,
    cluster: &mut Cluster,
    what: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<(), DemoError> {
    let since = Instant::now();
    loop {
        cluster.check_alive()?;
        let last = match ambit_admin::get(addr, path).await {
            Ok((StatusCode::OK, _)) => {
                out.progress_done(what, since);
                return Ok(());
            }
            Ok((status, body)) => format!("{status}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if since.elapsed() > Duration::from_secs(30) {
            out.progress_abandoned();
            return Err(DemoError::Timeout(format!("{what} (last answer: {last})")));
        }
        out.progress(what, since);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request from `from` to `target`, with the server pod's view of the connection
/// taken while it is open.
struct Probe {
    echo: Echo,
    /// Established connections in the server pod: (local, peer).
    server_side: Vec<(SocketAddr, SocketAddr)>,
}

async fn probe(from: &PodDef, target: &str) -> Result<Probe, DemoError> {
    let netns = Netns::open(Cluster::netns_path(from))
        .map_err(|e| DemoError::App(format!("{}: {e}", from.name)))?;
    let (mut client, path) = Client::connect(target, Some(netns)).await?;
    let echo = client.get(&path).await?;
    let server_side = established(&ECHO)?;
    drop(client);
    Ok(Probe { echo, server_side })
}

/// `ss` inside a pod: established TCP connections.
fn established(pod: &PodDef) -> Result<Vec<(SocketAddr, SocketAddr)>, DemoError> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns(),
            "ss",
            "-tnH",
            "state",
            "established",
        ])
        .output()
        .map_err(|e| DemoError::Io(format!("ss: {e}")))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let n = cols.len();
            if n < 2 {
                return None;
            }
            Some((cols[n - 2].parse().ok()?, cols[n - 1].parse().ok()?))
        })
        .collect())
}

/// Whether the server pod held a connection from `from` on `port`.
fn arrived_on(p: &Probe, from: &PodDef, port: u16) -> bool {
    p.server_side
        .iter()
        .any(|(l, peer)| l.port() == port && peer.ip() == IpAddr::V4(from.ip))
}

/// Access-log lines of a node proxy's log.
fn access_log(cluster: &Cluster, node: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(cluster.log_path(node))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection complete")
        .collect()
}

fn inbound_from(cluster: &Cluster, node: &str, pod: &PodDef) -> Vec<serde_json::Value> {
    let who = format!("{}:", pod.ip);
    access_log(cluster, node)
        .into_iter()
        .filter(|v| {
            v["direction"] == "inbound"
                && v["src.addr"].as_str().is_some_and(|a| a.starts_with(&who))
        })
        .collect()
}

fn spiffe(pod: &PodDef) -> String {
    format!(
        "spiffe://cluster.local/ns/{NAMESPACE}/sa/{}",
        pod.service_account
    )
}

/// Waits until both agents report every pod of theirs in one of `phases` (or not
/// tracked, when `absent_ok`).
async fn wait_agents(
    out: &Narrator,
    cluster: &mut Cluster,
    what: &str,
    enrolled: bool,
) -> Result<(), DemoError> {
    let since = Instant::now();
    loop {
        cluster.check_alive()?;
        let mut done = true;
        for node in NODES {
            let (_, _, _, agent) = node_ports(node);
            let status = match ambit_admin::get(local(agent), "/debug/pods").await {
                Ok((StatusCode::OK, body)) => {
                    serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()
                }
                _ => serde_json::Value::Null,
            };
            for pod in PODS.iter().filter(|p| p.node == node) {
                let phase = status["pods"]
                    .as_array()
                    .and_then(|a| a.iter().find(|p| p["name"] == pod.name))
                    .map(|p| p["phase"].as_str().unwrap_or("").to_owned());
                let ok = if enrolled {
                    phase.as_deref() == Some("enrolled")
                } else {
                    phase.as_deref() != Some("enrolled") && phase.as_deref() != Some("pending")
                };
                done &= ok;
            }
        }
        if done {
            out.progress_done(what, since);
            return Ok(());
        }
        if since.elapsed() > Duration::from_secs(30) {
            out.progress_abandoned();
            return Err(DemoError::Timeout(what.to_owned()));
        }
        out.progress(what, since);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries a probe for a few seconds (the application may still be starting).
async fn probe_soon(from: &PodDef, target: &str) -> Result<Probe, DemoError> {
    let since = Instant::now();
    loop {
        match probe(from, target).await {
            Ok(p) => return Ok(p),
            Err(e) if since.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs the demo. The cluster is removed when this returns (or is dropped, on Ctrl-C),
/// unless `keep`.
pub async fn run(opts: Options) -> Result<(), DemoError> {
    let mut out = Narrator {
        interactive: opts.interactive && !opts.check,
        terminal: std::io::stdout().is_terminal(),
        failures: Vec::new(),
        started: Instant::now(),
    };
    let dir = opts.dir.clone();
    // A leftover demo is reported before anything is narrated.
    Cluster::check_free(&dir)?;
    say!("ambit demo: a two-node service mesh built from network namespaces on this machine.");
    say!(
        "Files, state and logs go to {}; {}",
        dir.display(),
        if opts.keep {
            "the mesh stays up at the end (--keep)."
        } else {
            "everything it creates is removed at the end, on failure and on Ctrl-C."
        }
    );

    out.step(
        1,
        "Build the cluster: two nodes, four pods, one bridge between them",
    );
    let mut cluster = Cluster::build(&dir, &opts.exe)?;
    out.say(&format!(
        "node-a: pod sleep ({}), pod other ({}), pod waypoint ({}, for step 7)\nnode-b: pod echo-1 ({})\nEach pod is a network namespace (/run/netns/{NAMESPACE}.<pod>) with one address\non a bridge; nothing has a route off this machine.",
        SLEEP.ip, OTHER.ip, WAYPOINT.ip, ECHO.ip
    ));
    out.pause().await;

    out.step(
        2,
        "Start the control plane, then a node proxy and a node agent per node",
    );
    write_manifests(&dir, false)?;
    out.say(&format!(
        "Manifests in {}/manifests: namespace {NAMESPACE} (not in the mesh yet), the\nthree pods and their service accounts, service echo ({ECHO_VIP}:80 -> {ECHO_PORT}).",
        dir.display()
    ));
    let state = dir.join("state");
    let s = |p: &Path| p.display().to_string();
    cluster.spawn(
        "control",
        None,
        &args(&[
            "--log-format",
            "json",
            "control",
            "--manifests",
            &s(&dir.join("manifests")),
            "--state-dir",
            &s(&state),
            "--grpc-addr",
            &local(CONTROL_GRPC).to_string(),
            "--monitoring-addr",
            &local(CONTROL_MONITORING).to_string(),
            "--console-addr",
            &local(CONTROL_CONSOLE).to_string(),
        ]),
    )?;
    wait_ok(
        &out,
        &mut cluster,
        "control plane (CA, discovery) ready",
        local(CONTROL_MONITORING),
        "/ready",
    )
    .await?;
    out.say(&format!(
        "The mesh console (service graph, workloads, policies, waypoints): http://{}/",
        local(CONTROL_CONSOLE)
    ));
    let signer = ambit_control::auth::TokenSigner::load_or_create(&state)
        .map_err(|e| DemoError::Setup(format!("node tokens: {e}")))?;
    for node in NODES {
        let token = signer
            .mint(node, Duration::from_secs(7 * 24 * 3600))
            .map_err(|e| DemoError::Setup(format!("node token: {e}")))?;
        let token_file = dir.join(format!("{node}.token"));
        write_private(&token_file, token.as_bytes())?;
        let (admin, metrics, readiness, agent) = node_ports(node);
        let zds = dir.join(node).join("zds.sock");
        let common = [
            "--node-name".to_owned(),
            node.to_owned(),
            "--control-plane".to_owned(),
            local(CONTROL_GRPC).to_string(),
            "--server-name".to_owned(),
            "localhost".to_owned(),
            "--ca-root".to_owned(),
            s(&state.join("ca/root-cert.pem")),
            "--token-file".to_owned(),
            s(&token_file),
            "--zds-socket".to_owned(),
            s(&zds),
        ];
        let mut node_args = args(&["--log-format", "json", "node"]);
        node_args.extend(common.iter().cloned());
        node_args.extend(args(&[
            "--admin-addr",
            &local(admin).to_string(),
            "--metrics-addr",
            &local(metrics).to_string(),
            "--readiness-addr",
            &local(readiness).to_string(),
            "--run-dir",
            &s(&dir.join("run")),
            "--worker-threads",
            "1",
        ]));
        cluster.spawn(node, None, &node_args)?;
        let mut agent_args = args(&["--log-format", "json", "cni"]);
        agent_args.extend(common.iter().cloned());
        agent_args.extend(args(&[
            "--netns-dir",
            "/run/netns",
            "--reconcile-interval",
            "2s",
            "--admin-addr",
            &local(agent).to_string(),
        ]));
        cluster.spawn(&format!("{node}-agent"), None, &agent_args)?;
    }
    for node in NODES {
        let (_, _, readiness, agent) = node_ports(node);
        wait_ok(
            &out,
            &mut cluster,
            &format!("{node}: node proxy ready"),
            local(readiness),
            "/healthz/ready",
        )
        .await?;
        wait_ok(
            &out,
            &mut cluster,
            &format!("{node}: node proxy connected to its node agent"),
            local(agent),
            "/healthz/ready",
        )
        .await?;
    }
    cluster.spawn(
        "echo-1",
        Some(&ECHO.netns()),
        &args(&[
            "demo",
            "serve-echo",
            "--name",
            "echo-1",
            "--port",
            &ECHO_PORT.to_string(),
        ]),
    )?;
    out.say("The sample application in echo-1: an HTTP server that answers with the\ncaller's address as its socket sees it (built into this binary).");
    out.pause().await;

    let direct = format!("http://{}:{ECHO_PORT}/", ECHO.ip);
    let vip = format!("http://{ECHO_VIP}/");

    out.step(3, "Before enrollment: sleep calls echo-1 in plain TCP");
    let before = probe_soon(&SLEEP, &direct).await?;
    let pid = before.echo.pid;
    out.say(&format!(
        "GET {direct} from sleep -> {} says the caller is {}",
        before.echo.server, before.echo.client
    ));
    out.check(
        before.echo.client.ip() == IpAddr::V4(SLEEP.ip),
        "echo-1 sees sleep's own address",
        || format!("it saw {}", before.echo.client),
    );
    out.check(
        arrived_on(&before, &SLEEP, ECHO_PORT) && !arrived_on(&before, &SLEEP, 15008),
        &format!("in echo-1 the connection arrives on port {ECHO_PORT} straight from sleep: plaintext, no identity"),
        || format!("echo-1's connections: {:?}", before.server_side),
    );
    out.check(
        inbound_from(&cluster, "node-b", &SLEEP).is_empty(),
        "no node proxy saw it",
        || "node-b's proxy logged a connection".into(),
    );
    out.pause().await;

    out.step(
        4,
        &format!("Enroll: label namespace {NAMESPACE} with istio.io/dataplane-mode=ambient"),
    );
    out.say("Only the manifest changes. The control plane pushes the change; each node agent\ninstalls redirection rules inside its pods' namespaces and hands them to its node\nproxy, which fetches each pod's certificate. No pod restarts.");
    write_manifests(&dir, true)?;
    wait_agents(&out, &mut cluster, "all three pods enrolled", true).await?;
    for node in NODES {
        let (_, _, readiness, _) = node_ports(node);
        wait_ok(
            &out,
            &mut cluster,
            &format!("{node}: pod certificates issued"),
            local(readiness),
            "/healthz/ready",
        )
        .await?;
    }
    let logged = inbound_from(&cluster, "node-b", &SLEEP).len();
    let during = probe(&SLEEP, &direct).await?;
    out.say(&format!(
        "GET {direct} from sleep -> {} says the caller is {}",
        during.echo.server, during.echo.client
    ));
    out.check(
        during.echo.client.ip() == IpAddr::V4(SLEEP.ip),
        "echo-1 still sees sleep's own address (the proxy connects with it)",
        || format!("it saw {}", during.echo.client),
    );
    out.check(
        arrived_on(&during, &SLEEP, 15008),
        "in echo-1 the traffic now arrives on port 15008 (HBONE: HTTP/2 CONNECT in mutual TLS)",
        || format!("echo-1's connections: {:?}", during.server_side),
    );
    out.check(
        during.echo.pid == pid,
        &format!("echo-1 was not restarted (same process, pid {pid})"),
        || format!("now pid {}", during.echo.pid),
    );
    match probe(&SLEEP, &vip).await {
        Ok(p) => out.check(
            p.echo.server == "echo-1",
            &format!("GET {vip} (the echo service's VIP) reaches echo-1 through the mesh"),
            || format!("answered by {}", p.echo.server),
        ),
        Err(e) => out.check(false, &format!("GET {vip} works"), || e.to_string()),
    }
    let since = Instant::now();
    let lines = loop {
        let lines = inbound_from(&cluster, "node-b", &SLEEP);
        if lines.len() > logged || since.elapsed() > Duration::from_secs(5) {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = lines.last().cloned().unwrap_or_default();
    out.check(
        last["src.identity"] == spiffe(&SLEEP) && last["dst.identity"] == spiffe(&ECHO),
        &format!(
            "node-b's proxy authenticated the caller: {} -> {}",
            spiffe(&SLEEP),
            spiffe(&ECHO)
        ),
        || format!("last access log line: {last}"),
    );
    out.pause().await;

    out.step(
        5,
        "What the node proxies report: Istio's TCP metrics and the access log",
    );
    let (_, metrics, _, _) = node_ports("node-b");
    let page = ambit_admin::get(local(metrics), "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    let opened: Vec<&str> = page
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
                && l.contains(&spiffe(&SLEEP))
        })
        .collect();
    out.say(&format!(
        "curl -s {}/metrics   (node-b, reporter=destination):",
        local(metrics)
    ));
    for l in &opened {
        out.say(&format!("  {}", summarize_metric(l)));
    }
    out.check(
        opened
            .iter()
            .any(|l| l.contains("connection_security_policy=\"mutual_tls\"")),
        "istio_tcp_connections_opened_total counts sleep's connections as mutual_tls",
        || "no such sample".into(),
    );
    out.say(&format!(
        "Access log ({}): one line per connection; the last from sleep:",
        cluster.log_path("node-b").display()
    ));
    out.say(&format!(
        "  {} -> {} ({} -> {}), {} bytes from the client, {} bytes back, mtls={}",
        last["src.addr"].as_str().unwrap_or(""),
        // The application's address: inside the tunnel for mTLS connections.
        last["dst.hbone_addr"]
            .as_str()
            .filter(|a| !a.is_empty())
            .or(last["dst.addr"].as_str())
            .unwrap_or(""),
        last["src.identity"].as_str().unwrap_or(""),
        last["dst.identity"].as_str().unwrap_or(""),
        last["bytes_sent"],
        last["bytes_received"],
        last["mtls"]
    ));
    out.pause().await;

    out.step(6, "Authorization: deny one client, allow another");
    let other_before = probe(&OTHER, &direct).await;
    out.check(
        other_before.is_ok(),
        "without a policy, other reaches echo-1 too",
        || format!("{:?}", other_before.as_ref().err()),
    );
    let policy = deny_other_policy();
    out.say(&format!(
        "Writing {}/manifests/policy.yaml, an Istio AuthorizationPolicy:\n{}",
        dir.display(),
        policy
            .lines()
            .skip(1)
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    write_policy(&dir, Some(&policy))?;
    let refused = probe_until(&OTHER, &direct, false).await;
    out.check(
        refused.is_err(),
        "other is refused: node-b's proxy answers its tunnel with 401, nothing reaches echo-1",
        || "other still got an answer 10 s after the policy was written".into(),
    );
    let allowed = probe(&SLEEP, &direct).await;
    out.check(allowed.is_ok(), "sleep still gets its answer", || {
        format!("{:?}", allowed.as_ref().err())
    });
    let denied_line = inbound_from(&cluster, "node-b", &OTHER)
        .into_iter()
        .rev()
        .find(|v| v["authz"].as_str().is_some_and(|a| a.starts_with("denied")));
    out.check(
        denied_line
            .as_ref()
            .is_some_and(|v| v["authz"] == format!("denied by {NAMESPACE}/deny-other")),
        &format!("node-b's access log names the policy: \"denied by {NAMESPACE}/deny-other\""),
        || format!("last denial logged: {denied_line:?}"),
    );
    let page = ambit_admin::get(local(metrics), "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    out.check(
        page.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{reporter=\"destination\"")
                && l.contains(&spiffe(&OTHER))
                && l.contains("response_flags=\"DENY\"")
        }),
        "its metrics carry response_flags=\"DENY\"",
        || "no such sample".into(),
    );
    write_policy(&dir, None)?;
    let back = probe_until(&OTHER, &direct, true).await;
    out.check(
        back.is_ok(),
        "policy removed: other gets through again",
        || format!("{:?}", back.as_ref().err()),
    );
    out.pause().await;

    waypoint_step(&mut out, &mut cluster, &dir, &opts.exe, &vip).await?;
    out.pause().await;

    out.step(
        8,
        &format!("Un-enroll: remove the label from namespace {NAMESPACE}"),
    );
    write_manifests(&dir, false)?;
    wait_agents(&out, &mut cluster, "all three pods un-enrolled", false).await?;
    let logged = inbound_from(&cluster, "node-b", &SLEEP).len();
    let after = probe(&SLEEP, &direct).await?;
    out.say(&format!(
        "GET {direct} from sleep -> {} says the caller is {}",
        after.echo.server, after.echo.client
    ));
    out.check(
        arrived_on(&after, &SLEEP, ECHO_PORT) && !arrived_on(&after, &SLEEP, 15008),
        &format!("traffic is plain again: it arrives on port {ECHO_PORT} straight from sleep"),
        || format!("echo-1's connections: {:?}", after.server_side),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    out.check(
        inbound_from(&cluster, "node-b", &SLEEP).len() == logged,
        "no node proxy carried it",
        || "node-b's proxy logged it".into(),
    );
    out.check(
        after.echo.pid == pid,
        "echo-1 still runs as the same process",
        || format!("now pid {}", after.echo.pid),
    );
    cluster.check_alive()?;

    out.step(9, "Done");
    let failures = std::mem::take(&mut out.failures);
    if opts.keep {
        write_manifests(&dir, true)?;
        wait_agents(
            &out,
            &mut cluster,
            "namespace demo enrolled again, to explore",
            true,
        )
        .await?;
        print_keep_help(&dir, &opts.exe);
        cluster.keep();
    } else {
        out.say("Removing the processes, namespaces and files it created.");
        drop(cluster);
    }
    say!(
        "\n{} in {:.1} s.",
        if failures.is_empty() {
            "Every step behaved as narrated"
        } else {
            "Some steps did not behave as narrated"
        },
        out.started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Check(failures))
    }
}

/// The canary of step 7: Services echo-v1 and echo-v2 (ports 8080 and 8081 of the echo
/// pods) and an HTTPRoute on echo sending `x-canary: true` to v2 and the rest 90/10.
fn canary_route() -> String {
    format!(
        "# Written by `ambit demo`.
apiVersion: v1
kind: Service
metadata: {{name: echo-v1, namespace: {NAMESPACE}}}
spec: {{selector: {{app: echo}}, clusterIP: 198.19.0.11, ports: [{{name: http, port: 80, targetPort: {ECHO_PORT}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v2, namespace: {NAMESPACE}}}
spec: {{selector: {{app: echo}}, clusterIP: 198.19.0.12, ports: [{{name: http, port: 80, targetPort: {CANARY_PORT}}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-canary, namespace: {NAMESPACE}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo}}]
  rules:
  - name: testers
    matches: [{{headers: [{{name: x-canary, value: 'true'}}]}}]
    backendRefs: [{{name: echo-v2, port: 80}}]
  - name: split
    backendRefs: [{{name: echo-v1, port: 80, weight: 90}}, {{name: echo-v2, port: 80, weight: 10}}]
"
    )
}

/// The canary version's port in the echo pod.
const CANARY_PORT: u16 = 8081;

/// Step 7, continued: a canary by HTTPRoute (90/10 by weight, then a header that sends
/// one caller to v2), counted from the echo servers' own answers.
async fn canary(
    out: &mut Narrator,
    cluster: &mut Cluster,
    dir: &Path,
    vip: &str,
) -> Result<(), DemoError> {
    out.say(&format!(
        "Canary: version 2 of the echo app starts in echo-1 (port {CANARY_PORT}, named echo-1-v2)."
    ));
    cluster.spawn(
        "echo-v2",
        Some(&ECHO.netns()),
        &args(&[
            "demo",
            "serve-echo",
            "--name",
            "echo-1-v2",
            "--port",
            &CANARY_PORT.to_string(),
        ]),
    )?;
    let route = canary_route();
    let file = dir.join("manifests/canary.yaml");
    out.say(&format!(
        "Writing {}: Services echo-v1 and echo-v2, and an HTTPRoute on echo:
{}",
        file.display(),
        route
            .lines()
            .skip_while(|l| !l.starts_with("kind: HTTPRoute"))
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    write_private(&file, route.as_bytes())?;
    let sleep_ns = || Netns::open(Cluster::netns_path(&SLEEP));
    let canary_header = [("x-canary", "true")];
    // The route is in force once a tester's request reaches v2.
    let since = Instant::now();
    let in_force = loop {
        out.progress("the route at the waypoint", since);
        let reached = match sleep_ns() {
            Ok(ns) => match Client::connect(vip, Some(ns)).await {
                Ok((mut c, path)) => c
                    .get_with(&path, &canary_header)
                    .await
                    .is_ok_and(|e| e.server == "echo-1-v2"),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if reached || since.elapsed() > Duration::from_secs(15) {
            if reached {
                out.progress_done("the route at the waypoint", since);
            } else {
                out.progress_abandoned();
            }
            break reached;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    out.check(in_force, "the route is in force at the waypoint", || {
        "no request with x-canary: true reached echo-1-v2 within 15 s".into()
    });
    let ns = sleep_ns().map_err(|e| DemoError::App(format!("sleep: {e}")))?;
    let (mut client, path) = Client::connect(vip, Some(ns)).await?;
    let (mut v1, mut v2, mut failed) = (0, 0, 0);
    for _ in 0..200 {
        match client.get(&path).await {
            Ok(e) if e.server == "echo-1-v2" => v2 += 1,
            Ok(_) => v1 += 1,
            Err(e) => {
                if failed == 0 {
                    out.say(&format!("first failure: {e}"));
                }
                failed += 1;
            }
        }
    }
    out.say(&format!(
        "200 GETs from sleep: {v1} answered by echo-1 (v1), {v2} by echo-1-v2, {failed} failed"
    ));
    // 10% of 200 is 20; fewer than 5 or more than 40 is beyond any honest chance.
    out.check(
        failed == 0 && (5..=40).contains(&v2),
        "about one request in ten goes to v2 (weights 90/10)",
        || format!("v1 {v1}, v2 {v2}, failed {failed}"),
    );
    let other_ns = Netns::open(Cluster::netns_path(&OTHER))
        .map_err(|e| DemoError::App(format!("other: {e}")))?;
    let (mut tester, path) = Client::connect(vip, Some(other_ns)).await?;
    let mut to_v2 = 0;
    for _ in 0..10 {
        if tester
            .get_with(&path, &canary_header)
            .await
            .is_ok_and(|e| e.server == "echo-1-v2")
        {
            to_v2 += 1;
        }
    }
    out.say(&format!(
        "10 GETs from other with x-canary: true: {to_v2} answered by echo-1-v2"
    ));
    out.check(
        to_v2 == 10,
        "the tester's requests (header x-canary: true) all go to v2",
        || format!("{to_v2} of 10"),
    );
    // The route removed: once the waypoint has dropped it, a tester reaches v1 again,
    // and only then does v2 stop (requests it still took would fail).
    let _ = std::fs::remove_file(&file);
    let since = Instant::now();
    loop {
        out.progress("the route removed at the waypoint", since);
        let mut back = 0;
        let ns = sleep_ns().map_err(|e| DemoError::App(format!("sleep: {e}")))?;
        if let Ok((mut c, path)) = Client::connect(vip, Some(ns)).await {
            for _ in 0..5 {
                if c.get_with(&path, &canary_header)
                    .await
                    .is_ok_and(|e| e.server == ECHO.name)
                {
                    back += 1;
                }
            }
        }
        if back == 5 {
            out.progress_done("the route removed at the waypoint", since);
            break;
        }
        if since.elapsed() > Duration::from_secs(15) {
            out.progress_abandoned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.stop("echo-v2");
    fault(out, dir, vip).await
}

/// Step 7, continued: fault injection by VirtualService (half of the requests aborted
/// with 503), seen in the waypoint's metrics.
async fn fault(out: &mut Narrator, dir: &Path, vip: &str) -> Result<(), DemoError> {
    let vs = format!(
        "# Written by `ambit demo`.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo-faults, namespace: {NAMESPACE}}}
spec:
  hosts: [echo]
  http:
  - name: half-fail
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 50}}}}}}
    route: [{{destination: {{host: echo}}}}]
"
    );
    let file = dir.join("manifests/faults.yaml");
    out.say(&format!(
        "Fault injection: writing {} (the canary route removed; a VirtualService and an\nHTTPRoute never route one Service together):\n{}",
        file.display(),
        vs.lines()
            .skip(1)
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    write_private(&file, vs.as_bytes())?;
    let sleep_ns = || {
        Netns::open(Cluster::netns_path(&SLEEP)).map_err(|e| DemoError::App(format!("sleep: {e}")))
    };
    // In force once the waypoint counts an abort of its own (flag FI).
    let since = Instant::now();
    loop {
        out.progress("the fault at the waypoint", since);
        let (mut c, path) = Client::connect(vip, Some(sleep_ns()?)).await?;
        for _ in 0..10 {
            let _ = c.send(http::Method::GET, &path).await;
        }
        if fault_count().await > 0 {
            out.progress_done("the fault at the waypoint", since);
            break;
        }
        if since.elapsed() > Duration::from_secs(15) {
            out.progress_abandoned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = fault_count().await;
    let (mut client, path) = Client::connect(vip, Some(sleep_ns()?)).await?;
    let (mut ok, mut aborted, mut other) = (0, 0, 0);
    for _ in 0..100 {
        match client.send(http::Method::GET, &path).await {
            Ok((StatusCode::OK, _)) => ok += 1,
            Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => aborted += 1,
            _ => other += 1,
        }
    }
    out.say(&format!(
        "100 GETs from sleep: {ok} answered 200, {aborted} aborted with 503 at the waypoint, {other} other"
    ));
    // Half of 100 is 50; outside 25..=75 is beyond any honest chance.
    out.check(
        other == 0 && (25..=75).contains(&aborted),
        "about half are aborted (percentage 50)",
        || format!("ok {ok}, aborted {aborted}, other {other}"),
    );
    let after = fault_count().await;
    out.say(&format!(
        "istio_requests_total{{response_code=\"503\",response_flags=\"FI\"}} at the waypoint: {before} -> {after}"
    ));
    out.check(
        after.saturating_sub(before) == aborted,
        "the waypoint's metrics count each aborted request with flag FI",
        || format!("{before} -> {after}, aborted {aborted}"),
    );
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Requests the waypoint aborted by fault injection, from its metrics.
async fn fault_count() -> u64 {
    let page = waypoint_page(WAYPOINT_METRICS, "/metrics")
        .await
        .map(|(_, p)| p)
        .unwrap_or_default();
    page.lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_flags=\"FI\"")
                && l.contains("response_code=\"503\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// The policy of step 7: POST from `other` denied at the waypoint.
fn l7_policy() -> String {
    format!(
        "# Written by `ambit demo`.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-post-from-other, namespace: {NAMESPACE}}}
spec:
  targetRefs: [{{kind: Service, group: '', name: echo}}]
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{NAMESPACE}/sa/other]}}}}]
    to: [{{operation: {{methods: [POST]}}}}]
"
    )
}

/// The waypoint's pod, as a cluster would run it.
fn waypoint_pod() -> String {
    format!(
        "# Written by `ambit demo`: the pod that runs the waypoint.
apiVersion: v1
kind: ServiceAccount
metadata: {{name: waypoint, namespace: {NAMESPACE}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {{nodeName: {node}, serviceAccountName: waypoint}}
status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}
",
        name = WAYPOINT.name,
        node = WAYPOINT.node,
        ip = WAYPOINT.ip,
    )
}

/// GET or POST from a pod through the service; the status, or the error.
async fn request(
    from: &PodDef,
    target: &str,
    method: http::Method,
) -> Result<StatusCode, DemoError> {
    let netns = Netns::open(Cluster::netns_path(from))
        .map_err(|e| DemoError::App(format!("{}: {e}", from.name)))?;
    let (mut client, path) = Client::connect(target, Some(netns)).await?;
    client.send(method, &path).await.map(|(status, _)| status)
}

/// A page of the waypoint's admin ports, read from inside its pod.
async fn waypoint_page(port: u16, path: &str) -> Option<(StatusCode, String)> {
    let options = ambit_hbone::socket::SocketOptions {
        netns: Some(Netns::open(Cluster::netns_path(&WAYPOINT)).ok()?),
        ..Default::default()
    };
    let addr = SocketAddr::from((WAYPOINT.ip, port));
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        ambit_hbone::socket::connect(addr, &options),
    )
    .await
    .ok()?
    .ok()?;
    let mut conn = ambit_admin::Connection::open(stream).await.ok()?;
    conn.get(&addr.to_string(), path).await.ok()
}

/// Step 7: a waypoint for namespace demo, an L7 policy at it, its metrics; then back to
/// L4 only.
async fn waypoint_step(
    out: &mut Narrator,
    cluster: &mut Cluster,
    dir: &Path,
    exe: &Path,
    vip: &str,
) -> Result<(), DemoError> {
    out.step(7, "A waypoint: L7 policy for the echo service");
    let manifests = dir.join("manifests");
    let s = |p: &Path| p.display().to_string();
    out.say(&format!(
        "ambit waypoint apply --manifests {} -n {NAMESPACE} --enroll-namespace",
        manifests.display()
    ));
    let applied = std::process::Command::new(exe)
        .args(["waypoint", "apply", "--manifests"])
        .arg(&manifests)
        .args(["-n", NAMESPACE, "--enroll-namespace"])
        .output()
        .map_err(|e| DemoError::Setup(format!("ambit waypoint apply: {e}")))?;
    for line in String::from_utf8_lossy(&applied.stdout).lines().take(2) {
        out.say(&format!("  {line}"));
    }
    if !applied.status.success() {
        return Err(DemoError::Setup(format!(
            "ambit waypoint apply failed: {}",
            String::from_utf8_lossy(&applied.stderr)
        )));
    }
    let pod_file = manifests.join("waypoint-pod.yaml");
    std::fs::write(&pod_file, waypoint_pod()).map_err(|e| DemoError::Io(e.to_string()))?;
    out.say(&format!(
        "`ambit waypoint run -n {NAMESPACE} --name waypoint` serves it from pod {} on {}\n(identity {}; the node proxy does not capture it).",
        WAYPOINT.name,
        WAYPOINT.node,
        spiffe(&WAYPOINT)
    ));
    let state = dir.join("state");
    let waypoint_args = args(&[
        "--log-format",
        "json",
        "waypoint",
        "run",
        "-n",
        NAMESPACE,
        "--name",
        "waypoint",
        "--node-name",
        WAYPOINT.node,
        "--control-plane",
        // The control plane listens on the host's loopback; the waypoint's pod has no
        // route to it, so it is started outside the pod and opens its own ports inside.
        &local(CONTROL_GRPC).to_string(),
        "--server-name",
        "localhost",
        "--ca-root",
        &s(&state.join("ca/root-cert.pem")),
        "--token-file",
        &s(&dir.join(format!("{}.token", WAYPOINT.node))),
        "--netns",
        &s(&Cluster::netns_path(&WAYPOINT)),
        "--worker-threads",
        "1",
    ]);
    cluster.spawn("waypoint", None, &waypoint_args)?;
    let since = Instant::now();
    loop {
        out.progress("waypoint ready", since);
        if waypoint_page(WAYPOINT_READINESS, "/healthz/ready")
            .await
            .is_some_and(|(status, _)| status == StatusCode::OK)
        {
            out.progress_done("waypoint ready", since);
            break;
        }
        if since.elapsed() > Duration::from_secs(30) {
            out.progress_abandoned();
            cluster.check_alive()?;
            return Err(DemoError::Setup(format!(
                "the waypoint was not ready within 30 s; see {}",
                cluster.log_path("waypoint").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The binding reaches the node proxies: sleep's requests now cross the waypoint.
    let since = Instant::now();
    let through = loop {
        let page = waypoint_page(WAYPOINT_METRICS, "/metrics").await;
        let _ = request(&SLEEP, vip, http::Method::GET).await;
        let counted = page.is_some_and(|(_, p)| p.contains("istio_requests_total{"));
        if counted || since.elapsed() > Duration::from_secs(10) {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    out.check(
        through,
        &format!("GET {vip} from sleep now crosses the waypoint (node-a's proxy sends it there)"),
        || "the waypoint counted no request within 10 s".into(),
    );

    let policy = l7_policy();
    out.say(&format!(
        "Writing {}/policy.yaml: deny POST from other, at the waypoint:\n{}",
        manifests.display(),
        policy
            .lines()
            .skip(1)
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    write_policy(dir, Some(&policy))?;
    let since = Instant::now();
    let denied = loop {
        let status = request(&OTHER, vip, http::Method::POST).await;
        if matches!(status, Ok(StatusCode::FORBIDDEN)) || since.elapsed() > Duration::from_secs(10)
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let get = request(&OTHER, vip, http::Method::GET).await;
    let sleep_post = request(&SLEEP, vip, http::Method::POST).await;
    for (who, method, got) in [
        ("other", "POST", &denied),
        ("other", "GET", &get),
        ("sleep", "POST", &sleep_post),
    ] {
        out.say(&format!(
            "{method} {vip} from {who} -> {}",
            match got {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            }
        ));
    }
    out.check(
        matches!(denied, Ok(StatusCode::FORBIDDEN)),
        "other's POST is refused at the waypoint: 403 (RBAC: access denied)",
        || format!("{denied:?}"),
    );
    out.check(
        matches!(get, Ok(StatusCode::OK)) && matches!(sleep_post, Ok(StatusCode::OK)),
        "other's GET and sleep's POST pass: the policy reads the method and the caller",
        || format!("other GET: {get:?}, sleep POST: {sleep_post:?}"),
    );
    let page = waypoint_page(WAYPOINT_METRICS, "/metrics")
        .await
        .map(|(_, p)| p)
        .unwrap_or_default();
    let samples: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"waypoint\""))
        .collect();
    out.say("The waypoint's metrics (reporter=waypoint):");
    for l in &samples {
        out.say(&format!("  {}", summarize_request_metric(l)));
    }
    out.check(
        samples
            .iter()
            .any(|l| l.contains("response_code=\"403\"") && l.contains(&spiffe(&OTHER))),
        "istio_requests_total counts other's refused POST with response_code=\"403\"",
        || "no such sample".into(),
    );
    let (_, b_metrics, _, _) = node_ports("node-b");
    let node_b = ambit_admin::get(local(b_metrics), "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    out.check(
        node_b.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{}\"", spiffe(&WAYPOINT)))
        }),
        "node-b's proxy sees the waypoint as the caller (its L4 policies apply to it)",
        || "no connection from the waypoint in node-b's metrics".into(),
    );

    canary(out, cluster, dir, vip).await?;

    // Back to L4 only, for the next step.
    write_policy(dir, None)?;
    for f in [pod_file, manifests.join("waypoint.demo.waypoint.yaml")] {
        let _ = std::fs::remove_file(f);
    }
    write_manifests(dir, true)?;
    let back = probe_until(&OTHER, &format!("http://{}:{ECHO_PORT}/", ECHO.ip), true).await;
    out.check(
        back.is_ok(),
        "waypoint removed: traffic goes straight to echo-1's node again",
        || format!("{:?}", back.as_ref().err()),
    );
    cluster.stop("waypoint");
    Ok(())
}

/// A metric sample with only the labels in `keep`: `name{k="v",...} N`.
fn summarize(line: &str, keep: &[&str]) -> String {
    let (head, value) = line.rsplit_once(' ').unwrap_or((line, ""));
    let (name, labels) = head.split_once('{').unwrap_or((head, ""));
    let labels: Vec<&str> = labels
        .trim_end_matches('}')
        .split("\",")
        .map(|kv| kv.trim_end_matches('"'))
        .filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}="))))
        .collect();
    format!("{name}{{{}\"}} {value}", labels.join("\","))
}

fn summarize_metric(line: &str) -> String {
    summarize(
        line,
        &[
            "source_workload",
            "source_principal",
            "destination_workload",
            "destination_principal",
            "destination_service",
            "connection_security_policy",
        ],
    )
}

/// `istio_requests_total{...} N` with only the labels worth reading.
fn summarize_request_metric(line: &str) -> String {
    summarize(
        line,
        &[
            "source_workload",
            "destination_workload",
            "request_protocol",
            "response_code",
        ],
    )
}

fn write_private(path: &Path, body: &[u8]) -> Result<(), DemoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DemoError::Io(format!("{}: {e}", path.display())))?;
    f.write_all(body)
        .map_err(|e| DemoError::Io(format!("{}: {e}", path.display())))
}

fn print_keep_help(dir: &Path, exe: &Path) {
    let d = dir.display();
    let exe = exe.display();
    let (a_admin, a_metrics, _, a_agent) = node_ports("node-a");
    let (_, b_metrics, _, b_agent) = node_ports("node-b");
    say!(
        "
The mesh keeps running. Try:
  {exe} config workloads --node node-a --run-dir {d}/run     # what node-a's proxy knows
  {exe} config all --admin 127.0.0.1:{a_admin} -o yaml
  curl -s 127.0.0.1:{a_metrics}/metrics    # node-a proxy metrics (node-b: 127.0.0.1:{b_metrics})
  curl -s 127.0.0.1:{a_agent}/debug/pods   # node-a agent (node-b: 127.0.0.1:{b_agent})
  curl -s 127.0.0.1:{CONTROL_MONITORING}/debug/xds     # control plane: discovery subscribers
  {exe} dashboard --addr 127.0.0.1:{CONTROL_CONSOLE} --open   # the mesh console in a browser
  ip netns exec {ns}.sleep {exe} demo get http://{ECHO_VIP}/      # send your own traffic
  ip netns exec {ns}.other {exe} demo get http://{ip}:{ECHO_PORT}/
  tail -f {d}/logs/node-b.log | grep 'connection complete'   # access log
  $EDITOR {d}/manifests/mesh.yaml    # remove the label istio.io/dataplane-mode: ambient to un-enroll
Logs: {d}/logs/. Tear it all down with: {exe} demo --down{dir_flag}",
        dir_flag = if dir == Path::new(crate::DEFAULT_DIR) {
            String::new()
        } else {
            format!(" --dir {d}")
        },
        ns = NAMESPACE,
        ip = ECHO.ip,
    );
}
