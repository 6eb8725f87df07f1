//! `ambit node`: run the node proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambit_node::{NodeConfig, NodeProxy, XdsConfig};
use ambit_tls::client::TokenSource;
use anyhow::Context;
use clap::Args;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This node's name (the control plane hands out identities of pods on it).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The control plane's gRPC address (host:port).
    #[arg(long, env = "AMBIT_CONTROL_PLANE", default_value = "127.0.0.1:15012")]
    control_plane: String,
    /// PEM file with the mesh root(s) the control plane's certificate chains to
    /// (`<state-dir>/ca/root-cert.pem` of a self-signed control plane).
    #[arg(long, env = "AMBIT_CA_ROOT")]
    ca_root: PathBuf,
    /// Name to check the control plane's certificate against [default: the host of
    /// --control-plane].
    #[arg(long)]
    server_name: Option<String>,
    /// File holding this node's token (`ambit control token --node <name> --output <file>`);
    /// re-read on every request, so a rotated token is picked up.
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    token_file: PathBuf,
    /// Address of the admin port (/config_dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Where to announce the admin address for `ambit config --node`.
    #[arg(long, env = "AMBIT_RUN_DIR", default_value = "/run/ambit")]
    run_dir: PathBuf,
}

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let roots = CertificateDer::pem_file_iter(&args.ca_root)
        .with_context(|| format!("cannot read --ca-root {}", args.ca_root.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "--ca-root {} is not a PEM certificate bundle",
                args.ca_root.display()
            )
        })?;
    if roots.is_empty() {
        anyhow::bail!("--ca-root {} holds no certificate", args.ca_root.display());
    }
    if !args.token_file.exists() {
        anyhow::bail!(
            "--token-file {} does not exist; mint one with `ambit control token --node {} --output {}`",
            args.token_file.display(),
            args.node_name,
            args.token_file.display()
        );
    }
    let config = NodeConfig {
        xds: XdsConfig {
            address: args.control_plane,
            roots,
            server_name: args.server_name,
            token: TokenSource::File(args.token_file),
            node_name: args.node_name,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
        },
        admin_addr: args.admin_addr,
        run_dir: Some(args.run_dir),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ambit-node")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let node = NodeProxy::start(config).await?;
        crate::signal::wait().await;
        tracing::info!("shutting down");
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
