//! `ambit control`: run the control plane, mint node tokens, validate manifests.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambit_control::auth::TokenSigner;
use ambit_control::{Config, ControlPlane};
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ControlArgs {
    #[command(subcommand)]
    command: Option<ControlCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum ControlCommand {
    /// Mint a node token: a node proxy presents it to obtain its pods' certificates.
    Token(TokenArgs),
    /// Check a manifest folder and report every error with file, line and field.
    Validate(ValidateArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Folder of Kubernetes-style YAML manifests (watched for changes).
    #[arg(
        long,
        env = "AMBIT_MANIFESTS",
        conflicts_with_all = ["kubernetes", "kubeconfig"]
    )]
    manifests: Option<PathBuf>,
    /// Read the mesh from a Kubernetes API server instead of a folder: with --kubeconfig,
    /// else KUBECONFIG, ~/.kube/config or the pod's service account. Running in a pod
    /// without --manifests implies it.
    #[arg(long, env = "AMBIT_KUBERNETES")]
    kubernetes: bool,
    /// The kubeconfig file to reach the API server with (implies --kubernetes).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the audience service-account tokens must carry to obtain
    /// certificates (repeatable).
    #[arg(
        long = "token-audience",
        value_name = "AUDIENCE",
        default_value = "istio-ca"
    )]
    token_audiences: Vec<String>,
    /// With --kubernetes: a service account (NAMESPACE/NAME) node proxies run as; its
    /// pod-bound tokens may obtain identities of the pods on their pod's node (repeatable;
    /// default: ztunnel, ambit-node and ambit-cni in the root namespace).
    #[arg(long = "node-proxy-account", value_name = "NAMESPACE/NAME")]
    node_proxy_accounts: Vec<String>,
    /// With --kubernetes: the namespace of the leader-election Lease (`ambit-control`);
    /// only the leader writes to the cluster [default: the root namespace].
    #[arg(long, value_name = "NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// With --kubernetes: the image of the waypoint Deployments made for `istio-waypoint`
    /// Gateways (it must hold this `ambit` binary).
    #[arg(long, value_name = "IMAGE", default_value = "ambit:latest")]
    waypoint_image: String,
    /// With --kubernetes: the control plane's address as waypoint pods reach it
    /// [default: ambit-control.<root namespace>.svc:15012].
    #[arg(long, value_name = "HOST:PORT")]
    waypoint_control_plane: Option<String>,
    /// Folder for the control plane's keys (created with mode 0700).
    #[arg(
        long,
        env = "AMBIT_STATE_DIR",
        default_value = "/var/lib/ambit/control"
    )]
    state_dir: PathBuf,
    /// Use an operator-supplied intermediate CA from this folder (Istio's cacerts layout:
    /// ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem) instead of the self-signed root.
    #[arg(long, env = "AMBIT_PLUGIN_CA_DIR")]
    plugin_ca: Option<PathBuf>,
    /// Address of the gRPC port (certificate service).
    #[arg(long, default_value = "0.0.0.0:15012", value_parser = crate::addr::socket_addr)]
    grpc_addr: SocketAddr,
    /// Address of the monitoring port (/metrics, /ready, /debug/*).
    #[arg(long, default_value = "127.0.0.1:15014", value_parser = crate::addr::socket_addr)]
    monitoring_addr: SocketAddr,
    /// Address of the mesh console (web UI and JSON API, read-only); `off` for none.
    /// Beyond loopback it needs --console-token-file.
    #[arg(long, env = "AMBIT_CONSOLE_ADDR", default_value = "127.0.0.1:15080", value_parser = console_addr)]
    console_addr: ConsoleAddr,
    /// A file holding the console's bearer token (required when the console is bound
    /// beyond loopback). Browsers sign in once at /login?token=<token>.
    #[arg(long, env = "AMBIT_CONSOLE_TOKEN_FILE")]
    console_token_file: Option<PathBuf>,
    /// Link the console's trace ids to a trace viewer: a URL with `{trace_id}` in it
    /// (e.g. `http://jaeger:16686/trace/{trace_id}`).
    #[arg(long)]
    console_trace_url: Option<String>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = ambit_core::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Namespace of mesh-wide resources and of the control plane's own identity.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Workload certificate lifetime when a request names none (at most --max-cert-ttl).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// Longest workload certificate lifetime issued; longer requests are capped.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_ttl: Duration,
    /// Extra DNS name for the control plane's serving certificate (repeatable).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The node the token speaks for.
    #[arg(long)]
    node: String,
    /// How long the token is valid (at most 366 days).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    ttl: Duration,
    /// The control plane's state folder (where the signing key lives).
    #[arg(
        long,
        env = "AMBIT_STATE_DIR",
        default_value = "/var/lib/ambit/control"
    )]
    state_dir: PathBuf,
    /// Write the token to this file (mode 0600) instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 when every file is accepted (warnings may be printed), \
1 when a file is refused or an object is defined twice, 2 on a usage error (bad arguments, \
no such folder)."
)]
struct ValidateArgs {
    /// Folder of manifests to check.
    #[arg(value_name = "FOLDER", required_unless_present = "manifests")]
    folder: Option<PathBuf>,
    /// The same folder, named as `ambit control` names it.
    #[arg(long, value_name = "FOLDER", conflicts_with = "folder")]
    manifests: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 30m, 24h, 7d)"))
}

impl ControlArgs {
    /// Whether this is a one-shot tool rather than the long-running server.
    pub fn is_tool(&self) -> bool {
        self.command.is_some()
    }
}

pub fn run(args: ControlArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(ControlCommand::Token(t)) => token(t),
        Some(ControlCommand::Validate(v)) => validate(v),
        None => serve(args.run),
    }
}

fn serve(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.cert_ttl > args.max_cert_ttl {
        eprintln!(
            "error: --cert-ttl {} is longer than --max-cert-ttl {}, so it could never be issued; lower --cert-ttl or raise --max-cert-ttl",
            humantime::format_duration(args.cert_ttl),
            humantime::format_duration(args.max_cert_ttl)
        );
        return Ok(ExitCode::from(2));
    }
    let kubernetes = args.kubernetes
        || args.kubeconfig.is_some()
        || (args.manifests.is_none() && ambit_kube::in_cluster());
    if !kubernetes && args.manifests.is_none() {
        anyhow::bail!(
            "name where the mesh is read from: --manifests FOLDER, or --kubernetes (with --kubeconfig FILE outside a cluster)"
        );
    }
    if let Some(bad) = args
        .node_proxy_accounts
        .iter()
        .find(|a| a.split('/').count() != 2 || a.starts_with('/') || a.ends_with('/'))
    {
        eprintln!("error: --node-proxy-account {bad:?}: expected NAMESPACE/NAME");
        return Ok(ExitCode::from(2));
    }
    let node_accounts = if args.node_proxy_accounts.is_empty() {
        vec![
            format!("{}/ztunnel", args.root_namespace),
            format!("{}/ambit-node", args.root_namespace),
            format!("{}/ambit-cni", args.root_namespace),
        ]
    } else {
        args.node_proxy_accounts.clone()
    };
    let token_audiences = args.token_audiences.clone();
    let lease_namespace = args
        .leader_election_namespace
        .clone()
        .unwrap_or_else(|| args.root_namespace.clone());
    let waypoint_image = args.waypoint_image.clone();
    let waypoint_control_plane = args
        .waypoint_control_plane
        .clone()
        .unwrap_or_else(|| format!("ambit-control.{}.svc:15012", args.root_namespace));
    let trust_domain = args.trust_domain.clone();
    let console_token = match &args.console_token_file {
        None => None,
        Some(path) => {
            let token = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the console token file {}", path.display())
            })?;
            let token = token.trim().to_owned();
            if token.len() < 16 {
                anyhow::bail!(
                    "the console token in {} is shorter than 16 characters; use a long random one (e.g. `head -c 24 /dev/urandom | base64`)",
                    path.display()
                );
            }
            Some(token)
        }
    };
    let config = Config {
        manifests: args.manifests.unwrap_or_default(),
        state_dir: args.state_dir,
        plugin_ca_dir: args.plugin_ca,
        grpc_addr: args.grpc_addr,
        monitoring_addr: args.monitoring_addr,
        console_addr: args.console_addr.0,
        console_token,
        console_trace_url: args.console_trace_url.clone(),
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        default_cert_ttl: args.cert_ttl,
        max_cert_ttl: args.max_cert_ttl,
        server_names: args.server_names,
        ..Config::new(PathBuf::new(), PathBuf::new())
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ambit-control")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let cp = if kubernetes {
            let (client, url) = ambit_kube::client(args.kubeconfig.as_deref()).await?;
            tracing::info!(%url, "reading the mesh from the Kubernetes API server");
            let source = ambit_kube::KubeSource::start(
                client.clone(),
                url,
                ambit_kube::KubeOptions::default(),
            )
            .await?;
            let model = ambit_control::source::Source::model(&source);
            let tokens = ambit_kube::TokenReviewAuthenticator::new(
                client.clone(),
                ambit_control::source::Source::model(&source),
                trust_domain.clone(),
                token_audiences,
                node_accounts,
            );
            let cp = ControlPlane::start_with_source(
                config,
                Box::new(source),
                Some(std::sync::Arc::new(tokens)),
            )
            .await?;
            // Only the elected replica writes to the cluster.
            let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
                format!(
                    "{}-{}",
                    nix::unistd::gethostname()
                        .map(|h| h.to_string_lossy().into_owned())
                        .unwrap_or_else(|_| "ambit-control".into()),
                    std::process::id()
                )
            });
            let (leading, _election) = ambit_kube::leader::elect(
                client.clone(),
                ambit_kube::leader::LeaderOptions::new(lease_namespace, identity),
            );
            tokio::spawn(ambit_kube::status::run(
                client.clone(),
                cp.snapshots(),
                cp.model(),
                cp.source_status(),
                leading.clone(),
            ));
            tokio::spawn(ambit_kube::waypoints::run(
                client,
                model,
                leading,
                ambit_kube::waypoints::WaypointOptions {
                    image: waypoint_image,
                    control_plane: waypoint_control_plane,
                    trust_domain,
                    roots_pem: cp.roots_pem(),
                },
            ));
            cp
        } else {
            ControlPlane::start(config).await?
        };
        crate::signal::wait().await;
        tracing::info!("shutting down");
        cp.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let max = ambit_control::auth::MAX_TOKEN_TTL;
    if args.ttl.is_zero() || args.ttl > max {
        // Refused before anything is created in the state folder.
        eprintln!(
            "error: --ttl {} is out of range: a node token lives from 1s to {} days",
            humantime::format_duration(args.ttl),
            max.as_secs() / 86_400
        );
        return Ok(ExitCode::from(2));
    }
    let signer = TokenSigner::load_or_create(&args.state_dir).with_context(|| {
        format!(
            "cannot use the token signing key in {}",
            args.state_dir.display()
        )
    })?;
    let token = signer
        .mint(&args.node, args.ttl)
        .map_err(|e| anyhow::anyhow!(e))?;
    match args.output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            // The token alone, as Kubernetes writes token files: clients (Istio's node
            // proxy among them) put the file's bytes into the authorization header.
            file.write_all(token.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "wrote a token for node {} valid for {} to {}",
                args.node,
                humantime::format_duration(args.ttl),
                path.display()
            );
        }
        None => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let Some(folder) = args.folder.or(args.manifests) else {
        // clap requires one of them.
        anyhow::bail!("name the folder of manifests to check");
    };
    let (model, status) = match ambit_control::source::validate_dir(&folder) {
        Ok(found) => found,
        Err(e) => {
            // Not a verdict on manifests: the folder named is not one (usage, status 2).
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut out = std::io::stdout().lock();
    for file in &status.file_errors {
        for e in &file.errors {
            writeln!(out, "{}/{}: {e}", folder.display(), file.file)?;
        }
    }
    for c in &status.conflicts {
        writeln!(out, "conflict: {c}")?;
    }
    for i in &status.ignored {
        writeln!(out, "skipped (kind not modelled): {i}")?;
    }
    // What the node proxies will (not) do with the policies, as the control plane
    // would translate them.
    let mut translator = ambit_control::xds::translate::Translator::new(
        ambit_control::xds::translate::TranslateOptions::default(),
    );
    translator.full(&model);
    for (policy, warnings) in translator.warnings() {
        for w in warnings {
            writeln!(out, "warning: {policy}: {w}")?;
        }
    }
    let counts: Vec<String> = model
        .counts()
        .into_iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    writeln!(
        out,
        "{}, {} ({}), {} refused, {}",
        counted(status.files, "file", "files"),
        counted(model.len(), "object", "objects"),
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts.join(", ")
        },
        counted(status.file_errors.len(), "file", "files"),
        counted(status.conflicts.len(), "conflict", "conflicts"),
    )?;
    Ok(
        if status.file_errors.is_empty() && status.conflicts.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// `1 file`, `2 files`: a count with its noun in the right number.
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `--console-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleAddr(Option<SocketAddr>);

fn console_addr(s: &str) -> Result<ConsoleAddr, String> {
    if s == "off" {
        return Ok(ConsoleAddr(None));
    }
    crate::addr::socket_addr(s).map(|a| ConsoleAddr(Some(a)))
}
