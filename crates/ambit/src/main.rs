//! `ambit`: one binary, a subcommand per role.

mod addr;
mod cni;
mod config_cmd;
mod control;
mod dashboard;
mod demo;
mod discovery_args;
mod install_cmd;
mod logging;
mod node;
mod preflight;
mod signal;
mod waypoint;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the data path allocates and frees frame-sized
/// buffers at a high rate, where glibc's malloc faults pages in and out (measured in
/// `crates/ambit-hbone/benches/tunnel.rs`: one tunnel stream ~1.3 GB/s with glibc,
/// ~2.4 GB/s with mimalloc, same machine and run).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the calling thread's freed memory to the operating system: mimalloc keeps
/// freed pages in the thread's heap for reuse and purges them only when that thread
/// allocates again, so a node proxy thread gone idle after a burst of 5,000 connections
/// held ~38 MB it no longer used. `mi_collect(false)` frees the heap's retired pages and
/// purges what has been unused past mimalloc's purge delay; it is cheap when there is
/// nothing to do.
#[allow(unsafe_code)]
pub(crate) fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and only works on the calling thread's own
    // mimalloc heap (and abandoned segments), which is the allocator of this binary.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// `ambit --version`: the release and the cryptography library this build links.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (TLS: rustls with {})",
        env!("CARGO_PKG_VERSION"),
        ambit_core::crypto::LIBRARY
    )
});

/// Ambit, a sidecarless service mesh.
#[derive(Debug, Parser)]
#[command(name = "ambit", version, long_version = LONG_VERSION.as_str(), about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (mesh model, certificate authority, discovery), or its
    /// operator tools.
    Control(Box<control::ControlArgs>),
    /// Run the node proxy (one per node): captures each served pod's traffic inside its
    /// network namespace and carries it between nodes in mutual TLS (HBONE).
    Node(Box<node::NodeArgs>),
    /// Show what a node proxy knows: workloads, services, policies, certificates.
    Config(config_cmd::ConfigArgs),
    /// Run the node agent (one per node): enrolls the node's pods in the mesh by
    /// installing redirection rules in their network namespaces and handing them to the
    /// node proxy; un-enrolls them the same way. Pods are never restarted.
    Cni(Box<cni::CniArgs>),
    /// The CNI plugin the node agent installs (`ambit-cni`): run it, or install it into
    /// or remove it from a node's CNI configuration by hand.
    CniPlugin(cni::PluginArgs),
    /// The waypoint (L7 proxy, optional and shared): run one; HTTP/1.1, HTTP/2 and gRPC
    /// for the services and workloads bound to it.
    Waypoint(Box<waypoint::WaypointArgs>),
    /// Build a two-node mesh out of network namespaces on this machine and walk
    /// through it (needs root, iproute2 and nftables); also the demo's sample apps.
    Demo(Box<demo::DemoArgs>),
    /// Install Ambit on a Kubernetes cluster (CRDs, RBAC, control plane, node proxies),
    /// or print what would be applied (--dry-run -o yaml).
    Install(Box<install_cmd::InstallArgs>),
    /// Remove what `ambit install` applied.
    Uninstall(Box<install_cmd::UninstallArgs>),
    /// Check a cluster: before an install (--pre) or the installed mesh, a line per check.
    Check(Box<install_cmd::CheckArgs>),
    /// Print the address of the mesh console (the control plane's web UI), open it, or
    /// forward a local port to it in a cluster.
    Dashboard(Box<dashboard::DashboardArgs>),
}

fn main() -> ExitCode {
    // Installed as the CNI plugin, this binary is run by the container runtime under
    // the plugin's name, with no arguments.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_owned()));
    if invoked_as.as_deref() == Some(std::ffi::OsStr::new(ambit_cni::plugin::PLUGIN_TYPE)) {
        return cni::run_plugin();
    }
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Control(args) if args.is_tool() => "error",
        Command::Config(_) | Command::CniPlugin(_) => "error",
        Command::Waypoint(args) if args.is_tool() => "error",
        Command::Demo(_) => "warn",
        Command::Install(_) | Command::Uninstall(_) | Command::Check(_) => "warn",
        Command::Dashboard(_) => "warn",
        _ => "info",
    };
    if let Err(e) = logging::init(&cli.log, default_level) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Control(args) => control::run(*args),
        Command::Dashboard(args) => dashboard::run(*args),
        Command::Node(args) => node::run(*args),
        Command::Config(args) => config_cmd::run(args),
        Command::Cni(args) => cni::run(*args),
        Command::CniPlugin(args) => cni::plugin(args),
        Command::Waypoint(args) => waypoint::run(*args),
        Command::Demo(args) => demo::run(*args),
        Command::Install(args) => install_cmd::install(*args),
        Command::Uninstall(args) => install_cmd::uninstall(*args),
        Command::Check(args) => install_cmd::check(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
