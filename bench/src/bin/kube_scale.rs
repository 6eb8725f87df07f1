//! The control plane on a cluster at scale: pods and services created through a genuine
//! kube-apiserver (started by `tests/k8s/apiserver.sh`), then a control plane reading
//! it and a node proxy's discovery client, in this process.
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin kube-scale -- --pods 10000 --services 1000
//! ```
//!
//! Reports: time to create the objects through the API; time from the control plane's
//! start until a node proxy holds every workload and service (list, translate, push);
//! the control plane's live memory for them; and, at that scale, the time from one pod's
//! label change through the API until the node proxy has it.

#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_bench::alloc::Counting;
use ambit_control::auth::TokenSigner;
use ambit_control::{Config, ControlPlane};
use ambit_core::discovery::TunnelProtocol;
use ambit_core::state::Store;
use ambit_kube::{KubeOptions, KubeSource};
use ambit_node::{XdsClient, XdsConfig};
use ambit_tls::client::TokenSource;
use anyhow::Context;
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Semaphore;

#[global_allocator]
static ALLOC: Counting<mimalloc::MiMalloc> = Counting::new(mimalloc::MiMalloc);

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    /// Requests to the API server in flight while creating.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value = "bench/results/kube-scale.md")]
    output: PathBuf,
}

fn pod_ip(i: usize) -> String {
    format!("198.18.{}.{}", 16 + (i >> 8), i & 0xff)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.pods <= 100 * 256,
        "at most 25,600 pods (their addresses)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(ambit_bench::harness::until_interrupted(run(args)))
}

async fn apiserver() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/k8s/apiserver.sh");
    println!("starting the test API server ({})...", script.display());
    // Once, before anything else runs: blocking is fine here.
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("start")
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "{} start failed", script.display());
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let kubeconfig = apiserver().await?;
    let (client, url) = ambit_kube::client(Some(&kubeconfig)).await?;
    let run_id = std::process::id();
    let ns = format!("scale-{run_id}");
    let node = format!("scale-node-{run_id}");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
            )?,
        )
        .await?;
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": node}}))?,
        )
        .await?;

    // Create the objects, `concurrency` requests at a time, with progress.
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.pods {
        let permit = limit.clone().acquire_owned().await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let node = node.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let name = format!("p{i}");
            pods.create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"app": format!("s{}", i % 1000)}},
                    "spec": {"nodeName": node, "serviceAccountName": "default",
                             "containers": [{"name": "c", "image": "example.invalid/app"}]}
                }))?,
            )
            .await?;
            pods.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Running", "podIP": pod_ip(i),
                    "conditions": [{"type": "Ready", "status": "True"}]}})),
            )
            .await?;
            anyhow::Ok(())
        });
        if (i + 1) % 2000 == 0 {
            println!("  {} pods created ({:.0?})", i + 1, started.elapsed());
        }
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    for i in 0..args.services {
        let permit = limit.clone().acquire_owned().await?;
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        tasks.spawn(async move {
            let _permit = permit;
            services
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({
                        "metadata": {"name": format!("s{i}")},
                        "spec": {"selector": {"app": format!("s{i}")},
                                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
                    }))?,
                )
                .await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let create = started.elapsed();
    println!(
        "created {} pods and {} services in {create:.1?}",
        args.pods, args.services
    );

    // The control plane reads the cluster; a node proxy's discovery client follows it.
    let dir = tempfile::tempdir()?;
    let before = ALLOC.live();
    let started = Instant::now();
    let source = KubeSource::start(client.clone(), url, KubeOptions::default()).await?;
    let listed = started.elapsed();
    let mut config = Config::new(dir.path().join("manifests"), dir.path().join("state"));
    config.grpc_addr = "127.0.0.1:0".parse()?;
    config.monitoring_addr = "127.0.0.1:0".parse()?;
    let cp = ControlPlane::start_with_source(config, Box::new(source), None).await?;
    let translated = started.elapsed();
    let signer = TokenSigner::load_or_create(&dir.path().join("state"))?;
    let pem = std::fs::read(dir.path().join("state/ca/root-cert.pem"))?;
    let store = Arc::new(Store::new());
    let (xds, _state) = XdsClient::new(
        XdsConfig {
            address: cp.grpc_addr().to_string(),
            roots: ambit_tls::spiffe::TrustBundle::from_pem(&pem).context("roots")?,
            server_name: Some("localhost".into()),
            token: TokenSource::Static(
                signer
                    .mint(&node, Duration::from_secs(3600))
                    .map_err(anyhow::Error::msg)?,
            ),
            node_name: node.clone(),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
        },
        store.clone(),
    );
    let (_stop, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(xds.run(stop));
    let in_ns = |st: &ambit_core::state::State| {
        st.workloads()
            .filter(|w| w.profile.namespace.as_ref() == ns)
            .count()
    };
    loop {
        let st = store.load();
        if in_ns(&st) >= args.pods
            && st.services().filter(|s| s.namespace.as_ref() == ns).count() >= args.services
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the node proxy did not converge within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let converged = started.elapsed();
    let cp_bytes = ALLOC.live() - before;
    println!("node proxy converged {converged:.1?} after the control plane started");

    // One change at this scale: un-enroll a pod by label; time until the node proxy has it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    pods.patch(
        "p0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}})),
    )
    .await?;
    let ip: std::net::IpAddr = pod_ip(0).parse()?;
    loop {
        if store
            .load()
            .workload_by_ip("", ip)
            .is_some_and(|w| w.tunnel != TunnelProtocol::Hbone)
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the change did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let change = started.elapsed();

    let mut out = String::new();
    writeln!(
        out,
        "# The control plane on a cluster at scale\n\n`cargo run --release -p ambit-bench --bin kube-scale -- --pods {} --services {}` against kube-apiserver 1.20 and etcd 3.4 on the same 2-core machine (`tests/k8s/apiserver.sh`).\n",
        args.pods, args.services
    )?;
    writeln!(out, "| Measure | Value |\n|---|---|")?;
    writeln!(
        out,
        "| Creating {} pods (create + status) and {} services through the API, {} in flight | {:.1} s |",
        args.pods,
        args.services,
        args.concurrency,
        create.as_secs_f64()
    )?;
    writeln!(
        out,
        "| Control plane start: every kind listed | {:.2} s |",
        listed.as_secs_f64()
    )?;
    writeln!(
        out,
        "| ... and translated, ready to serve | {:.2} s |",
        translated.as_secs_f64()
    )?;
    writeln!(
        out,
        "| ... and a node proxy holds every workload and service | {:.2} s |",
        converged.as_secs_f64()
    )?;
    writeln!(
        out,
        "| Control plane and node-proxy client live memory for them | {:.0} MB |",
        cp_bytes as f64 / 1e6
    )?;
    writeln!(
        out,
        "| One pod's label changed through the API -> at the node proxy | {:.0} ms |",
        change.as_secs_f64() * 1e3
    )?;
    println!("\n{out}");
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, out)?;
    println!("written to {}", args.output.display());
    // Leave the API server clean for the next run: the namespace's pods go with it only
    // with a controller-manager, so delete them here (no grace: no kubelet).
    let _ = pods
        .delete_collection(
            &kube::api::DeleteParams::default().grace_period(0),
            &Default::default(),
        )
        .await;
    cp.shutdown().await;
    Ok(())
}
