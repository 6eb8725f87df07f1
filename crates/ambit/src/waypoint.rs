//! `ambit waypoint`: run a waypoint (the L7 proxy).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// Declare a waypoint in the manifest folder, like `istioctl waypoint apply`: its
    /// Gateway (class istio-waypoint, listener mesh/15008/HBONE) and its Service; with
    /// --enroll-namespace, the namespace's istio.io/use-waypoint label too. The pods
    /// that run it (`ambit waypoint run`) are declared like any other pod, labelled
    /// gateway.networking.k8s.io/gateway-name=<name> and istio.io/dataplane-mode=none,
    /// service account <name>.
    Apply(ApplyArgs),
    /// List the waypoints of the manifest folder: what they take, what binds to them,
    /// whether a ready pod runs them.
    List(ListArgs),
    /// Show one waypoint in detail (or every waypoint of a namespace).
    Status(ListArgs),
}

/// What traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum For {
    Service,
    Workload,
    All,
    None,
}

impl For {
    fn as_str(self) -> &'static str {
        match self {
            For::Service => "service",
            For::Workload => "workload",
            For::All => "all",
            For::None => "none",
        }
    }
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The manifest folder the control plane reads.
    #[arg(long, env = "AMBIT_MANIFESTS")]
    manifests: PathBuf,
    /// The waypoint's namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The waypoint's name (its Gateway, Service and service account).
    #[arg(long, default_value = "waypoint")]
    name: String,
    /// What traffic it takes: services (addressed by their VIP), workloads (addressed
    /// by their pod IP), both, or none.
    #[arg(long = "for", value_enum, default_value = "service")]
    for_: For,
    /// Also bind the whole namespace to it (istio.io/use-waypoint on the Namespace).
    #[arg(long)]
    enroll_namespace: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The manifest folder the control plane reads.
    #[arg(
        long,
        env = "AMBIT_MANIFESTS",
        required_unless_present = "kubeconfig",
        conflicts_with = "kubeconfig"
    )]
    manifests: Option<PathBuf>,
    /// Read a cluster instead, through this kubeconfig.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Only this namespace's waypoints.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Only this waypoint.
    #[arg(long)]
    name: Option<String>,
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
    /// Open the listeners and the connections to endpoints inside this network namespace
    /// (a path such as /run/netns/<name>), while discovery and certificates use the
    /// process's own network: for a waypoint run beside its pod rather than in it.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// On shutdown, how long open tunnels may finish before they are closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long a request's headers may take to arrive; a slower client is closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// Largest request head in bytes (request line and headers); larger gets 431.
    #[arg(long, default_value_t = 65_536)]
    max_header_bytes: usize,
    /// Send a span per request to this OTLP/gRPC collector (`host:port`, e.g. an
    /// OpenTelemetry Collector's 4317); no traces without it.
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Percent of the requests that start a trace here to sample (0 to 100); a request
    /// that arrives in a trace keeps its caller's decision.
    #[arg(long, default_value_t = 1.0)]
    trace_sampling: f64,
}

impl WaypointArgs {
    /// An operator tool (quiet logs), not the proxy.
    pub fn is_tool(&self) -> bool {
        !matches!(self.command, WaypointCommand::Run(_))
    }
}

pub fn run(args: WaypointArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        WaypointCommand::Run(args) => run_waypoint(*args),
        WaypointCommand::Apply(args) => apply(args),
        WaypointCommand::List(args) => list(args, false),
        WaypointCommand::Status(args) => list(args, true),
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
    if let Some(path) = &args.netns {
        config.netns = Some(
            ambit_hbone::socket::Netns::open(path)
                .with_context(|| format!("cannot open --netns {}", path.display()))?,
        );
    }
    config.limits.header_timeout = args.header_timeout;
    config.limits.max_header_bytes = args.max_header_bytes;
    config.otlp_endpoint = args.otlp_endpoint.clone();
    config.trace_sampling = args.trace_sampling;
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

/// The file `apply` writes for a waypoint.
fn waypoint_file(dir: &Path, namespace: &str, name: &str) -> PathBuf {
    dir.join(format!("waypoint.{namespace}.{name}.yaml"))
}

fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    for (what, v) in [("--namespace", &args.namespace), ("--name", &args.name)] {
        if !ambit_core::identity::is_dns1123_label(v) {
            anyhow::bail!(
                "{what} {v:?} is not a valid name (lowercase letters, digits and '-', at most 63)"
            );
        }
    }
    if !args.manifests.is_dir() {
        anyhow::bail!(
            "{} is not a folder; give the folder `ambit control --manifests` reads",
            args.manifests.display()
        );
    }
    let (ns, name) = (&args.namespace, &args.name);
    let labels = if args.for_ == For::Service {
        String::new()
    } else {
        format!(
            "\n  labels: {{istio.io/waypoint-for: {}}}",
            args.for_.as_str()
        )
    };
    let text = format!(
        "# Written by `ambit waypoint apply`: waypoint {name} of namespace {ns}.
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: {name}
  namespace: {ns}{labels}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {{name: mesh, port: 15008, protocol: HBONE}}
---
# Node proxies reach the waypoint through its Service's endpoints: the pods labelled
# gateway.networking.k8s.io/gateway-name={name}.
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
  labels: {{gateway.networking.k8s.io/gateway-name: {name}}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: {name}}}
  ports:
  - {{name: mesh, port: 15008, appProtocol: all}}
  - {{name: status-port, port: 15021}}
"
    );
    let path = waypoint_file(&args.manifests, ns, name);
    write_atomically(&path, &text)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "waypoint {ns}/{name} applied ({}); it takes {} traffic",
        path.display(),
        args.for_.as_str()
    )?;
    if args.enroll_namespace {
        let file = label_namespace(&args.manifests, ns, name)?;
        writeln!(
            out,
            "namespace {ns} labelled istio.io/use-waypoint={name} ({})",
            file.display()
        )?;
    }
    writeln!(
        out,
        "run it in a pod labelled gateway.networking.k8s.io/gateway-name={name} and istio.io/dataplane-mode=none, service account {name}: ambit waypoint run -n {ns} --name {name} ..."
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to `path` through a temporary file in the same folder, so the control
/// plane never reads half a file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("waypoint")
    ));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Sets `istio.io/use-waypoint=<waypoint>` on Namespace `ns`: rewrites the document
/// that defines it (that document only; its comments are not kept), or, when the folder
/// defines no such Namespace, writes one next to the waypoint. Returns the file.
fn label_namespace(dir: &Path, ns: &str, waypoint: &str) -> anyhow::Result<PathBuf> {
    let (model, _) =
        ambit_control::source::validate_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let doc = |labels: &ambit_control::model::fields::Labels, annotations: Vec<(&str, &str)>| {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .filter(|(k, _)| {
                *k != "istio.io/use-waypoint" && *k != "istio.io/use-waypoint-namespace"
            })
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        labels.push(("istio.io/use-waypoint".into(), waypoint.into()));
        let mut text =
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n");
        for (k, v) in labels {
            text.push_str(&format!("    {}: {}\n", yaml_str(&k), yaml_str(&v)));
        }
        if !annotations.is_empty() {
            text.push_str("  annotations:\n");
            for (k, v) in annotations {
                text.push_str(&format!("    {}: {}\n", yaml_str(k), yaml_str(v)));
            }
        }
        text
    };
    let Some(namespace) = model.namespace(ns) else {
        let path = dir.join(format!("namespace.{ns}.yaml"));
        let empty = ambit_control::model::fields::Labels::default();
        write_atomically(
            &path,
            &format!(
                "# Written by `ambit waypoint apply`.\n{}",
                doc(&empty, Vec::new())
            ),
        )?;
        return Ok(path);
    };
    let replacement = doc(
        &namespace.metadata.labels,
        namespace.metadata.annotations.iter().collect(),
    );
    // The first file (by path, as the control plane reads them) and document that
    // define it.
    let files = ambit_control::source::manifest_files(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?;
    let mut target = None;
    for path in files {
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let docs = split_documents(&text);
        if let Some(i) = docs.iter().position(|d| defines_namespace(d, ns)) {
            target = Some((path, docs, i));
            break;
        }
    }
    let Some((path, mut docs, i)) = target else {
        anyhow::bail!(
            "cannot find the YAML document of Namespace {ns} in {}; add the label istio.io/use-waypoint={waypoint} to it by hand",
            dir.display()
        );
    };
    // The document's leading comment stays.
    let comment: String = docs[i]
        .lines()
        .take_while(|l| l.trim_start().starts_with('#') || l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    docs[i] = format!("{comment}{replacement}");
    write_atomically(&path, &docs.join("---\n"))?;
    Ok(path)
}

/// A YAML plain or quoted scalar for a label key or value.
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && !matches!(s, "true" | "false" | "null" | "yes" | "no" | "on" | "off")
        && s.parse::<f64>().is_err();
    if plain {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

/// The documents of a multi-document YAML text (split at `---` lines), each ending in a
/// newline.
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

/// Whether one YAML document is Namespace `ns`.
fn defines_namespace(doc: &str, ns: &str) -> bool {
    match ambit_control::model::parse::parse_manifest(doc) {
        Ok(objects) => objects.iter().any(|o| {
            let k = o.key();
            k.kind == ambit_control::model::Kind::Namespace && k.name == ns
        }),
        Err(_) => false,
    }
}

/// One waypoint as `list` and `status` show it.
struct Shown {
    namespace: String,
    name: String,
    takes: String,
    pods: Vec<(String, bool, String)>,
    services: Vec<String>,
    workloads: Vec<String>,
    policies: Vec<String>,
    /// Routes it applies (`HTTPRoute ns/name`, `GRPCRoute ns/name`), each with what the
    /// control plane found wrong in it.
    routes: Vec<(String, Vec<String>)>,
    /// Traffic policies it applies (`DestinationRule ns/name`, `LocalRateLimit ns/name`,
    /// `RequestAuthentication ns/name`),
    /// each with its findings.
    traffic: Vec<(String, Vec<String>)>,
}

/// The mesh as a control plane would read it from a cluster (every kind listed once).
fn cluster_model(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<std::sync::Arc<ambit_control::model::Model>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, url) = ambit_kube::client(kubeconfig).await?;
        let source =
            ambit_kube::KubeSource::start(client, url, ambit_kube::KubeOptions::default()).await?;
        let model = ambit_control::source::Source::model(&source)
            .borrow()
            .clone();
        Ok(model)
    })
}

fn list(args: ListArgs, detail: bool) -> anyhow::Result<ExitCode> {
    use ambit_control::model::{Kind, Object};
    use ambit_control::xds::translate::{self, WaypointFor};
    let model = match (&args.manifests, &args.kubeconfig) {
        (Some(dir), _) => {
            ambit_control::source::validate_dir(dir)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .0
        }
        (None, kubeconfig) => cluster_model(kubeconfig.as_deref())?,
    };
    let options = translate::TranslateOptions::default();
    let mut translator = translate::Translator::new(options.clone());
    translator.full(&model);
    let mut shown = Vec::new();
    for o in model.of_kind(Kind::Gateway) {
        let Object::Gateway(g) = o else { continue };
        if g.spec.gateway_class_name.as_str() != "istio-waypoint" {
            continue;
        }
        let ns = g.metadata.namespace().to_owned();
        let name = g.metadata.name.as_str().to_owned();
        if args.namespace.as_ref().is_some_and(|n| *n != ns)
            || args.name.as_ref().is_some_and(|n| *n != name)
        {
            continue;
        }
        let hostname = format!("{name}.{ns}.svc.{}", options.domain_suffix);
        let bound_here = |gw: Option<ambit_proto::workload::GatewayAddress>| {
            gw.and_then(|g| g.destination).is_some_and(|d| {
                matches!(d, ambit_proto::workload::gateway_address::Destination::Hostname(h) if h.hostname == hostname)
            })
        };
        let services = model
            .of_kind(Kind::Service)
            .filter_map(|o| match o {
                Object::Service(s) => Some(s),
                _ => None,
            })
            .filter(|s| {
                bound_here(translate::waypoint(
                    &model,
                    &s.metadata,
                    WaypointFor::Service,
                    &options,
                ))
            })
            .map(|s| format!("{}/{}", s.metadata.namespace(), s.metadata.name.as_str()))
            .collect();
        let workloads = model
            .pods()
            .filter(|p| {
                bound_here(translate::waypoint(
                    &model,
                    &p.metadata,
                    WaypointFor::Workload,
                    &options,
                ))
            })
            .map(|p| format!("{}/{}", p.metadata.namespace(), p.metadata.name.as_str()))
            .collect();
        let pods = model
            .pods()
            .filter(|p| {
                p.metadata.namespace() == ns
                    && p.metadata
                        .labels
                        .get("gateway.networking.k8s.io/gateway-name")
                        == Some(name.as_str())
            })
            .map(|p| {
                let ips: Vec<String> = p.ips().iter().map(ToString::to_string).collect();
                (
                    p.metadata.name.as_str().to_owned(),
                    p.is_ready(),
                    ips.join(","),
                )
            })
            .collect();
        let policies = model
            .of_kind(Kind::AuthorizationPolicy)
            .filter_map(|o| match o {
                Object::AuthorizationPolicy(p) => Some(p),
                _ => None,
            })
            .filter(|p| {
                p.metadata.namespace() == ns
                    && p.spec
                        .target_ref
                        .iter()
                        .chain(&p.spec.target_refs)
                        .any(|t| t.kind.as_str() == "Gateway" && t.name.as_str() == name)
            })
            .map(|p| format!("{}/{}", ns, p.metadata.name.as_str()))
            .collect();
        let routes = routes_of(&translator, &format!("{ns}/{name}"));
        let traffic = traffic_of(&translator, &format!("{ns}/{name}"));
        shown.push(Shown {
            routes,
            traffic,
            takes: g
                .metadata
                .labels
                .get("istio.io/waypoint-for")
                .unwrap_or("service")
                .to_owned(),
            namespace: ns,
            name,
            pods,
            services,
            workloads,
            policies,
        });
    }
    let mut out = std::io::stdout().lock();
    if shown.is_empty() {
        writeln!(
            out,
            "no waypoints in {}{}; declare one with `ambit waypoint apply -n <namespace>` (or an istio-waypoint Gateway in the cluster)",
            args.manifests
                .as_ref()
                .map_or_else(|| "the cluster".to_owned(), |m| m.display().to_string()),
            args.namespace
                .as_ref()
                .map(|n| format!(" (namespace {n})"))
                .unwrap_or_default()
        )?;
        return Ok(if args.name.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    if !detail {
        writeln!(
            out,
            "{:<12} {:<16} {:<9} {:<6} {:<9} WORKLOADS",
            "NAMESPACE", "NAME", "FOR", "READY", "SERVICES"
        )?;
        for w in &shown {
            let ready = w.pods.iter().filter(|p| p.1).count();
            writeln!(
                out,
                "{:<12} {:<16} {:<9} {:<6} {:<9} {}",
                w.namespace,
                w.name,
                w.takes,
                format!("{ready}/{}", w.pods.len()),
                w.services.len(),
                w.workloads.len()
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    for w in &shown {
        writeln!(out, "waypoint {}/{}", w.namespace, w.name)?;
        writeln!(
            out,
            "  identity:  spiffe://{}/ns/{}/sa/{}",
            options.trust_domain, w.namespace, w.name
        )?;
        writeln!(out, "  takes:     {} traffic", w.takes)?;
        if w.pods.is_empty() {
            writeln!(
                out,
                "  pods:      none: traffic bound to it is refused until a ready pod runs it"
            )?;
        }
        for (pod, ready, ips) in &w.pods {
            writeln!(
                out,
                "  pod:       {pod} {} {}",
                if *ready { "ready" } else { "NOT READY" },
                ips
            )?;
        }
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        writeln!(out, "  services:  {}", list(&w.services))?;
        writeln!(out, "  workloads: {}", list(&w.workloads))?;
        writeln!(out, "  policies:  {}", list(&w.policies))?;
        if w.routes.is_empty() {
            writeln!(out, "  routes:    none")?;
        }
        for (route, findings) in &w.routes {
            writeln!(out, "  route:     {route}")?;
            for f in findings {
                writeln!(out, "             ! {f}")?;
            }
        }
        for (policy, findings) in &w.traffic {
            writeln!(out, "  traffic:   {policy}")?;
            for f in findings {
                writeln!(out, "             ! {f}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The routes the control plane would send waypoint `key` (`<ns>/<name>`), with their
/// warnings.
fn routes_of(
    translator: &ambit_control::xds::translate::Translator,
    key: &str,
) -> Vec<(String, Vec<String>)> {
    use ambit_control::xds::translate::routes::{GRPC_NAME_PREFIX, VS_NAME_PREFIX};
    use ambit_control::xds::translate::{
        GRPC_ROUTE_WARNING_PREFIX, ROUTE_WARNING_PREFIX, ResourceType, VS_WARNING_PREFIX,
    };
    use ambit_proto::prost::Message;
    listed_for(translator, ResourceType::WaypointRoute, key, |body| {
        let r = ambit_proto::waypoint::Route::decode(body).ok()?;
        let (prefix, name) = if let Some(n) = r.name.strip_prefix(GRPC_NAME_PREFIX) {
            (GRPC_ROUTE_WARNING_PREFIX, n)
        } else if let Some(n) = r.name.strip_prefix(VS_NAME_PREFIX) {
            (VS_WARNING_PREFIX, n)
        } else {
            (ROUTE_WARNING_PREFIX, r.name.as_str())
        };
        Some((
            r.waypoints.clone(),
            format!("{prefix}{}/{name}", r.namespace),
        ))
    })
}

/// The traffic policies the control plane would send waypoint `key`, with their
/// warnings.
fn traffic_of(
    translator: &ambit_control::xds::translate::Translator,
    key: &str,
) -> Vec<(String, Vec<String>)> {
    use ambit_control::xds::translate::traffic::{RA_NAME_PREFIX, RL_NAME_PREFIX};
    use ambit_control::xds::translate::{
        DR_WARNING_PREFIX, RA_WARNING_PREFIX, RL_WARNING_PREFIX, ResourceType,
    };
    use ambit_proto::prost::Message;
    listed_for(translator, ResourceType::WaypointTraffic, key, |body| {
        let t = ambit_proto::waypoint::TrafficPolicy::decode(body).ok()?;
        let name = t.name.split_once(':').map_or(t.name.as_str(), |(_, n)| n);
        let prefix = if t.name.starts_with(RL_NAME_PREFIX) {
            RL_WARNING_PREFIX
        } else if t.name.starts_with(RA_NAME_PREFIX) {
            RA_WARNING_PREFIX
        } else {
            DR_WARNING_PREFIX
        };
        Some((
            t.waypoints.clone(),
            format!("{prefix}{}/{name}", t.namespace),
        ))
    })
}

/// The resources of type `t` that list waypoint `key`, each by its warnings' label
/// (`read` gives a resource's waypoints and label), with those warnings.
fn listed_for(
    translator: &ambit_control::xds::translate::Translator,
    t: ambit_control::xds::translate::ResourceType,
    key: &str,
    read: impl Fn(&[u8]) -> Option<(Vec<String>, String)>,
) -> Vec<(String, Vec<String>)> {
    translator
        .resources(t)
        .values()
        .filter_map(|enc| read(&enc.body))
        .filter(|(waypoints, _)| waypoints.iter().any(|w| w == key))
        .map(|(_, label)| {
            let findings = translator
                .warnings()
                .get(&label)
                .cloned()
                .unwrap_or_default();
            (label, findings)
        })
        .collect()
}
