//! Ambit's data path against direct traffic and a reference mTLS proxy pair, measured
//! side by side on the same machine in the same run. Run it with `bench/run`, which
//! installs the tools and builds the binaries.
//!
//! ```sh
//! bench/run            # 5 interleaved repetitions (about 15 minutes on 2 cores)
//! bench/run --quick    # 1 repetition, short runs (about 2 minutes)
//! bench/run --baseline /path/to/older/ambit   # before/after a change, same run
//! bench/run --aa --l7-metrics   # request metrics' cost beside an A/A control
//! ```
//!
//! One topology of network namespaces (ambit-testenv), three client/server pairs on two
//! simulated nodes, all on the same bridge:
//!
//! - **direct**: the client talks to the server, no proxy;
//! - **ambit**: both pods enrolled; `ambit control`, `ambit node` and `ambit cni` run as
//!   processes (one per node, one data-path thread each) and the traffic is captured and
//!   tunnelled (HBONE, mTLS) as in a real node;
//! - **nginx**: the classic "two proxies with mTLS": an nginx stream proxy in the client
//!   pod (the client connects to it on localhost) opens TLS 1.3 with a client
//!   certificate to an nginx stream proxy in the server pod, which requires and verifies
//!   it and forwards to the server on localhost (ECDSA P-256 certificates, one worker
//!   process each).
//!
//! The servers are iperf3 and an nginx HTTP server answering every request with 1 KiB.
//! Per mode and repetition (modes interleaved, each repetition starting one mode later:
//! direct, ambit, nginx; ambit, nginx, direct; ...):
//! iperf3 one-stream throughput both ways; latency at a fixed ~1,000 requests/s over 10
//! connections, with keep-alive and with a new connection per request, from the
//! `fixed-rate` client (`src/bin/fixed_rate.rs`), which times every request from when it
//! was due so a stall is not hidden (p50 to p99.9 and the maximum, and a per-100 ms
//! timeline laid beside the proxies' CPU by thread, written to `<output>-timeline.md`);
//! wrk's maximum request rate; the connection setup rate (a new connection per request,
//! as fast as it goes); the proxies' CPU seconds (from /proc, both proxies) per 1,000
//! requests and per GB moved; the proxies' RSS idle, under load and with 10,000 idle
//! connections open through them. Each mode starts on a quiet machine. Medians with min
//! and max across repetitions; a markdown table
//! with the ratios Ambit/direct and Ambit/nginx, printed and written to `--output`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ambit_testenv::{Pod, Topology};
use anyhow::{Context, bail};
use clap::Parser;

use ambit_bench::harness::*;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// The `ambit` binary to run (release build).
    #[arg(long)]
    ambit: PathBuf,
    /// Repetitions of every measurement, modes interleaved.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds per throughput, latency and rate run.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Requests per second in the fixed-rate latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Idle connections opened through the proxies for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// One repetition of short runs (a smoke run of about two minutes).
    #[arg(long)]
    quick: bool,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/results/mesh.md")]
    output: PathBuf,
    /// An earlier `ambit` binary to measure in the same run, interleaved with the others
    /// (its own control plane, node proxies and pods): before/after comparisons of a
    /// change without the noise between separate runs.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// An A/A control: the same `ambit` binary again as the baseline. Whatever differs
    /// between the two columns is the harness and the machine, not the code.
    #[arg(long, conflicts_with = "baseline")]
    aa: bool,
    /// Measure, in the same run, another Ambit mesh whose pods turned request metrics on
    /// (`ambit.io/l7-metrics: enabled`): the cost of sniffing HTTP at the node proxies
    /// against L4 only. Combine with `--aa` to see the harness's own spread beside it.
    #[arg(long)]
    l7_metrics: bool,
    /// Build the topology, start everything, print where things are, and wait for
    /// Ctrl-C instead of measuring (for profiling by hand: perf, iperf3, wrk).
    #[arg(long)]
    hold: bool,
}

const IPERF_PORT: u16 = 5201;
const HTTP_PORT: u16 = 8080;
/// nginx pair: client-side listeners on localhost, server-side TLS listeners.
const NGINX_LOCAL_OFFSET: u16 = 10000;
const NGINX_TLS_OFFSET: u16 = 20000;
const FIXED_RATE_CONNECTIONS: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Ambit,
    Nginx,
    Baseline,
    L7,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ambit => "ambit",
            Mode::Nginx => "nginx pair",
            Mode::Baseline => "Ambit baseline",
            Mode::L7 => "Ambit, L7 metrics on",
        }
    }
}

/// What one mode needs to be driven.
struct Target {
    mode: Mode,
    client: Pod,
    /// Where the client sends traffic for the server's `port`.
    addr: Box<dyn Fn(u16) -> SocketAddr>,
    /// The proxies' root processes (none for direct).
    proxies: Vec<u32>,
}

#[derive(Debug, Default, Clone)]
struct Sample {
    up_gbps: f64,
    down_gbps: f64,
    cpu_per_gb: f64,
    /// Fixed-rate latency (µs): p50, p90, p99, p99.9, max.
    kept: [f64; 5],
    fresh: [f64; 5],
    /// The fixed-rate client's own lateness (p99 of how late its threads woke, µs).
    client_late: f64,
    /// Keep-alive at a fixed rate, per 100 ms: the slowest request due then (µs) and the
    /// proxies' CPU then, by thread role.
    timeline: Vec<(u64, ThreadCpu)>,
    max_rps: f64,
    cpu_per_k_requests: f64,
    setup_rate: f64,
    rss_idle: f64,
    anon_idle: f64,
    rss_load: f64,
    per_idle_conn: f64,
    /// The share of the machine's CPU time the hypervisor gave to others meanwhile.
    steal: f64,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.reps = 1;
        args.seconds = 3;
    }
    let limit = raise_fd_limit();
    // An nginx proxy holds two descriptors per connection, in one worker process.
    let fit = (limit.saturating_sub(1000) / 2) as usize;
    if args.idle_connections > fit {
        eprintln!(
            "the open-file limit is {limit} and cannot be raised here: {fit} idle connections instead of {}",
            args.idle_connections
        );
        args.idle_connections = fit;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(until_interrupted(run(args)))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    let ambit = std::fs::canonicalize(&args.ambit)
        .with_context(|| format!("the ambit binary {}", args.ambit.display()))?;
    for tool in ["iperf3", "wrk", "nginx", "openssl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!(
                "{tool} is missing; bench/run installs it (apt-get install iperf3 wrk nginx-light libnginx-mod-stream openssl)"
            );
        }
    }
    if !Path::new(NGINX_MODULE).exists() {
        bail!("{NGINX_MODULE} is missing: apt-get install libnginx-mod-stream");
    }
    let work = tempfile::Builder::new()
        .prefix("ambit-mesh-bench-")
        .tempdir()?;
    let dir = work.path().to_owned();
    eprintln!("work folder (logs, configs): {}", dir.display());

    eprintln!("building the topology");
    let mut topo = Topology::new().context("building the topology (run as root, with iproute2)")?;
    let a_client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 10))?;
    let a_server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 10))?;
    let d_client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 20))?;
    let d_server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 20))?;
    let n_client = topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 30))?;
    let n_server = topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 30))?;
    if args.aa {
        args.baseline = Some(args.ambit.clone());
    }
    let baseline = match &args.baseline {
        Some(bin) => Some((
            std::fs::canonicalize(bin)
                .with_context(|| format!("the baseline binary {}", bin.display()))?,
            topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 40))?,
            topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 40))?,
        )),
        None => None,
    };
    let l7 = if args.l7_metrics {
        Some((
            topo.pod("node-a", Ipv4Addr::new(198, 18, 1, 50))?,
            topo.pod("node-b", Ipv4Addr::new(198, 18, 2, 50))?,
        ))
    } else {
        None
    };
    let mut procs = Procs::default();

    // Servers in every server pod: iperf3 and an nginx HTTP server answering 1 KiB (it
    // also holds the idle connections: half a request waits for the rest).
    let body = "x".repeat(1024);
    let mut servers = vec![("a", &a_server), ("d", &d_server), ("n", &n_server)];
    if let Some((_, _, server)) = &baseline {
        servers.push(("b", server));
    }
    if let Some((_, server)) = &l7 {
        servers.push(("l", server));
    }
    for (tag, pod) in servers {
        procs.spawn(
            &format!("iperf3-{tag}"),
            Some(&pod.netns_name),
            &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
            &dir.join(format!("iperf3-{tag}.log")),
        )?;
        let conf = nginx_conf(
            &dir,
            &format!("http-{tag}"),
            &format!(
                "http {{ access_log off; keepalive_requests 1000000; client_header_timeout 600s; server {{ listen {HTTP_PORT}; location / {{ return 200 \"{body}\"; }} }} }}"
            ),
            args.idle_connections,
        )?;
        procs.spawn(
            &format!("http-{tag}"),
            Some(&pod.netns_name),
            &["nginx", "-c", &conf.display().to_string()],
            &dir.join(format!("http-{tag}.log")),
        )?;
    }

    // The nginx mTLS pair.
    nginx_pki(&dir)?;
    let d = dir.display();
    let mut client_servers = String::new();
    let mut server_servers = String::new();
    for port in [IPERF_PORT, HTTP_PORT] {
        let _ = writeln!(
            client_servers,
            "server {{ listen 127.0.0.1:{local}; proxy_pass {ip}:{tls}; proxy_ssl on; proxy_ssl_protocols TLSv1.3; proxy_ssl_certificate {d}/client.pem; proxy_ssl_certificate_key {d}/client.key; proxy_ssl_trusted_certificate {d}/ca.pem; proxy_ssl_verify on; proxy_ssl_name server.bench; proxy_ssl_server_name on; }}",
            local = port + NGINX_LOCAL_OFFSET,
            ip = n_server.ip,
            tls = port + NGINX_TLS_OFFSET,
        );
        let _ = writeln!(
            server_servers,
            "server {{ listen {tls} ssl; ssl_protocols TLSv1.3; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key; ssl_client_certificate {d}/ca.pem; ssl_verify_client on; proxy_pass 127.0.0.1:{port}; }}",
            tls = port + NGINX_TLS_OFFSET,
        );
    }
    let conf = nginx_conf(
        &dir,
        "nginx-client",
        &format!("stream {{\n{client_servers}}}"),
        args.idle_connections,
    )?;
    let nginx_client = procs.spawn(
        "nginx-client",
        Some(&n_client.netns_name),
        &["nginx", "-c", &conf.display().to_string()],
        &dir.join("nginx-client.log"),
    )?;
    let conf = nginx_conf(
        &dir,
        "nginx-server",
        &format!("stream {{\n{server_servers}}}"),
        args.idle_connections,
    )?;
    let nginx_server = procs.spawn(
        "nginx-server",
        Some(&n_server.netns_name),
        &["nginx", "-c", &conf.display().to_string()],
        &dir.join("nginx-server.log"),
    )?;

    // Ambit: control plane, then a node proxy and a node agent per node.
    eprintln!("starting Ambit");
    let ambit_mesh = start_ambit(
        &mut procs,
        &ambit,
        &dir,
        "ambit",
        &a_client,
        &a_server,
        MeshExtras::default(),
    )
    .await?;
    let baseline_mesh = match &baseline {
        Some((bin, client, server)) => {
            eprintln!("starting the baseline Ambit ({})", bin.display());
            let none = MeshExtras::default();
            Some(start_ambit(&mut procs, bin, &dir, "baseline", client, server, none).await?)
        }
        None => None,
    };
    let l7_mesh = match &l7 {
        Some((client, server)) => {
            eprintln!("starting another Ambit mesh with request metrics at the node proxies");
            let on = MeshExtras {
                namespace_annotations: "ambit.io/l7-metrics: enabled",
                ..Default::default()
            };
            Some(start_ambit(&mut procs, &ambit, &dir, "l7", client, server, on).await?)
        }
        None => None,
    };

    let mut targets = vec![
        Target {
            mode: Mode::Direct,
            client: d_client,
            addr: Box::new(move |p| SocketAddr::new(IpAddr::V4(d_server.ip), p)),
            proxies: vec![],
        },
        Target {
            mode: Mode::Ambit,
            client: a_client,
            addr: Box::new(move |p| SocketAddr::new(IpAddr::V4(a_server.ip), p)),
            proxies: ambit_mesh.node_pids.clone(),
        },
        Target {
            mode: Mode::Nginx,
            client: n_client,
            addr: Box::new(|p| SocketAddr::from(([127, 0, 0, 1], p + NGINX_LOCAL_OFFSET))),
            proxies: vec![nginx_client, nginx_server],
        },
    ];
    if let (Some((_, client, server)), Some(mesh)) = (baseline, &baseline_mesh) {
        targets.push(Target {
            mode: Mode::Baseline,
            client,
            addr: Box::new(move |p| SocketAddr::new(IpAddr::V4(server.ip), p)),
            proxies: mesh.node_pids.clone(),
        });
    }
    if let (Some((client, server)), Some(mesh)) = (l7, &l7_mesh) {
        targets.push(Target {
            mode: Mode::L7,
            client,
            addr: Box::new(move |p| SocketAddr::new(IpAddr::V4(server.ip), p)),
            proxies: mesh.node_pids.clone(),
        });
    }

    // Every path works, and Ambit's really goes through the node proxies.
    for t in &targets {
        wrk(&t.client, (t.addr)(HTTP_PORT), 1, 1, false)
            .with_context(|| format!("[{}] a first request", t.mode.name()))?;
    }
    for mesh in [Some(&ambit_mesh), baseline_mesh.as_ref(), l7_mesh.as_ref()]
        .into_iter()
        .flatten()
    {
        let page = ambit_admin::get(mesh.metrics_b, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        if !page.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
                && l.contains("mutual_tls")
        }) {
            bail!("the ambit pair's traffic did not go through node-b's proxy in mTLS");
        }
    }
    if let Some(mesh) = &l7_mesh {
        let page = ambit_admin::get(mesh.metrics_b, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        if !page
            .lines()
            .any(|l| l.starts_with("istio_requests_total{reporter=\"destination\""))
        {
            bail!("the mesh with request metrics on recorded no request at node-b's proxy");
        }
    }

    if args.hold {
        for t in &targets {
            eprintln!(
                "{:>10}: client netns {}, iperf3 {}, http {}, proxy pids {:?}",
                t.mode.name(),
                t.client.netns_name,
                (t.addr)(IPERF_PORT),
                (t.addr)(HTTP_PORT),
                t.proxies
            );
        }
        eprintln!("holding; Ctrl-C tears everything down");
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for rep in 0..args.reps {
        // Each repetition starts with the next mode, so no mode always runs in the same
        // place: an A/A run found the fourth place alone costing half the throughput.
        for k in 0..targets.len() {
            let i = (k + rep) % targets.len();
            let t = &targets[i];
            eprintln!("[{}] repetition {}/{}", t.mode.name(), rep + 1, args.reps);
            // Whatever the previous mode left running (closing 10,000 connections)
            // must not land on this one.
            if let Err(busy) = settle(Duration::from_secs(15)).await {
                eprintln!(
                    "  the machine stayed {:.0}% busy for 15 s; measuring anyway",
                    busy * 100.0
                );
            }
            let before = CpuTimes::now();
            let mut sample = measure(t, &args, &mut procs).await?;
            sample.steal = CpuTimes::now().since(&before).steal();
            samples[i].push(sample);
        }
    }
    let modes: Vec<Mode> = targets.iter().map(|t| t.mode).collect();
    let table = report(&samples, &modes, &args);
    println!("\n{table}");
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, &table)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let timeline = args.output.with_file_name(format!(
        "{}-timeline.md",
        args.output
            .file_stem()
            .map_or("mesh".into(), |s| s.to_string_lossy())
    ));
    std::fs::write(&timeline, timeline_report(&samples, &modes))
        .with_context(|| format!("writing {}", timeline.display()))?;
    println!(
        "written to {} and {}",
        args.output.display(),
        timeline.display()
    );
    drop(procs);
    drop(topo);
    Ok(())
}

fn iperf(client: &Pod, to: SocketAddr, seconds: u64, reverse: bool) -> anyhow::Result<(f64, f64)> {
    let mut argv = vec![
        "netns".to_owned(),
        "exec".into(),
        client.netns_name.clone(),
        "iperf3".into(),
        "-c".into(),
        to.ip().to_string(),
        "-p".into(),
        to.port().to_string(),
        "-t".into(),
        seconds.to_string(),
        "-J".into(),
    ];
    if reverse {
        argv.push("-R".into());
    }
    let out = Command::new("ip").args(&argv).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    Ok((
        sum["bits_per_second"].as_f64().unwrap_or(0.0) / 8e9,
        sum["bytes"].as_f64().unwrap_or(0.0),
    ))
}

/// Runs wrk in the client pod, as fast as it goes; returns (requests/s, requests).
fn wrk(
    client: &Pod,
    to: SocketAddr,
    seconds: u64,
    connections: u32,
    close: bool,
) -> anyhow::Result<(f64, f64)> {
    let script = std::env::temp_dir().join(format!("ambit-wrk-{}.lua", std::process::id()));
    let lua = if close {
        "wrk.headers[\"Connection\"] = \"close\"\n"
    } else {
        ""
    };
    std::fs::write(&script, lua)?;
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.netns_name,
            "wrk",
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
            &script.display().to_string(),
            &format!("http://{to}/"),
        ])
        .output()?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| {
            format!(
                "wrk printed no rate:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    if text.contains("Non-2xx") {
        bail!("wrk saw non-2xx answers:\n{text}");
    }
    Ok((rps, requests))
}

const TIMELINE_SLOT: Duration = Duration::from_millis(100);

/// What the `fixed-rate` client reported.
struct FixedRate {
    quantiles: [f64; 5],
    late_p99: f64,
    start: std::time::SystemTime,
    slot_max: Vec<u64>,
}

/// Runs the `fixed-rate` client (built next to this binary) in the client pod:
/// `rate` requests/s over FIXED_RATE_CONNECTIONS connections, each timed from when it
/// was due, so a stall counts on every request it delayed.
fn fixed_rate(
    client: &Pod,
    to: SocketAddr,
    rate: u32,
    seconds: u64,
    close: bool,
) -> anyhow::Result<FixedRate> {
    let tool = std::env::current_exe()?.with_file_name("fixed-rate");
    let mut argv = vec![
        "netns".to_owned(),
        "exec".into(),
        client.netns_name.clone(),
        tool.display().to_string(),
        "--addr".into(),
        to.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--connections".into(),
        FIXED_RATE_CONNECTIONS.to_string(),
    ];
    if close {
        argv.push("--close".into());
    }
    let out = Command::new("ip")
        .args(&argv)
        .output()
        .context("running the fixed-rate client (bench/run builds it)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the fixed-rate client's report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let errors = v["errors"].as_u64().unwrap_or(u64::MAX);
    if errors > 0 {
        bail!("the fixed-rate client saw {errors} failed requests to {to}");
    }
    let us = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(FixedRate {
        quantiles: [
            us("p50_us"),
            us("p90_us"),
            us("p99_us"),
            us("p999_us"),
            us("max_us"),
        ],
        late_p99: us("late_p99_us"),
        start: std::time::SystemTime::UNIX_EPOCH
            + Duration::from_nanos(v["start_unix_ns"].as_u64().unwrap_or(0)),
        slot_max: v["slot_max_us"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default(),
    })
}

async fn measure(t: &Target, args: &Args, procs: &mut Procs) -> anyhow::Result<Sample> {
    procs.check()?;
    let secs = args.seconds;
    let cpu = || cpu_seconds(&t.proxies);
    let rss = || t.proxies.iter().map(|p| rss_bytes(*p)).sum::<u64>() as f64;
    let proxies = t.proxies.len().max(1) as f64;
    let mut s = Sample {
        rss_idle: rss() / proxies,
        anon_idle: t
            .proxies
            .iter()
            .map(|p| status_bytes(*p, "RssAnon:"))
            .sum::<u64>() as f64
            / proxies,
        ..Sample::default()
    };

    let c0 = cpu();
    let (up, up_bytes) = iperf(&t.client, (t.addr)(IPERF_PORT), secs, false)?;
    let (down, down_bytes) = iperf(&t.client, (t.addr)(IPERF_PORT), secs, true)?;
    s.cpu_per_gb = (cpu() - c0) / ((up_bytes + down_bytes) / 1e9);
    s.up_gbps = up;
    s.down_gbps = down;

    // ~rate requests/s on 10 connections, each request timed from when it was due.
    let sampler = CpuSampler::start(t.proxies.clone(), TIMELINE_SLOT);
    let kept = fixed_rate(&t.client, (t.addr)(HTTP_PORT), args.rate, secs, false)?;
    let by_slot = sampler.finish(kept.start, TIMELINE_SLOT, kept.slot_max.len());
    s.kept = kept.quantiles;
    s.timeline = kept.slot_max.iter().copied().zip(by_slot).collect();
    let fresh = fixed_rate(&t.client, (t.addr)(HTTP_PORT), args.rate, secs, true)?;
    s.fresh = fresh.quantiles;
    s.client_late = kept.late_p99.max(fresh.late_p99);

    // Maximum rate, sampling memory meanwhile.
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, roots) = (peak.clone(), done.clone(), t.proxies.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now: u64 = roots.iter().map(|p| rss_bytes(*p)).sum();
                peak.fetch_max(now, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let c0 = cpu();
    let (rps, requests) = wrk(&t.client, (t.addr)(HTTP_PORT), secs, 32, false)?;
    s.cpu_per_k_requests = (cpu() - c0) / (requests / 1000.0);
    s.max_rps = rps;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    s.rss_load = peak.load(Ordering::Relaxed) as f64 / proxies;
    s.setup_rate = wrk(&t.client, (t.addr)(HTTP_PORT), secs, 16, true)?.0;

    // Idle connections through the proxies.
    if !t.proxies.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss();
        // Half an HTTP request: the server waits for the rest (client_header_timeout).
        let to = (t.addr)(HTTP_PORT);
        let mut held = Vec::with_capacity(args.idle_connections);
        while held.len() < args.idle_connections {
            let batch = (args.idle_connections - held.len()).min(200);
            let opened = futures_join(&t.client, to, batch).await?;
            held.extend(opened);
        }
        // Give both proxies time to set up their side of every connection.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss();
        s.per_idle_conn = (after - before) / args.idle_connections as f64;
        drop(held);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(s)
}

async fn futures_join(
    client: &Pod,
    to: SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let c = client.clone();
        set.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut conn = c.connect(to).await?;
            // One byte, so the far proxy has to carry the connection to the server.
            conn.write_all(b"GET / HTTP/1.1\r\n").await?;
            Ok::<_, std::io::Error>(conn)
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r?.context("opening an idle connection")?);
    }
    Ok(out)
}

fn report(samples: &[Vec<Sample>], modes: &[Mode], args: &Args) -> String {
    type Get = fn(&Sample) -> f64;
    let rows: Vec<(&str, Get, &str, bool)> = vec![
        // (metric, value, unit, shown for direct)
        (
            "Throughput, one stream, client -> server",
            |s| s.up_gbps,
            "GB/s",
            true,
        ),
        (
            "Throughput, one stream, server -> client",
            |s| s.down_gbps,
            "GB/s",
            true,
        ),
        (
            "Latency p50 at ~1,000 req/s, keep-alive",
            |s| s.kept[0],
            "µs",
            true,
        ),
        (
            "Latency p90 at ~1,000 req/s, keep-alive",
            |s| s.kept[1],
            "µs",
            true,
        ),
        (
            "Latency p99 at ~1,000 req/s, keep-alive",
            |s| s.kept[2],
            "µs",
            true,
        ),
        (
            "Latency p99.9 at ~1,000 req/s, keep-alive",
            |s| s.kept[3],
            "µs",
            true,
        ),
        (
            "Latency max at ~1,000 req/s, keep-alive",
            |s| s.kept[4],
            "µs",
            true,
        ),
        (
            "Latency p50 at ~1,000 req/s, new connection each",
            |s| s.fresh[0],
            "µs",
            true,
        ),
        (
            "Latency p90 at ~1,000 req/s, new connection each",
            |s| s.fresh[1],
            "µs",
            true,
        ),
        (
            "Latency p99 at ~1,000 req/s, new connection each",
            |s| s.fresh[2],
            "µs",
            true,
        ),
        (
            "Latency p99.9 at ~1,000 req/s, new connection each",
            |s| s.fresh[3],
            "µs",
            true,
        ),
        (
            "Latency max at ~1,000 req/s, new connection each",
            |s| s.fresh[4],
            "µs",
            true,
        ),
        (
            "Maximum request rate (32 connections)",
            |s| s.max_rps,
            "req/s",
            true,
        ),
        (
            "Connection setup rate (new connection per request)",
            |s| s.setup_rate,
            "conn/s",
            true,
        ),
        (
            "Proxy CPU per 1,000 requests (both proxies)",
            |s| s.cpu_per_k_requests * 1e3,
            "ms",
            false,
        ),
        (
            "Proxy CPU per GB moved (both proxies)",
            |s| s.cpu_per_gb,
            "s",
            false,
        ),
        (
            "Proxy RSS idle, after the previous repetition's load (per proxy)",
            |s| s.rss_idle / 1e6,
            "MB",
            false,
        ),
        (
            "Proxy RSS under load (per proxy, peak)",
            |s| s.rss_load / 1e6,
            "MB",
            false,
        ),
        (
            "Memory per idle connection (both proxies)",
            |s| s.per_idle_conn / 1e3,
            "KB",
            false,
        ),
        (
            "Fixed-rate client's own lateness, p99 (how late it woke to send)",
            |s| s.client_late,
            "µs",
            true,
        ),
        (
            "CPU time the hypervisor gave to others during the mode's runs (steal)",
            |s| s.steal * 100.0,
            "%",
            true,
        ),
    ];
    // Columns after the three fixed modes: (mode index, header, ratio header, whether
    // the ratio is this mode over Ambit rather than Ambit over it).
    let extras: Vec<(usize, &str, &str, bool)> = modes
        .iter()
        .enumerate()
        .skip(3)
        .map(|(i, m)| match m {
            Mode::L7 => (i, "Ambit, L7 metrics on", "L7 on/off", true),
            _ if args.aa => (i, "Ambit again (A/A)", "A/A", false),
            _ => (i, "Ambit baseline", "Ambit/baseline", false),
        })
        .collect();
    let extra_head: String = extras
        .iter()
        .map(|(_, h, r, _)| format!(" {h} | {r} |"))
        .collect();
    let extra_rule = "---|---|".repeat(extras.len());
    let mut out = format!(
        "# Mesh data path: Ambit vs direct vs an nginx mTLS proxy pair\n\n`bench/run{}` — {} repetition(s), modes interleaved, {} s per run; medians (min–max); {} idle connections for the memory row. {}\n\n| Metric | direct | Ambit | nginx pair | Ambit/direct | Ambit/nginx |{extra_head}\n|---|---|---|---|---|---|{extra_rule}\n",
        [
            (args.quick, " --quick"),
            (args.aa, " --aa"),
            (args.baseline.is_some() && !args.aa, " --baseline OLD"),
            (args.l7_metrics, " --l7-metrics"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect::<String>(),
        args.reps,
        args.seconds,
        args.idle_connections,
        machine()
    );
    let ratio = |x: f64, y: f64| {
        if x.is_finite() && y.is_finite() && y != 0.0 {
            format!("{:.2}x", x / y)
        } else {
            "-".into()
        }
    };
    // Idle memory before any traffic: the first repetition's starting point.
    let first = |i: usize| samples[i].first().map_or(f64::NAN, |s| s.rss_idle / 1e6);
    let first_anon = |i: usize| samples[i].first().map_or(f64::NAN, |s| s.anon_idle / 1e6);
    for (name, get) in [
        (
            "Proxy RSS idle, before any traffic (per proxy)",
            &first as &dyn Fn(usize) -> f64,
        ),
        (
            "Proxy anonymous memory idle, before any traffic (per proxy)",
            &first_anon,
        ),
    ] {
        let (fa, fne) = (get(1), get(2));
        let extra: String = extras
            .iter()
            .map(|&(i, _, _, over_ambit)| {
                let fb = get(i);
                let r = if over_ambit {
                    ratio(fb, fa)
                } else {
                    ratio(fa, fb)
                };
                format!(" {} MB | {} |", fmt(fb), r)
            })
            .collect();
        let _ = writeln!(
            out,
            "| {name} | - | {} MB | {} MB | - | {} |{extra}",
            fmt(fa),
            fmt(fne),
            ratio(fa, fne)
        );
    }
    for (name, get, unit, direct_too) in rows {
        let after_load = name.contains("previous repetition");
        let cell = |i: usize| {
            let skip = usize::from(after_load);
            let (m, lo, hi) = stats(samples[i].iter().skip(skip).map(get));
            if i == 0 && !direct_too || m.is_nan() {
                ("-".to_owned(), f64::NAN)
            } else if samples[i].len() > 1 {
                (format!("{} {unit} ({}–{})", fmt(m), fmt(lo), fmt(hi)), m)
            } else {
                (format!("{} {unit}", fmt(m)), m)
            }
        };
        let (d, dm) = cell(0);
        let (a, am) = cell(1);
        let (n, nm) = cell(2);
        let extra: String = extras
            .iter()
            .map(|&(i, _, _, over_ambit)| {
                let (b, bm) = cell(i);
                let r = if over_ambit {
                    ratio(bm, am)
                } else {
                    ratio(am, bm)
                };
                format!(" {b} | {r} |")
            })
            .collect();
        let _ = writeln!(
            out,
            "| {name} | {d} | {a} | {n} | {} | {} |{extra}",
            ratio(am, dm),
            ratio(am, nm)
        );
    }
    // The target for the tail: within twice direct's p99, repetition by repetition.
    let within = |i: usize| {
        let n = samples[i].len().min(samples[0].len());
        let k = (0..n)
            .filter(|&r| samples[i][r].kept[2] <= 2.0 * samples[0][r].kept[2])
            .count();
        format!("{k} of {n}")
    };
    let extra: String = extras
        .iter()
        .map(|&(i, _, _, _)| format!(" {} | - |", within(i)))
        .collect();
    let _ = writeln!(
        out,
        "| Repetitions whose keep-alive p99 is within 2x direct's (same repetition) | - | {} | {} | - | - |{extra}",
        within(1),
        within(2)
    );
    out
}

/// The keep-alive fixed-rate runs, 100 ms at a time: where the slow requests were, and
/// what the proxies' threads were doing then.
fn timeline_report(samples: &[Vec<Sample>], modes: &[Mode]) -> String {
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut out = String::from(
        "# Latency timeline: keep-alive at ~1,000 req/s, 100 ms at a time\n\nPer mode and repetition: the slowest request due in each 100 ms (µs, timed from when it was due), and the proxies' CPU in the same 100 ms by thread (`data`: the node proxies' data-path threads; `control`: their control threads; `other`: any other thread, all of nginx's). A spike is a slot over 1 ms and over 3x the run's median slot.\n\n| Mode | Rep | Median slot max | Worst slot | Spikes | CPU in spike slots, data / control / other (ms) | CPU in a median slot, data / control / other (ms) |\n|---|---|---|---|---|---|---|\n",
    );
    let mut raw = String::from("\n## Every slot\n\n```\n");
    for (i, mode) in modes.iter().enumerate() {
        for (r, s) in samples[i].iter().enumerate() {
            if s.timeline.is_empty() {
                continue;
            }
            let mut maxes: Vec<u64> = s.timeline.iter().map(|(m, _)| *m).collect();
            maxes.sort_unstable();
            let median = maxes[maxes.len() / 2];
            let worst = maxes[maxes.len() - 1];
            let spikes: Vec<&(u64, ThreadCpu)> = s
                .timeline
                .iter()
                .filter(|(m, _)| *m > 1000 && *m > 3 * median)
                .collect();
            let avg = |v: &[&(u64, ThreadCpu)]| {
                let n = v.len().max(1) as u64;
                let sum = v.iter().fold(ThreadCpu::default(), |a, (_, c)| ThreadCpu {
                    data: a.data + c.data,
                    control: a.control + c.control,
                    other: a.other + c.other,
                });
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    ms(sum.data / n),
                    ms(sum.control / n),
                    ms(sum.other / n)
                )
            };
            let mut by_cpu: Vec<&(u64, ThreadCpu)> = s.timeline.iter().collect();
            by_cpu.sort_by_key(|(m, _)| *m);
            let typical = [by_cpu[by_cpu.len() / 2]];
            let _ = writeln!(
                out,
                "| {} | {} | {median} µs | {worst} µs | {} | {} | {} |",
                mode.name(),
                r + 1,
                spikes.len(),
                if spikes.is_empty() {
                    "-".to_owned()
                } else {
                    avg(&spikes)
                },
                avg(&typical),
            );
            let line = |f: &dyn Fn(&(u64, ThreadCpu)) -> String| {
                s.timeline.iter().map(f).collect::<Vec<_>>().join(" ")
            };
            let _ = writeln!(
                raw,
                "{} r{} max_us: {}\n{} r{} data_ms: {}\n{} r{} control_ms: {}",
                mode.name(),
                r + 1,
                line(&|(m, _)| m.to_string()),
                mode.name(),
                r + 1,
                line(&|(_, c)| format!("{:.1}", ms(c.data))),
                mode.name(),
                r + 1,
                line(&|(_, c)| format!("{:.1}", ms(c.control))),
            );
        }
    }
    raw.push_str("```\n");
    out + &raw
}
