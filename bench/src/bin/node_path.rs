//! The node proxy's data path, measured against direct traffic in the same run.
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin node-path
//! ```
//!
//! Builds a topology of network namespaces (ambit-testenv): a client and a server pod
//! enrolled in the mesh on two simulated nodes, each served by its own node proxy, and a
//! second pair outside the mesh on the same bridge. Every scenario runs over both pairs:
//!
//! - one-stream throughput: the client sends `--bytes` on one connection, the server
//!   reads and discards them and answers with the count once the client has finished;
//! - 1 KiB request/response latency at a fixed rate (`--rate`, default 1,000/s) on one
//!   kept connection, and with a new connection per request;
//! - CPU time of the whole process (applications and proxies) per scenario.
//!
//! Needs root, iproute2 and nftables. Prints a markdown table and writes it to
//! `--output`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_bench::harness::until_interrupted;
use ambit_control::auth::TokenSigner;
use ambit_control::{Config, ControlPlane};
use ambit_node::{NodeConfig, NodeProxy, PodInfo, XdsConfig};
use ambit_testenv::{Pod, Topology};
use ambit_tls::client::TokenSource;
use anyhow::{Context, bail};
use clap::Parser;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Bytes sent in each throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Throughput runs per path, alternating between the paths; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Requests in each latency run.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests per second in the latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Data-path threads per node proxy.
    #[arg(long, default_value_t = 1)]
    proxy_threads: usize,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/results/node-path.md")]
    output: PathBuf,
}

const SINK_PORT: u16 = 8080;
const ECHO_PORT: u16 = 8081;
const REQUEST: usize = 1024;

const MANIFESTS: &str = "apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {nodeName: node-b, serviceAccountName: server}
status: {podIP: 198.18.2.10}
";

struct Pair {
    name: &'static str,
    client: Pod,
    server: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(until_interrupted(run(args)))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut topo = Topology::new().context("building the topology (run as root)")?;
    let client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 10))?;
    let server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 10))?;
    let plain_client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 20))?;
    let plain_server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 20))?;
    topo.enroll(&client)?;
    topo.enroll(&server)?;
    for pod in [&server, &plain_server] {
        serve_sink(pod.listen(SINK_PORT)?);
        serve_echo(pod.listen(ECHO_PORT)?);
    }

    let dir = tempfile::tempdir()?;
    std::fs::create_dir(dir.path().join("manifests"))?;
    std::fs::write(dir.path().join("manifests/mesh.yaml"), MANIFESTS)?;
    let mut config = Config::new(dir.path().join("manifests"), dir.path().join("state"));
    config.grpc_addr = "127.0.0.1:0".parse()?;
    config.monitoring_addr = "127.0.0.1:0".parse()?;
    let cp = ControlPlane::start(config).await?;
    let roots = CertificateDer::pem_file_iter(dir.path().join("state/ca/root-cert.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let signer = TokenSigner::load_or_create(&dir.path().join("state"))?;
    let mut nodes = Vec::new();
    for (node, pod, name, sa) in [
        ("node-a", &client, "client", "client"),
        ("node-b", &server, "server", "server"),
    ] {
        let mut c = NodeConfig::new(XdsConfig {
            address: cp.grpc_addr().to_string(),
            roots: ambit_tls::spiffe::TrustBundle::new(&roots)?,
            server_name: Some("localhost".into()),
            token: TokenSource::Static(
                signer
                    .mint(node, Duration::from_secs(3600))
                    .map_err(anyhow::Error::msg)?,
            ),
            node_name: node.into(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        });
        c.admin_addr = "127.0.0.1:0".parse()?;
        c.metrics_addr = "127.0.0.1:0".parse()?;
        c.readiness_addr = "127.0.0.1:0".parse()?;
        c.worker_threads = args.proxy_threads;
        c.local_pods = vec![(
            PodInfo {
                uid: format!("uid-{name}"),
                name: name.into(),
                namespace: "bench".into(),
                service_account: sa.into(),
            },
            pod.netns_path(),
        )];
        nodes.push(NodeProxy::start(c).await?);
    }
    for node in &nodes {
        wait_ready(node).await?;
    }

    let pairs = [
        Pair {
            name: "direct",
            client: plain_client,
            server: SocketAddr::new(IpAddr::V4(plain_server.ip), 0),
        },
        Pair {
            name: "ambit",
            client,
            server: SocketAddr::new(IpAddr::V4(server.ip), 0),
        },
    ];

    for pair in &pairs {
        eprintln!("[{}] warming up", pair.name);
        throughput(pair, 64 << 20).await?;
        latency(pair, 200, args.rate, false).await?;
    }
    // Throughput and CPU per GB: rounds alternate between the paths so that a noisy
    // moment of the machine does not land on one path only.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); pairs.len()];
    for round in 0..args.rounds {
        for (i, pair) in pairs.iter().enumerate() {
            eprintln!(
                "[{}] one stream, {} MiB (round {}/{})",
                pair.name,
                args.bytes >> 20,
                round + 1,
                args.rounds
            );
            let cpu = cpu_time();
            let (secs, bytes) = throughput(pair, args.bytes).await?;
            let cpu = cpu_time() - cpu;
            runs[i].push((bytes as f64 / secs / 1e9, cpu / (bytes as f64 / 1e9)));
        }
    }
    let mut measured = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        eprintln!("[{}] latency, kept connection", pair.name);
        let kept = latency(pair, args.requests, args.rate, false).await?;
        eprintln!("[{}] latency, new connection per request", pair.name);
        let fresh = latency(pair, args.requests, args.rate, true).await?;
        let gbps = median(runs[i].iter().map(|r| r.0).collect());
        let cpu = median(runs[i].iter().map(|r| r.1).collect());
        measured.push((gbps, kept, fresh, cpu));
    }
    drop(nodes);
    drop(cp);

    let (d, a) = (&measured[0], &measured[1]);
    let mut out = String::new();
    writeln!(out, "## Node proxy data path vs direct\n")?;
    writeln!(
        out,
        "`cargo run --release -p ambit-bench --bin node-path -- --bytes {} --rounds {} --requests {} --rate {} --proxy-threads {}` on {} cores; client and server in network namespaces on one bridge, two node proxies (one per simulated node) in the same process. Throughput and CPU: median of the rounds.\n",
        args.bytes,
        args.rounds,
        args.requests,
        args.rate,
        args.proxy_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(out, "| Measure | Direct | Ambit | Ambit / direct |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| One-stream throughput | {:.2} GB/s | {:.2} GB/s | {:.2}x |",
        d.0,
        a.0,
        a.0 / d.0
    )?;
    writeln!(
        out,
        "| CPU seconds per GB moved (whole process) | {:.2} | {:.2} | {:.2}x |",
        d.3,
        a.3,
        a.3 / d.3
    )?;
    for (label, pick) in [("kept connection", 1usize), ("new connection each", 2usize)] {
        let (dl, al) = match pick {
            1 => (&d.1, &a.1),
            _ => (&d.2, &a.2),
        };
        for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
            let (x, y) = (quantile(dl, q), quantile(al, q));
            writeln!(
                out,
                "| 1 KiB request/response at {} /s, {label}, {name} | {} µs | {} µs | {:.2}x |",
                args.rate,
                x.as_micros(),
                y.as_micros(),
                y.as_secs_f64() / x.as_secs_f64()
            )?;
        }
    }
    print!("{out}");
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, &out)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("written to {}", args.output.display());
    drop(topo);
    Ok(())
}

async fn wait_ready(node: &NodeProxy) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let (status, body) = ambit_admin::get(node.readiness_addr(), "/healthz/ready").await?;
        if status == 200 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("node proxy not ready: {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads everything, then answers with the byte count.
fn serve_sink(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = conn.write_all(&total.to_be_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
}

/// Answers every 1 KiB request with 1 KiB.
fn serve_echo(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; REQUEST];
                while conn.read_exact(&mut buf).await.is_ok() {
                    if conn.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

async fn throughput(pair: &Pair, bytes: u64) -> anyhow::Result<(f64, u64)> {
    let to = SocketAddr::new(pair.server.ip(), SINK_PORT);
    let mut conn = pair.client.connect(to).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        conn.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    conn.shutdown().await?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count).await?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(count);
    if got != bytes {
        bail!("the server received {got} of {bytes} bytes");
    }
    Ok((secs, bytes))
}

async fn latency(
    pair: &Pair,
    requests: usize,
    rate: u32,
    fresh: bool,
) -> anyhow::Result<Vec<Duration>> {
    let to = SocketAddr::new(pair.server.ip(), ECHO_PORT);
    let request = [0xa5u8; REQUEST];
    let mut reply = [0u8; REQUEST];
    let mut samples = Vec::with_capacity(requests);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kept = None;
    for _ in 0..requests {
        tick.tick().await;
        let start = Instant::now();
        if fresh || kept.is_none() {
            let conn = pair.client.connect(to).await?;
            conn.set_nodelay(true)?;
            kept = Some(conn);
        }
        let conn = kept.as_mut().context("no connection")?;
        conn.write_all(&request).await?;
        conn.read_exact(&mut reply).await?;
        samples.push(start.elapsed());
        if fresh {
            kept = None;
        }
    }
    samples.sort();
    Ok(samples)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// User + system CPU seconds of this process so far.
fn cpu_time() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}
