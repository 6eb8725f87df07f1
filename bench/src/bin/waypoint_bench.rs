//! The L7 hop: Ambit's waypoint against an nginx reverse proxy with TLS, each measured
//! against the path without it, on the same machine in the same run. Run it with
//! `bench/run-waypoint`, which installs nginx and builds the binaries.
//!
//! One topology of network namespaces, two pairs of client and server pods on two
//! simulated nodes:
//!
//! - **Ambit**: both pods enrolled; control plane, node proxies, node agents and the
//!   waypoint run as processes. The server is behind two services: `l4` (no waypoint:
//!   node proxy to node proxy, HBONE) and `l7` (bound to the waypoint, which runs in its
//!   own pod on node-a and forwards over HBONE with its own identity).
//! - **nginx**: the client talks to the server directly (**direct**), or through an
//!   nginx reverse proxy in a third pod (**nginx L7**) that parses HTTP and forwards over
//!   TLS 1.3 (ECDSA P-256, upstream keep-alive) to the server, which terminates TLS:
//!   HTTP/1.1 as HTTP/1.1, HTTP/2 as HTTP/2 (nginx's gRPC proxy module, which carries
//!   any HTTP/2 request), so both hops keep the protocol end to end.
//!
//! The server in every pod is nginx answering 1 KiB, over HTTP/1.1 and HTTP/2 (prior
//! knowledge). The load comes from this process (hyper clients inside the client pods):
//! latency at a fixed ~1,000 requests/s over 10 connections (HTTP/1.1: one request at a
//! time per connection; HTTP/2: 10 streams on one connection), and the maximum rate (64
//! requests in flight). The hop's cost is the difference to its own baseline: the
//! waypoint's `l7 - l4`, nginx's `nginx L7 - direct`. Its CPU (seconds per 1,000
//! requests, that is vCPU at 1,000 requests/s) and resident memory come from /proc.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambit_bench::harness::*;
use ambit_testenv::{Pod, Topology};
use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// The `ambit` binary to run (release build).
    #[arg(long)]
    ambit: PathBuf,
    /// Repetitions of every measurement, modes interleaved.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// Requests per second in the fixed-rate runs.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// One repetition of short runs.
    #[arg(long)]
    quick: bool,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/results/waypoint.md")]
    output: PathBuf,
    /// Log every request at the waypoint (its access log, with the time each spent
    /// inside it) and keep the work folder, for looking at where the hop's time goes.
    #[arg(long)]
    access_log: bool,
    /// After setting up, keep the mesh running this many seconds (and print where
    /// things are) before measuring: for looking at it with other tools.
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// HTTPRoutes on the waypoint's Service: that many routes on other paths, plus one
    /// per port taking the measured requests (0: no routes, requests go as addressed).
    #[arg(long, default_value_t = 0)]
    routes: usize,
}

const H1_PORT: u16 = 8080;
const H2_PORT: u16 = 8082;
const TLS_PORT: u16 = 8443;
/// The server's HTTP/2-over-TLS port: where the nginx reference sends HTTP/2.
const TLS_H2_PORT: u16 = 8444;
const L4_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const L7_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const WAYPOINT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
const WAYPOINT_METRICS: u16 = 15020;
const WAYPOINT_READY: u16 = 15021;
const FIXED_CONNECTIONS: usize = 10;
const MAX_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    NginxL7,
    AmbitL4,
    Waypoint,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Direct, Mode::NginxL7, Mode::AmbitL4, Mode::Waypoint];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::NginxL7 => "nginx L7",
            Mode::AmbitL4 => "Ambit L4",
            Mode::Waypoint => "Ambit waypoint",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

/// Where a mode's requests go, and the L7 proxy whose cost is measured (if any).
struct Target {
    mode: Mode,
    client: Pod,
    h1: SocketAddr,
    h2: SocketAddr,
    proxy: Option<u32>,
}

#[derive(Debug, Default, Clone)]
struct Sample {
    /// p50, p99 at the fixed rate, µs.
    fixed: [[f64; 2]; 2],
    max_rps: [f64; 2],
    /// The L7 proxy's CPU seconds per 1,000 requests at the maximum rate.
    cpu_per_k: [f64; 2],
    /// The L7 proxy's peak resident memory under load, bytes.
    rss: f64,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.reps = 1;
        args.seconds = 3;
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(until_interrupted(run(args)))
}

/// nginx answering 1 KiB on HTTP/1.1, HTTP/2 (prior knowledge) and, with `tls`, on TLS.
fn server_conf(dir: &Path, name: &str, tls: bool) -> anyhow::Result<PathBuf> {
    let body = "x".repeat(1024);
    let d = dir.display();
    let tls_listen = if tls {
        format!(
            "listen {TLS_PORT} ssl; listen {TLS_H2_PORT} ssl http2; ssl_protocols TLSv1.3; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;"
        )
    } else {
        String::new()
    };
    nginx_conf(
        dir,
        name,
        &format!(
            "http {{ access_log off; keepalive_requests 10000000; server {{ listen {H1_PORT}; listen {H2_PORT} http2; {tls_listen} location / {{ return 200 \"{body}\"; }} }} }}"
        ),
        1000,
    )
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ambit = std::fs::canonicalize(&args.ambit)
        .with_context(|| format!("the ambit binary {}", args.ambit.display()))?;
    let work = tempfile::Builder::new()
        .prefix("ambit-waypoint-bench-")
        .tempdir()?;
    let dir = work.path().to_owned();
    eprintln!("work folder (logs, configs): {}", dir.display());
    let mut topo = Topology::new().context("building the topology (run as root, with iproute2)")?;
    let a_client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 10))?;
    let a_server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 10))?;
    let waypoint_pod = topo.pod("node-a", WAYPOINT_IP)?;
    let n_client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 30))?;
    let n_proxy = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 31))?;
    let n_server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 30))?;
    let mut procs = Procs::default();

    nginx_pki(&dir)?;
    for (tag, pod, tls) in [("a", &a_server, false), ("n", &n_server, true)] {
        let conf = server_conf(&dir, &format!("server-{tag}"), tls)?;
        procs.spawn(
            &format!("server-{tag}"),
            Some(&pod.netns_name),
            &["nginx", "-c", &conf.display().to_string()],
            &dir.join(format!("server-{tag}.log")),
        )?;
    }
    // The reference L7 hop: parses HTTP, forwards over TLS with upstream keep-alive.
    let d = dir.display();
    let conf = nginx_conf(
        &dir,
        "nginx-l7",
        &format!(
            "http {{ access_log off; keepalive_requests 10000000;
  upstream backend {{ server {ip}:{TLS_PORT}; keepalive 128; }}
  upstream backend_h2 {{ server {ip}:{TLS_H2_PORT}; keepalive 128; }}
  server {{ listen {H1_PORT};
    location / {{ proxy_pass https://backend; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_ssl_protocols TLSv1.3; proxy_ssl_certificate {d}/client.pem; proxy_ssl_certificate_key {d}/client.key;
      proxy_ssl_trusted_certificate {d}/ca.pem; proxy_ssl_verify on; proxy_ssl_name server.bench; proxy_ssl_session_reuse on; }} }}
  server {{ listen {H2_PORT} http2;
    location / {{ grpc_pass grpcs://backend_h2;
      grpc_ssl_protocols TLSv1.3; grpc_ssl_certificate {d}/client.pem; grpc_ssl_certificate_key {d}/client.key;
      grpc_ssl_trusted_certificate {d}/ca.pem; grpc_ssl_verify on; grpc_ssl_name server.bench; grpc_ssl_session_reuse on; }} }} }}",
            ip = n_server.ip
        ),
        1000,
    )?;
    let nginx_l7 = procs.spawn(
        "nginx-l7",
        Some(&n_proxy.netns_name),
        &["nginx", "-c", &conf.display().to_string()],
        &dir.join("nginx-l7.log"),
    )?;

    eprintln!("starting Ambit");
    let extra = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: l4, namespace: bench}}
spec:
  selector: {{app: server}}
  clusterIP: {L4_VIP}
  ports: [{{name: http, port: {H1_PORT}}}, {{name: h2, port: {H2_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: l7, namespace: bench, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  selector: {{app: server}}
  clusterIP: {L7_VIP}
  ports: [{{name: http, port: {H1_PORT}}}, {{name: h2, port: {H2_PORT}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: bench}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: waypoint, namespace: bench, labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
  ports: [{{name: mesh, port: 15008}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint
  namespace: bench
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {{nodeName: node-a, serviceAccountName: waypoint}}
status: {{podIP: {WAYPOINT_IP}}}
"
    );
    let mut extra = extra;
    if args.routes > 0 {
        use std::fmt::Write as _;
        for port in [H1_PORT, H2_PORT] {
            let _ = write!(
                extra,
                "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: measured-{port}, namespace: bench}}
spec:
  parentRefs: [{{group: '', kind: Service, name: l7, port: {port}}}]
  rules: [{{matches: [{{path: {{type: PathPrefix, value: /}}}}], backendRefs: [{{name: l7, port: {port}}}]}}]
"
            );
        }
        for i in 0..args.routes {
            let _ = write!(
                extra,
                "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: other-{i}, namespace: bench}}
spec:
  parentRefs: [{{group: '', kind: Service, name: l7}}]
  rules: [{{matches: [{{path: {{type: PathPrefix, value: /other-{i}}}, headers: [{{name: x-tenant, value: t{i}}}]}}], backendRefs: [{{name: l4, port: {H1_PORT}}}]}}]
"
            );
        }
    }
    let mesh = start_ambit(
        &mut procs,
        &ambit,
        &dir,
        "ambit",
        &a_client,
        &a_server,
        MeshExtras {
            manifests: &extra,
            ..Default::default()
        },
    )
    .await?;
    let s = |p: &Path| p.display().to_string();
    let waypoint = procs.spawn(
        "waypoint",
        None,
        &[
            &s(&ambit),
            "--log-format",
            "json",
            "--log-level",
            if args.access_log { "info" } else { "warn" },
            "waypoint",
            "run",
            "-n",
            "bench",
            "--name",
            "waypoint",
            "--node-name",
            "node-a",
            "--control-plane",
            &mesh.grpc.to_string(),
            "--server-name",
            "localhost",
            "--ca-root",
            &s(&mesh.root_cert),
            "--token-file",
            &s(&mesh.token_a),
            "--netns",
            &s(&waypoint_pod.netns_path()),
            "--worker-threads",
            "1",
        ],
        &dir.join("waypoint.log"),
    )?;
    wait_for(&mut procs, "waypoint ready", async || {
        page(&waypoint_pod, WAYPOINT_READY, "/healthz/ready")
            .await
            .is_some_and(|(status, _)| status == 200)
    })
    .await?;

    let targets = vec![
        Target {
            mode: Mode::Direct,
            client: n_client.clone(),
            h1: SocketAddr::from((n_server.ip, H1_PORT)),
            h2: SocketAddr::from((n_server.ip, H2_PORT)),
            proxy: None,
        },
        Target {
            mode: Mode::NginxL7,
            client: n_client,
            h1: SocketAddr::from((n_proxy.ip, H1_PORT)),
            h2: SocketAddr::from((n_proxy.ip, H2_PORT)),
            proxy: Some(nginx_l7),
        },
        Target {
            mode: Mode::AmbitL4,
            client: a_client.clone(),
            h1: SocketAddr::from((L4_VIP, H1_PORT)),
            h2: SocketAddr::from((L4_VIP, H2_PORT)),
            proxy: None,
        },
        Target {
            mode: Mode::Waypoint,
            client: a_client,
            h1: SocketAddr::from((L7_VIP, H1_PORT)),
            h2: SocketAddr::from((L7_VIP, H2_PORT)),
            proxy: Some(waypoint),
        },
    ];
    // Every path answers, and the waypoint's really crosses the waypoint.
    for t in &targets {
        for (proto, to) in [(Proto::H1, t.h1), (Proto::H2, t.h2)] {
            load(&t.client, to, proto, 1, 1, Duration::from_millis(300), None)
                .await
                .with_context(|| format!("[{}] {proto:?}: a first request", t.mode.name()))?;
        }
    }
    let metrics = page(&waypoint_pod, WAYPOINT_METRICS, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    if !metrics.contains("istio_requests_total{reporter=\"waypoint\"") {
        bail!("the l7 service's requests did not cross the waypoint");
    }

    if args.hold > 0 {
        println!(
            "holding {} s: waypoint pid {waypoint}; client pod netns {} (l4 {L4_VIP}, l7 {L7_VIP}; ports {H1_PORT} HTTP/1.1, {H2_PORT} HTTP/2)",
            args.hold,
            targets[2].client.netns_path().display(),
        );
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for rep in 0..args.reps {
        for (i, t) in targets.iter().enumerate() {
            eprintln!("[{}] repetition {}/{}", t.mode.name(), rep + 1, args.reps);
            samples[i].push(measure(t, &args, &mut procs).await?);
        }
    }
    let table = report(&samples, &args);
    println!("\n{table}");
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, &table)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("written to {}", args.output.display());
    drop(procs);
    drop(topo);
    if args.access_log {
        let kept = work.keep();
        println!("work folder kept: {} (waypoint.log)", kept.display());
    }
    Ok(())
}

/// A page of an admin port inside `pod`.
async fn page(pod: &Pod, port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from((pod.ip, port));
    let stream = tokio::time::timeout(Duration::from_secs(2), pod.connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut conn = ambit_admin::Connection::open(stream).await.ok()?;
    let (status, body) = conn.get(&addr.to_string(), path).await.ok()?;
    Some((status.as_u16(), body))
}

type Sender = Box<dyn SendOne>;

/// One request on an open connection, its body read to the end.
trait SendOne: Send {
    fn send<'a>(
        &'a mut self,
        uri: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;
}

struct H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>);
struct H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>);

async fn finish(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<()> {
    if resp.status() != 200 {
        bail!("status {}", resp.status());
    }
    let body = resp.into_body().collect().await?.to_bytes();
    if body.len() != 1024 {
        bail!("a body of {} bytes", body.len());
    }
    Ok(())
}

impl SendOne for H1 {
    fn send<'a>(
        &'a mut self,
        uri: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>> {
        Box::pin(async move {
            self.0.ready().await?;
            let req = http::Request::get("/")
                .header("host", uri)
                .body(Empty::new())?;
            finish(self.0.send_request(req).await?).await
        })
    }
}

impl SendOne for H2 {
    fn send<'a>(
        &'a mut self,
        uri: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let req = http::Request::get(format!("http://{uri}/")).body(Empty::new())?;
            finish(self.0.send_request(req).await?).await
        })
    }
}

/// An open connection: HTTP/1.1 carries one request at a time; HTTP/2 senders are
/// clones of one connection, one per worker.
enum Conn {
    H1(H1),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(client: &Pod, to: SocketAddr, proto: Proto) -> anyhow::Result<Conn> {
    let tcp = client.connect(to).await?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(match proto {
        Proto::H1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Conn::H1(H1(send))
        }
        Proto::H2 => {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Conn::H2(send)
        }
    })
}

/// `workers` request loops over `connections` connections (HTTP/2: the workers share
/// them as streams) for `duration`; each worker waits `pace` between its requests when
/// given (a fixed rate), else sends the next at once. Returns the latencies (µs).
async fn load(
    client: &Pod,
    to: SocketAddr,
    proto: Proto,
    connections: usize,
    workers: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> anyhow::Result<Vec<f64>> {
    let host = to.to_string();
    let mut conns = Vec::new();
    for _ in 0..connections.max(1) {
        conns.push(connect(client, to, proto).await?);
    }
    let mut senders: Vec<Sender> = Vec::new();
    let mut h2 = Vec::new();
    for c in conns {
        match c {
            Conn::H1(s) => senders.push(Box::new(s)),
            Conn::H2(s) => h2.push(s),
        }
    }
    for w in 0..if h2.is_empty() { 0 } else { workers } {
        senders.push(Box::new(H2(h2[w % h2.len()].clone())));
    }
    let end = Instant::now() + duration;
    let mut set = tokio::task::JoinSet::new();
    for mut sender in senders {
        let host = host.clone();
        set.spawn(async move { worker(&mut *sender, &host, end, pace).await });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

async fn worker(
    conn: &mut dyn SendOne,
    host: &str,
    end: Instant,
    pace: Option<Duration>,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    let mut next = Instant::now() + pace.map_or(Duration::ZERO, |p| p.mul_f64(fastrand::f64()));
    while Instant::now() < end {
        if let Some(p) = pace {
            tokio::time::sleep_until(next.into()).await;
            next += p;
        }
        let started = Instant::now();
        conn.send(host).await?;
        out.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn measure(t: &Target, args: &Args, procs: &mut Procs) -> anyhow::Result<Sample> {
    procs.check()?;
    let secs = Duration::from_secs(args.seconds);
    let mut s = Sample::default();
    // ~rate requests/s: each worker waits so that together they make it.
    let pace = Duration::from_secs_f64(FIXED_CONNECTIONS as f64 / f64::from(args.rate.max(1)));
    for (i, (proto, to)) in [(Proto::H1, t.h1), (Proto::H2, t.h2)]
        .into_iter()
        .enumerate()
    {
        let connections = if proto == Proto::H1 {
            FIXED_CONNECTIONS
        } else {
            1
        };
        let mut lat = load(
            &t.client,
            to,
            proto,
            connections,
            FIXED_CONNECTIONS,
            secs,
            Some(pace),
        )
        .await?;
        lat.sort_by(f64::total_cmp);
        s.fixed[i] = [percentile(&lat, 0.5), percentile(&lat, 0.99)];

        let peak = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = t.proxy.map(|pid| {
            let (peak, done) = (peak.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        let cpu = || t.proxy.map_or(0.0, |p| cpu_seconds(&[p]));
        let c0 = cpu();
        let started = Instant::now();
        let connections = if proto == Proto::H1 { MAX_IN_FLIGHT } else { 4 };
        let lat = load(&t.client, to, proto, connections, MAX_IN_FLIGHT, secs, None).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let used = cpu() - c0;
        done.store(true, Ordering::Relaxed);
        if let Some(h) = sampler {
            let _ = h.join();
        }
        s.max_rps[i] = lat.len() as f64 / elapsed;
        s.cpu_per_k[i] = used / (lat.len() as f64 / 1000.0);
        s.rss = s.rss.max(peak.load(Ordering::Relaxed) as f64);
    }
    Ok(s)
}

fn report(samples: &[Vec<Sample>], args: &Args) -> String {
    type Get = Box<dyn Fn(&Sample) -> f64>;
    let idx = |m: Mode| Mode::ALL.iter().position(|x| *x == m).unwrap_or(0);
    let med = |m: Mode, get: &Get| stats(samples[idx(m)].iter().map(get)).0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# The L7 hop: Ambit's waypoint vs an nginx reverse proxy with TLS\n\n`bench/run-waypoint{}` — {} repetition(s), modes interleaved, {} s per run; medians. Latency in µs at ~{} requests/s over {FIXED_CONNECTIONS} connections (HTTP/2: {FIXED_CONNECTIONS} streams on one); maximum rate with {MAX_IN_FLIGHT} requests in flight. The waypoint hop is `Ambit waypoint - Ambit L4`; the nginx hop `nginx L7 - direct`. {}\n",
        if args.quick { " --quick" } else { "" },
        args.reps,
        args.seconds,
        args.rate,
        machine()
    );
    let _ = writeln!(
        out,
        "| Metric | direct | nginx L7 | Ambit L4 | Ambit waypoint | nginx hop | waypoint hop | waypoint/nginx |\n|---|---|---|---|---|---|---|---|"
    );
    let rows: Vec<(&str, Get, bool)> = vec![
        (
            "HTTP/1.1 p50 (µs)",
            Box::new(|s: &Sample| s.fixed[0][0]),
            true,
        ),
        (
            "HTTP/1.1 p99 (µs)",
            Box::new(|s: &Sample| s.fixed[0][1]),
            true,
        ),
        (
            "HTTP/2 p50 (µs)",
            Box::new(|s: &Sample| s.fixed[1][0]),
            true,
        ),
        (
            "HTTP/2 p99 (µs)",
            Box::new(|s: &Sample| s.fixed[1][1]),
            true,
        ),
        (
            "HTTP/1.1 max requests/s",
            Box::new(|s: &Sample| s.max_rps[0]),
            false,
        ),
        (
            "HTTP/2 max requests/s",
            Box::new(|s: &Sample| s.max_rps[1]),
            false,
        ),
    ];
    for (name, get, hop) in &rows {
        let v: Vec<f64> = Mode::ALL.iter().map(|m| med(*m, get)).collect();
        let (nginx_hop, waypoint_hop) = (v[1] - v[0], v[3] - v[2]);
        if *hop {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                fmt(v[0]),
                fmt(v[1]),
                fmt(v[2]),
                fmt(v[3]),
                fmt(nginx_hop),
                fmt(waypoint_hop),
                fmt(waypoint_hop / nginx_hop)
            );
        } else {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | | | {} |",
                fmt(v[0]),
                fmt(v[1]),
                fmt(v[2]),
                fmt(v[3]),
                fmt(v[3] / v[1])
            );
        }
    }
    let proxy_rows: Vec<(&str, Get)> = vec![
        (
            "L7 proxy CPU s per 1,000 requests (HTTP/1.1) = vCPU at 1,000/s",
            Box::new(|s: &Sample| s.cpu_per_k[0]),
        ),
        (
            "L7 proxy CPU s per 1,000 requests (HTTP/2)",
            Box::new(|s: &Sample| s.cpu_per_k[1]),
        ),
        (
            "L7 proxy memory under load (MB)",
            Box::new(|s: &Sample| s.rss / 1e6),
        ),
    ];
    for (name, get) in &proxy_rows {
        let (n, w) = (med(Mode::NginxL7, get), med(Mode::Waypoint, get));
        let _ = writeln!(
            out,
            "| {name} | | {} | | {} | | | {} |",
            fmt(n),
            fmt(w),
            fmt(w / n)
        );
    }
    out
}
