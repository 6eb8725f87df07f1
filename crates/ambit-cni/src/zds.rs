//! The node agent's side of ZDS: tells the node proxy which pods to serve.
//!
//! One request per `SOCK_SEQPACKET` packet, each answered by an `Ack` before the next is
//! sent; an `add` carries the pod's network namespace as an SCM_RIGHTS descriptor. On
//! connect the node proxy speaks first (`ZdsHello`); the agent then sends its snapshot
//! (`add`/`keep` per pod, then `snapshot_sent`) and later changes (`add`, `del`).

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_proto::prost::Message;
use ambit_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::AncillaryMessageWriter;

/// Largest reply accepted.
const MAX_REPLY: usize = 64 * 1024;

/// What went wrong talking to the node proxy.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error(
        "cannot connect to the node proxy at {path}: {source} (is `ambit node --zds-socket {path}` running?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// A session with the node proxy.
#[derive(Debug)]
pub struct ZdsClient {
    conn: UnixSeqpacket,
    timeout: Duration,
}

impl ZdsClient {
    /// Connects and waits for the node proxy's hello.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, ZdsError> {
        let conn = UnixSeqpacket::connect(path)
            .await
            .map_err(|source| ZdsError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let client = Self { conn, timeout };
        let hello = client.receive().await?;
        let hello = ZdsHello::decode(hello.as_slice()).map_err(|e| ZdsError::Protocol {
            what: "hello",
            reason: e.to_string(),
        })?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::Version(hello.version));
        }
        Ok(client)
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
        match fd {
            Some(fd) => {
                let fds = [fd];
                let mut space = [0u8; 64];
                let mut ancillary = AncillaryMessageWriter::new(&mut space);
                ancillary
                    .add_fds(&fds)
                    .map_err(|e| ZdsError::Io(std::io::Error::other(e.to_string())))?;
                self.conn.send_with_ancillary(&body, &mut ancillary).await?;
            }
            None => {
                self.conn.send(&body).await?;
            }
        }
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
