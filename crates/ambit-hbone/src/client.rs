//! The HBONE client: a pool of HTTP/2 connections, one CONNECT stream per tunnel.
//!
//! Connections are keyed by (source identity, expected destination identities,
//! destination address, socket options): streams with the same key share a connection,
//! up to [`PoolConfig::max_streams_per_connection`], after which another connection is
//! opened. The first request for a key opens the connection in a task of its own;
//! concurrent requests for the same key wait for that one handshake instead of starting
//! their own. Each connection is kept alive with PINGs (a peer that stops answering is
//! evicted) and closed once idle for [`PoolConfig::idle_timeout`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_tls::spiffe::{TrustBundle, UnexpectedIdentity, hbone_client_config};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::headers::ConnectHeaders;
use crate::server::keepalive;
use crate::socket::{SocketOptions, connect as tcp_connect};
use crate::stream::H2Stream;
use crate::tls_io::Batched;
use crate::{H2Settings, Keepalive};

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub h2: H2Settings,
    /// Streams one connection carries before another is opened.
    pub max_streams_per_connection: usize,
    /// TCP connect plus TLS and HTTP/2 handshakes must finish within this.
    pub connect_timeout: Duration,
    pub keepalive: Keepalive,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            h2: H2Settings::default(),
            max_streams_per_connection: 100,
            connect_timeout: Duration::from_secs(10),
            keepalive: Keepalive::default(),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// One tunnel to open.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The source workload's identity and its current certificate.
    pub source: SpiffeId,
    pub source_cert: Arc<CertifiedKey>,
    /// Where the HBONE server listens (`<pod IP>:15008`).
    pub destination: SocketAddr,
    /// The identities the server may present (the workload's, or its waypoint's).
    pub expected: Vec<SpiffeId>,
    /// The `:authority`: the original destination.
    pub authority: SocketAddr,
    pub headers: ConnectHeaders,
    /// How to open the TCP connection (source address, mark, namespace).
    pub socket: SocketOptions,
}

/// Why a tunnel could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {destination}: {message}")]
    Tcp {
        destination: SocketAddr,
        message: String,
    },
    #[error("TLS with {destination} failed: {message}")]
    Tls {
        destination: SocketAddr,
        message: String,
    },
    #[error("{destination} is not who we expected: {message}")]
    WrongIdentity {
        destination: SocketAddr,
        message: String,
    },
    #[error("HTTP/2 with {destination} failed: {message}")]
    Http2 {
        destination: SocketAddr,
        message: String,
    },
    #[error("{destination} refused the tunnel to {authority} with status {status}")]
    Refused {
        destination: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("connecting to {destination} timed out after {after:?}")]
    Timeout {
        destination: SocketAddr,
        after: Duration,
    },
}

impl ConnectError {
    /// The HTTP status a server refused with, if that is what happened.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    source: SpiffeId,
    expected: Vec<SpiffeId>,
    destination: SocketAddr,
    socket: SocketOptions,
}

/// A pool of HBONE connections. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: PoolConfig,
    bundle: TrustBundle,
    slots: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
    handshakes: AtomicU64,
    epoch: Instant,
}

/// The result of opening a connection, once known.
type Outcome = Option<Result<Arc<Conn>, ConnectError>>;

#[derive(Default)]
struct Slot {
    ready: Vec<Arc<Conn>>,
    /// A connection being opened; waiters watch for its outcome.
    connecting: Option<watch::Receiver<Outcome>>,
}

struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    max: usize,
    dead: AtomicBool,
    /// Milliseconds since the pool epoch when the last stream ended.
    idle_since_ms: AtomicU64,
    idle_changed: tokio::sync::Notify,
}

impl Conn {
    fn try_acquire(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
            && self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max).then_some(n + 1)
                })
                .is_ok()
    }
}

/// Holds one stream's place on its connection; dropping it frees the place.
pub struct StreamGuard {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since_ms
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
            self.conn.idle_changed.notify_one();
        }
    }
}

/// What the pool holds, for admin output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub connections: usize,
    pub active_streams: usize,
    /// TLS handshakes completed since the pool was created.
    pub handshakes: u64,
}

impl Pool {
    pub fn new(config: PoolConfig, bundle: TrustBundle) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                config,
                bundle,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                handshakes: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    pub fn stats(&self) -> PoolStats {
        let slots = self.lock();
        let conns = slots.values().flat_map(|s| s.ready.iter());
        let (mut connections, mut active_streams) = (0, 0);
        for c in conns.filter(|c| !c.dead.load(Ordering::Acquire)) {
            connections += 1;
            active_streams += c.active.load(Ordering::Acquire);
        }
        PoolStats {
            connections,
            active_streams,
            handshakes: self.inner.handshakes.load(Ordering::Acquire),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        // Every critical section leaves the map consistent (pushes, removals), so a
        // panicking holder cannot leave it half-updated.
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens a tunnel: a CONNECT stream on a pooled connection, answered 200.
    pub async fn connect(&self, req: ConnectRequest) -> Result<H2Stream, ConnectError> {
        let key = Key {
            source: req.source.clone(),
            expected: req.expected.clone(),
            destination: req.destination,
            socket: req.socket.clone(),
        };
        // A connection can die between being picked and being used; try a few times.
        let mut last_err = None;
        for _ in 0..3 {
            let conn = self.checkout(&key, &req).await?;
            let guard = StreamGuard {
                conn: conn.clone(),
                epoch: self.inner.epoch,
            };
            match open_stream(&conn, &req).await {
                Ok((send, recv)) => return Ok(H2Stream::new(send, recv, Some(guard))),
                Err(StreamError::Refused(e)) => return Err(e),
                Err(StreamError::ConnectionGone(e)) => {
                    conn.dead.store(true, Ordering::Release);
                    self.remove(&key, conn.id);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(ConnectError::Http2 {
            destination: req.destination,
            message: "no usable connection".into(),
        }))
    }

    /// A connection for `key` with room for one more stream (the stream's place is taken).
    async fn checkout(&self, key: &Key, req: &ConnectRequest) -> Result<Arc<Conn>, ConnectError> {
        loop {
            let mut waiting = {
                let mut slots = self.lock();
                let slot = slots.entry(key.clone()).or_default();
                slot.ready.retain(|c| !c.dead.load(Ordering::Acquire));
                if let Some(conn) = slot.ready.iter().find(|c| c.try_acquire()) {
                    return Ok(conn.clone());
                }
                match &slot.connecting {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        slot.connecting = Some(rx.clone());
                        tokio::spawn(self.clone().establish(key.clone(), req.clone(), tx));
                        rx
                    }
                }
            };
            let outcome = match waiting.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => Some(Err(ConnectError::Http2 {
                    destination: req.destination,
                    message: "the connection attempt was abandoned".into(),
                })),
            };
            match outcome {
                Some(Err(e)) => return Err(e),
                // Connected: loop to take a place on it (or on another one).
                _ => continue,
            }
        }
    }

    /// Opens one connection for `key` and publishes the outcome to everyone waiting.
    async fn establish(self, key: Key, req: ConnectRequest, tx: watch::Sender<Outcome>) {
        let timeout = self.inner.config.connect_timeout;
        let result = match tokio::time::timeout(timeout, self.handshake(&req)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout {
                destination: req.destination,
                after: timeout,
            }),
        };
        let outcome = {
            let mut slots = self.lock();
            let slot = slots.entry(key.clone()).or_default();
            slot.connecting = None;
            match result {
                Ok((conn, driver)) => {
                    slot.ready.push(conn.clone());
                    tokio::spawn(self.clone().drive(key, conn.clone(), driver));
                    Ok(conn)
                }
                Err(e) => {
                    if slot.ready.is_empty() {
                        slots.remove(&key);
                    }
                    tracing::debug!(error = %e, "HBONE connection failed");
                    Err(e)
                }
            }
        };
        let _ = tx.send(Some(outcome));
    }

    async fn handshake(&self, req: &ConnectRequest) -> Result<(Arc<Conn>, Driver), ConnectError> {
        let destination = req.destination;
        let tcp = tcp_connect(destination, &req.socket)
            .await
            .map_err(|e| ConnectError::Tcp {
                destination,
                message: e.to_string(),
            })?;
        let tls_config = hbone_client_config(
            req.source_cert.clone(),
            &self.inner.bundle,
            req.expected.clone(),
        )
        .map_err(|e| ConnectError::Tls {
            destination,
            message: e.to_string(),
        })?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config));
        // No SNI is sent; the name only satisfies the API.
        let name = ServerName::IpAddress(destination.ip().into());
        let tcp = tokio::io::BufReader::with_capacity(crate::TLS_READ_BUFFER, tcp);
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(destination, e))?;
        if tls.get_ref().1.alpn_protocol() != Some(ambit_tls::config::ALPN_H2) {
            return Err(ConnectError::Tls {
                destination,
                message: "the server did not negotiate ALPN h2".into(),
            });
        }
        self.inner.handshakes.fetch_add(1, Ordering::AcqRel);
        let h2 = &self.inner.config.h2;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_frame_size(h2.max_frame_size)
            .max_send_buffer_size(h2.max_send_buffer)
            .max_header_list_size(h2.max_header_list_size)
            .enable_push(false)
            .handshake::<_, Bytes>(Batched::new(tls))
            .await
            .map_err(|e| ConnectError::Http2 {
                destination,
                message: e.to_string(),
            })?;
        let ping = connection.ping_pong();
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: AtomicUsize::new(0),
            max: self.inner.config.max_streams_per_connection.max(1),
            dead: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.inner.epoch.elapsed().as_millis() as u64),
            idle_changed: tokio::sync::Notify::new(),
        });
        Ok((
            conn,
            Driver {
                connection: Box::pin(connection),
                ping,
            },
        ))
    }

    /// Runs a connection until it ends, its peer stops answering PINGs, or it idles out;
    /// then takes it out of the pool.
    async fn drive(self, key: Key, conn: Arc<Conn>, driver: Driver) {
        let Driver { connection, ping } = driver;
        let keepalive = keepalive(ping, self.inner.config.keepalive);
        let idle = self.idle_watch(&conn);
        let reason = tokio::select! {
            r = connection => match r {
                Ok(()) => "closed by the peer",
                Err(_) => "failed",
            },
            _ = keepalive => "evicted: the peer stopped answering PINGs",
            _ = idle => "closed after being idle",
        };
        conn.dead.store(true, Ordering::Release);
        self.remove(&key, conn.id);
        tracing::debug!(destination = %key.destination, id = conn.id, reason, "HBONE connection ended");
    }

    async fn idle_watch(&self, conn: &Conn) {
        let timeout = self.inner.config.idle_timeout;
        loop {
            if conn.active.load(Ordering::Acquire) == 0 {
                let since = Duration::from_millis(conn.idle_since_ms.load(Ordering::Acquire));
                let at = self.inner.epoch + since + timeout;
                if Instant::now() >= at {
                    // Claim the connection so no stream starts on it as it closes.
                    if conn
                        .active
                        .compare_exchange(0, usize::MAX / 2, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        conn.dead.store(true, Ordering::Release);
                        return;
                    }
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = conn.idle_changed.notified() => {}
                }
            } else {
                conn.idle_changed.notified().await;
            }
        }
    }

    fn remove(&self, key: &Key, id: u64) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(key) {
            slot.ready.retain(|c| c.id != id);
            if slot.ready.is_empty() && slot.connecting.is_none() {
                slots.remove(key);
            }
        }
    }
}

/// The transport under a client connection's HTTP/2.
type ClientIo =
    Batched<tokio_rustls::client::TlsStream<tokio::io::BufReader<tokio::net::TcpStream>>>;

struct Driver {
    connection: std::pin::Pin<Box<h2::client::Connection<ClientIo, Bytes>>>,
    ping: Option<h2::PingPong>,
}

enum StreamError {
    /// The server answered with a non-200 status.
    Refused(ConnectError),
    /// The connection cannot take streams any more.
    ConnectionGone(ConnectError),
}

async fn open_stream(
    conn: &Conn,
    req: &ConnectRequest,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), StreamError> {
    let destination = req.destination;
    let gone = |e: h2::Error| {
        StreamError::ConnectionGone(ConnectError::Http2 {
            destination,
            message: e.to_string(),
        })
    };
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .body(())
        .map_err(|e| {
            StreamError::Refused(ConnectError::Http2 {
                destination,
                message: e.to_string(),
            })
        })?;
    let mut headers = HeaderMap::new();
    req.headers.write(&mut headers);
    *request.headers_mut() = headers;
    let mut send = conn.send.clone().ready().await.map_err(gone)?;
    let (response, stream) = send.send_request(request, false).map_err(gone)?;
    let response = response.await.map_err(|e| {
        if e.is_reset() {
            // The stream alone was reset (e.g. REFUSED_STREAM over the limit).
            StreamError::Refused(ConnectError::Http2 {
                destination,
                message: e.to_string(),
            })
        } else {
            gone(e)
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(StreamError::Refused(ConnectError::Refused {
            destination,
            authority: req.authority,
            status: response.status(),
        }));
    }
    Ok((stream, response.into_body()))
}

/// A readable reason for a failed TLS handshake; a wrong server identity gets its own
/// variant with both names.
fn tls_error(destination: SocketAddr, e: std::io::Error) -> ConnectError {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) = inner
        && let Some(unexpected) = other.0.downcast_ref::<UnexpectedIdentity>()
    {
        return ConnectError::WrongIdentity {
            destination,
            message: unexpected.to_string(),
        };
    }
    ConnectError::Tls {
        destination,
        message: e.to_string(),
    }
}
