//! The demo's cluster: network namespaces for pods on two simulated nodes, and the mesh's
//! processes (control plane, a node proxy and a node agent per node, the echo
//! application), each started from this same binary with its log in a file.
//!
//! Everything created is recorded in `<dir>/demo.json`, so `ambit demo --down` can
//! remove a cluster left running with `--keep`; without `--keep` it is removed when the
//! demo ends, fails or is interrupted.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_testenv::Topology;
use serde::{Deserialize, Serialize};

use crate::DemoError;

/// The fabric namespace (the "network" between the nodes).
pub const FABRIC: &str = "ambit-demo";

/// A demo pod.
#[derive(Debug, Clone, Copy)]
pub struct PodDef {
    pub name: &'static str,
    pub service_account: &'static str,
    pub app: &'static str,
    pub node: &'static str,
    pub ip: Ipv4Addr,
}

impl PodDef {
    /// `/run/netns/<namespace>.<name>`: the convention the node agent follows.
    pub fn netns(&self) -> String {
        format!("{NAMESPACE}.{}", self.name)
    }
}

/// The Kubernetes namespace of every demo pod.
pub const NAMESPACE: &str = "demo";

pub const SLEEP: PodDef = PodDef {
    name: "sleep",
    service_account: "sleep",
    app: "sleep",
    node: "node-a",
    ip: Ipv4Addr::new(198, 18, 1, 10),
};
pub const OTHER: PodDef = PodDef {
    name: "other",
    service_account: "other",
    app: "other",
    node: "node-a",
    ip: Ipv4Addr::new(198, 18, 1, 11),
};
pub const ECHO: PodDef = PodDef {
    name: "echo-1",
    service_account: "echo",
    app: "echo",
    node: "node-b",
    ip: Ipv4Addr::new(198, 18, 2, 10),
};
/// The pod that runs the demo's waypoint (not an application: it is never enrolled).
pub const WAYPOINT: PodDef = PodDef {
    name: "waypoint",
    service_account: "waypoint",
    app: "waypoint",
    node: "node-a",
    ip: Ipv4Addr::new(198, 18, 1, 12),
};
/// The application pods.
pub const PODS: [PodDef; 3] = [SLEEP, OTHER, ECHO];
/// Every pod's network namespace the demo makes.
pub const ALL_PODS: [PodDef; 4] = [SLEEP, OTHER, ECHO, WAYPOINT];
/// The waypoint's ports inside its pod: metrics, readiness.
pub const WAYPOINT_METRICS: u16 = 15020;
pub const WAYPOINT_READINESS: u16 = 15021;
pub const NODES: [&str; 2] = ["node-a", "node-b"];
pub const ECHO_PORT: u16 = 8080;
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

/// Fixed local ports (all on 127.0.0.1), away from the defaults of a real install.
pub const CONTROL_GRPC: u16 = 25012;
pub const CONTROL_MONITORING: u16 = 25014;
/// The mesh console.
pub const CONTROL_CONSOLE: u16 = 25080;

/// A node's ports: admin, metrics, readiness, agent admin.
pub fn node_ports(node: &str) -> (u16, u16, u16, u16) {
    if node == "node-a" {
        (25000, 25020, 25021, 25030)
    } else {
        (25100, 25120, 25121, 25130)
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What `<dir>/demo.json` records.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub processes: Vec<(String, u32)>,
    pub namespaces: Vec<String>,
}

/// The running cluster; removed on drop unless kept.
pub struct Cluster {
    pub dir: PathBuf,
    exe: PathBuf,
    topo: Option<Topology>,
    children: Vec<(String, Child)>,
    keep: bool,
}

impl Cluster {
    /// Refuses if a demo is running or was left behind: its record in `dir`, or any of
    /// its network namespaces (whose names are fixed: one demo per machine).
    pub fn check_free(dir: &Path) -> Result<(), DemoError> {
        let netns = Path::new("/run/netns");
        let found = if dir.join("demo.json").exists() {
            Some(format!("{} exists", dir.join("demo.json").display()))
        } else {
            std::iter::once(FABRIC.to_owned())
                .chain(ALL_PODS.iter().map(PodDef::netns))
                .find(|n| netns.join(n).exists())
                .map(|n| format!("network namespace {n} exists"))
        };
        let Some(found) = found else {
            return Ok(());
        };
        // The folder whose record lists the leftover's processes: this one, or else the
        // default one.
        let default = Path::new(crate::DEFAULT_DIR);
        let owner = if !dir.join("demo.json").exists() && default.join("demo.json").exists() {
            default
        } else {
            dir
        };
        Err(DemoError::Busy {
            found,
            down: crate::down_command(owner),
        })
    }

    /// Builds the namespaces. Refuses if a demo is already there.
    pub fn build(dir: &Path, exe: &Path) -> Result<Self, DemoError> {
        Self::check_free(dir)?;
        std::fs::create_dir_all(dir.join("logs"))
            .map_err(|e| DemoError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            exe: exe.to_owned(),
            topo: None,
            children: Vec::new(),
            keep: false,
        };
        // On an error the topology made so far is dropped, which deletes it.
        let mut topo =
            Topology::named(FABRIC, "demo").map_err(|e| DemoError::Setup(e.to_string()))?;
        for pod in ALL_PODS {
            topo.named_pod(&pod.netns(), pod.node, pod.ip)
                .map_err(|e| DemoError::Setup(e.to_string()))?;
        }
        cluster.topo = Some(topo);
        cluster.save()?;
        Ok(cluster)
    }

    /// The network namespace file of a pod.
    pub fn netns_path(pod: &PodDef) -> PathBuf {
        Path::new("/run/netns").join(pod.netns())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Starts `ambit <args>` (inside `netns` when given) with its output in
    /// `logs/<name>.log`, in its own process group so a Ctrl-C meant for the demo does
    /// not reach it first.
    pub fn spawn(
        &mut self,
        name: &str,
        netns: Option<&str>,
        args: &[String],
    ) -> Result<(), DemoError> {
        let log = File::create(self.log_path(name))
            .map_err(|e| DemoError::Io(format!("cannot create the log of {name}: {e}")))?;
        let err = log.try_clone().map_err(|e| DemoError::Io(e.to_string()))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| DemoError::Io(format!("cannot start {name}: {e}")))?;
        self.children.push((name.to_owned(), child));
        self.save()
    }

    /// Stops one started process (SIGTERM, then SIGKILL) and forgets it.
    pub fn stop(&mut self, name: &str) {
        let Some(i) = self.children.iter().position(|(n, _)| n == name) else {
            return;
        };
        let (_, mut child) = self.children.remove(i);
        stop_processes(&[child.id()]);
        let _ = child.wait();
        let _ = self.save();
    }

    /// Whether every started process is still running; names the first that is not.
    pub fn check_alive(&mut self) -> Result<(), DemoError> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(DemoError::Died {
                    name: name.clone(),
                    status: status.to_string(),
                    log: self.dir.join("logs").join(format!("{name}.log")),
                });
            }
        }
        Ok(())
    }

    fn save(&self) -> Result<(), DemoError> {
        let record = Record {
            processes: self
                .children
                .iter()
                .map(|(n, c)| (n.clone(), c.id()))
                .collect(),
            namespaces: self.topo.as_ref().map(Topology::names).unwrap_or_default(),
        };
        let body = serde_json::to_vec_pretty(&record).map_err(|e| DemoError::Io(e.to_string()))?;
        std::fs::write(self.dir.join("demo.json"), body)
            .map_err(|e| DemoError::Io(format!("cannot write demo.json: {e}")))
    }

    /// Leaves everything running; `ambit demo --down` removes it.
    pub fn keep(mut self) {
        self.keep = true;
        if let Some(topo) = self.topo.take() {
            topo.keep();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let pids: Vec<u32> = self.children.iter().map(|(_, c)| c.id()).collect();
        stop_processes(&pids);
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        // Dropping the topology deletes the namespaces.
        self.topo = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM each process (and its group), then SIGKILL what is still there after 5 s.
fn stop_processes(pids: &[u32]) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    for &pid in pids {
        let pid = Pid::from_raw(pid as i32);
        let _ = killpg(pid, Signal::SIGTERM);
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for &pid in pids {
        let pid = Pid::from_raw(pid as i32);
        while Instant::now() < deadline && kill(pid, None).is_ok() && !is_zombie(pid.as_raw()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if kill(pid, None).is_ok() && !is_zombie(pid.as_raw()) {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether `pid` still runs the program at `exe` (pids are reused; never signal a
/// stranger).
fn is_ours(pid: u32, exe_name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(exe_name))
        .unwrap_or(false)
}

/// `ambit demo --down`: stops the processes and deletes the namespaces a kept demo left,
/// then its folder. Returns what it removed.
pub fn down(dir: &Path, exe: &Path) -> Result<Vec<String>, DemoError> {
    let record: Record = match std::fs::read(dir.join("demo.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| DemoError::Io(format!("{}: {e}", dir.join("demo.json").display())))?,
        Err(_) => Record::default(),
    };
    let exe_name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ambit".into());
    let mut removed = Vec::new();
    let pids: Vec<u32> = record
        .processes
        .iter()
        .filter(|(_, pid)| is_ours(*pid, &exe_name))
        .map(|(name, pid)| {
            removed.push(format!("process {name} ({pid})"));
            *pid
        })
        .collect();
    stop_processes(&pids);
    // The recorded namespaces, and the demo's fixed names in case the record is gone.
    let mut names = record.namespaces;
    names.extend(ALL_PODS.iter().map(PodDef::netns));
    names.push(FABRIC.to_owned());
    names.sort();
    names.dedup();
    for n in &names {
        if Path::new("/run/netns").join(n).exists() {
            removed.push(format!("network namespace {n}"));
        }
    }
    ambit_testenv::delete(&names);
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| DemoError::Io(format!("cannot remove {}: {e}", dir.display())))?;
        removed.push(format!("folder {}", dir.display()));
    }
    Ok(removed)
}
