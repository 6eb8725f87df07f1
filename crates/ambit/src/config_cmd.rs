//! `ambit config`: what a node proxy knows, read from its admin port (like
//! `istioctl ztunnel-config`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    what: What,
    /// The node whose proxy to ask (found through its announcement in --run-dir).
    #[arg(long, global = true)]
    node: Option<String>,
    /// The admin address to ask, when not using --node.
    #[arg(long, global = true, default_value = "127.0.0.1:15000", value_parser = crate::addr::socket_addr)]
    admin: SocketAddr,
    #[arg(
        long,
        global = true,
        env = "AMBIT_RUN_DIR",
        default_value = "/run/ambit"
    )]
    run_dir: PathBuf,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Ask the node proxy of a cluster's node (--node) through the API server, like
    /// `kubectl port-forward` to its admin port; with KUBECONFIG, ~/.kube/config or the
    /// pod's service account.
    #[arg(long, global = true)]
    kubernetes: bool,
    /// The kubeconfig for --kubernetes (implies it).
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the namespace Ambit is installed in.
    #[arg(long, short = 'n', global = true, default_value = "istio-system")]
    namespace: String,
    /// With --kubernetes: the node proxy's admin port inside its pod.
    #[arg(long, global = true, default_value_t = 15000)]
    admin_port: u16,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum What {
    /// Workloads (pods) the node proxy knows.
    Workloads,
    /// Services and their endpoints.
    Services,
    /// L4 authorization policies.
    Policies,
    /// Workload certificates the node proxy holds.
    Certificates,
    /// Everything (the whole /config_dump).
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Yaml,
}

pub fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (source, (status, body)) = if args.kubernetes || args.kubeconfig.is_some() {
        let Some(node) = args.node.clone() else {
            anyhow::bail!("name the cluster node whose proxy to ask: --node NAME");
        };
        runtime.block_on(async {
            let (client, _) = ambit_kube::client(args.kubeconfig.as_deref()).await?;
            let (pod, stream) =
                ambit_kube::cni::node_proxy_port(&client, &args.namespace, &node, args.admin_port)
                    .await
                    .map_err(anyhow::Error::msg)?;
            let source = format!("{}/{pod}:{}", args.namespace, args.admin_port);
            let answer = ambit_admin::Connection::open(stream)
                .await?
                .get("localhost", "/config_dump")
                .await
                .with_context(|| format!("cannot read the node proxy's admin port ({source})"))?;
            anyhow::Ok((source, answer))
        })?
    } else {
        let admin = local_admin(&args)?;
        let answer = runtime
            .block_on(ambit_admin::get(admin, "/config_dump"))
            .with_context(|| format!("cannot read the node proxy's admin port at {admin}"))?;
        (admin.to_string(), answer)
    };
    if !status.is_success() {
        anyhow::bail!("{source}/config_dump answered {status}: {body}");
    }
    print(&args, &body)
}

/// The admin address of a local node proxy: from its announcement, or --admin.
fn local_admin(args: &ConfigArgs) -> anyhow::Result<SocketAddr> {
    Ok(match &args.node {
        Some(node) => {
            let path = ambit_node::announcement_path(&args.run_dir, node);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "no node proxy for node {node} announced at {} (is `ambit node --node-name {node}` running with --run-dir {}?)",
                    path.display(),
                    args.run_dir.display()
                )
            })?;
            let a: ambit_node::Announcement = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a node announcement", path.display()))?;
            a.admin
        }
        None => args.admin,
    })
}

fn print(args: &ConfigArgs, body: &str) -> anyhow::Result<ExitCode> {
    let dump: Value = serde_json::from_str(body).context("the admin port sent invalid JSON")?;
    let section = match args.what {
        What::Workloads => dump["workloads"].clone(),
        What::Services => dump["services"].clone(),
        What::Policies => dump["policies"].clone(),
        What::Certificates => dump["certificates"].clone(),
        What::All => dump.clone(),
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&section)?)?,
        Format::Yaml => write!(out, "{}", serde_saphyr::to_string(&section)?)?,
        Format::Table => {
            let rows = match args.what {
                What::Workloads => workload_rows(&section),
                What::Services => service_rows(&section),
                What::Policies => policy_rows(&section),
                What::Certificates => certificate_rows(&section),
                What::All => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&section)?)?;
                    return Ok(ExitCode::SUCCESS);
                }
            };
            write!(out, "{}", table(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn workload_rows(list: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec![
            "NAMESPACE",
            "NAME",
            "ADDRESS",
            "NODE",
            "PROTOCOL",
            "IDENTITY",
            "STATUS",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    for w in list.as_array().into_iter().flatten() {
        let addresses: Vec<String> = w["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        rows.push(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            addresses.join(","),
            s(&w["node"]),
            match w["tunnel"].as_str() {
                Some("Hbone") => "HBONE".into(),
                _ => "TCP".into(),
            },
            format!(
                "spiffe://{}/ns/{}/sa/{}",
                s(&w["trust_domain"]),
                s(&w["namespace"]),
                s(&w["service_account"])
            ),
            s(&w["status"]),
        ]);
    }
    rows
}

fn service_rows(list: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    for svc in list.as_array().into_iter().flatten() {
        let vips: Vec<String> = svc["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| s(&v["address"]))
            .collect();
        let ports: Vec<String> = svc["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}->{}", s(&p["service_port"]), s(&p["target_port"])))
            .collect();
        let endpoints = svc["endpoints"].as_array().map_or(0, Vec::len);
        rows.push(vec![
            s(&svc["namespace"]),
            s(&svc["name"]),
            if vips.is_empty() {
                "None".into()
            } else {
                vips.join(",")
            },
            ports.join(","),
            endpoints.to_string(),
        ]);
    }
    rows
}

fn policy_rows(list: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    for p in list.as_array().into_iter().flatten() {
        rows.push(vec![
            s(&p["namespace"]),
            s(&p["name"]),
            if let Some(why) = p["unenforced"].as_str() {
                format!("NOT ENFORCED: {why}")
            } else if let Some(why) = p["refused"].as_str() {
                format!("REFUSED (denies all): {why}")
            } else if p["dry_run"] == Value::Bool(true) {
                format!("{} (dry-run)", s(&p["action"]))
            } else {
                s(&p["action"])
            },
            s(&p["scope"]),
            p["rules"].as_array().map_or(0, Vec::len).to_string(),
        ]);
    }
    rows
}

fn certificate_rows(list: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["IDENTITY", "STATE", "SERIAL", "NOT AFTER", "LAST ERROR"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    for c in list.as_array().into_iter().flatten() {
        rows.push(vec![
            s(&c["identity"]),
            s(&c["state"]),
            s(&c["serial"]),
            s(&c["not_after"]),
            s(&c["last_error"]),
        ]);
    }
    rows
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["A".to_owned(), "BB".to_owned()],
            vec!["long".to_owned(), "x".to_owned()],
        ];
        assert_eq!(table(&rows), "A     BB\nlong  x\n");
    }

    #[test]
    fn workload_rows_read_the_dump() {
        let dump: Value = serde_json::json!([{
            "namespace": "demo", "name": "echo-1", "addresses": ["198.18.1.10"], "node": "node-a",
            "tunnel": "Hbone", "trust_domain": "cluster.local", "service_account": "echo", "status": "Healthy"
        }]);
        let rows = workload_rows(&dump);
        assert_eq!(
            rows[1],
            [
                "demo",
                "echo-1",
                "198.18.1.10",
                "node-a",
                "HBONE",
                "spiffe://cluster.local/ns/demo/sa/echo",
                "Healthy"
            ]
        );
    }
}
