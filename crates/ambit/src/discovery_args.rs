//! The flags every component that follows the control plane takes (node proxy, node
//! agent): where the control plane is, how to trust it, who this node is.

use std::path::PathBuf;
use std::time::Duration;

use ambit_tls::client::TokenSource;
use ambit_tls::spiffe::TrustBundle;
use ambit_xds::XdsConfig;
use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct DiscoveryArgs {
    /// This node's name (the control plane hands out identities of pods on it).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The control plane's gRPC address (host:port): discovery and certificates.
    #[arg(long, env = "AMBIT_CONTROL_PLANE", default_value = "127.0.0.1:15012")]
    pub control_plane: String,
    /// PEM file with the mesh root(s): the control plane's certificate and every peer's
    /// chain to them (`<state-dir>/ca/root-cert.pem` of a self-signed control plane).
    /// Re-read every 10 s: during a root rotation put the old and the new root in it.
    #[arg(long, env = "AMBIT_CA_ROOT")]
    pub ca_root: PathBuf,
    /// Name to check the control plane's certificate against [default: the host of
    /// --control-plane].
    #[arg(long)]
    pub server_name: Option<String>,
    /// File holding this node's token (`ambit control token --node <name> --output <file>`);
    /// re-read on every request, so a rotated token is picked up.
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: PathBuf,
}

impl DiscoveryArgs {
    /// Checks the files and builds the discovery client's configuration.
    pub fn xds_config(&self) -> anyhow::Result<XdsConfig> {
        let pem = std::fs::read(&self.ca_root)
            .with_context(|| format!("cannot read --ca-root {}", self.ca_root.display()))?;
        let roots = TrustBundle::from_pem(&pem)
            .with_context(|| format!("--ca-root {}", self.ca_root.display()))?;
        if !self.token_file.exists() {
            anyhow::bail!(
                "--token-file {} does not exist; mint one with `ambit control token --node {} --output {}`",
                self.token_file.display(),
                self.node_name,
                self.token_file.display()
            );
        }
        Ok(XdsConfig {
            address: self.control_plane.clone(),
            roots,
            server_name: self.server_name.clone(),
            token: TokenSource::File(self.token_file.clone()),
            node_name: self.node_name.clone(),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
        })
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 5s, 1m)"))
}
