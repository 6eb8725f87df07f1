//! `ambit demo`: the local demo mesh, and its sample applications.

// The demo reports on standard output.
#![allow(clippy::print_stdout)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use ambit_demo::DemoError;
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    app: Option<DemoApp>,
    /// Run every step without pausing; exit non-zero if any did not behave as narrated.
    #[arg(long)]
    check: bool,
    /// Leave the mesh running at the end and print how to reach it.
    #[arg(long, conflicts_with = "down")]
    keep: bool,
    /// Remove a mesh left running by --keep (processes, namespaces, files).
    #[arg(long)]
    down: bool,
    /// Where the demo keeps its manifests, state and logs.
    #[arg(long, default_value = "/run/ambit-demo")]
    dir: PathBuf,
}

/// The sample applications (run inside a pod's namespace: `ip netns exec demo.sleep ...`).
#[derive(Debug, Subcommand)]
enum DemoApp {
    /// The echo server: answers every HTTP request with the caller's address as its
    /// socket sees it.
    ServeEcho {
        #[arg(long, default_value = "echo")]
        name: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// The client: one GET (http://<ip>[:port]/path), the answer printed as JSON.
    Get { url: String },
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match args.app {
        Some(DemoApp::ServeEcho { name, port }) => {
            runtime.block_on(async {
                tokio::select! {
                    r = ambit_demo::app::serve_echo(name, port) => r,
                    _ = crate::signal::wait() => Ok(()),
                }
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(DemoApp::Get { url }) => {
            let echo = runtime.block_on(ambit_demo::app::get_once(&url))?;
            println!("{}", serde_json::to_string_pretty(&echo)?);
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    crate::preflight::require_root("the demo creates network namespaces and nftables rules")?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    if args.down {
        let removed = ambit_demo::down(&args.dir, &exe)?;
        if removed.is_empty() {
            println!("nothing to remove: no demo is running");
        } else {
            for r in removed {
                println!("removed {r}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    crate::preflight::require_tools(&[
        (std::path::Path::new("ip"), "iproute2"),
        (std::path::Path::new("nft"), "nftables"),
        (std::path::Path::new("ss"), "iproute2"),
    ])?;
    let options = ambit_demo::Options {
        check: args.check,
        keep: args.keep,
        interactive: std::io::stdin().is_terminal() && std::io::stdout().is_terminal(),
        dir: args.dir,
        exe,
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = ambit_demo::run(options) => Some(r),
            _ = crate::signal::wait() => None,
        }
    });
    match outcome {
        Some(Ok(())) => Ok(ExitCode::SUCCESS),
        Some(Err(DemoError::Check(failures))) => {
            eprintln!(
                "error: {} step(s) did not behave as narrated:",
                failures.len()
            );
            for f in failures {
                eprintln!("  - {f}");
            }
            Ok(ExitCode::FAILURE)
        }
        Some(Err(e)) => Err(e.into()),
        None => {
            eprintln!("\ninterrupted; everything the demo created has been removed");
            Ok(ExitCode::from(130))
        }
    }
}
