//! `ambit node`: run the node proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambit_node::{NodeConfig, NodeProxy, PodInfo};
use anyhow::Context;
use clap::Args;

use crate::discovery_args::{DiscoveryArgs, parse_duration};

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    discovery: DiscoveryArgs,
    /// The node agent's ZDS socket to connect to (`ambit cni --zds-socket`, or Istio's
    /// istio-cni); retried with backoff while the agent is away [default:
    /// /var/run/ztunnel/ztunnel.sock, or none when --pod names the pods].
    #[arg(long, env = "AMBIT_ZDS_SOCKET")]
    zds_socket: Option<PathBuf>,
    /// Serve a pod without a node agent: `<namespace>/<name>[/<service-account>]=<netns path>`
    /// (repeatable), e.g. `demo/sleep/sleep=/run/netns/demo.sleep`.
    #[arg(long = "pod", value_parser = parse_pod)]
    pods: Vec<(PodInfo, PathBuf)>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = ambit_core::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Another trust domain whose workloads count as the mesh's own (repeatable; for a
    /// trust domain migration). Peers from any other trust domain are refused at the
    /// handshake.
    #[arg(long = "trust-domain-alias")]
    trust_domain_aliases: Vec<String>,
    /// Istio's cluster ID (part of every workload's discovery name).
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// Address of the admin port (/config_dump).
    #[arg(long, default_value = "127.0.0.1:15000", value_parser = crate::addr::socket_addr)]
    admin_addr: SocketAddr,
    /// Address of the Prometheus metrics port (/metrics).
    #[arg(long, default_value = "0.0.0.0:15020", value_parser = crate::addr::socket_addr)]
    metrics_addr: SocketAddr,
    /// Address of the readiness port (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021", value_parser = crate::addr::socket_addr)]
    readiness_addr: SocketAddr,
    /// Threads of the data path [default: one per CPU].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Send a span per sampled request to this OTLP/gRPC collector (`host:port`), for
    /// the pods with request metrics on (`ambit.io/l7-metrics`); no spans without it.
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// On shutdown, how long open connections may finish before they are closed (a pod
    /// removed while the proxy runs keeps its connections until they end).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Until discovery has synced (start-up, the control plane away), how long a
    /// connection waits for it before it is refused. Nothing is forwarded unsynced.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    sync_timeout: Duration,
    /// How long the metric series of a workload that has left the mesh are kept before
    /// they are removed (pod churn must not grow the metrics without bound).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    metrics_retention: Duration,
    /// Open connections on port 15008, every pod's together; more are closed on arrival.
    #[arg(long, default_value_t = 16_384)]
    max_hbone_connections: usize,
    /// Connections on port 15008 in their TLS handshake at once (they are anonymous
    /// until it completes, within 10 s).
    #[arg(long, default_value_t = 1024)]
    max_hbone_handshakes: usize,
    /// Of those, from one source address (an IPv6 source by its /64): a client that
    /// floods the port with connections it never authenticates cannot take the places of
    /// other peers.
    #[arg(long, default_value_t = 16)]
    max_hbone_handshakes_per_source: u32,
    /// Open connections on port 15008 from one source address, authenticated or not.
    #[arg(long, default_value_t = 512)]
    max_hbone_connections_per_source: u32,
    /// Where to announce the admin address for `ambit config --node`.
    #[arg(long, env = "AMBIT_RUN_DIR", default_value = "/run/ambit")]
    run_dir: PathBuf,
}

fn parse_pod(s: &str) -> Result<(PodInfo, PathBuf), String> {
    let (pod, path) = s
        .split_once('=')
        .ok_or("expected <namespace>/<name>[/<service-account>]=<netns path>")?;
    let parts: Vec<&str> = pod.split('/').collect();
    let (namespace, name, sa) = match parts.as_slice() {
        [ns, name] => (*ns, *name, "default"),
        [ns, name, sa] => (*ns, *name, *sa),
        _ => {
            return Err(format!(
                "{pod:?}: expected <namespace>/<name>[/<service-account>]"
            ));
        }
    };
    if namespace.is_empty() || name.is_empty() || sa.is_empty() || path.is_empty() {
        return Err(format!("{s:?}: empty part"));
    }
    Ok((
        PodInfo {
            uid: format!("{namespace}/{name}"),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: sa.to_owned(),
        },
        PathBuf::from(path),
    ))
}

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let mut config = NodeConfig::new(args.discovery.xds_config()?);
    for td in std::iter::once(&args.trust_domain).chain(&args.trust_domain_aliases) {
        if !ambit_core::identity::is_trust_domain(td) {
            anyhow::bail!(
                "{td:?} is not a valid trust domain (lowercase letters, digits, '.', '-', '_')"
            );
        }
    }
    config.admin_addr = args.admin_addr;
    config.metrics_addr = args.metrics_addr;
    config.readiness_addr = args.readiness_addr;
    config.run_dir = Some(args.run_dir);
    // Istio's path unless the pods are named on the command line (then no agent is
    // expected unless one is named too).
    config.zds_socket = args.zds_socket.or_else(|| {
        args.pods
            .is_empty()
            .then(|| PathBuf::from(ambit_cni::zds::DEFAULT_SOCKET))
    });
    config.local_pods = args.pods;
    config.dataplane.trust_domain = args.trust_domain;
    config.dataplane.trust_domain_aliases = args.trust_domain_aliases;
    config.trust_bundle_file = Some(args.discovery.ca_root.clone());
    config.dataplane.cluster_id = args.cluster_id;
    config.dataplane.drain_timeout = args.drain_timeout;
    config.dataplane.sync_timeout = args.sync_timeout;
    config.dataplane.metrics_retention = args.metrics_retention;
    config.dataplane.hbone_limits = ambit_node::HboneLimits {
        connections: args.max_hbone_connections,
        handshakes: args.max_hbone_handshakes,
        handshakes_per_source: args.max_hbone_handshakes_per_source,
        connections_per_source: args.max_hbone_connections_per_source,
    };
    if let Some(n) = args.worker_threads {
        config.worker_threads = n;
    }
    config.release_memory = Some(crate::release_free_memory);
    config.otlp_endpoint = args.otlp_endpoint.clone();
    // The proxy runs its own runtimes; this one only waits for the signal.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let node = NodeProxy::start(config).await?;
        crate::signal::wait().await;
        tracing::info!("shutting down: draining pods");
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_flags() {
        let (info, path) = parse_pod("demo/sleep/sleep=/run/netns/x").unwrap();
        assert_eq!(
            (
                info.namespace.as_str(),
                info.name.as_str(),
                info.service_account.as_str()
            ),
            ("demo", "sleep", "sleep")
        );
        assert_eq!(path, PathBuf::from("/run/netns/x"));
        assert_eq!(parse_pod("demo/a=/p").unwrap().0.service_account, "default");
        assert!(parse_pod("demo=/p").is_err());
        assert!(parse_pod("demo/a").is_err());
        assert!(parse_pod("demo/a/b/c=/p").is_err());
    }
}
