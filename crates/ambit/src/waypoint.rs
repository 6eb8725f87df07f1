//! `ambit waypoint`: run a waypoint (the L7 proxy).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use ambit_waypoint::{Waypoint, WaypointConfig};
use anyhow::Context;
use clap::{Args, Subcommand};

use crate::discovery_args::{DiscoveryArgs, parse_duration};

#[derive(Debug, Args)]
pub struct WaypointArgs {
    #[command(subcommand)]
    command: WaypointCommand,
}

#[derive(Debug, Subcommand)]
enum WaypointCommand {
    /// Run a waypoint: inside its pod (labelled `istio.io/dataplane-mode: none`, service
    /// account named after its Gateway), serving HBONE on 15008 for the services and
    /// workloads bound to the Gateway.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    discovery: DiscoveryArgs,
    /// The waypoint's Gateway (`gatewayClassName: istio-waypoint`), also its service
    /// account: the identity is `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
    #[arg(long)]
    name: String,
    /// The Gateway's namespace.
    #[arg(long, short = 'n', env = "POD_NAMESPACE")]
    namespace: String,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = ambit_core::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Another trust domain whose clients count as the mesh's own (repeatable).
    #[arg(long = "trust-domain-alias")]
    trust_domain_aliases: Vec<String>,
    /// Address of the HBONE port node proxies send bound traffic to.
    #[arg(long, default_value = "0.0.0.0:15008", value_parser = crate::addr::socket_addr)]
    hbone_addr: SocketAddr,
    /// Address of the admin port (/config_dump).
    #[arg(long, default_value = "127.0.0.1:15000", value_parser = crate::addr::socket_addr)]
    admin_addr: SocketAddr,
    /// Address of the Prometheus metrics port (/metrics).
    #[arg(long, default_value = "0.0.0.0:15020", value_parser = crate::addr::socket_addr)]
    metrics_addr: SocketAddr,
    /// Address of the readiness port (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021", value_parser = crate::addr::socket_addr)]
    readiness_addr: SocketAddr,
    /// Threads [default: one per CPU].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// On shutdown, how long open tunnels may finish before they are closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long a request's headers may take to arrive; a slower client is closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// Largest request head in bytes (request line and headers); larger gets 431.
    #[arg(long, default_value_t = 65_536)]
    max_header_bytes: usize,
}

pub fn run(args: WaypointArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        WaypointCommand::Run(args) => run_waypoint(*args),
    }
}

fn run_waypoint(args: RunArgs) -> anyhow::Result<ExitCode> {
    for td in std::iter::once(&args.trust_domain).chain(&args.trust_domain_aliases) {
        if !ambit_core::identity::is_trust_domain(td) {
            anyhow::bail!(
                "{td:?} is not a valid trust domain (lowercase letters, digits, '.', '-', '_')"
            );
        }
    }
    if !(1024..=16 * 1024 * 1024).contains(&args.max_header_bytes) {
        anyhow::bail!(
            "--max-header-bytes {} is out of range: give 1024 to 16777216",
            args.max_header_bytes
        );
    }
    let mut config = WaypointConfig::new(args.discovery.xds_config()?, &args.namespace, &args.name);
    config.trust_domain = args.trust_domain;
    config.trust_domain_aliases = args.trust_domain_aliases;
    config
        .identity()
        .context("--name and --namespace must make a valid identity")?;
    config.ca_address = None;
    config.hbone_addr = args.hbone_addr;
    config.admin_addr = args.admin_addr;
    config.metrics_addr = args.metrics_addr;
    config.readiness_addr = args.readiness_addr;
    config.trust_bundle_file = Some(args.discovery.ca_root.clone());
    config.limits.header_timeout = args.header_timeout;
    config.limits.max_header_bytes = args.max_header_bytes;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .enable_all()
        .thread_name("ambit-waypoint")
        .build()
        .context("cannot start the async runtime")?;
    let drain = args.drain_timeout;
    runtime.block_on(async move {
        let waypoint = Waypoint::start(config).await?;
        crate::signal::wait().await;
        tracing::info!("shutting down: draining tunnels");
        waypoint.shutdown(drain).await;
        Ok(ExitCode::SUCCESS)
    })
}
