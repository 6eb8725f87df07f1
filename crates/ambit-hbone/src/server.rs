//! The HBONE server: TLS 1.3 with a client certificate, HTTP/2, one CONNECT per tunnel.
//!
//! Each connection: TCP accept -> TLS handshake within [`ServerConfig::handshake_timeout`]
//! (the client must present a certificate chaining to the mesh root; its SPIFFE ID becomes
//! the peer identity) -> HTTP/2 with bounded streams and header size -> each request is
//! checked (method CONNECT, `:authority` an `ip:port`) and handed to the
//! [`ConnectHandler`], which accepts it (200 and a byte stream) or refuses it with a status.
//! A request that fails the checks gets 400 and never reaches the handler. (HTTP/2 itself
//! resets a CONNECT that carries `:scheme` or `:path` with PROTOCOL_ERROR, as RFC 9113
//! §8.1.1 requires of malformed requests; that too never reaches the handler.)
//!
//! [`ServerHandle::shutdown`] drains: the listener closes, every connection sends GOAWAY,
//! open streams may finish until the deadline, then whatever remains is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::admission::{Admission, Ticket};
use crate::headers::ConnectHeaders;
use crate::stream::{H2Stream, h2_to_io};
use crate::workers::Workers;
use crate::{H2Settings, Keepalive};

/// Server limits and settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub h2: H2Settings,
    /// Concurrent CONNECT streams one client connection may have open.
    pub max_concurrent_streams: u32,
    /// A client must complete TLS and HTTP/2 setup within this time.
    pub handshake_timeout: Duration,
    /// A connection without an open stream for this long is closed (GOAWAY): an
    /// authenticated peer cannot keep idle connections forever. Clients close theirs
    /// sooner (the pool after 60 s).
    pub idle_timeout: Duration,
    pub keepalive: Keepalive,
    /// Limits on connections and handshakes, shared with the process's other servers
    /// (`None`: unlimited, for tests and tools).
    pub admission: Option<Arc<Admission>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            h2: H2Settings::default(),
            max_concurrent_streams: 1000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive: Keepalive::default(),
            admission: None,
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The SPIFFE ID of the client certificate: the source principal.
    pub identity: SpiffeId,
    /// The TCP peer address (the source pod's IP for HBONE from a node proxy).
    pub addr: SocketAddr,
    /// The local address the connection arrived on.
    pub local: SocketAddr,
}

/// Decides what happens to each well-formed CONNECT.
pub trait ConnectHandler: Send + Sync + 'static {
    /// Accept ([`IncomingConnect::accept`]) or refuse ([`IncomingConnect::refuse`]) the
    /// request. Runs in its own task; may take as long as the tunnel lives.
    fn handle(&self, connect: IncomingConnect) -> impl Future<Output = ()> + Send;
}

/// A CONNECT that passed the checks, waiting for the handler's answer.
pub struct IncomingConnect {
    pub peer: PeerInfo,
    /// The original destination the client asked for.
    pub authority: SocketAddr,
    pub headers: ConnectHeaders,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl std::fmt::Debug for IncomingConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingConnect")
            .field("peer", &self.peer)
            .field("authority", &self.authority)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl IncomingConnect {
    /// Answers 200 and returns the tunnel's byte stream.
    pub fn accept(mut self) -> io::Result<H2Stream> {
        let response = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .map_err(io::Error::other)?;
        let send = self
            .respond
            .send_response(response, false)
            .map_err(h2_to_io)?;
        Ok(H2Stream::new(send, self.recv, None))
    }

    /// Refuses with `status` (e.g. 401 for a policy denial, 503 when the backend is
    /// unreachable). Nothing reaches the destination.
    pub fn refuse(mut self, status: StatusCode) {
        respond_empty(&mut self.respond, status);
    }
}

fn respond_empty(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(response) = Response::builder().status(status).body(()) {
        // The client may already be gone; then there is nobody to tell.
        let _ = respond.send_response(response, true);
    }
}

/// Why a request was refused before reaching the handler.
fn check(req: &Request<RecvStream>) -> Result<SocketAddr, &'static str> {
    if req.method() != Method::CONNECT {
        return Err("the method must be CONNECT");
    }
    if req.uri().scheme().is_some() || req.uri().path_and_query().is_some() {
        return Err("a CONNECT request has no :scheme or :path");
    }
    let authority = req.uri().authority().ok_or("missing :authority")?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .map_err(|_| ":authority must be ip:port")
}

/// An HBONE server, ready to serve a listener.
pub struct Server {
    tls: TlsAcceptor,
    config: Arc<ServerConfig>,
    workers: Option<Workers>,
}

impl Server {
    /// `tls` comes from [`ambit_tls::spiffe::hbone_server_config`].
    pub fn new(tls: rustls::ServerConfig, config: ServerConfig) -> Self {
        Self {
            tls: TlsAcceptor::from(Arc::new(tls)),
            config: Arc::new(config),
            workers: None,
        }
    }

    /// Runs each accepted connection on the next of these workers instead of the
    /// accepting runtime.
    pub fn with_workers(mut self, workers: Workers) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Serves `listener` in the background until [`ServerHandle::shutdown`].
    pub fn serve<H: ConnectHandler>(self, listener: TcpListener, handler: Arc<H>) -> ServerHandle {
        let local_addr = listener.local_addr().ok();
        let (drain_tx, drain_rx) = watch::channel(None);
        let task = tokio::spawn(accept_loop(self, listener, handler, drain_rx));
        ServerHandle {
            drain: drain_tx,
            task,
            local_addr,
        }
    }
}

/// Controls a running server.
pub struct ServerHandle {
    drain: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
    local_addr: Option<SocketAddr>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting, sends GOAWAY on every connection, lets open streams finish for
    /// up to `deadline`, then closes what remains. Returns when everything is closed.
    pub async fn shutdown(self, deadline: Duration) {
        // A deadline too far to represent (Duration::MAX: "no deadline") is 100 years.
        let now = Instant::now();
        let at = now
            .checked_add(deadline)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let _ = self.drain.send(Some(at));
        let _ = self.task.await;
    }
}

async fn accept_loop<H: ConnectHandler>(
    server: Server,
    listener: TcpListener,
    handler: Arc<H>,
    mut drain: watch::Receiver<Option<Instant>>,
) {
    let mut connections = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "HBONE accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                // Over a limit: closed now, before anything is spent on it.
                let ticket = match &server.config.admission {
                    Some(a) => match a.admit(addr.ip()) {
                        Ok(t) => Some(t),
                        Err(r) => {
                            tracing::debug!(peer = %addr, limit = r.as_str(), "HBONE connection refused on arrival");
                            continue;
                        }
                    },
                    None => None,
                };
                let _ = tcp.set_nodelay(true);
                let local = tcp.local_addr().unwrap_or(addr);
                let tls = server.tls.clone();
                let config = server.config.clone();
                let handler = handler.clone();
                let drain = drain.clone();
                let serve = move |tcp: tokio::net::TcpStream| async move {
                    let arrival = Arrival { addr, local, ticket };
                    if let Err(e) = tls_connection(tcp, arrival, tls, config, handler, drain).await {
                        tracing::debug!(peer = %addr, error = %e, "HBONE connection ended with an error");
                    }
                };
                match &server.workers {
                    None => {
                        connections.spawn(serve(tcp));
                    }
                    Some(workers) => match workers.dispatch(tcp) {
                        Ok((worker, moving)) => {
                            connections.spawn_on(
                                async move {
                                    match moving.arrive() {
                                        // The load counts for the connection's life.
                                        Ok((tcp, _load)) => serve(tcp).await,
                                        Err(e) => tracing::warn!(peer = %addr, error = %e, "cannot move an HBONE connection to its worker"),
                                    }
                                },
                                worker,
                            );
                        }
                        Err(e) => tracing::warn!(peer = %addr, error = %e, "cannot move an HBONE connection to its worker"),
                    },
                }
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = drain.changed() => {
                let d = if changed.is_ok() { *drain.borrow() } else { Some(Instant::now()) };
                if let Some(d) = d { break d }
            }
        }
    };
    drop(listener);
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, all_done).await.is_err() {
        tracing::info!(
            remaining = connections.len(),
            "drain deadline reached; closing the remaining HBONE connections"
        );
        connections.shutdown().await;
    }
}

/// Where a connection came from, and its place under the limits.
struct Arrival {
    addr: SocketAddr,
    local: SocketAddr,
    ticket: Option<Ticket>,
}

async fn tls_connection<H: ConnectHandler>(
    tcp: tokio::net::TcpStream,
    arrival: Arrival,
    tls: TlsAcceptor,
    config: Arc<ServerConfig>,
    handler: Arc<H>,
    drain: watch::Receiver<Option<Instant>>,
) -> io::Result<()> {
    let Arrival {
        addr,
        local,
        mut ticket,
    } = arrival;
    let deadline = Instant::now() + config.handshake_timeout;
    // Nothing large until the client is authenticated.
    let tcp = crate::read_buffer::ReadBuffered::new(tcp, crate::TLS_READ_BUFFER);
    let mut stream = tokio::time::timeout_at(deadline, tls.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    if let Some(t) = ticket.as_mut() {
        t.handshake_done();
    }
    stream.get_mut().0.enable();
    let conn = stream.get_ref().1;
    if conn.alpn_protocol() != Some(ambit_tls::config::ALPN_H2) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the client did not negotiate ALPN h2",
        ));
    }
    let identity = ambit_tls::spiffe::peer_identity(conn)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    let peer = PeerInfo {
        identity,
        addr,
        local,
    };
    let served = serve_connection(
        crate::tls_io::Batched::new(stream),
        peer,
        &config,
        handler,
        drain,
        Some(deadline),
    )
    .await;
    // The connection counts as open until here.
    drop(ticket);
    served
}

/// Serves HTTP/2 on an established (authenticated) connection. Public so the request
/// handling can be exercised without TLS (the fuzz target does).
pub async fn serve_connection<IO, H>(
    io: IO,
    peer: PeerInfo,
    config: &ServerConfig,
    handler: Arc<H>,
    mut drain: watch::Receiver<Option<Instant>>,
    handshake_deadline: Option<Instant>,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: ConnectHandler,
{
    let h2 = &config.h2;
    let handshake = h2::server::Builder::new()
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_send_buffer_size(h2.max_send_buffer)
        .max_header_list_size(h2.max_header_list_size)
        .max_concurrent_streams(config.max_concurrent_streams)
        .handshake::<_, Bytes>(io);
    let mut conn = match handshake_deadline {
        Some(d) => tokio::time::timeout_at(d, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out"))?,
        None => handshake.await,
    }
    .map_err(h2_to_io)?;

    let ping = conn.ping_pong();
    let keepalive = keepalive(ping, config.keepalive);
    tokio::pin!(keepalive);
    let mut draining = drain.borrow().is_some();
    if draining {
        conn.graceful_shutdown();
    }
    // Streams open on this connection, and since when there has been none.
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since = Some(Instant::now());
    let mut idle_check =
        tokio::time::interval((config.idle_timeout / 4).max(Duration::from_millis(10)));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let handler = handler.clone();
                    let peer = peer.clone();
                    let guard = StreamCount::new(open.clone());
                    idle_since = None;
                    tokio::spawn(async move {
                        handle_request(req, respond, peer, handler).await;
                        drop(guard);
                    });
                }
                Some(Err(e)) => return Err(h2_to_io(e)),
                None => return Ok(()),
            },
            changed = drain.changed(), if !draining => {
                if changed.is_err() || drain.borrow().is_some() {
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
            _ = &mut keepalive => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped answering PINGs"));
            }
            _ = idle_check.tick(), if !draining => {
                if open.load(std::sync::atomic::Ordering::Acquire) > 0 {
                    idle_since = None;
                } else if let Some(since) = idle_since {
                    if since.elapsed() >= config.idle_timeout {
                        draining = true;
                        conn.graceful_shutdown();
                    }
                } else {
                    idle_since = Some(Instant::now());
                }
            }
        }
    }
}

/// Counts a stream as open on its connection while it lives.
struct StreamCount(Arc<std::sync::atomic::AtomicUsize>);

impl StreamCount {
    fn new(open: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(open)
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn handle_request<H: ConnectHandler>(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: PeerInfo,
    handler: Arc<H>,
) {
    let authority = match check(&req) {
        Ok(a) => a,
        Err(reason) => {
            tracing::debug!(peer = %peer.identity, method = %req.method(), uri = %req.uri(), reason, "malformed HBONE request refused");
            respond_empty(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let headers = ConnectHeaders::parse(req.headers());
    let connect = IncomingConnect {
        peer,
        authority,
        headers,
        respond,
        recv: req.into_body(),
    };
    handler.handle(connect).await;
}

/// Resolves when the peer stops answering PINGs (or the connection is gone); never
/// resolves while it answers.
pub(crate) async fn keepalive(ping: Option<PingPong>, ka: Keepalive) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(ka.interval).await;
        match tokio::time::timeout(ka.timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
