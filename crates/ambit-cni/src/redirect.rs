//! The redirection rules of an enrolled pod, installed inside its network namespace.
//!
//! - TCP leaving the pod, not from the proxy and not over loopback, is redirected to the
//!   proxy's outbound listener (15001).
//! - TCP arriving, except to the HBONE port 15008 and except from the proxy itself, is
//!   redirected to the proxy's inbound plaintext listener (15006).
//! - The proxy marks its own sockets with 0x539 (bits 0xfff); rules skip those packets.
//! - The proxy connects to the application keeping the client's address as the source.
//!   Such connections are marked 0x111 in conntrack when their first packet passes
//!   prerouting; the application's replies get the mark back in output and are routed by
//!   the policy rule `fwmark 0x111/0xfff lookup 100` to table 100, where everything is
//!   local, so they reach the proxy's transparent socket instead of leaving the pod.
//!
//! The nftables part lives in a table of Ambit's own (`inet ambit`) and is replaced
//! atomically: applying twice is the same as applying once. Nothing here touches a
//! table Ambit did not create.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use nix::sched::CloneFlags;

/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE port (not redirected: the proxy listens on it directly).
pub const HBONE_PORT: u16 = 15008;
/// The mark on the proxy's own sockets.
pub const PROXY_MARK: u32 = 0x539;
/// The mark of connections the proxy made to the application with a client's address.
pub const CONNECTION_MARK: u32 = 0x111;
/// Bits of the packet mark these marks use.
pub const MARK_MASK: u32 = 0xfff;
/// Policy routing table for the replies of those connections.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the policy routing rule.
pub const RULE_PRIORITY: u32 = 32764;
/// The nftables table Ambit owns inside a pod.
pub const TABLE: &str = "ambit";

/// Why rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot enter the pod's network namespace: {0}")]
    Setns(nix::Error),
    #[error("cannot run {program}: {source} (install {package}: apt-get install -y {package})")]
    Spawn {
        program: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("the helper thread failed")]
    Thread,
}

/// The nftables ruleset, as one atomic `nft -f` transaction that replaces Ambit's table.
pub fn ruleset() -> String {
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
    chain prerouting_mangle {{
        type filter hook prerouting priority mangle; policy accept;
        meta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} ct mark set {CONNECTION_MARK:#x}
    }}
    chain output_route {{
        type route hook output priority mangle; policy accept;
        ct mark & {MARK_MASK:#x} == {CONNECTION_MARK:#x} meta mark set {CONNECTION_MARK:#x}
    }}
    chain prerouting_nat {{
        type nat hook prerouting priority dstnat; policy accept;
        meta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} return
        ip daddr 127.0.0.0/8 return
        ip6 daddr ::1 return
        tcp dport {HBONE_PORT} return
        meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}
    }}
    chain output_nat {{
        type nat hook output priority -100; policy accept;
        meta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} return
        oifname \"lo\" return
        meta l4proto tcp redirect to :{OUTBOUND_PORT}
    }}
}}
"
    )
}

/// Removes Ambit's table (and nothing else) in one transaction.
pub fn removal() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Installs (or re-installs) the rules inside the namespace `netns` (an open namespace
/// file: `/run/netns/<name>`, `/proc/<pid>/ns/net`).
pub fn install(netns: &File) -> Result<(), RedirectError> {
    in_netns(netns, || {
        nft(&ruleset())?;
        // Policy routing, replaced rather than duplicated.
        let mark = format!("{CONNECTION_MARK:#x}/{MARK_MASK:#x}");
        let pref = RULE_PRIORITY.to_string();
        let table = ROUTE_TABLE.to_string();
        for family in ["-4", "-6"] {
            while ip(&[family, "rule", "del", "pref", &pref]).is_ok() {}
            ip(&[
                family, "rule", "add", "fwmark", &mark, "pref", &pref, "lookup", &table,
            ])?;
            let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            ip(&[
                family, "route", "replace", "local", any, "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    })
}

/// Removes the rules from the namespace (nothing happens if they are not there).
pub fn remove(netns: &File) -> Result<(), RedirectError> {
    in_netns(netns, || {
        nft(&removal())?;
        let pref = RULE_PRIORITY.to_string();
        let table = ROUTE_TABLE.to_string();
        for family in ["-4", "-6"] {
            while ip(&[family, "rule", "del", "pref", &pref]).is_ok() {}
            let _ = ip(&[family, "route", "flush", "table", &table]);
        }
        Ok(())
    })
}

/// Whether the namespace currently has Ambit's table.
pub fn installed(netns: &File) -> Result<bool, RedirectError> {
    in_netns(netns, || {
        let out = Command::new("nft")
            .args(["list", "table", "inet", TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| RedirectError::Spawn {
                program: "nft",
                package: "nftables",
                source,
            })?;
        Ok(out.success())
    })
}

/// Runs `f` on a fresh thread that has entered `netns`; processes it starts run there.
/// The thread ends with `f`, so no other work ever runs in the pod's namespace.
fn in_netns<T: Send>(
    netns: &File,
    f: impl FnOnce() -> Result<T, RedirectError> + Send,
) -> Result<T, RedirectError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(RedirectError::Setns)?;
                f()
            })
            .join()
            .map_err(|_| RedirectError::Thread)?
    })
}

fn nft(script: &str) -> Result<(), RedirectError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RedirectError::Spawn {
            program: "nft",
            package: "nftables",
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| RedirectError::Spawn {
                program: "nft",
                package: "nftables",
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RedirectError::Spawn {
            program: "nft",
            package: "nftables",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Command {
            command: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn ip(args: &[&str]) -> Result<(), RedirectError> {
    let out = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| RedirectError::Spawn {
            program: "ip",
            package: "iproute2",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_only_our_table() {
        let r = ruleset();
        assert!(r.starts_with("table inet ambit\ndelete table inet ambit\ntable inet ambit {"));
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("redirect to :15006"));
        assert!(r.contains("tcp dport 15008 return"));
        assert!(r.contains("0x539"));
        assert_eq!(removal(), "table inet ambit\ndelete table inet ambit\n");
    }
}
