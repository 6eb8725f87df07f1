//! ZDS: the node agent tells the node proxy which pods to serve.
//!
//! The node proxy listens on a unix `SOCK_SEQPACKET` socket; one message per packet,
//! protobuf-encoded. On connect the proxy sends `ZdsHello { V1 }`; the agent then sends
//! its snapshot (`add` for each pod, with the pod's network namespace file descriptor as
//! SCM_RIGHTS ancillary data, or `keep` for a pod it has no descriptor for), then
//! `snapshot_sent`, after which the proxy stops serving pods the snapshot did not
//! mention. Later `add` and `del` messages follow. Every message is answered with
//! `Ack { error }` (empty: done). Losing the agent changes nothing: pods keep being
//! served until an agent reconnects and sends its snapshot.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ambit_hbone::socket::Netns;
use ambit_proto::prost::Message;
use ambit_proto::zds::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use tokio::sync::watch;
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

use crate::dataplane::PodInfo;
use crate::pods::Pods;

/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why the ZDS socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket (replacing a stale one), readable by root only.
pub fn bind(path: &Path) -> Result<UnixSeqpacketListener, ZdsError> {
    let err = |source| ZdsError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixSeqpacketListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves agents, one connection at a time, until `stop` fires.
pub async fn serve(
    mut listener: UnixSeqpacketListener,
    pods: Arc<Pods>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        match conn {
            Ok(conn) => {
                tracing::info!("node agent connected");
                let reason = match session(&conn, &pods).await {
                    Ok(()) => "disconnected".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::info!(reason, "node agent session ended; pods stay as they are");
            }
            Err(e) => {
                tracing::warn!(error = %e, "ZDS accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
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

async fn session(conn: &UnixSeqpacket, pods: &Pods) -> std::io::Result<()> {
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
        let request = match WorkloadRequest::decode(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                send(conn, ack(format!("undecodable WorkloadRequest: {e}"))).await?;
                continue;
            }
        };
        let reply = match request.payload {
            Some(workload_request::Payload::Add(add)) => {
                let Some(w) = add.workload_info else {
                    send(conn, ack("add without workload_info")).await?;
                    continue;
                };
                let mut fds = fds.into_iter();
                let (Some(fd), None) = (fds.next(), fds.next()) else {
                    send(
                        conn,
                        ack("add needs exactly one network namespace descriptor"),
                    )
                    .await?;
                    continue;
                };
                let name = format!("{}/{} (uid {})", w.namespace, w.name, add.uid);
                match Netns::from_file(File::from(fd), name) {
                    Ok(netns) => {
                        let info = PodInfo {
                            uid: add.uid.clone(),
                            name: w.name,
                            namespace: w.namespace,
                            service_account: if w.service_account.is_empty() {
                                "default".into()
                            } else {
                                w.service_account
                            },
                        };
                        match pods.add(info, netns).await {
                            Ok(()) => {
                                if let Some(s) = snapshot.as_mut() {
                                    s.insert(add.uid);
                                }
                                ack("")
                            }
                            Err(e) => ack(e),
                        }
                    }
                    Err(e) => ack(format!("not a network namespace: {e}")),
                }
            }
            Some(workload_request::Payload::Keep(keep)) => match snapshot.as_mut() {
                Some(s) => {
                    s.insert(keep.uid);
                    ack("")
                }
                None => ack("keep is only valid before snapshot_sent"),
            },
            Some(workload_request::Payload::Del(del)) => {
                pods.remove(&del.uid).await;
                if let Some(s) = snapshot.as_mut() {
                    s.remove(&del.uid);
                }
                ack("")
            }
            Some(workload_request::Payload::SnapshotSent(_)) => match snapshot.take() {
                Some(keep) => {
                    let before = pods.uids().len();
                    pods.retain(&keep).await;
                    tracing::info!(
                        pods = keep.len(),
                        removed = before.saturating_sub(pods.uids().len()),
                        "node agent snapshot applied"
                    );
                    ack("")
                }
                None => ack("snapshot already sent on this connection"),
            },
            None => ack("empty WorkloadRequest"),
        };
        send(conn, reply).await?;
    }
}
