//! `ambit cni`: run the node agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambit_cni::agent::{Agent, AgentConfig};
use ambit_cni::redirect::Redirector;
use anyhow::Context;
use clap::Args;

use crate::discovery_args::{DiscoveryArgs, parse_duration};

#[derive(Debug, Args)]
pub struct CniArgs {
    #[command(flatten)]
    discovery: DiscoveryArgs,
    /// The ZDS socket to serve; node proxies (`ambit node --zds-socket`, or Istio's
    /// ztunnel) connect to it. Created with mode 0600 in a directory of mode 0700.
    #[arg(long, env = "AMBIT_ZDS_SOCKET", default_value = ambit_cni::zds::DEFAULT_SOCKET)]
    zds_socket: PathBuf,
    /// A user id, besides root, allowed to connect to the ZDS socket as the node proxy
    /// (repeatable). Every connection's credentials are checked.
    #[arg(long = "zds-allowed-uid")]
    zds_allowed_uids: Vec<u32>,
    /// Where pods' network namespaces are: `<dir>/<namespace>.<pod name>`.
    #[arg(long, default_value = "/run/netns")]
    netns_dir: PathBuf,
    /// How often installed rules are checked (and repaired if they drifted).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    reconcile_interval: Duration,
    /// Address of the agent's admin port (/metrics, /healthz/ready, /debug/pods).
    #[arg(long, default_value = "127.0.0.1:15030", value_parser = crate::addr::socket_addr)]
    admin_addr: SocketAddr,
    /// The nft program.
    #[arg(long, default_value = "nft")]
    nft: PathBuf,
    /// The ip program (iproute2).
    #[arg(long, default_value = "ip")]
    ip: PathBuf,
    /// How long one nft or ip run may take; a run that hangs is killed and the pod's
    /// enrollment retried.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    tool_timeout: Duration,
}

pub fn run(args: CniArgs) -> anyhow::Result<ExitCode> {
    crate::preflight::require_root("the node agent changes pods' network namespaces")?;
    crate::preflight::require_tools(&[(&args.nft, "nftables"), (&args.ip, "iproute2")])?;
    let mut config = AgentConfig::new(args.discovery.xds_config()?, args.zds_socket);
    config.zds_allowed_uids.extend(args.zds_allowed_uids);
    config.netns_dir = args.netns_dir;
    config.reconcile_interval = args.reconcile_interval;
    config.admin_addr = args.admin_addr;
    config.redirector = Redirector {
        nft: args.nft,
        ip: args.ip,
        timeout: args.tool_timeout,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let agent = Agent::start(config).await?;
        crate::signal::wait().await;
        tracing::info!("shutting down; enrolled pods stay enrolled");
        agent.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
