//! The agent's side of the CNI plugin's socket: one JSON line in (a [`PodEvent`]), one
//! out (an [`EventReply`]) per connection. Only root may connect (the container runtime
//! runs the plugin as root); the socket is mode 0600 in a folder only its owner enters.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::plugin::{EventReply, PodEvent};

/// The largest request read from the plugin.
const MAX_REQUEST: u64 = 64 << 10;
/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the reconciler may take to answer (below the plugin's own timeout).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// One event for the reconciler, and where its answer goes.
pub(crate) type Event = (PodEvent, oneshot::Sender<EventReply>);

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for the CNI plugin at {path}: {reason}")]
pub struct EventsError {
    path: PathBuf,
    reason: String,
}

pub(crate) fn bind(path: &Path) -> Result<UnixListener, EventsError> {
    let err = |reason: String| EventsError {
        path: path.to_owned(),
        reason,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| err("the path has no parent directory".into()))?;
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| err(e.to_string()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(err(format!(
            "{} must be a directory owned by uid {me} that nobody else may write",
            dir.display()
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("cannot remove the old socket: {e}"))),
    }
    let fd = (|| -> std::io::Result<OwnedFd> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
        nix::sys::stat::fchmod(&socket, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(std::io::Error::from)?;
        socket.bind(&SockAddr::unix(path)?)?;
        socket.listen(64)?;
        Ok(OwnedFd::from(socket))
    })()
    .map_err(|e| err(e.to_string()))?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    UnixListener::from_std(std_listener).map_err(|e| err(e.to_string()))
}

/// Accepts plugin connections until stopped; each is served on its own task.
pub(crate) async fn serve(
    listener: UnixListener,
    events: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let events = events.clone();
                tokio::spawn(async move {
                    if let Err(e) = one(stream, events).await {
                        tracing::warn!(error = %e, "CNI plugin request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn one(stream: UnixStream, events: mpsc::Sender<Event>) -> Result<(), String> {
    let cred = stream.peer_cred().map_err(|e| e.to_string())?;
    if cred.uid() != 0 {
        return Err(format!(
            "refused a connection from uid {} (only root, the container runtime, may call)",
            cred.uid()
        ));
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| "the plugin sent no request in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let reply = match serde_json::from_str::<PodEvent>(&line) {
        Err(e) => EventReply {
            captured: false,
            error: Some(format!("unreadable request: {e}")),
        },
        Ok(event) => {
            let (tx, rx) = oneshot::channel();
            if events.send((event, tx)).await.is_err() {
                return Err("the agent is stopping".into());
            }
            match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => return Err("the agent is stopping".into()),
                Err(_) => EventReply {
                    captured: false,
                    error: Some("the node agent took too long to enroll the pod".into()),
                },
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
    out.push(b'\n');
    write.write_all(&out).await.map_err(|e| e.to_string())
}
