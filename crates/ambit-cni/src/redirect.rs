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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

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
    #[error("{command} did not finish within {timeout:?} and was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("the helper thread failed")]
    Thread,
    #[error("reading the pod's sockets: {0}")]
    Proc(String),
}

/// The table's chains. Declaring them is idempotent; they are never deleted while a pod
/// may have redirected connections, because deleting a NAT chain makes the kernel drop
/// the NAT state of every connection it redirected (they would be reset).
fn chains() -> String {
    format!(
        "table inet {TABLE} {{
    chain prerouting_mangle {{ type filter hook prerouting priority mangle; policy accept; }}
    chain output_route {{ type route hook output priority mangle; policy accept; }}
    chain prerouting_nat {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain output_nat {{ type nat hook output priority -100; policy accept; }}
}}
flush chain inet {TABLE} prerouting_mangle
flush chain inet {TABLE} output_route
flush chain inet {TABLE} prerouting_nat
flush chain inet {TABLE} output_nat
"
    )
}

/// Replies of the proxy's transparent connections to the application go back to the
/// proxy: needed while any such connection is open.
fn reply_rules() -> String {
    format!(
        "add rule inet {TABLE} prerouting_mangle meta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} ct mark set {CONNECTION_MARK:#x}
add rule inet {TABLE} output_route ct mark & {MARK_MASK:#x} == {CONNECTION_MARK:#x} meta mark set {CONNECTION_MARK:#x}
"
    )
}

/// Only a connection's opening SYN is redirected. Connections open before enrollment are
/// untracked until the rules arrive; conntrack then picks them up mid-stream, and
/// redirecting that first mid-stream packet would send it to a proxy port that never
/// saw the connection (a reset). They keep going straight instead.
fn redirect_rules() -> String {
    format!(
        "add rule inet {TABLE} prerouting_nat meta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} return
add rule inet {TABLE} prerouting_nat ip daddr 127.0.0.0/8 return
add rule inet {TABLE} prerouting_nat ip6 daddr ::1 return
add rule inet {TABLE} prerouting_nat tcp dport {HBONE_PORT} return
add rule inet {TABLE} prerouting_nat tcp flags & (syn | ack) == syn redirect to :{INBOUND_PLAINTEXT_PORT}
add rule inet {TABLE} output_nat meta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} return
add rule inet {TABLE} output_nat oifname \"lo\" return
add rule inet {TABLE} output_nat tcp flags & (syn | ack) == syn redirect to :{OUTBOUND_PORT}
"
    )
}

/// The enrolled pod's ruleset, as one atomic `nft -f` transaction: Ambit's chains are
/// created if missing and their rules replaced. Nothing outside the table is touched.
pub fn ruleset() -> String {
    format!("{}{}{}", chains(), reply_rules(), redirect_rules())
}

/// An un-enrolled pod's ruleset while connections the proxy handled may still be open:
/// nothing is redirected any more, but the NAT chains stay (empty) so connections
/// redirected earlier keep their translation, and replies still reach the proxy.
pub fn draining_ruleset() -> String {
    format!("{}{}", chains(), reply_rules())
}

/// The table rebuilt from nothing, for when it has drifted in ways the in-place update
/// cannot repair (a chain changed or added). Connections redirected earlier are reset.
pub fn replacement_ruleset() -> String {
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}{}{}",
        chains(),
        reply_rules(),
        redirect_rules()
    )
}

/// Removes Ambit's table (and nothing else) in one transaction.
pub fn removal() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// How a pod's rules are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Traffic is redirected to the node proxy.
    Enrolled,
    /// Nothing is redirected; connections the proxy handled keep working.
    Draining,
}

/// Runs the tools that change a pod's network namespace. The programs can be replaced
/// (a wrapper, or a fault-injecting one in tests).
#[derive(Debug, Clone)]
pub struct Redirector {
    pub nft: PathBuf,
    pub ip: PathBuf,
    /// How long one `nft` or `ip` run may take before it is killed and reported.
    pub timeout: Duration,
}

impl Default for Redirector {
    fn default() -> Self {
        Self {
            nft: PathBuf::from("nft"),
            ip: PathBuf::from("ip"),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Redirector {
    /// Applies `mode`'s rules in the namespace `netns` (an open namespace file:
    /// `/run/netns/<name>`, `/proc/<pid>/ns/net`). Either all of it is in place
    /// afterwards, or an error is returned and the namespace holds what it held before
    /// or, if the policy-routing step failed, no Ambit rules at all.
    pub fn apply(&self, netns: &File, mode: Mode) -> Result<(), RedirectError> {
        in_netns(netns, || {
            let script = match mode {
                Mode::Enrolled => ruleset(),
                Mode::Draining => draining_ruleset(),
            };
            if let Err(e) = self.nft(&script) {
                // A chain changed under us cannot be redeclared in place.
                if mode == Mode::Enrolled {
                    self.nft(&replacement_ruleset()).map_err(|_| e)?;
                } else {
                    return Err(e);
                }
            }
            if let Err(e) = self.policy_routing() {
                let _ = self.clear();
                return Err(e);
            }
            Ok(())
        })
    }

    /// Rebuilds the table from nothing (drift repair when the in-place update does not
    /// restore it).
    pub fn replace(&self, netns: &File) -> Result<(), RedirectError> {
        in_netns(netns, || {
            self.nft(&replacement_ruleset())?;
            if let Err(e) = self.policy_routing() {
                let _ = self.clear();
                return Err(e);
            }
            Ok(())
        })
    }

    fn policy_routing(&self) -> Result<(), RedirectError> {
        // Replaced rather than duplicated.
        let mark = format!("{CONNECTION_MARK:#x}/{MARK_MASK:#x}");
        let pref = RULE_PRIORITY.to_string();
        let table = ROUTE_TABLE.to_string();
        let wanted = format!("{pref}:\tfrom all fwmark {mark} lookup {table}");
        for family in ["-4", "-6"] {
            // A correct rule stays in place: deleting and re-adding it would leave a
            // moment in which replies of proxied connections are routed out of the pod
            // instead of back to the proxy, and the peer would reset them.
            let listed = self.ip_output(&[family, "rule", "list", "pref", &pref])?;
            let lines: Vec<&str> = listed.lines().map(str::trim_end).collect();
            if lines != [wanted.as_str()] {
                while self.ip(&[family, "rule", "del", "pref", &pref]).is_ok() {}
                self.ip(&[
                    family, "rule", "add", "fwmark", &mark, "pref", &pref, "lookup", &table,
                ])?;
            }
            let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            self.ip(&[
                family, "route", "replace", "local", any, "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), RedirectError> {
        self.nft(&removal())?;
        let pref = RULE_PRIORITY.to_string();
        let table = ROUTE_TABLE.to_string();
        for family in ["-4", "-6"] {
            while self.ip(&[family, "rule", "del", "pref", &pref]).is_ok() {}
            let _ = self.ip(&[family, "route", "flush", "table", &table]);
        }
        Ok(())
    }

    /// Removes every Ambit rule from the namespace (nothing happens if none is there).
    pub fn remove(&self, netns: &File) -> Result<(), RedirectError> {
        in_netns(netns, || self.clear())
    }

    /// What the namespace holds of Ambit's rules, as text (the table's listing and the
    /// policy-routing rule), or `None` if the table is absent. Comparing two listings
    /// tells whether the rules drifted.
    pub fn listing(&self, netns: &File) -> Result<Option<String>, RedirectError> {
        in_netns(netns, || {
            let table = run(
                &self.nft,
                &["list", "table", "inet", TABLE],
                None,
                self.timeout,
                ("nft", "nftables"),
            )?;
            if !table.status.success() {
                return Ok(None);
            }
            let mut out = String::from_utf8_lossy(&table.stdout).into_owned();
            for family in ["-4", "-6"] {
                let rules =
                    self.ip_output(&[family, "rule", "list", "pref", &RULE_PRIORITY.to_string()])?;
                out.push_str(&rules);
                let routes =
                    self.ip_output(&[family, "route", "list", "table", &ROUTE_TABLE.to_string()])?;
                out.push_str(&routes);
            }
            Ok(Some(out))
        })
    }

    fn nft(&self, script: &str) -> Result<(), RedirectError> {
        let out = run(
            &self.nft,
            &["-f", "-"],
            Some(script.as_bytes()),
            self.timeout,
            ("nft", "nftables"),
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RedirectError::Command {
                command: "nft -f -".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    fn ip(&self, args: &[&str]) -> Result<(), RedirectError> {
        self.ip_output(args).map(|_| ())
    }

    fn ip_output(&self, args: &[&str]) -> Result<String, RedirectError> {
        let out = run(&self.ip, args, None, self.timeout, ("ip", "iproute2"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RedirectError::Command {
                command: format!("ip {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

/// Runs `program` with `args`, feeding it `stdin`, and waits at most `timeout` for it to
/// exit (then it is killed and the run is an error). Output is collected while it runs.
fn run(
    program: &std::path::Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
    (name, package): (&'static str, &'static str),
) -> Result<std::process::Output, RedirectError> {
    let spawn_error = |source| RedirectError::Spawn {
        program: name,
        package,
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let collect = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as _));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The program may exit before reading everything (a parse error, a wrapper that
        // refuses); its exit status and message say why, not the broken pipe.
        if let Err(source) = pipe.write_all(input)
            && source.kind() != std::io::ErrorKind::BrokenPipe
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(spawn_error(source));
        }
    }
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(spawn_error)? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RedirectError::Timeout {
                    command: format!("{name} {}", args.join(" ")),
                    timeout,
                });
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Installs (or re-installs) the enrolled rules with the default tools.
pub fn install(netns: &File) -> Result<(), RedirectError> {
    Redirector::default().apply(netns, Mode::Enrolled)
}

/// Removes the rules with the default tools (nothing happens if they are not there).
pub fn remove(netns: &File) -> Result<(), RedirectError> {
    Redirector::default().remove(netns)
}

/// Whether the namespace currently has Ambit's table.
pub fn installed(netns: &File) -> Result<bool, RedirectError> {
    Ok(Redirector::default().listing(netns)?.is_some())
}

/// Open TCP connections in the namespace that depend on Ambit's rules: sockets of the
/// proxy's capture ports (redirected to them by NAT) and the proxy's transparent
/// connections to the application (their replies are routed by the mark). Until there
/// are none, an un-enrolled pod keeps its draining ruleset.
pub fn proxied_connections(netns: &File) -> Result<usize, RedirectError> {
    in_netns(netns, || {
        let local: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map_err(|e| RedirectError::Proc(format!("listing addresses: {e}")))?
            .filter_map(|i| i.address)
            .filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect();
        let mut n = 0;
        for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RedirectError::Proc(format!("{file}: {e}"))),
            };
            n += tcp_sockets(&text)
                .filter(|s| s.depends_on_rules(&local))
                .count();
        }
        Ok(n)
    })
}

/// One line of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's TCP state number (0x0A listening, 0x06 time-wait, 0x07 closed).
    pub state: u8,
}

impl ProcSocket {
    fn depends_on_rules(&self, local_addrs: &[IpAddr]) -> bool {
        if matches!(self.state, 0x0A | 0x06 | 0x07) {
            return false;
        }
        let port = self.local.port();
        if port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT {
            return true;
        }
        let ip = self.local.ip();
        !ip.is_unspecified() && !ip.is_loopback() && !local_addrs.contains(&ip)
    }
}

/// Parses the socket table of `/proc/net/tcp` or `/proc/net/tcp6`; lines it cannot read
/// are skipped.
pub fn tcp_sockets(text: &str) -> impl Iterator<Item = ProcSocket> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let mut cols = line.split_whitespace().skip(1);
        let local = proc_addr(cols.next()?)?;
        let remote = proc_addr(cols.next()?)?;
        let state = u8::from_str_radix(cols.next()?, 16).ok()?;
        Some(ProcSocket {
            local,
            remote,
            state,
        })
    })
}

/// `0100007F:3A99` (IPv4) or 32 hex digits `:port` (IPv6); the address is printed as
/// 32-bit words in the kernel's byte order.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_touch_only_our_table_and_keep_nat_chains() {
        let r = ruleset();
        assert!(r.starts_with("table inet ambit {"));
        assert!(
            !r.contains("delete"),
            "an in-place update never deletes chains"
        );
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("redirect to :15006"));
        assert!(r.contains("tcp dport 15008 return"));
        assert!(r.contains("0x539"));
        let d = draining_ruleset();
        assert!(!d.contains("redirect"), "{d}");
        assert!(d.contains("chain prerouting_nat") && d.contains("chain output_nat"));
        assert!(d.contains("ct mark set 0x111"));
        assert!(replacement_ruleset().starts_with("table inet ambit\ndelete table inet ambit\n"));
        assert_eq!(removal(), "table inet ambit\ndelete table inet ambit\n");
        for script in [
            ruleset(),
            draining_ruleset(),
            replacement_ruleset(),
            removal(),
        ] {
            for line in script.lines() {
                assert!(
                    !line.contains("table ") || line.contains("inet ambit"),
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn reads_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:3A99 0A0112C6:8A7C 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0A0212C6:1F90 0A0112C6:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0A0112C6:9C40 0A0212C6:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1
   4: garbage
";
        let all: Vec<ProcSocket> = tcp_sockets(v4).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].local.to_string(), "127.0.0.1:15001");
        assert_eq!(all[0].state, 0x0A);
        assert_eq!(all[1].remote.to_string(), "198.18.1.10:35452");
        // The pod is 198.18.2.10.
        let local = [IpAddr::from([198, 18, 2, 10]), IpAddr::from([127, 0, 0, 1])];
        let deps: Vec<bool> = all.iter().map(|s| s.depends_on_rules(&local)).collect();
        // listener: no; redirected outbound: yes; the app's own socket: no; the proxy's
        // transparent socket (local address is the client's): yes.
        assert_eq!(deps, [false, true, false, true]);

        let v6 = "header
   0: 00000000000000000000000001000000:3A98 00000000000000000000000000000000:0000 0A 0 0 0 0 0 0 0
";
        let s: Vec<ProcSocket> = tcp_sockets(v6).collect();
        assert_eq!(s[0].local.to_string(), "[::1]:15000");
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;

    #[test]
    fn a_tool_that_hangs_is_killed_at_the_deadline() {
        let started = std::time::Instant::now();
        let err = run(
            std::path::Path::new("sleep"),
            &["30"],
            None,
            Duration::from_millis(200),
            ("sleep", "coreutils"),
        )
        .unwrap_err();
        assert!(matches!(err, RedirectError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("sleep 30 did not finish"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn input_and_output_go_through() {
        let out = run(
            std::path::Path::new("cat"),
            &[],
            Some(b"table inet ambit"),
            Duration::from_secs(10),
            ("cat", "coreutils"),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"table inet ambit");
    }
}
