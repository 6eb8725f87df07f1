//! `ambit cni`: run the node agent.

// The CNI plugin answers on stdout, as the CNI specification asks; the plugin tools
// report to the operator there too.
#![allow(clippy::print_stdout)]

use std::io::Write;
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
    /// Cluster mode: decide from the API server (pod and namespace labels) whether a pod
    /// the runtime is creating is in the mesh, serve the CNI plugin on --cni-socket, and
    /// find pods' network namespaces by their addresses. Implied by --kubeconfig and in a
    /// pod.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig to reach the API server with (implies --kubernetes).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where the CNI plugin reaches the agent [default in cluster mode:
    /// /var/run/ambit/cni.sock; off in local mode unless given].
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// The node's CNI configuration folder (the host's /etc/cni/net.d, mounted): the
    /// plugin is chained into its first configuration and kept there. Needs --cni-bin-dir.
    #[arg(long, requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// Where --cni-conf-dir is on the host (the plugin, run by the host's container
    /// runtime, reads its kubeconfig there).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_host_conf_dir: PathBuf,
    /// The node's CNI plugin folder (the host's /opt/cni/bin, mounted): the plugin binary
    /// is installed there as `ambit-cni`.
    #[arg(long, requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// A namespace whose pods the plugin never holds, even when the agent is away
    /// (repeatable; kube-system and the agent's own namespace always are).
    #[arg(long = "exclude-namespace")]
    exclude_namespaces: Vec<String>,
    /// The agent's DaemonSet (NAMESPACE/NAME): when the agent stops and the DaemonSet is
    /// gone (an uninstall, not an upgrade), the plugin is removed from the node.
    #[arg(long, env = "AMBIT_CNI_DAEMONSET")]
    daemonset: Option<String>,
}

/// `ambit cni-plugin`: the CNI plugin itself, and its installation on a node.
#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PluginCommand {
    /// Act as the CNI plugin: CNI_COMMAND and friends from the environment, the network
    /// configuration on stdin (the node agent installs this binary as `ambit-cni`, which
    /// the container runtime runs directly).
    Run,
    /// Install the plugin binary and chain it into the node's first CNI configuration.
    Install(InstallPaths),
    /// Remove the plugin from every CNI configuration and its binary.
    Uninstall(InstallPaths),
}

#[derive(Debug, Args)]
struct InstallPaths {
    /// The node's CNI configuration folder.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The node's CNI plugin folder.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// With install: where the plugin reaches the agent.
    #[arg(long, default_value = ambit_cni::plugin::DEFAULT_AGENT_SOCKET)]
    cni_socket: PathBuf,
}

/// Runs as the CNI plugin: prints the result or the error object and exits 0 or 1, as
/// the CNI specification asks.
pub fn run_plugin() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let out = ambit_cni::plugin::run(
        &env,
        &mut std::io::stdin().lock(),
        &ambit_kube::cni::PluginLookup,
    );
    // The runtime may have gone away: a closed stdout is not worth a panic.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", out.stdout);
    let _ = stdout.flush();
    if out.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn plugin(args: PluginArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PluginCommand::Run => Ok(run_plugin()),
        PluginCommand::Install(p) => {
            let spec = install_spec(&p.cni_conf_dir, &p.cni_bin_dir, &p.cni_socket, &[], None)?;
            let (path, changed) = ambit_cni::plugin::install(&spec)?;
            println!(
                "{} {}",
                if changed {
                    "chained into"
                } else {
                    "already in"
                },
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Uninstall(p) => {
            let changed = ambit_cni::plugin::uninstall(&p.cni_conf_dir, &p.cni_bin_dir)?;
            for path in &changed {
                println!("removed from {}", path.display());
            }
            if changed.is_empty() {
                println!("the plugin was not installed");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The name of the kubeconfig the agent writes for the plugin, in the CNI folder.
const PLUGIN_KUBECONFIG: &str = "ambit-cni-kubeconfig";

fn install_spec(
    conf_dir: &std::path::Path,
    bin_dir: &std::path::Path,
    socket: &std::path::Path,
    exclude: &[String],
    kubeconfig: Option<PathBuf>,
) -> anyhow::Result<ambit_cni::plugin::InstallSpec> {
    let binary = std::env::current_exe().context("cannot find this binary to install it")?;
    let mut entry = serde_json::json!({
        "agentSocket": socket,
        "excludeNamespaces": exclude,
    });
    if let Some(k) = kubeconfig {
        entry["kubeconfig"] = serde_json::json!(k);
    }
    Ok(ambit_cni::plugin::InstallSpec {
        conf_dir: conf_dir.to_owned(),
        bin_dir: bin_dir.to_owned(),
        binary,
        entry,
    })
}

/// Keeps the plugin chained (the node's network plugin may rewrite its configuration)
/// and the plugin's kubeconfig current (its token is renewed at half its lifetime).
async fn keep_plugin_installed(
    spec: ambit_cni::plugin::InstallSpec,
    client: Option<ambit_kube::Client>,
) {
    let mut last_error = String::new();
    let mut token_written: Option<tokio::time::Instant> = None;
    loop {
        let renew = token_written
            .is_none_or(|at| at.elapsed() >= ambit_kube::cni::PLUGIN_TOKEN_LIFETIME / 2);
        if renew && let Some(client) = &client {
            match ambit_kube::cni::plugin_kubeconfig(client).await {
                Ok(Some(k)) => {
                    let path = spec.conf_dir.join(PLUGIN_KUBECONFIG);
                    match write_private(&path, k.as_bytes()) {
                        Ok(()) => token_written = Some(tokio::time::Instant::now()),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot write the CNI plugin's kubeconfig")
                        }
                    }
                }
                Ok(None) => token_written = Some(tokio::time::Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get a token for the CNI plugin; it cannot ask the API server while the agent is away")
                }
            }
        }
        let s = spec.clone();
        let done = tokio::task::spawn_blocking(move || ambit_cni::plugin::install(&s)).await;
        match done {
            Ok(Ok((path, true))) => {
                last_error.clear();
                tracing::info!(conf = %path.display(), "CNI plugin chained into the node's network configuration")
            }
            Ok(Ok(_)) => last_error.clear(),
            Ok(Err(e)) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "cannot install the CNI plugin; new pods are captured only once the agent finds them");
                    last_error = e;
                }
            }
            Err(e) => tracing::warn!(error = %e, "CNI plugin install task failed"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Writes a secret file: mode 0600 from its creation, replaced by rename.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_file_name(format!(".{PLUGIN_KUBECONFIG}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
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
    let cluster = args.kubernetes || args.kubeconfig.is_some() || ambit_kube::in_cluster();
    if cluster {
        config.cni_socket = Some(
            args.cni_socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(ambit_cni::plugin::DEFAULT_AGENT_SOCKET)),
        );
        config.netns_search = Some(ambit_cni::netns::Search::default());
    } else {
        config.cni_socket = args.cni_socket.clone();
    }
    let mut exclude = vec!["kube-system".to_owned()];
    if let Ok(own) = std::env::var("POD_NAMESPACE") {
        exclude.push(own);
    }
    exclude.extend(args.exclude_namespaces.iter().cloned());
    let plugin = match (&args.cni_conf_dir, &args.cni_bin_dir) {
        (Some(conf), Some(bin)) => {
            let socket = config.cni_socket.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "--cni-conf-dir needs the agent's socket: pass --cni-socket or --kubernetes"
                )
            })?;
            // The plugin runs on the host: it reads the kubeconfig at the host's path.
            let kubeconfig =
                ambit_kube::in_cluster().then(|| args.cni_host_conf_dir.join(PLUGIN_KUBECONFIG));
            Some(install_spec(conf, bin, &socket, &exclude, kubeconfig)?)
        }
        _ => None,
    };
    let daemonset = match &args.daemonset {
        Some(d) => Some(
            d.split_once('/')
                .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--daemonset {d:?}: expected NAMESPACE/NAME"))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = if cluster {
            let (client, url) = ambit_kube::client(args.kubeconfig.as_deref()).await?;
            tracing::info!(api_server = %url, "cluster mode: pod labels are read from the API server");
            config.enrollment = Some(std::sync::Arc::new(ambit_kube::cni::PodLabels::new(
                client.clone(),
            )));
            Some(client)
        } else {
            None
        };
        let agent = Agent::start(config).await?;
        let keeper = plugin
            .clone()
            .map(|spec| tokio::spawn(keep_plugin_installed(spec, client.clone())));
        crate::signal::wait().await;
        if let Some(k) = keeper {
            k.abort();
        }
        if let (Some(spec), Some((ns, name)), Some(client)) = (&plugin, &daemonset, &client) {
            match ambit_kube::cni::daemonset_present(client, ns, name).await {
                Ok(false) => match ambit_cni::plugin::uninstall(&spec.conf_dir, &spec.bin_dir) {
                    Ok(_) => {
                        let _ = std::fs::remove_file(spec.conf_dir.join(PLUGIN_KUBECONFIG));
                        tracing::info!("the agent's DaemonSet is gone: CNI plugin removed from this node")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot remove the CNI plugin"),
                },
                Ok(true) => tracing::info!("the agent's DaemonSet remains (an upgrade or restart): the CNI plugin stays"),
                Err(e) => tracing::warn!(error = %e, "cannot tell whether the agent is being uninstalled; the CNI plugin stays"),
            }
        }
        tracing::info!("shutting down; enrolled pods stay enrolled");
        agent.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
