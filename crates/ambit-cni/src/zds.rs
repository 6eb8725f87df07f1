//! The node agent's side of ZDS: it serves the socket, the node proxy connects.
//!
//! As in Istio, the agent listens on a unix `SOCK_SEQPACKET` socket (default
//! `/var/run/ztunnel/ztunnel.sock`) and the node proxy connects to it, retrying while the
//! agent is away. The proxy speaks first (`ZdsHello { V1 }`); the agent then sends its
//! snapshot (`add`/`keep` per pod, then `snapshot_sent`) and later changes (`add`,
//! `del`), one request per packet, each answered by an `Ack` before the next is sent; an
//! `add` carries the pod's network namespace as an SCM_RIGHTS descriptor.
//!
//! Whoever can connect here is handed pods' network namespaces, so the socket is guarded
//! twice: it is created with mode 0600 inside a directory of mode 0700 (the mode is set
//! on the socket before it is bound, so there is no moment at which it exists with a
//! wider one), and every connecting process's credentials (SO_PEERCRED) are checked
//! against the allowed user ids (root, plus any configured) before it is spoken to.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_proto::prost::Message;
use ambit_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use tokio_seqpacket::ancillary::AncillaryMessageWriter;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

/// Istio's path for the node agent's socket.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest message accepted from the node proxy.
const MAX_REPLY: usize = 64 * 1024;

/// What went wrong serving or talking to the node proxy.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("cannot serve the node proxy socket at {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    #[error("node proxy connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node proxy closed the connection")]
    Closed,
    #[error("the node proxy did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the node proxy sent an undecodable {what}: {reason}")]
    Protocol { what: &'static str, reason: String },
    #[error("the node proxy speaks ZDS version {0}, this agent speaks V1")]
    Version(i32),
    #[error(
        "refused a connection from pid {pid}, uid {uid}: only root or an allowed uid may act as the node proxy (ambit cni --zds-allowed-uid)"
    )]
    Peer { pid: i32, uid: u32 },
    #[error("the node proxy refused {request}: {reason}")]
    Refused {
        request: &'static str,
        reason: String,
    },
}

/// A pod as the node proxy is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// The socket node proxies connect to.
#[derive(Debug)]
pub struct ZdsListener {
    listener: UnixSeqpacketListener,
    path: PathBuf,
    allowed_uids: Vec<u32>,
    timeout: Duration,
}

impl ZdsListener {
    /// Creates the socket at `path` (replacing a stale one) with mode 0600, inside a
    /// directory of mode 0700 (created if missing; an existing one is restricted to 0700
    /// if this process owns it, refused otherwise). With a non-root allowed uid, the
    /// socket is given to that uid and the directory is 0711 (passable, not listable). Only connections from processes
    /// running as one of `allowed_uids` are served (the node agent's configuration
    /// puts root there); `timeout` bounds every wait for the node proxy.
    pub fn bind(path: &Path, allowed_uids: &[u32], timeout: Duration) -> Result<Self, ZdsError> {
        let err = |reason: String| ZdsError::Listen {
            path: path.to_owned(),
            reason,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| err("the path has no parent directory".into()))?;
        // A node proxy running as another user (one allowed uid besides root) owns the
        // socket and may pass through the folder (0711: it can reach the socket by name,
        // not list the folder); everyone else is still kept out by the modes.
        let me = nix::unistd::geteuid().as_raw();
        let owner = allowed_uids.iter().copied().find(|u| *u != 0 && *u != me);
        private_dir(dir, if owner.is_some() { 0o711 } else { 0o700 }).map_err(err)?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("cannot remove the old socket: {e}"))),
        }
        let fd = bind_private(path).map_err(|e| err(e.to_string()))?;
        if let Some(uid) = owner {
            // Until here the socket is root's, mode 0600: narrower, not wider.
            nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), None)
                .map_err(|e| err(format!("cannot give the socket to uid {uid}: {e}")))?;
        }
        let listener = UnixSeqpacketListener::try_from(fd).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            allowed_uids: allowed_uids.to_vec(),
            timeout,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next node proxy: checks its credentials and reads its hello. A
    /// connection that fails either is closed and reported as an error; the listener
    /// stays usable.
    pub async fn accept(&mut self) -> Result<ZdsSession, ZdsError> {
        let conn = self.listener.accept().await?;
        let cred = conn.peer_cred()?;
        if !self.allowed_uids.contains(&cred.uid()) {
            return Err(ZdsError::Peer {
                pid: cred.pid().unwrap_or(0),
                uid: cred.uid(),
            });
        }
        let session = ZdsSession {
            conn,
            timeout: self.timeout,
            peer_pid: cred.pid().unwrap_or(0),
        };
        let hello = session.receive().await?;
        let hello = ZdsHello::decode(hello.as_slice()).map_err(|e| ZdsError::Protocol {
            what: "hello",
            reason: e.to_string(),
        })?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::Version(hello.version));
        }
        Ok(session)
    }
}

/// Makes `dir` a directory of `mode` (0700, or 0711) owned by this process's user.
fn private_dir(dir: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to this process (uid {me}); remove it or choose another --zds-socket",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set {} to mode {mode:o}: {e}", dir.display()))?;
    }
    Ok(())
}

/// A listening `SOCK_SEQPACKET` socket at `path`, with mode 0600 from the moment it
/// exists: Linux creates a unix socket's file with the mode of the socket's inode
/// (less the umask), and that mode is set here before `bind`.
fn bind_private(path: &Path) -> std::io::Result<OwnedFd> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking().cloexec(), None)?;
    nix::sys::stat::fchmod(&socket, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(16)?;
    Ok(OwnedFd::from(socket))
}

/// A session with one node proxy.
#[derive(Debug)]
pub struct ZdsSession {
    conn: UnixSeqpacket,
    timeout: Duration,
    peer_pid: i32,
}

impl ZdsSession {
    /// The node proxy's process id, as the kernel reported it when it connected.
    pub fn peer_pid(&self) -> i32 {
        self.peer_pid
    }

    /// Asks the node proxy to serve a pod inside the network namespace `netns`.
    pub async fn add(&self, pod: &PodRef, netns: BorrowedFd<'_>) -> Result<(), ZdsError> {
        let request = workload_request::Payload::Add(AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(WorkloadInfo {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            }),
        });
        self.request("add", request, Some(netns)).await
    }

    /// During the snapshot: the pod stays as it is (no descriptor at hand).
    pub async fn keep(&self, uid: &str) -> Result<(), ZdsError> {
        let request = workload_request::Payload::Keep(KeepWorkload {
            uid: uid.to_owned(),
        });
        self.request("keep", request, None).await
    }

    /// Stops the node proxy serving a pod.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let request = workload_request::Payload::Del(DelWorkload {
            uid: uid.to_owned(),
        });
        self.request("del", request, None).await
    }

    /// Ends the snapshot: pods it did not name stop being served.
    pub async fn snapshot_sent(&self) -> Result<(), ZdsError> {
        let request = workload_request::Payload::SnapshotSent(SnapshotSent {});
        self.request("snapshot_sent", request, None).await
    }

    /// Resolves when the node proxy closes the session (it sends nothing unasked, so a
    /// readable socket means the end). Cancel-safe: dropping it loses nothing.
    pub async fn closed(&self) {
        let mut buf = [0u8; 64];
        loop {
            match self.conn.recv(&mut buf).await {
                Ok(info) if info.bytes_read() == 0 => return,
                Ok(_) => tracing::warn!("unexpected message from the node proxy; ignored"),
                Err(_) => return,
            }
        }
    }

    async fn request(
        &self,
        name: &'static str,
        payload: workload_request::Payload,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        let body = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        let send = async {
            match fd {
                Some(fd) => {
                    let fds = [fd];
                    let mut space = [0u8; 64];
                    let mut ancillary = AncillaryMessageWriter::new(&mut space);
                    ancillary
                        .add_fds(&fds)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    self.conn.send_with_ancillary(&body, &mut ancillary).await
                }
                None => self.conn.send(&body).await,
            }
        };
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ZdsError::Timeout(self.timeout))??;
        let reply = self.receive().await?;
        let reply = WorkloadResponse::decode(reply.as_slice()).map_err(|e| ZdsError::Protocol {
            what: "reply",
            reason: e.to_string(),
        })?;
        match reply.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Refused {
                request: name,
                reason: ack.error,
            }),
            None => Err(ZdsError::Protocol {
                what: "reply",
                reason: "no payload".into(),
            }),
        }
    }

    async fn receive(&self) -> Result<Vec<u8>, ZdsError> {
        let mut buf = vec![0u8; MAX_REPLY];
        let info = tokio::time::timeout(self.timeout, self.conn.recv(&mut buf))
            .await
            .map_err(|_| ZdsError::Timeout(self.timeout))??;
        if info.bytes_read() == 0 {
            return Err(ZdsError::Closed);
        }
        if info.truncated() {
            return Err(ZdsError::Protocol {
                what: "message",
                reason: format!("larger than {MAX_REPLY} bytes"),
            });
        }
        buf.truncate(info.bytes_read());
        Ok(buf)
    }
}

#[cfg(test)]
mod tests;
