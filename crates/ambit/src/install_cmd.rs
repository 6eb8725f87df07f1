//! `ambit install`, `ambit uninstall`, `ambit check`: Ambit on a Kubernetes cluster.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ambit_kube::install::{self, CaFiles, InstallOptions};
use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The kubeconfig to reach the cluster with [default: KUBECONFIG, ~/.kube/config, or
    /// the pod's service account].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The namespace Ambit is installed in.
    #[arg(long, short = 'n', default_value = "istio-system")]
    namespace: String,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print what would be applied instead of applying it (needs no cluster; with one
    /// reachable, its existing mesh CA is reused).
    #[arg(long)]
    dry_run: bool,
    /// Output format of --dry-run.
    #[arg(long, short = 'o', value_parser = ["yaml"], default_value = "yaml")]
    output: String,
    /// A setting, KEY=VALUE (repeatable): image, controlPlane.replicas, trustDomain, logLevel.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write the Helm chart of this version (the same objects, as templates) to DIR
    /// instead of installing.
    #[arg(long, value_name = "DIR", conflicts_with = "dry_run")]
    write_chart: Option<PathBuf>,
    /// Write a new mesh root (root-cert.pem, root-key.pem, mode 0600) to DIR instead of
    /// installing: the CA values the Helm chart needs.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["dry_run", "write_chart"])]
    write_ca: Option<PathBuf>,
    /// How long to wait for the control plane and node proxies to be ready (0: do not wait).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    wait: Duration,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Also delete Istio's CRDs (those Ambit installed), and with them every policy
    /// written with them.
    #[arg(long)]
    crds: bool,
    /// Also delete the mesh CA (Secret ambit-ca): a later install makes a new root, and
    /// certificates chained to the old one stop being trusted.
    #[arg(long)]
    purge: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Check whether an install can proceed (API server, clock, permissions) instead of
    /// the installed mesh.
    #[arg(long)]
    pre: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 0s, 90s, 5m)"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn options(args: &InstallArgs) -> anyhow::Result<InstallOptions> {
    let mut o = InstallOptions {
        namespace: args.cluster.namespace.clone(),
        ..InstallOptions::default()
    };
    for s in &args.set {
        o.set(s).map_err(anyhow::Error::msg)?;
    }
    Ok(o)
}

/// A new self-signed mesh root, made with the control plane's own CA code.
fn new_ca(trust_domain: &str) -> anyhow::Result<CaFiles> {
    let dir = tempfile::tempdir().context("a temporary folder for the new CA")?;
    ambit_tls::ca::CertificateAuthority::load_or_create(
        dir.path(),
        ambit_tls::ca::CaOptions {
            trust_domain: trust_domain.to_owned(),
            default_ttl: Duration::from_secs(86_400),
            max_ttl: Duration::from_secs(86_400),
        },
    )
    .map_err(|e| anyhow::anyhow!("creating the mesh CA: {e}"))?;
    Ok(CaFiles {
        root_cert: std::fs::read_to_string(dir.path().join(ambit_tls::ca::ROOT_CERT_FILE))?,
        root_key: std::fs::read_to_string(dir.path().join(ambit_tls::ca::ROOT_KEY_FILE))?,
    })
}

pub fn install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let o = options(&args)?;
    if let Some(dir) = &args.write_chart {
        for (path, text) in ambit_kube::chart::chart(env!("CARGO_PKG_VERSION")) {
            let target = dir.join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&target, text)
                .with_context(|| format!("writing {}", target.display()))?;
        }
        eprintln!(
            "wrote the Helm chart to {}; install it with a mesh root of your own:\n  ambit install --write-ca ./ambit-ca\n  helm install ambit {} -n istio-system --create-namespace --set-file ca.rootCert=./ambit-ca/root-cert.pem --set-file ca.rootKey=./ambit-ca/root-key.pem",
            dir.display(),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(dir) = &args.write_ca {
        let ca = new_ca(&o.trust_domain)?;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in [
            ("root-cert.pem", &ca.root_cert),
            ("root-key.pem", &ca.root_key),
        ] {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| {
                    format!(
                        "writing {} (an existing file is never overwritten)",
                        path.display()
                    )
                })?;
        }
        eprintln!(
            "wrote a new mesh root to {}; keep root-key.pem secret",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    runtime()?.block_on(async move {
        let client = ambit_kube::client(args.cluster.kubeconfig.as_deref()).await;
        // Reuse the installed CA: replacing it would orphan every workload certificate.
        let existing = match &client {
            Ok((c, _)) => install::existing_ca(c, &o.namespace).await.ok().flatten(),
            Err(_) => None,
        };
        let reused = existing.is_some();
        let ca = match existing {
            Some(ca) => ca,
            None => new_ca(&o.trust_domain)?,
        };
        let objects = install::render(&o, &ca);
        if args.dry_run {
            let mut out = std::io::stdout().lock();
            out.write_all(install::to_yaml(&objects).as_bytes())?;
            return Ok(ExitCode::SUCCESS);
        }
        let (client, url) = client?;
        eprintln!(
            "installing Ambit in namespace {} of {url} ({}){}",
            o.namespace,
            install::summary(&objects),
            if reused { "; keeping the installed mesh CA" } else { "" }
        );
        install::apply(&client, &objects, |line| eprintln!("  {line}")).await?;
        if args.wait.is_zero() {
            eprintln!("applied; not waiting for readiness (check with `ambit check`)");
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "waiting up to {} for the control plane, node proxies and node agents",
            humantime::format_duration(args.wait)
        );
        let started = Instant::now();
        loop {
            let checks = install::run_checks(&client, &o.namespace, false).await;
            let pending: Vec<&install::Check> = checks
                .iter()
                .filter(|c| {
                    !c.ok
                        && (c.name == "control plane ready"
                            || c.name.starts_with("a node proxy")
                            || c.name.starts_with("a node agent"))
                })
                .collect();
            if pending.is_empty() {
                eprintln!(
                    "Ambit is installed and ready. Next: label a namespace `istio.io/dataplane-mode=ambient`, and run `ambit check`."
                );
                return Ok(ExitCode::SUCCESS);
            }
            if started.elapsed() >= args.wait {
                for c in pending {
                    eprintln!("  not ready: {}: {} ({})", c.name, c.detail, c.hint);
                }
                eprintln!("installed, but not ready after {}", humantime::format_duration(args.wait));
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

pub fn uninstall(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let (client, url) = ambit_kube::client(args.cluster.kubeconfig.as_deref()).await?;
        let o = InstallOptions {
            namespace: args.cluster.namespace.clone(),
            ..InstallOptions::default()
        };
        let placeholder = CaFiles {
            root_cert: String::new(),
            root_key: String::new(),
        };
        let objects = install::render(&o, &placeholder);
        eprintln!("removing Ambit from namespace {} of {url}", o.namespace);
        install::uninstall(&client, &objects, args.crds, args.purge, |line| {
            eprintln!("  {line}")
        })
        .await?;
        eprintln!(
            "kept namespace {} (it may hold more than Ambit)",
            o.namespace
        );
        if !args.purge {
            eprintln!(
                "kept the mesh CA (Secret {}/{}; --purge removes it)",
                o.namespace,
                install::CA_SECRET
            );
        }
        if !args.crds {
            eprintln!("kept Istio's CRDs and the policies written with them (--crds removes them)");
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let (client, _) = ambit_kube::client(args.cluster.kubeconfig.as_deref()).await?;
        let checks = install::run_checks(&client, &args.cluster.namespace, args.pre).await;
        let mut out = std::io::stdout().lock();
        let color = std::io::IsTerminal::is_terminal(&std::io::stdout());
        for c in &checks {
            let mark = match (c.ok, color) {
                (true, true) => "\x1b[32m✔\x1b[0m",
                (false, true) => "\x1b[31m✘\x1b[0m",
                (true, false) => "ok  ",
                (false, false) => "FAIL",
            };
            writeln!(out, "{mark} {}: {}", c.name, c.detail)?;
            if !c.ok {
                writeln!(out, "     fix: {}", c.hint)?;
            }
        }
        let failed = checks.iter().filter(|c| !c.ok).count();
        writeln!(out, "{} checks, {failed} failed", checks.len())?;
        Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}
