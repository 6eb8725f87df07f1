//! What the benchmark harnesses share: child processes and their CPU and memory, an
//! Ambit mesh started as processes, nginx configurations and certificates, statistics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_control::auth::TokenSigner;
use ambit_testenv::Pod;
use anyhow::{Context, bail};

/// Children killed (SIGTERM, then SIGKILL) when dropped, before the namespaces go.
#[derive(Default)]
pub struct Procs(Vec<(String, Child)>);

impl Procs {
    pub fn spawn(
        &mut self,
        name: &str,
        netns: Option<&str>,
        argv: &[&str],
        log: &Path,
    ) -> anyhow::Result<u32> {
        let log = std::fs::File::create(log)?;
        let mut cmd = if let Some(ns) = netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        } else {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} ({})", argv[0]))?;
        let pid = child.id();
        self.0.push((name.to_owned(), child));
        Ok(pid)
    }

    pub fn check(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}); see its log in the work folder");
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for (_, child) in &self.0 {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a benchmark until it ends or the process is asked to stop (Ctrl-C, SIGTERM).
/// On a signal the benchmark's future is dropped, so its processes are killed and its
/// network namespaces removed (their guards' `Drop`), and an error says so.
pub async fn until_interrupted<T>(
    run: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        r = run => r,
        _ = term.recv() => bail!("stopped by SIGTERM; processes and network namespaces removed"),
        _ = int.recv() => bail!("interrupted; processes and network namespaces removed"),
    }
}

/// A pod's process-visible resources: its process tree for CPU and memory.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU seconds (user + system) of these processes and their descendants.
pub fn cpu_seconds(roots: &[u32]) -> f64 {
    // /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
    let tick = 100.0;
    roots
        .iter()
        .flat_map(|r| process_tree(*r))
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces) start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / tick)
        })
        .sum()
}

/// Resident memory (bytes) of one proxy: its process tree.
pub fn rss_bytes(root: u32) -> u64 {
    status_bytes(root, "VmRSS:")
}

/// A memory figure of `/proc/<pid>/status` (in bytes), summed over a process tree.
/// `RssAnon:` is the part of the resident set no file backs: heap, stacks, buffers
/// (the rest is the binary's and libraries' pages, shared with other processes running
/// them and reclaimable).
pub fn status_bytes(root: u32, field: &str) -> u64 {
    process_tree(root)
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .sum()
}

/// 10,000 connections through two proxies need more descriptors than the usual limit.
/// With CAP_SYS_RESOURCE the hard limit is raised (children inherit it); otherwise the
/// soft limit goes up to the hard one. Returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if setrlimit(Resource::RLIMIT_NOFILE, 200_000, 200_000).is_ok() {
        return 200_000;
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    matches!(ambit_admin::get(addr, path).await, Ok((s, _)) if s == 200)
}

pub async fn wait_for(
    procs: &mut Procs,
    what: &str,
    mut ok: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ok().await {
        procs.check()?;
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what}: not within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("  {what}");
    Ok(())
}

pub fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl (install the openssl package)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A CA and two ECDSA P-256 leaf certificates for the nginx pair.
pub fn nginx_pki(dir: &Path) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=bench-ca",
            "-days",
            "2",
            "-out",
            "ca.pem",
        ],
    )?;
    for name in ["client", "server"] {
        let ext = dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!("subjectAltName=DNS:{name}.bench\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )?;
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &format!("{name}.key"),
            ],
        )?;
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={name}.bench"),
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        )?;
    }
    Ok(())
}

pub const NGINX_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Enough connection slots for the idle-connection run (two per proxied connection);
/// nginx preallocates them, so no more than that.
pub fn nginx_conf(
    dir: &Path,
    name: &str,
    body: &str,
    connections: usize,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.conf"));
    let module = if body.contains("stream {") {
        format!("load_module {NGINX_MODULE};\n")
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            "{module}daemon off;\nworker_processes 1;\nworker_rlimit_nofile {limit};\npid {d}/{name}.pid;\nerror_log {d}/{name}.error.log warn;\nevents {{ worker_connections {slots}; }}\n{body}\n",
            d = dir.display(),
            slots = 2 * connections + 512,
            limit = 2 * connections + 1024
        ),
    )?;
    Ok(path)
}

/// A running Ambit mesh of the benchmark: its node proxies' pids and node-b's metrics
/// address.
pub struct AmbitMesh {
    pub node_pids: Vec<u32>,
    pub metrics_b: SocketAddr,
    /// The control plane's gRPC address and root certificate, and node-a's token file:
    /// what another component (a waypoint) needs to join.
    pub grpc: SocketAddr,
    pub root_cert: PathBuf,
    pub token_a: PathBuf,
}

/// Starts an Ambit mesh (control plane, a node proxy and an agent per node) with
/// `binary`, enrolling `client` (node-a) and `server` (node-b); `extra` is more of the
/// manifest (YAML documents, each starting with `---`).
/// What a benchmark adds to the mesh's manifests.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeshExtras<'a> {
    /// More objects (YAML documents, each starting with `---`).
    pub manifests: &'a str,
    /// Annotations of namespace `bench`, as YAML flow entries (`key: value, ...`).
    pub namespace_annotations: &'a str,
}

pub async fn start_ambit(
    procs: &mut Procs,
    ambit: &Path,
    dir: &Path,
    tag: &str,
    client: &Pod,
    server: &Pod,
    more: MeshExtras<'_>,
) -> anyhow::Result<AmbitMesh> {
    let MeshExtras {
        manifests: extra,
        namespace_annotations,
    } = more;
    let dir = dir.join(tag);
    std::fs::create_dir(&dir)?;
    let manifests = dir.join("manifests");
    std::fs::create_dir(&manifests)?;
    std::fs::write(
        manifests.join("mesh.yaml"),
        format!(
            "apiVersion: v1
kind: Namespace
metadata: {{name: bench, annotations: {{{namespace_annotations}}}, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench, labels: {{app: client}}}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: {}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench, labels: {{app: server}}}}
spec: {{nodeName: node-b, serviceAccountName: server}}
status: {{podIP: {}}}
{extra}",
            client.ip, server.ip
        ),
    )?;
    let netns_dir = dir.join("netns");
    std::fs::create_dir(&netns_dir)?;
    std::os::unix::fs::symlink(client.netns_path(), netns_dir.join("bench.client"))?;
    std::os::unix::fs::symlink(server.netns_path(), netns_dir.join("bench.server"))?;
    let state = dir.join("state");
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let monitoring = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let s = |p: &Path| p.display().to_string();
    let ambit_s = s(ambit);
    procs.spawn(
        &format!("{tag}-control"),
        None,
        &[
            &ambit_s,
            "--log-format",
            "json",
            "control",
            "--manifests",
            &s(&manifests),
            "--state-dir",
            &s(&state),
            "--grpc-addr",
            &grpc.to_string(),
            "--monitoring-addr",
            &monitoring.to_string(),
            // Two meshes in one run (--baseline, --l7-metrics) must not share the
            // console's default port; the benchmark does not use it.
            "--console-addr",
            "off",
        ],
        &dir.join("control.log"),
    )?;
    wait_for(procs, "control plane ready", async || {
        http_ok(monitoring, "/ready").await
    })
    .await?;
    let signer = TokenSigner::load_or_create(&state).map_err(anyhow::Error::msg)?;
    let mut node_pids = Vec::new();
    let mut checks = Vec::new();
    for node in ["node-a", "node-b"] {
        let token = signer
            .mint(node, Duration::from_secs(24 * 3600))
            .map_err(anyhow::Error::msg)?;
        let token_file = dir.join(format!("{node}.token"));
        std::fs::write(&token_file, token)?;
        let zds = dir.join(format!("{node}.zds.sock"));
        let (admin, metrics, ready, agent) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let common = [
            "--node-name".to_owned(),
            node.to_owned(),
            "--control-plane".to_owned(),
            grpc.to_string(),
            "--server-name".to_owned(),
            "localhost".to_owned(),
            "--ca-root".to_owned(),
            s(&state.join("ca/root-cert.pem")),
            "--token-file".to_owned(),
            s(&token_file),
            "--zds-socket".to_owned(),
            s(&zds),
        ];
        let mut argv = vec![
            ambit_s.clone(),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            "warn".into(),
            "node".into(),
        ];
        argv.extend(common.iter().cloned());
        argv.extend([
            "--admin-addr".into(),
            format!("127.0.0.1:{admin}"),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics}"),
            "--readiness-addr".into(),
            format!("127.0.0.1:{ready}"),
            "--worker-threads".into(),
            "1".into(),
        ]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        node_pids.push(procs.spawn(
            &format!("{tag}-{node}"),
            None,
            &argv,
            &dir.join(format!("{node}.log")),
        )?);
        let mut argv = vec![
            ambit_s.clone(),
            "--log-format".into(),
            "json".into(),
            "cni".into(),
        ];
        argv.extend(common.iter().cloned());
        argv.extend([
            "--netns-dir".into(),
            s(&netns_dir),
            "--admin-addr".into(),
            format!("127.0.0.1:{agent}"),
        ]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        procs.spawn(
            &format!("{tag}-{node}-agent"),
            None,
            &argv,
            &dir.join(format!("{node}-agent.log")),
        )?;
        checks.push((node, ready, agent, metrics));
    }
    for (node, ready, agent, _) in &checks {
        let (ready, agent) = (
            SocketAddr::from(([127, 0, 0, 1], *ready)),
            SocketAddr::from(([127, 0, 0, 1], *agent)),
        );
        wait_for(procs, &format!("{node}: pod enrolled by its agent"), async || {
            matches!(ambit_admin::get(agent, "/debug/pods").await, Ok((s, b)) if s == 200 && b.contains("\"enrolled\""))
        })
        .await?;
        wait_for(procs, &format!("{node}: node proxy ready"), async || {
            http_ok(ready, "/healthz/ready").await
        })
        .await?;
    }

    Ok(AmbitMesh {
        node_pids,
        metrics_b: SocketAddr::from(([127, 0, 0, 1], checks[1].3)),
        grpc,
        root_cert: state.join("ca/root-cert.pem"),
        token_a: dir.join("node-a.token"),
    })
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (USER_HZ ticks).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    /// user, nice, system, irq, softirq: work done by this machine.
    pub busy: u64,
    pub idle: u64,
    /// Time the hypervisor ran someone else while this machine wanted to run.
    pub steal: u64,
}

impl CpuTimes {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal ...
        Self {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            idle: at(3) + at(4),
            steal: at(7),
        }
    }

    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            busy: self.busy.saturating_sub(earlier.busy),
            idle: self.idle.saturating_sub(earlier.idle),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn total(&self) -> f64 {
        (self.busy + self.idle + self.steal).max(1) as f64
    }

    /// The share of CPU time spent working.
    pub fn busy(&self) -> f64 {
        self.busy as f64 / self.total()
    }

    /// The share of CPU time stolen.
    pub fn steal(&self) -> f64 {
        self.steal as f64 / self.total()
    }
}

/// Waits until the machine is quiet (under 10% busy over a quarter of a second), for
/// at most `max`. Returns the last busy share when it never got quiet.
pub async fn settle(max: Duration) -> Result<(), f64> {
    let start = Instant::now();
    loop {
        let before = CpuTimes::now();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let busy = CpuTimes::now().since(&before).busy();
        if busy < 0.10 {
            return Ok(());
        }
        if start.elapsed() >= max {
            return Err(busy);
        }
    }
}

/// On-CPU time (ns) of a process tree's threads, by role: the node proxy's data-path
/// threads (`ambit-data`), its control thread (`ambit-control`) and everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThreadCpu {
    pub data: u64,
    pub control: u64,
    pub other: u64,
}

impl ThreadCpu {
    /// Reads `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on CPU) of every thread.
    pub fn of(roots: &[u32]) -> Self {
        let mut out = Self::default();
        for pid in roots.iter().flat_map(|r| process_tree(*r)) {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let ns: u64 = std::fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                match comm.trim() {
                    "ambit-data" => out.data += ns,
                    "ambit-control" => out.control += ns,
                    _ => out.other += ns,
                }
            }
        }
        out
    }

    fn minus(&self, earlier: &Self) -> Self {
        Self {
            data: self.data.saturating_sub(earlier.data),
            control: self.control.saturating_sub(earlier.control),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

/// Samples the proxies' CPU by thread role every `every` on a thread of its own, with
/// wall-clock times, so a latency timeline can be laid beside it.
pub struct CpuSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(std::time::SystemTime, ThreadCpu)>>,
}

impl CpuSampler {
    pub fn start(roots: Vec<u32>, every: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let start = Instant::now();
            let mut k = 0u32;
            while !flag.load(Ordering::Relaxed) {
                out.push((std::time::SystemTime::now(), ThreadCpu::of(&roots)));
                k += 1;
                let next = start + every * k;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            out
        });
        Self { stop, thread }
    }

    /// Stops sampling; returns the CPU used in each `slot` from `from` on, `slots` of
    /// them (interpolated from the samples around each slot's edges).
    pub fn finish(
        self,
        from: std::time::SystemTime,
        slot: Duration,
        slots: usize,
    ) -> Vec<ThreadCpu> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.thread.join().unwrap_or_default();
        let at = |t: std::time::SystemTime| -> ThreadCpu {
            // The last sample taken at or before t.
            samples
                .iter()
                .take_while(|(when, _)| *when <= t)
                .last()
                .map(|(_, c)| *c)
                .unwrap_or_default()
        };
        (0..slots)
            .map(|i| {
                let a = from + slot * i as u32;
                at(a + slot).minus(&at(a))
            })
            .collect()
    }
}

/// Median, min and max.
pub fn stats(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Machine: {cpus} CPUs ({model}), Linux {}.", kernel.trim())
}
