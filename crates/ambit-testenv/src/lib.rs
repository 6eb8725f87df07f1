//! Network-namespace topologies for end-to-end tests and benchmarks.
//!
//! A [`Topology`] is one isolated "fabric" namespace holding a bridge (`198.18.0.1/16`,
//! the pods' gateway) and any number of pod namespaces, each with a veth on the bridge,
//! an address in `198.18.0.0/16`, loopback up and a default route to the gateway. Pods
//! are grouped into simulated nodes only by which node proxy serves them. Nothing has a
//! route off the machine: the fabric namespace has no link to the host.
//!
//! Every name carries a random tag, so topologies of tests running at the same time do
//! not collide; everything is deleted when the topology is dropped, including while a
//! test panics. Creating one needs root and iproute2 (and nftables to enroll pods); a
//! test without them fails with a message that says so.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use ambit_hbone::socket::{Netns, SocketOptions};
use tokio::net::{TcpListener, TcpStream};

/// The pods' gateway on the fabric bridge.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Why a topology could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TestenvError {
    #[error(
        "network namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); run them as root, as CI does"
    )]
    NotRoot,
    #[error(
        "cannot run `{0}`: {1} (install iproute2 and nftables: apt-get install -y iproute2 nftables)"
    )]
    Spawn(String, std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{0}")]
    Redirect(#[from] ambit_cni::redirect::RedirectError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A pod: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The namespace's name (under /run/netns).
    pub netns_name: String,
    pub ip: Ipv4Addr,
    /// The simulated node it belongs to.
    pub node: String,
    pub netns: Netns,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns_name))
    }

    fn inside(&self) -> SocketOptions {
        SocketOptions {
            netns: Some(self.netns.clone()),
            ..SocketOptions::default()
        }
    }

    /// A listener inside the pod, as an application there would open it.
    pub fn listen(&self, port: u16) -> std::io::Result<TcpListener> {
        self.listen_on(SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// A listener inside the pod on a given address (`[::]:port` for IPv6).
    pub fn listen_on(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        ambit_hbone::socket::listen(addr, &self.inside(), 1024)
    }

    /// A connection from inside the pod, as an application there would make it (so it
    /// goes through the pod's redirection rules when the pod is enrolled).
    pub async fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        ambit_hbone::socket::connect(to, &self.inside()).await
    }

    /// `ss -tnH` inside the pod: established TCP connections as (local, peer).
    pub fn tcp_connections(&self) -> Result<Vec<(SocketAddr, SocketAddr)>, TestenvError> {
        self.ss("established")
    }

    /// `ss -tlnH` inside the pod: the addresses TCP listeners are bound to.
    pub fn tcp_listeners(&self) -> Result<Vec<SocketAddr>, TestenvError> {
        Ok(self.ss("listening")?.into_iter().map(|(l, _)| l).collect())
    }

    fn ss(&self, state: &str) -> Result<Vec<(SocketAddr, SocketAddr)>, TestenvError> {
        let out = run_output(&[
            "ip",
            "netns",
            "exec",
            &self.netns_name,
            "ss",
            "-tnH",
            "state",
            state,
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                let n = cols.len();
                if n < 2 {
                    return None;
                }
                // Listeners show their peer as `0.0.0.0:*` or `[::]:*`.
                let peer = cols[n - 1].replace('*', "0");
                Some((cols[n - 2].parse().ok()?, peer.parse().ok()?))
            })
            .collect())
    }
}

/// A set of pods on one bridge, deleted on drop (unless [`Topology::keep`] is called).
#[derive(Debug)]
pub struct Topology {
    tag: String,
    fabric: String,
    pods: Vec<Pod>,
    next: u32,
    keep: bool,
}

impl Topology {
    /// A topology with random names (`ambit-<tag>-fab`, `ambit-<tag>-p<n>`), so tests
    /// running at the same time do not collide.
    pub fn new() -> Result<Self, TestenvError> {
        let tag = format!("{:06x}", fastrand::u32(..) & 0xff_ffff);
        Self::build(tag.clone(), format!("ambit-{tag}-fab"))
    }

    /// A topology with a fixed fabric name (the demo's), whose pods are named by
    /// [`Topology::named_pod`]. `tag` (at most 6 characters) names the host-side links.
    pub fn named(fabric: &str, tag: &str) -> Result<Self, TestenvError> {
        Self::build(tag.chars().take(6).collect(), fabric.to_owned())
    }

    fn build(tag: String, fabric: String) -> Result<Self, TestenvError> {
        require_root()?;
        let topo = Topology {
            tag,
            fabric: fabric.clone(),
            pods: Vec::new(),
            next: 0,
            keep: false,
        };
        run(&["ip", "netns", "add", &fabric])?;
        run(&["ip", "-n", &fabric, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{GATEWAY}/16"),
            "dev",
            "br0",
        ])?;
        run(&["ip", "-n", &fabric, "link", "set", "br0", "up"])?;
        Ok(topo)
    }

    /// Adds a pod with address `ip` (in 198.18.0.0/16) on simulated node `node`.
    pub fn pod(&mut self, node: &str, ip: Ipv4Addr) -> Result<Pod, TestenvError> {
        let name = format!("ambit-{}-p{}", self.tag, self.next);
        self.named_pod(&name, node, ip)
    }

    /// Adds a pod whose network namespace is `/run/netns/<netns_name>`.
    pub fn named_pod(
        &mut self,
        netns_name: &str,
        node: &str,
        ip: Ipv4Addr,
    ) -> Result<Pod, TestenvError> {
        let [a, b, ..] = ip.octets();
        if (a, b) != (198, 18) || ip == GATEWAY {
            return Err(TestenvError::Command {
                command: format!("pod {ip}"),
                stderr: "test pods take addresses in 198.18.0.0/16 (not the gateway)".into(),
            });
        }
        let n = self.next;
        self.next += 1;
        let name = netns_name.to_owned();
        // Interface names have at most 15 characters.
        let outer = format!("va{}{n}", self.tag);
        run(&["ip", "netns", "add", &name])?;
        let pod = Pod {
            netns: Netns::open(format!("/run/netns/{name}"))?,
            netns_name: name.clone(),
            ip,
            node: node.to_owned(),
        };
        self.pods.push(pod.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "link",
            "add",
            &outer,
            "netns",
            &self.fabric,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &name,
        ])?;
        run(&[
            "ip",
            "-n",
            &self.fabric,
            "link",
            "set",
            &outer,
            "master",
            "br0",
            "up",
        ])?;
        run(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
        run(&[
            "ip",
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &GATEWAY.to_string(),
        ])?;
        Ok(pod)
    }

    /// Gives the pod an IPv6 address too (dual stack), on the fabric's one link; pods'
    /// IPv6 addresses share one /64 and reach each other across the bridge directly.
    /// Test addresses are in 2001:2::/64, inside 2001:2::/48, the IPv6 benchmarking range
    /// (as 198.18.0.0/15 is for IPv4); nothing routes them off the machine.
    pub fn add_ipv6(&self, pod: &Pod, ip: std::net::Ipv6Addr) -> Result<(), TestenvError> {
        let [a, b, c, d, ..] = ip.segments();
        if (a, b, c, d) != (0x2001, 0x2, 0, 0) {
            return Err(TestenvError::Command {
                command: format!("pod {ip}"),
                stderr: "test pods take IPv6 addresses in 2001:2::/64".into(),
            });
        }
        run(&[
            "ip",
            "-n",
            &pod.netns_name,
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
    }

    /// Installs the redirection rules in the pod (what the node agent does on enrollment).
    pub fn enroll(&self, pod: &Pod) -> Result<(), TestenvError> {
        ambit_cni::redirect::install(&File::open(pod.netns_path())?)?;
        Ok(())
    }

    /// Removes the pod's redirection rules.
    pub fn unenroll(&self, pod: &Pod) -> Result<(), TestenvError> {
        ambit_cni::redirect::remove(&File::open(pod.netns_path())?)?;
        Ok(())
    }

    /// The fabric namespace's name (for captures on `br0`).
    pub fn fabric(&self) -> &str {
        &self.fabric
    }

    /// Starts capturing every TCP packet on the fabric's links, that is every packet
    /// between pods. (A capture on the bridge device itself would only see what is
    /// addressed to the bridge, not what it forwards between pods.)
    pub fn capture(&self) -> Result<capture::Capture, TestenvError> {
        capture::Capture::start(&self.fabric, "any")
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
}

impl Topology {
    /// Leaves everything in place when dropped (the demo's `--keep`); [`delete`] removes
    /// it later by name.
    pub fn keep(mut self) -> Vec<String> {
        self.keep = true;
        self.names()
    }

    /// Every namespace this topology made.
    pub fn names(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|p| p.netns_name.clone())
            .chain([self.fabric.clone()])
            .collect()
    }
}

/// Deletes network namespaces by name (those that exist).
pub fn delete(names: &[String]) {
    for name in names {
        if std::path::Path::new("/run/netns").join(name).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.keep {
            delete(&self.names());
        }
    }
}

fn require_root() -> Result<(), TestenvError> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        });
    if uid.as_deref() == Some("0") {
        Ok(())
    } else {
        Err(TestenvError::NotRoot)
    }
}

fn run(args: &[&str]) -> Result<(), TestenvError> {
    run_output(args).map(|_| ())
}

fn run_output(args: &[&str]) -> Result<String, TestenvError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| TestenvError::Spawn(args.join(" "), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestenvError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

pub mod capture;

#[cfg(test)]
mod tests;

/// Starts (or finds running) the project's test Kubernetes API server and etcd with
/// `tests/k8s/apiserver.sh` (which builds them from Debian's sources the first time) and
/// returns its kubeconfig. Panics with what is needed when it cannot.
pub fn kube_apiserver() -> PathBuf {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/k8s/apiserver.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("start")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "this test needs a Kubernetes API server, which {} builds from Debian's sources and starts (as root, with apt-get access to Debian's archive); it failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
