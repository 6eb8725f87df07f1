//! `ambit dashboard`: finds the control plane's mesh console and prints its address (and
//! opens it in a browser with --open). With --kubernetes it forwards a local port to the
//! console of the control plane's pod, as `kubectl port-forward` would, and keeps
//! forwarding until interrupted.

// Its output is the address, for the user.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// The console's address (the control plane's --console-addr).
    #[arg(long, default_value = "127.0.0.1:15080", value_parser = crate::addr::socket_addr)]
    addr: SocketAddr,
    /// Open the console in the default browser (`xdg-open`).
    #[arg(long)]
    open: bool,
    /// Reach the console of the control plane running in a cluster, through a local port
    /// forwarded to its pod (the kubeconfig as kubectl finds it).
    #[arg(long)]
    kubernetes: bool,
    /// The namespace of the control plane (with --kubernetes).
    #[arg(long, default_value = "istio-system")]
    namespace: String,
    /// Path of a kubeconfig (with --kubernetes).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
}

pub fn run(args: DashboardArgs) -> Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if args.kubernetes {
            forward(&args).await?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        check(args.addr).await?;
        let url = format!("http://{}/", args.addr);
        println!("The mesh console: {url}");
        if args.open {
            open(&url);
        }
        Ok(std::process::ExitCode::SUCCESS)
    })
}

/// Whether the console answers at `addr`, with what to do when it does not.
async fn check(addr: SocketAddr) -> Result<()> {
    match tokio::time::timeout(Duration::from_secs(3), ambit_admin::get(addr, "/api/graph")).await {
        Ok(Ok((status, _))) if status.is_success() => Ok(()),
        Ok(Ok((status, body))) if status == http::StatusCode::UNAUTHORIZED => {
            println!(
                "The console at http://{addr}/ asks for its token: open http://{addr}/login?token=<token> once in the browser."
            );
            let _ = body;
            Ok(())
        }
        Ok(Ok((status, body))) => bail!("the console at {addr} answered {status}: {}", body.trim()),
        Ok(Err(e)) => bail!(
            "no console at {addr} ({e}): is `ambit control` running, with --console-addr {addr}? (`ambit demo` starts one)"
        ),
        Err(_) => bail!("the console at {addr} did not answer within 3 s"),
    }
}

fn open(url: &str) {
    match std::process::Command::new("xdg-open").arg(url).spawn() {
        Ok(_) => {}
        Err(e) => eprintln!("could not open a browser ({e}); open {url} yourself"),
    }
}

/// Forwards a local port to the console of a control plane pod until Ctrl-C.
async fn forward(args: &DashboardArgs) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};
    let (client, url) = ambit_kube::client(args.kubeconfig.as_deref()).await?;
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=ambit-control"))
        .await
        .with_context(|| {
            format!(
                "listing the control plane's pods in {} at {url}",
                args.namespace
            )
        })?;
    let Some(name) = list
        .items
        .iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name.clone())
    else {
        bail!(
            "no running control plane pod in {} (label app.kubernetes.io/component=ambit-control); is Ambit installed (`ambit check`)?",
            args.namespace
        );
    };
    let port = args.addr.port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding a local port")?;
    let local = listener.local_addr()?;
    println!(
        "The mesh console of {}/{name}: http://{local}/ (forwarded to its port {port}; Ctrl-C stops)",
        args.namespace
    );
    if args.open {
        open(&format!("http://{local}/"));
    }
    loop {
        let (mut conn, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let pods = pods.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut forwarder = match pods.portforward(&name, &[port]).await {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("port forward to {name}: {e}");
                    return;
                }
            };
            let Some(mut upstream) = forwarder.take_stream(port) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
        });
    }
}
