//! Discovery at scale: a control plane and node-proxy discovery clients in one process,
//! over real TLS and gRPC on loopback, fed from a generated manifest folder.
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin xds-scale -- --workloads 10000,100000 --subscribers 100
//! ```
//!
//! - cold sync: time for one client to go from connecting to holding every workload,
//!   resource bytes sent, client memory per workload, control-plane memory;
//! - fan-out: one pod edited in the manifest folder; time until each of N subscribers
//!   holds the change (includes the folder watch and push debounce, 100 ms each).

#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_bench::alloc::Counting;
use ambit_control::auth::TokenSigner;
use ambit_control::xds::translate::ResourceType;
use ambit_control::{Config, ControlPlane};
use ambit_core::state::Store;
use ambit_node::{XdsClient, XdsConfig, XdsState};
use ambit_tls::client::TokenSource;
use anyhow::Context;
use clap::Parser;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;

#[global_allocator]
static ALLOC: Counting<mimalloc::MiMalloc> = Counting::new(mimalloc::MiMalloc);

#[derive(Debug, Parser)]
struct Args {
    /// Workload counts for the cold-sync runs.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    workloads: Vec<usize>,
    /// Subscribers for the fan-out run.
    #[arg(long, default_value = "100")]
    subscribers: usize,
    /// Workloads in the mesh during the fan-out run.
    #[arg(long, default_value = "10000")]
    fanout_workloads: usize,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/results/xds-scale.md")]
    output: PathBuf,
}

/// Pods per namespace, and per service.
const PODS_PER_NAMESPACE: usize = 1000;
const PODS_PER_SERVICE: usize = 10;

fn pod_ip(i: usize) -> String {
    // 198.18.0.0/15 holds 131,072 addresses.
    format!("198.{}.{}.{}", 18 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
}

fn namespace_file(ns: usize, pods: std::ops::Range<usize>, moved: Option<usize>) -> String {
    let mut out = String::with_capacity(pods.len() * 260);
    let name = format!("ns{ns}");
    writeln!(out, "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient}}}}").ok();
    for i in pods.clone() {
        let ip = if moved == Some(i) {
            "198.19.255.254".to_owned()
        } else {
            pod_ip(i)
        };
        write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: {name}, labels: {{app: svc-{}, version: v1}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-{}}}\nstatus: {{podIP: {ip}}}\n",
            i / PODS_PER_SERVICE,
            i % 50,
            i / PODS_PER_SERVICE % 20,
        )
        .ok();
    }
    let first_service = pods.start / PODS_PER_SERVICE;
    let last_service = pods.end.div_ceil(PODS_PER_SERVICE);
    for s in first_service..last_service {
        write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {name}}}\nspec: {{selector: {{app: svc-{s}}}, clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            128 + (s >> 8) % 120,
            s & 0xff
        )
        .ok();
    }
    write!(
        out,
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-ns, namespace: {name}}}\nspec: {{rules: [{{from: [{{source: {{namespaces: [{name}]}}}}]}}]}}\n"
    )
    .ok();
    out
}

fn write_manifests(dir: &Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for ns in 0..n.div_ceil(PODS_PER_NAMESPACE) {
        let pods = ns * PODS_PER_NAMESPACE..((ns + 1) * PODS_PER_NAMESPACE).min(n);
        std::fs::write(
            dir.join(format!("ns{ns}.yaml")),
            namespace_file(ns, pods, None),
        )?;
    }
    Ok(())
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn mb(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

struct Mesh {
    dir: tempfile::TempDir,
    cp: ControlPlane,
    /// Time to read the folder, translate, and be ready.
    start: Duration,
    /// Live bytes the control plane holds once ready.
    cp_bytes: isize,
}

async fn start_mesh(n: usize) -> anyhow::Result<Mesh> {
    let dir = tempfile::tempdir()?;
    write_manifests(&dir.path().join("manifests"), n)?;
    let before = ALLOC.live();
    let t = Instant::now();
    let mut config = Config::new(dir.path().join("manifests"), dir.path().join("state"));
    config.grpc_addr = "127.0.0.1:0".parse()?;
    config.monitoring_addr = "127.0.0.1:0".parse()?;
    let cp = ControlPlane::start(config).await?;
    let start = t.elapsed();
    Ok(Mesh {
        cp_bytes: ALLOC.live() - before,
        dir,
        cp,
        start,
    })
}

fn client(
    mesh: &Mesh,
    node: &str,
    signer: &TokenSigner,
) -> anyhow::Result<(XdsClient, watch::Receiver<XdsState>, Arc<Store>)> {
    let roots = CertificateDer::pem_file_iter(mesh.dir.path().join("state/ca/root-cert.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let store = Arc::new(Store::new());
    let (c, state) = XdsClient::new(
        XdsConfig {
            address: mesh.cp.grpc_addr().to_string(),
            roots: ambit_tls::spiffe::TrustBundle::new(&roots).expect("roots"),
            server_name: Some("localhost".into()),
            token: TokenSource::Static(
                signer
                    .mint(node, Duration::from_secs(3600))
                    .map_err(anyhow::Error::msg)?,
            ),
            node_name: node.into(),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
        },
        store.clone(),
    );
    Ok((c, state, store))
}

struct ColdSync {
    workloads: usize,
    cp_start: Duration,
    sync: Duration,
    resource_bytes: usize,
    client_bytes: isize,
    cp_bytes: isize,
    rss_mb: f64,
}

async fn cold_sync(n: usize) -> anyhow::Result<ColdSync> {
    println!("cold sync: generating and loading {n} workloads...");
    let mesh = start_mesh(n).await?;
    let snapshot = mesh.cp.snapshots().borrow().clone();
    let resource_bytes: usize = ResourceType::ALL
        .iter()
        .flat_map(|t| snapshot.resources(*t).iter())
        .map(|(name, enc)| name.len() + enc.version.len() + enc.body.len())
        .sum();
    println!(
        "  control plane ready in {:?}; connecting one client",
        mesh.start
    );
    let signer = TokenSigner::load_or_create(&mesh.dir.path().join("state"))?;
    let before = ALLOC.live();
    let (c, mut state, store) = client(&mesh, "node-0", &signer)?;
    let (stop_tx, stop) = watch::channel(false);
    let t = Instant::now();
    let task = tokio::spawn(c.run(stop));
    loop {
        state.changed().await?;
        if state.borrow().synced && store.load().counts().0 == n {
            break;
        }
    }
    let sync = t.elapsed();
    // Let the transient buffers of the sync be freed before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client_bytes = ALLOC.live() - before;
    let rss = rss_mb();
    let _ = stop_tx.send(true);
    let _ = task.await;
    mesh.cp.shutdown().await;
    Ok(ColdSync {
        workloads: n,
        cp_start: mesh.start,
        sync,
        resource_bytes,
        client_bytes,
        cp_bytes: mesh.cp_bytes,
        rss_mb: rss,
    })
}

struct Fanout {
    subscribers: usize,
    workloads: usize,
    latencies: Vec<Duration>,
}

async fn fanout(n: usize, subscribers: usize) -> anyhow::Result<Fanout> {
    println!("fan-out: {n} workloads, {subscribers} subscribers; syncing them...");
    let mesh = start_mesh(n).await?;
    let signer = TokenSigner::load_or_create(&mesh.dir.path().join("state"))?;
    let (stop_tx, stop) = watch::channel(false);
    let mut clients = Vec::new();
    for i in 0..subscribers {
        let (c, state, store) = client(&mesh, &format!("node-{i}"), &signer)?;
        tokio::spawn(c.run(stop.clone()));
        clients.push((state, store));
    }
    for (state, store) in &mut clients {
        while !(state.borrow().synced && store.load().counts().0 == n) {
            state.changed().await?;
        }
    }
    println!("  all synced; moving one pod");
    // Let every subscriber's ACK land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = n / 2;
    let ns = moved / PODS_PER_NAMESPACE;
    let pods = ns * PODS_PER_NAMESPACE..((ns + 1) * PODS_PER_NAMESPACE).min(n);
    let uid = format!("Kubernetes//Pod/ns{ns}/pod-{moved}");
    let target: std::net::IpAddr = "198.19.255.254".parse()?;
    let t = Instant::now();
    std::fs::write(
        mesh.dir
            .path()
            .join("manifests")
            .join(format!("ns{ns}.yaml")),
        namespace_file(ns, pods, Some(moved)),
    )?;
    let waits = clients.into_iter().map(|(mut state, store)| {
        let uid = uid.clone();
        tokio::spawn(async move {
            loop {
                if store
                    .load()
                    .workload(&uid)
                    .is_some_and(|w| w.addresses.first() == Some(&target))
                {
                    return t.elapsed();
                }
                if state.changed().await.is_err() {
                    return Duration::MAX;
                }
            }
        })
    });
    let mut latencies = Vec::new();
    for w in waits {
        latencies.push(w.await?);
    }
    latencies.sort();
    let _ = stop_tx.send(true);
    mesh.cp.shutdown().await;
    Ok(Fanout {
        subscribers,
        workloads: n,
        latencies,
    })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut report = String::new();
    writeln!(report, "## Discovery at scale\n")?;
    writeln!(
        report,
        "`cargo run --release -p ambit-bench --bin xds-scale -- --workloads {} --subscribers {} --fanout-workloads {}` on {} cores.\n",
        args.workloads
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.subscribers,
        args.fanout_workloads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(
        report,
        "| Workloads | Control plane load + translate | Cold sync, one client | Resource bytes | Client memory / workload | Control plane memory | Process RSS |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|")?;
    for &n in &args.workloads {
        let r = rt.block_on(cold_sync(n))?;
        let line = format!(
            "| {} | {:.2} s | {:.2} s | {:.1} MB | {} B | {:.0} MB | {:.0} MB |",
            r.workloads,
            r.cp_start.as_secs_f64(),
            r.sync.as_secs_f64(),
            r.resource_bytes as f64 / 1e6,
            r.client_bytes / r.workloads as isize,
            mb(r.cp_bytes),
            r.rss_mb
        );
        println!("{line}");
        writeln!(report, "{line}")?;
    }
    let f = rt.block_on(fanout(args.fanout_workloads, args.subscribers))?;
    writeln!(
        report,
        "\n| Subscribers | Workloads | One pod change reaches all: p50 | p99 | max |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    let line = format!(
        "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
        f.subscribers,
        f.workloads,
        pct(&f.latencies, 0.5).as_secs_f64() * 1e3,
        pct(&f.latencies, 0.99).as_secs_f64() * 1e3,
        f.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    println!("{line}");
    writeln!(report, "{line}")?;
    writeln!(
        report,
        "\nThe change latency runs from the manifest file write to the subscriber's state holding the change, and includes the folder watch's and the push's 100 ms debounce each."
    )?;
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, &report)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("\n{report}\nwritten to {}", args.output.display());
    Ok(())
}
