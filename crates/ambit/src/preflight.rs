//! Checks made before a command that changes the machine starts, so it fails at once
//! with what to do rather than half-way.

use std::path::Path;
use std::process::{Command, Stdio};

/// Fails unless running as root.
pub fn require_root(why: &str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        anyhow::bail!("{why}, which needs root: run it with sudo (or as root)")
    }
}

/// Fails unless each program runs (`<program> --version` or `-V`).
pub fn require_tools(tools: &[(&Path, &str)]) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (program, package) in tools {
        let ok = ["--version", "-V"].iter().any(|flag| {
            Command::new(program)
                .arg(flag)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !ok {
            missing.push((program.display().to_string(), *package));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(p, pkg)| format!("{p} (package {pkg})"))
        .collect();
    let mut packages: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
    packages.sort_unstable();
    packages.dedup();
    anyhow::bail!(
        "missing {}; install with: apt-get install -y {}",
        names.join(", "),
        packages.join(" ")
    )
}
