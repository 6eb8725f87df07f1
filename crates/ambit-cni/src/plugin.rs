//! The CNI plugin: the container runtime runs it, chained after the node's own network
//! plugin, each time it creates, checks or deletes a pod's network (CNI specification
//! 1.0: `CNI_COMMAND` ADD, CHECK, DEL, VERSION; network configuration on stdin; a result
//! or an error object on stdout).
//!
//! ADD hands the pod (its network namespace path, name, uid and the addresses the
//! interface plugin gave it) to the node agent over the agent's socket; the agent decides
//! from the pod's labels whether it is in the mesh and, if it is, installs its
//! redirection rules before answering, so the pod's first packet is already captured.
//! The plugin then passes the previous plugin's result through unchanged.
//!
//! When the agent cannot be reached, only pods that are in the mesh fail: the plugin asks
//! the API server itself (through the `kubeconfig` the agent wrote) and lets every other
//! pod start. Pods in `excludeNamespaces` never wait for Ambit. DEL never fails: the pod
//! is going away and the agent forgets it on its own.
//!
//! This module also installs the plugin into the node's CNI configuration and removes it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The plugin's `type`, and its binary's file name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "ambit-cni";
/// Where the agent listens for the plugin by default.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";
/// The CNI specification versions this plugin speaks.
/// (1.1.0 is not claimed: it adds STATUS and GC, which this plugin does not implement.)
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The largest network configuration read from stdin.
const MAX_STDIN: u64 = 1 << 20;
/// The largest answer read from the agent.
const MAX_REPLY: u64 = 64 << 10;

/// How long the plugin waits for the agent; enrolling one pod takes well under a second.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A request from the plugin to the agent (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvent {
    pub command: EventCommand,
    pub container_id: String,
    /// The pod's network namespace path; empty on a DEL after the namespace is gone.
    #[serde(default)]
    pub netns: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub pod_uid: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventCommand {
    Add,
    Check,
    Del,
}

/// The agent's answer (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventReply {
    /// The pod is in the mesh and its traffic is captured.
    #[serde(default)]
    pub captured: bool,
    /// Why the agent could not do what was asked; the pod must not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The plugin's own fields in the network configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// A CNI error: exit status 1 with this object on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// Error codes from the CNI specification, and Ambit's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent refused or failed to enroll the pod.
    pub const ENROLL_FAILED: u32 = 100;
}

/// How the plugin learns, without the agent, whether a pod is in the mesh (the binary
/// provides one that asks the API server through the configured kubeconfig).
pub trait EnrollmentLookup {
    fn is_enrolled(&self, kubeconfig: &Path, namespace: &str, name: &str) -> Result<bool, String>;
}

/// The outcome of one plugin run: what to print and how to exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub success: bool,
}

/// Runs the plugin: `env` is the process environment, `stdin` the network configuration.
pub fn run(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    lookup: &dyn EnrollmentLookup,
) -> Output {
    let mut raw = Vec::new();
    let read = stdin.take(MAX_STDIN + 1).read_to_end(&mut raw);
    let command = env("CNI_COMMAND").unwrap_or_default();
    // The version to answer in: the configuration's if it can be read.
    let conf_value: Option<Value> = serde_json::from_slice(&raw).ok();
    let version = conf_value
        .as_ref()
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or("1.0.0")
        .to_owned();
    let result = match read {
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            "cannot read the network configuration from stdin",
            e.to_string(),
        )),
        Ok(_) if raw.len() as u64 > MAX_STDIN => Err(CniError::new(
            code::INVALID_CONFIG,
            "network configuration larger than 1 MiB",
            "",
        )),
        Ok(_) => dispatch(&command, &raw, env, lookup),
    };
    match result {
        Ok(stdout) => Output {
            stdout,
            success: true,
        },
        Err(e) => Output {
            stdout: json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            })
            .to_string(),
            success: false,
        },
    }
}

fn dispatch(
    command: &str,
    raw: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
    lookup: &dyn EnrollmentLookup,
) -> Result<String, CniError> {
    let parse = || -> Result<PluginConf, CniError> {
        let conf: PluginConf = serde_json::from_slice(raw).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("unsupported cniVersion {:?}", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    };
    match command {
        "VERSION" => Ok(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })
        .to_string()),
        "ADD" => {
            let conf = parse()?;
            let Some(prev) = conf.prev_result.clone() else {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "ambit-cni must be chained after the interface plugin",
                    "put it last in the plugins list of a .conflist; it found no prevResult",
                ));
            };
            if let Some(pod) = pod_event(EventCommand::Add, env, &prev)? {
                handle(&conf, &pod, lookup)?;
            }
            Ok(prev.to_string())
        }
        "CHECK" => {
            let conf = parse()?;
            let prev = conf.prev_result.clone().unwrap_or(Value::Null);
            if let Some(pod) = pod_event(EventCommand::Check, env, &prev)? {
                handle(&conf, &pod, lookup)?;
            }
            Ok(String::new())
        }
        "DEL" => {
            // Never fails: the runtime retries a failed DEL forever, and the agent
            // forgets a pod whose namespace is gone by itself.
            if let Ok(conf) = parse()
                && let Ok(Some(pod)) = pod_event(EventCommand::Del, env, &Value::Null)
                && let Err(e) = handle(&conf, &pod, lookup)
            {
                eprintln!(
                    "ambit-cni: DEL of {}/{}: {}",
                    pod.namespace, pod.name, e.msg
                );
            }
            Ok(String::new())
        }
        "" => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "this binary is a CNI plugin, run by the container runtime; the node agent is `ambit cni`",
        )),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unsupported CNI_COMMAND {other:?}"),
            "supported: ADD, CHECK, DEL, VERSION",
        )),
    }
}

/// The pod the runtime names, or none when it is not a Kubernetes pod (nothing to do).
fn pod_event(
    command: EventCommand,
    env: &dyn Fn(&str) -> Option<String>,
    prev: &Value,
) -> Result<Option<PodEvent>, CniError> {
    let container_id = env("CNI_CONTAINERID").unwrap_or_default();
    let netns = env("CNI_NETNS").unwrap_or_default();
    if container_id.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_CONTAINERID is not set",
            "",
        ));
    }
    if netns.is_empty() && command != EventCommand::Del {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            "",
        ));
    }
    let args = env("CNI_ARGS").unwrap_or_default();
    let mut namespace = None;
    let mut name = None;
    let mut uid = String::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                "",
            ));
        };
        match k {
            "K8S_POD_NAMESPACE" => namespace = Some(v.to_owned()),
            "K8S_POD_NAME" => name = Some(v.to_owned()),
            "K8S_POD_UID" => uid = v.to_owned(),
            _ => {}
        }
    }
    let (Some(namespace), Some(name)) = (namespace, name) else {
        return Ok(None);
    };
    Ok(Some(PodEvent {
        command,
        container_id,
        netns,
        namespace,
        name,
        pod_uid: uid,
        ips: result_ips(prev),
    }))
}

/// The addresses in a CNI result (`ips[].address`, CIDR notation).
fn result_ips(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

fn handle(
    conf: &PluginConf,
    pod: &PodEvent,
    lookup: &dyn EnrollmentLookup,
) -> Result<(), CniError> {
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    let label = format!("{}/{}", pod.namespace, pod.name);
    match ask_agent(&socket, pod) {
        Ok(EventReply { error: None, .. }) => Ok(()),
        Ok(EventReply { error: Some(e), .. }) => Err(CniError::new(
            code::ENROLL_FAILED,
            format!("the Ambit node agent could not enroll pod {label}"),
            e,
        )),
        Err(unreachable) => {
            if pod.command == EventCommand::Del {
                return Err(CniError::new(code::IO_FAILURE, unreachable, ""));
            }
            let Some(kubeconfig) = &conf.kubeconfig else {
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "the Ambit node agent is not reachable, and without a kubeconfig the plugin cannot tell whether pod {label} is in the mesh"
                    ),
                    unreachable,
                ));
            };
            match lookup.is_enrolled(kubeconfig, &pod.namespace, &pod.name) {
                Ok(false) => Ok(()),
                Ok(true) => Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "pod {label} is in the mesh but the Ambit node agent is not reachable; the pod starts once the agent runs (check `kubectl -n ambit-system get pods` on this node)"
                    ),
                    unreachable,
                )),
                Err(e) => Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "neither the Ambit node agent nor the API server could say whether pod {label} is in the mesh"
                    ),
                    format!("{unreachable}; {e}"),
                )),
            }
        }
    }
}

/// Connects to a unix socket, waiting (until `deadline`) while its listener's backlog is
/// full rather than blocking without end as a plain connect does.
fn connect_before(path: &Path, deadline: std::time::Instant) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    loop {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        match socket.connect(&addr) {
            Ok(()) => {
                socket.set_nonblocking(false)?;
                return Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)));
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One request and one answer over the agent's socket.
fn ask_agent(socket: &Path, pod: &PodEvent) -> Result<EventReply, String> {
    let unreachable = |e: std::io::Error| format!("node agent at {}: {e}", socket.display());
    let mut stream =
        connect_before(socket, std::time::Instant::now() + AGENT_TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(AGENT_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(pod).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_REPLY))
        .read_line(&mut reply)
        .map_err(unreachable)?;
    serde_json::from_str(&reply).map_err(|e| {
        format!(
            "node agent at {} answered something unreadable: {e}",
            socket.display()
        )
    })
}

/// Why the plugin could not be installed into, or removed from, the CNI configuration.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "no CNI network configuration in {0} yet (the node's network plugin writes it); retrying"
    )]
    NoPrimary(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CNI configuration Ambit can chain into: {why}")]
    Unreadable { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the plugin is installed with.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    /// The node's CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The node's CNI plugin directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The binary to install as the plugin (the running `ambit`).
    pub binary: PathBuf,
    /// The plugin's entry in the chain (`type` is set to `ambit-cni`).
    pub entry: Value,
}

/// The configuration file the runtime uses: the first by name among `.conflist`,
/// `.conf` and `.json` files (as kubelet, containerd and CRI-O choose).
pub fn primary_conf(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let entries = std::fs::read_dir(conf_dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            InstallError::NoPrimary(conf_dir.to_owned())
        } else {
            io(conf_dir)(e)
        }
    })?;
    let mut confs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    confs.sort();
    confs
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoPrimary(conf_dir.to_owned()))
}

/// Installs the binary and chains the plugin last in the primary configuration (a single
/// plugin `.conf` becomes a `.conflist`). Idempotent: nothing is written when both are
/// already as they should be. Returns the configuration file and whether it changed.
pub fn install(spec: &InstallSpec) -> Result<(PathBuf, bool), InstallError> {
    install_binary(&spec.binary, &spec.bin_dir)?;
    let path = primary_conf(&spec.conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let unreadable = |why: String| InstallError::Unreadable {
        path: path.clone(),
        why,
    };
    let mut conf: Value = serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
    let Some(obj) = conf.as_object_mut() else {
        return Err(unreadable("not a JSON object".into()));
    };
    let mut entry = spec.entry.clone();
    if let Some(e) = entry.as_object_mut() {
        e.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
    }
    let is_list = path.extension().and_then(|e| e.to_str()) == Some("conflist");
    let (target, mut list) = if is_list {
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| unreadable("a .conflist without a plugins list".into()))?;
        (path.clone(), (conf.clone(), plugins))
    } else {
        // A single plugin: it becomes the first of a list.
        let mut single = obj.clone();
        let version = single
            .remove("cniVersion")
            .unwrap_or(Value::String("1.0.0".into()));
        let name = single
            .remove("name")
            .ok_or_else(|| unreadable("no \"name\"".into()))?;
        let list = json!({"cniVersion": version, "name": name, "plugins": []});
        (
            path.with_extension("conflist"),
            (list, vec![Value::Object(single)]),
        )
    };
    let before = list.1.clone();
    list.1
        .retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    list.1.push(entry);
    let changed = !is_list || list.1 != before;
    if changed {
        list.0["plugins"] = Value::Array(list.1);
        let text = serde_json::to_string_pretty(&list.0).map_err(|e| unreadable(e.to_string()))?;
        write_atomically(&target, text.as_bytes())?;
        if target != path {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok((target, changed))
}

/// Removes the plugin from every configuration that chains it, and its binary.
/// Returns the files changed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    if let Ok(entries) = std::fs::read_dir(conf_dir) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(mut conf) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
                continue;
            };
            let n = plugins.len();
            plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
            if plugins.len() != n {
                let text = serde_json::to_string_pretty(&conf).unwrap_or_default();
                write_atomically(&path, text.as_bytes())?;
                changed.push(path);
            }
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&binary) {
        Ok(()) => changed.push(binary),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&binary)(e)),
    }
    Ok(changed)
}

/// Copies the binary in unless an identical one is there (a rename, so a runtime never
/// runs a half-written plugin).
fn install_binary(binary: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    use std::os::unix::fs::PermissionsExt;
    let new = std::fs::read(binary).map_err(io(binary))?;
    let executable = std::fs::metadata(&target).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    if executable && std::fs::read(&target).ok().as_deref() == Some(new.as_slice()) {
        return Ok(());
    }
    write_atomically_mode(&target, &new, 0o755)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    // A configuration keeps its mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o777);
    write_atomically_mode(path, bytes, mode)
}

/// Writes a temporary file with its final mode, flushes it to disk, renames it over
/// `path` and flushes the folder: a reader (or a crash) sees the old file or the new
/// one, never a partial or non-executable one.
fn write_atomically_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.ambit-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("tmp"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Never;
    impl EnrollmentLookup for Never {
        fn is_enrolled(&self, _: &Path, _: &str, _: &str) -> Result<bool, String> {
            Err("not asked in this test".into())
        }
    }

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> (Value, bool) {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |k: &str| vars.get(k).cloned();
        let out = run(&env, &mut stdin.as_bytes(), &Never);
        let value = if out.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out.stdout).unwrap()
        };
        (value, out.success)
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let (v, ok) = run_with(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        assert!(ok);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!("0.4.0"))
        );
    }

    #[test]
    fn bad_input_gets_spec_errors() {
        let (v, ok) = run_with(&[("CNI_COMMAND", "ADD")], "{not json");
        assert!(!ok);
        assert_eq!(v["code"], code::DECODE_FAILURE);
        assert!(v["msg"].as_str().unwrap().contains("decode"));
        let (v, ok) = run_with(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"9.9.9","name":"n","type":"ambit-cni"}"#,
        );
        assert!(!ok);
        assert_eq!(v["code"], code::INCOMPATIBLE_VERSION);
        let (v, ok) = run_with(&[], r#"{"cniVersion":"1.0.0"}"#);
        assert!(!ok);
        assert_eq!(v["code"], code::INVALID_ENVIRONMENT);
        let (v, ok) = run_with(&[("CNI_COMMAND", "FROB")], r#"{"cniVersion":"1.0.0"}"#);
        assert!(!ok);
        assert_eq!(v["code"], code::INVALID_ENVIRONMENT);
        let conf = r#"{"cniVersion":"0.4.0","name":"n","type":"ambit-cni"}"#;
        let (v, ok) = run_with(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_NETNS", "/x"),
            ],
            conf,
        );
        assert!(!ok);
        assert_eq!(v["code"], code::INVALID_CONFIG);
        assert_eq!(
            v["cniVersion"], "0.4.0",
            "errors answer in the caller's version"
        );
        let big = format!(
            r#"{{"cniVersion":"1.0.0","pad":"{}"}}"#,
            "x".repeat(2 << 20)
        );
        let (v, ok) = run_with(&[("CNI_COMMAND", "ADD")], &big);
        assert!(!ok);
        assert_eq!(v["code"], code::INVALID_CONFIG);
    }

    #[test]
    fn a_non_kubernetes_container_passes_through() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"ambit-cni",
            "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"198.18.0.7/24"}]}}"#;
        let (v, ok) = run_with(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_NETNS", "/x"),
                ("CNI_ARGS", "IgnoreUnknown=1"),
            ],
            conf,
        );
        assert!(ok);
        assert_eq!(v["ips"][0]["address"], "198.18.0.7/24");
    }

    #[test]
    fn an_unreachable_agent_holds_only_pods_it_cannot_clear() {
        struct Labels(bool);
        impl EnrollmentLookup for Labels {
            fn is_enrolled(&self, _: &Path, _: &str, _: &str) -> Result<bool, String> {
                Ok(self.0)
            }
        }
        let conf = |kubeconfig: bool| {
            let mut c = json!({"cniVersion":"1.0.0","name":"n","type":"ambit-cni",
                "agentSocket":"/nonexistent/ambit.sock","excludeNamespaces":["kube-system"],
                "prevResult":{"cniVersion":"1.0.0","ips":[]}});
            if kubeconfig {
                c["kubeconfig"] = json!("/etc/cni/net.d/ambit-kubeconfig");
            }
            c.to_string()
        };
        let env_for = |ns: &str| {
            let vars: HashMap<&str, String> = [
                ("CNI_COMMAND", "ADD".to_string()),
                ("CNI_CONTAINERID", "c".into()),
                ("CNI_NETNS", "/x".into()),
                ("CNI_ARGS", format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p")),
            ]
            .into();
            move |k: &str| vars.get(k).cloned()
        };
        let out = run(&env_for("app"), &mut conf(true).as_bytes(), &Labels(false));
        assert!(out.success, "{}", out.stdout);
        let out = run(&env_for("app"), &mut conf(true).as_bytes(), &Labels(true));
        assert!(!out.success);
        assert!(out.stdout.contains("is in the mesh"), "{}", out.stdout);
        let out = run(&env_for("app"), &mut conf(false).as_bytes(), &Labels(false));
        assert!(!out.success, "without a kubeconfig it cannot tell");
        let out = run(
            &env_for("kube-system"),
            &mut conf(false).as_bytes(),
            &Labels(true),
        );
        assert!(out.success, "excluded namespaces never wait");
    }

    #[test]
    fn install_chains_last_converts_a_conf_and_uninstall_reverses_it() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::create_dir_all(&bin_dir).unwrap();
        let binary = dir.path().join("ambit");
        std::fs::write(&binary, b"#!binary").unwrap();
        let spec = InstallSpec {
            conf_dir: conf_dir.clone(),
            bin_dir: bin_dir.clone(),
            binary,
            entry: json!({"agentSocket": "/var/run/ambit/cni.sock"}),
        };
        assert!(matches!(install(&spec), Err(InstallError::NoPrimary(_))));
        std::fs::write(
            conf_dir.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"pods","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        std::fs::write(conf_dir.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        let (path, changed) = install(&spec).unwrap();
        assert!(changed);
        assert_eq!(path, conf_dir.join("10-bridge.conflist"));
        assert!(!conf_dir.join("10-bridge.conf").exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["name"], "pods");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], PLUGIN_TYPE);
        assert_eq!(
            std::fs::read(bin_dir.join(PLUGIN_TYPE)).unwrap(),
            b"#!binary"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bin_dir.join(PLUGIN_TYPE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o755,
            "executable from the moment it is in place"
        );
        // A copy that lost its mode is installed again.
        std::fs::set_permissions(
            bin_dir.join(PLUGIN_TYPE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        install(&spec).unwrap();
        let mode = std::fs::metadata(bin_dir.join(PLUGIN_TYPE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // Again: nothing to do.
        assert_eq!(install(&spec).unwrap(), (path.clone(), false));
        // Someone rewrote the file without us: chained again, once.
        std::fs::write(
            &path,
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert!(install(&spec).unwrap().1);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN_TYPE]);
        let changed = uninstall(&conf_dir, &bin_dir).unwrap();
        assert_eq!(changed.len(), 2, "{changed:?}");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
        assert!(!bin_dir.join(PLUGIN_TYPE).exists());
        assert!(uninstall(&conf_dir, &bin_dir).unwrap().is_empty());
    }

    #[test]
    fn garbage_conf_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("10-x.conflist"), "garbage").unwrap();
        let binary = dir.path().join("ambit");
        std::fs::write(&binary, b"b").unwrap();
        let spec = InstallSpec {
            conf_dir: dir.path().into(),
            bin_dir: dir.path().into(),
            binary,
            entry: json!({}),
        };
        assert!(matches!(
            install(&spec),
            Err(InstallError::Unreadable { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("10-x.conflist")).unwrap(),
            "garbage"
        );
    }

    #[test]
    fn a_full_agent_backlog_is_waited_for_then_given_up_on() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        // Fill the backlog: the listener never accepts.
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(c) = connect_before(&path, std::time::Instant::now()) {
                held.push(c);
            }
        }
        let started = std::time::Instant::now();
        let r = connect_before(&path, started + Duration::from_millis(300));
        assert!(r.is_err(), "a full backlog is an error, not a hang");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(listener);
    }
}
