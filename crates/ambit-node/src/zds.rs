//! ZDS: the node agent tells the node proxy which pods to serve.
//!
//! As in Istio, the node agent serves a unix `SOCK_SEQPACKET` socket and the node proxy
//! connects to it, retrying with backoff while the agent is away; one message per
//! packet, protobuf-encoded. On connect the proxy sends `ZdsHello { V1 }`; the agent then
//! sends its snapshot (`add` for each pod, with the pod's network namespace file
//! descriptor as SCM_RIGHTS ancillary data, or `keep` for a pod it has no descriptor
//! for), then `snapshot_sent`, after which the proxy stops serving pods the snapshot did
//! not mention. Later `add` and `del` messages follow. Every message is answered with
//! `Ack { error }` (empty: done). Losing the agent changes nothing: pods keep being
//! served, and the next connection's snapshot brings the proxy up to date. A restarted
//! node proxy is simply a new connection that receives the full snapshot.
//!
//! A namespace descriptor is checked before it is used: it must be a network namespace,
//! and neither the proxy's own nor the host's (serving "a pod" there would open the
//! capture listeners on the node itself).

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::socket::Netns;
use ambit_proto::prost::Message;
use ambit_proto::zds::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use tokio::sync::watch;
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;

use crate::dataplane::PodInfo;
use crate::pods::Pods;

/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024;

/// First and longest wait between connection attempts.
const FIRST_RETRY: Duration = Duration::from_millis(10);
const LAST_RETRY: Duration = Duration::from_secs(5);
/// A session at least this long resets the backoff.
const SESSION_THAT_LASTED: Duration = Duration::from_secs(10);

/// The node agent session's state, for readiness and the admin port.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ZdsState {
    pub socket: PathBuf,
    pub connected: bool,
    /// Whether an agent's snapshot has been applied since start.
    pub snapshot_applied: bool,
    pub connects: u64,
    pub last_error: Option<String>,
}

/// Connects to the node agent at `path` and serves its sessions until `stop` fires,
/// reconnecting (10 ms doubling to 5 s, with jitter) whenever there is none.
pub async fn run(
    path: PathBuf,
    pods: Arc<Pods>,
    state: watch::Sender<ZdsState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = FIRST_RETRY;
    loop {
        let attempt = tokio::select! {
            c = UnixSeqpacket::connect(&path) => c,
            _ = stop.changed() => return,
        };
        match attempt {
            Ok(conn) => {
                let connected = std::time::Instant::now();
                tracing::info!(socket = %path.display(), "connected to the node agent");
                state.send_modify(|s| {
                    s.connected = true;
                    s.connects += 1;
                    s.last_error = None;
                });
                let reason = tokio::select! {
                    r = session(&conn, &pods, &state) => match r {
                        Ok(()) => "the node agent closed the session".to_owned(),
                        Err(e) => e.to_string(),
                    },
                    _ = stop.changed() => return,
                };
                tracing::warn!(
                    reason,
                    "node agent session ended; pods stay as they are; reconnecting"
                );
                state.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(reason);
                });
                // Only a session that lasted starts the backoff again: an agent that
                // refuses this proxy at once must not be hammered.
                if connected.elapsed() >= SESSION_THAT_LASTED {
                    delay = FIRST_RETRY;
                }
            }
            Err(e) => {
                let reason = format!(
                    "cannot connect to the node agent at {}: {e}",
                    path.display()
                );
                let changed = state.borrow().last_error.as_deref() != Some(reason.as_str());
                if changed {
                    tracing::warn!(error = %reason, "waiting for the node agent (is `ambit cni` running with this --zds-socket?); retrying");
                    state.send_modify(|s| s.last_error = Some(reason));
                }
            }
        }
        let wait = delay.mul_f64(0.8 + 0.4 * fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(LAST_RETRY);
    }
}

/// Refuses a namespace that is the node proxy's own or the host's: serving a pod there
/// would open the capture listeners, and route traffic, on the node itself.
pub fn check_pod_netns(netns: &Netns) -> Result<(), String> {
    let own = Netns::host().map_err(|e| format!("cannot read the proxy's own namespace: {e}"))?;
    if *netns == own {
        return Err("the descriptor is the node proxy's own network namespace, not a pod's".into());
    }
    // PID 1's namespace is the host's (or, in a container, the container's own, which
    // is the check above again).
    if let Ok(host) = Netns::open("/proc/1/ns/net")
        && *netns == host
    {
        return Err("the descriptor is the host's network namespace, not a pod's".into());
    }
    Ok(())
}

async fn send(conn: &UnixSeqpacket, response: WorkloadResponse) -> std::io::Result<()> {
    conn.send(&response.encode_to_vec()).await.map(|_| ())
}

fn ack(error: impl Into<String>) -> WorkloadResponse {
    WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.into(),
        })),
    }
}

async fn session(
    conn: &UnixSeqpacket,
    pods: &Pods,
    state: &watch::Sender<ZdsState>,
) -> std::io::Result<()> {
    conn.send(
        &ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec(),
    )
    .await?;
    // Pods named during the current snapshot (until snapshot_sent).
    let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut ancillary = [0u8; 256];
    loop {
        let (info, reader) = conn.recv_with_ancillary(&mut buf, &mut ancillary).await?;
        let n = info.bytes_read();
        if n == 0 {
            return Ok(());
        }
        let mut fds = Vec::new();
        for message in reader.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(list) = message {
                fds.extend(list);
            }
        }
        if info.truncated() {
            send(
                conn,
                ack(format!("message larger than {MAX_MESSAGE} bytes")),
            )
            .await?;
            continue;
        }
        let request = match decode(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                send(conn, ack(e)).await?;
                continue;
            }
        };
        let reply = match request {
            Request::Add(info) => {
                let mut fds = fds.into_iter();
                let (Some(fd), None) = (fds.next(), fds.next()) else {
                    send(
                        conn,
                        ack("add needs exactly one network namespace descriptor"),
                    )
                    .await?;
                    continue;
                };
                let name = format!("{}/{} (uid {})", info.namespace, info.name, info.uid);
                match Netns::from_file(File::from(fd), name)
                    .map_err(|e| format!("not a network namespace: {e}"))
                {
                    Ok(netns) => {
                        let uid = info.uid.clone();
                        match pods.add(info, netns) {
                            Ok(()) => {
                                if let Some(s) = snapshot.as_mut() {
                                    s.insert(uid);
                                }
                                ack("")
                            }
                            Err(e) => ack(e),
                        }
                    }
                    Err(e) => ack(e),
                }
            }
            Request::Keep(uid) => match snapshot.as_mut() {
                Some(s) => {
                    s.insert(uid);
                    ack("")
                }
                None => ack("keep is only valid before snapshot_sent"),
            },
            Request::Del(uid) => {
                pods.remove(&uid);
                if let Some(s) = snapshot.as_mut() {
                    s.remove(&uid);
                }
                ack("")
            }
            Request::SnapshotSent => match snapshot.take() {
                Some(keep) => {
                    let before = pods.uids().len();
                    pods.retain(&keep);
                    tracing::info!(
                        pods = keep.len(),
                        removed = before.saturating_sub(pods.uids().len()),
                        "node agent snapshot applied"
                    );
                    state.send_modify(|s| s.snapshot_applied = true);
                    ack("")
                }
                None => ack("snapshot already sent on this connection"),
            },
        };
        send(conn, reply).await?;
    }
}

/// A request from the node agent, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Add(PodInfo),
    Keep(String),
    Del(String),
    SnapshotSent,
}

/// Longest uid, name, namespace or service account accepted (Kubernetes names are at
/// most 253 characters).
const MAX_FIELD: usize = 253;

fn field(what: &str, value: String, required: bool) -> Result<String, String> {
    checked(what, value, required, false)
}

/// A uid may hold '/' (Ambit's agent uses the discovery name `<cluster>//Pod/<ns>/<name>`).
fn uid(value: String) -> Result<String, String> {
    checked("uid", value, true, true)
}

fn checked(what: &str, value: String, required: bool, slash: bool) -> Result<String, String> {
    if required && value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > MAX_FIELD {
        return Err(format!("{what} is longer than {MAX_FIELD} bytes"));
    }
    if value
        .chars()
        .any(|c| c.is_control() || (c == '/' && !slash))
    {
        return Err(format!("{what} {value:?} holds a control character or '/'"));
    }
    Ok(value)
}

/// Decodes and checks one message from the node agent.
pub fn decode(bytes: &[u8]) -> Result<Request, String> {
    let request =
        WorkloadRequest::decode(bytes).map_err(|e| format!("undecodable WorkloadRequest: {e}"))?;
    match request.payload {
        Some(workload_request::Payload::Add(add)) => {
            let w = add
                .workload_info
                .ok_or_else(|| "add without workload_info".to_owned())?;
            Ok(Request::Add(PodInfo {
                uid: uid(add.uid)?,
                name: field("pod name", w.name, true)?,
                namespace: field("namespace", w.namespace, true)?,
                service_account: match field("service account", w.service_account, false)? {
                    sa if sa.is_empty() => "default".to_owned(),
                    sa => sa,
                },
            }))
        }
        Some(workload_request::Payload::Keep(keep)) => Ok(Request::Keep(uid(keep.uid)?)),
        Some(workload_request::Payload::Del(del)) => Ok(Request::Del(uid(del.uid)?)),
        Some(workload_request::Payload::SnapshotSent(_)) => Ok(Request::SnapshotSent),
        None => Err("empty WorkloadRequest".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_proto::zds::{AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo};

    fn encode(payload: workload_request::Payload) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    fn add(uid: &str, name: &str, ns: &str, sa: &str) -> Vec<u8> {
        encode(workload_request::Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: Some(WorkloadInfo {
                name: name.into(),
                namespace: ns.into(),
                service_account: sa.into(),
            }),
        }))
    }

    #[test]
    fn decodes_each_request() {
        assert!(matches!(
            decode(&add("Kubernetes//Pod/demo/echo", "echo", "demo", "")),
            Ok(Request::Add(p)) if p.uid == "Kubernetes//Pod/demo/echo"
        ));
        assert_eq!(
            decode(&add("u1", "echo", "demo", "")).unwrap(),
            Request::Add(PodInfo {
                uid: "u1".into(),
                name: "echo".into(),
                namespace: "demo".into(),
                service_account: "default".into(),
            })
        );
        let keep = encode(workload_request::Payload::Keep(KeepWorkload {
            uid: "u2".into(),
        }));
        assert_eq!(decode(&keep).unwrap(), Request::Keep("u2".into()));
        let del = encode(workload_request::Payload::Del(DelWorkload {
            uid: "u3".into(),
        }));
        assert_eq!(decode(&del).unwrap(), Request::Del("u3".into()));
        let done = encode(workload_request::Payload::SnapshotSent(SnapshotSent {}));
        assert_eq!(decode(&done).unwrap(), Request::SnapshotSent);
    }

    #[test]
    fn refuses_bad_requests_with_a_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff, 0xff, 0xff], "undecodable"),
            (WorkloadRequest { payload: None }.encode_to_vec(), "empty"),
            (add("", "echo", "demo", "sa"), "uid is empty"),
            (add("u", "", "demo", "sa"), "pod name is empty"),
            (add("u", "echo", "", "sa"), "namespace is empty"),
            (add("u", "echo", "de/mo", "sa"), "'/'"),
            (add("u\u{7}", "echo", "demo", "sa"), "control character"),
            (add("u", "echo\n", "demo", "sa"), "control character"),
            (add(&"u".repeat(300), "echo", "demo", "sa"), "longer than"),
            (
                encode(workload_request::Payload::Add(AddWorkload {
                    uid: "u".into(),
                    workload_info: None,
                })),
                "without workload_info",
            ),
        ];
        for (bytes, want) in cases {
            let err = decode(&bytes).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
