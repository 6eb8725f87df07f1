//! `ambit demo`: the local demo mesh, and its sample applications.

// The demo reports on standard output.
#![allow(clippy::print_stdout)]

use std::io::{IsTerminal, Write as _};
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
    #[arg(long, default_value = ambit_demo::DEFAULT_DIR)]
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
    if let Some(app) = args.app {
        return run_app(app);
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
    // Worker threads keep receiving signals while the clean-up blocks the main thread,
    // so a second Ctrl-C is never ignored.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let down = ambit_demo::down_command(&options.dir);
    let outcome = runtime.block_on(async {
        let mut stops = crate::signal::Stops::new().context("cannot catch signals")?;
        let mut demo = Box::pin(ambit_demo::run(options));
        let stop = tokio::select! {
            r = &mut demo => return anyhow::Ok(Ok(r)),
            stop = stops.next() => stop,
        };
        // Standard error may be a closed terminal by now (SIGHUP): never fail on it.
        let _ = writeln!(
            std::io::stderr(),
            "\ninterrupted ({}): removing everything the demo created (again to stop at once)",
            stop.name()
        );
        tokio::spawn(async move {
            let again = stops.next().await;
            let _ = writeln!(
                std::io::stderr(),
                "interrupted again ({}): stopping now; remove what is left with `{down}`",
                again.name()
            );
            std::process::exit(i32::from(again.exit_code()));
        });
        // Dropping the walk-through removes the cluster (processes, namespaces, folder).
        drop(demo);
        let _ = writeln!(
            std::io::stderr(),
            "removed; no process, network namespace or file of the demo is left"
        );
        Ok(Err(stop))
    })?;
    // Nothing may hold the exit back (a read of the terminal at a pause, for one).
    runtime.shutdown_background();
    match outcome {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(DemoError::Check(failures))) => {
            eprintln!(
                "error: {} step(s) did not behave as narrated:",
                failures.len()
            );
            for f in failures {
                eprintln!("  - {f}");
            }
            Ok(ExitCode::FAILURE)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(stop) => Ok(ExitCode::from(stop.exit_code())),
    }
}

/// The sample applications, each in a small single-threaded runtime.
fn run_app(app: DemoApp) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match app {
        DemoApp::ServeEcho { name, port } => {
            runtime.block_on(async {
                tokio::select! {
                    r = ambit_demo::app::serve_echo(name, port) => r,
                    _ = crate::signal::wait() => Ok(()),
                }
            })?;
        }
        DemoApp::Get { url } => {
            let echo = runtime.block_on(ambit_demo::app::get_once(&url))?;
            println!("{}", serde_json::to_string_pretty(&echo)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
