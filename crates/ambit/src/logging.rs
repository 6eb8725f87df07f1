//! Structured logs on standard error: text for people, JSON for machines.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive such
    /// as `info,ambit_control=debug`. RUST_LOG, when set, takes precedence.
    /// [default: info for servers, error for one-shot tools]
    #[arg(long, global = true, env = "AMBIT_LOG")]
    log_level: Option<String>,
    /// Log format on standard error.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "AMBIT_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

/// Starts logging; `default_level` applies when neither --log-level nor RUST_LOG is set.
pub fn init(args: &LogArgs, default_level: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f)?,
        _ => {
            let level = args.log_level.as_deref().unwrap_or(default_level);
            EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("--log-level {level:?}: {e}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}
