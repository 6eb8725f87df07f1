//! The waypoint's side toward endpoints: tunnels opened with its own identity, and
//! pooled HTTP connections over them.
//!
//! An endpoint in the mesh is reached over HBONE at `<pod IP>:15008` with the CONNECT
//! authority `<pod IP>:<target port>`; the destination's node proxy then applies its L4
//! policy with the waypoint as the source. One outside the mesh is reached directly.
//!
//! HTTP connections are pooled per (endpoint, authority, protocol): HTTP/2 multiplexes
//! every request on one connection; HTTP/1.1 keeps up to
//! [`crate::Limits::max_idle_per_endpoint`] idle connections, each given back when its
//! response has ended. The pool map is copy-on-write (`ArcSwap`): a request reads it
//! without a lock; the idle list of one endpoint is taken with `try_lock`, and a request
//! that finds it busy opens a connection rather than wait.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ambit_core::discovery::Str;
use ambit_core::route::Route;
use ambit_hbone::{ConnectHeaders, ConnectRequest, H2Stream};
use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;
use crate::http::RequestBody;

/// The HTTP version spoken on a tunnel (the same both sides of the waypoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Why there is no upstream for a request or connection.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no healthy upstream")]
    NoHealthy,
    #[error("the service's DestinationRule defines no subset {0:?}")]
    NoSubset(String),
    #[error("upstream connect error: {0}")]
    Connect(String),
    #[error("upstream connect error: the destination refused the tunnel ({0})")]
    Refused(String),
    #[error("upstream connect error: timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream reset before the response started: {0}")]
    Reset(String),
}

impl UpstreamError {
    /// Envoy's response flag, as Istio users know them.
    pub fn flags(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthy => "UH",
            // Envoy's "no cluster": a subset that does not exist.
            UpstreamError::NoSubset(_) => "NC",
            UpstreamError::Reset(_) => "UR",
            _ => "UF",
        }
    }
}

/// A byte stream to an endpoint.
pub enum Tunnel {
    Hbone(H2Stream),
    Plain(TcpStream),
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tunnel::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            Tunnel::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Tunnel::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Tunnel::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tunnel::Hbone(s) => Pin::new(s).poll_flush(cx),
            Tunnel::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tunnel::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Tunnel::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens a tunnel to where `route` says, with the waypoint's identity.
pub(crate) async fn open(
    shared: &Shared,
    route: &Route,
    connect_timeout: Option<Duration>,
) -> Result<Tunnel, UpstreamError> {
    let timeout = connect_timeout.unwrap_or(shared.config.limits.connect_timeout);
    match route {
        Route::Hbone {
            workload,
            target,
            hbone,
            ..
        } => {
            let expected = workload.identity().ok_or_else(|| {
                UpstreamError::Connect("the endpoint has no valid identity".into())
            })?;
            let cert = shared
                .cert
                .get()
                .await
                .map_err(|e| UpstreamError::Connect(format!("no certificate yet: {e}")))?;
            let request = ConnectRequest {
                source: shared.identity.clone(),
                source_cert: cert.certified_key.clone(),
                destination: *hbone,
                expected: vec![expected],
                authority: *target,
                headers: ConnectHeaders::default(),
                socket: shared.config.socket(),
            };
            match tokio::time::timeout(timeout, shared.pool.connect(request)).await {
                Ok(Ok(s)) => Ok(Tunnel::Hbone(s)),
                Ok(Err(e)) if e.status().is_some() => Err(UpstreamError::Refused(e.to_string())),
                Ok(Err(e)) => Err(UpstreamError::Connect(e.to_string())),
                Err(_) => Err(UpstreamError::Timeout(timeout)),
            }
        }
        Route::Direct { target, .. } => {
            let socket = shared.config.socket();
            let connect = ambit_hbone::socket::connect(*target, &socket);
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(s)) => Ok(Tunnel::Plain(s)),
                Ok(Err(e)) => Err(UpstreamError::Connect(format!("{target}: {e}"))),
                Err(_) => Err(UpstreamError::Timeout(timeout)),
            }
        }
        Route::NoEndpoint { .. } | Route::NoWaypoint { .. } => Err(UpstreamError::NoHealthy),
        Route::NoSubset { subset, .. } => Err(UpstreamError::NoSubset(subset.clone())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    hbone: Option<SocketAddr>,
    target: SocketAddr,
    protocol: Protocol,
}

fn key_of(route: &Route, protocol: Protocol) -> Option<Key> {
    match route {
        Route::Hbone { target, hbone, .. } => Some(Key {
            hbone: Some(*hbone),
            target: *target,
            protocol,
        }),
        Route::Direct { target, .. } => Some(Key {
            hbone: None,
            target: *target,
            protocol,
        }),
        _ => None,
    }
}

/// An idle HTTP/1.1 connection: how many requests it carried, and since when it idles.
struct Idle {
    sender: http1::SendRequest<RequestBody>,
    uses: u32,
    since: Instant,
}

/// The connections to one endpoint.
struct Entry {
    h2: ArcSwapOption<http2::SendRequest<RequestBody>>,
    /// Requests sent on the current HTTP/2 connection.
    h2_uses: std::sync::atomic::AtomicU32,
    h1_idle: Mutex<Vec<Idle>>,
    /// Seconds since [`Upstreams::epoch`] of the last use.
    last_used: AtomicU64,
}

/// Every pooled upstream connection.
pub struct Upstreams {
    map: ArcSwap<HashMap<Key, Arc<Entry>>>,
    epoch: Instant,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            epoch: Instant::now(),
        }
    }
}

impl Upstreams {
    fn entry(&self, key: Key) -> Arc<Entry> {
        let now = self.epoch.elapsed().as_secs();
        if let Some(e) = self.map.load().get(&key) {
            e.last_used.store(now, Ordering::Relaxed);
            return e.clone();
        }
        let mut made = None;
        self.map.rcu(|m| {
            if m.contains_key(&key) {
                return m.clone();
            }
            let mut m = HashMap::clone(m);
            let e = made
                .get_or_insert_with(|| {
                    Arc::new(Entry {
                        h2: ArcSwapOption::empty(),
                        h2_uses: std::sync::atomic::AtomicU32::new(0),
                        h1_idle: Mutex::new(Vec::new()),
                        last_used: AtomicU64::new(now),
                    })
                })
                .clone();
            m.insert(key, e);
            Arc::new(m)
        });
        self.map
            .load()
            .get(&key)
            .cloned()
            .expect("the entry was just inserted")
    }

    /// How many endpoints have pooled connections.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An HTTP/1.1 connection lent to one request; given back with [`Lease::give_back`]
/// once its response has ended.
pub struct Lease {
    entry: Arc<Entry>,
    sender: http1::SendRequest<RequestBody>,
    max_idle: usize,
    uses: u32,
    /// `maxRequestsPerConnection`: closed rather than given back after this many.
    max_uses: Option<u32>,
}

impl Lease {
    pub fn give_back(self) {
        if self.sender.is_closed() || self.max_uses.is_some_and(|m| self.uses >= m) {
            return;
        }
        if let Ok(mut idle) = self.entry.h1_idle.try_lock()
            && idle.len() < self.max_idle
        {
            idle.push(Idle {
                sender: self.sender,
                uses: self.uses,
                since: Instant::now(),
            });
        }
    }
}

/// Sends `req` to the endpoint `route` chose, on a pooled connection or a new one.
/// Returns the response head and, for HTTP/1.1, the connection to give back when the
/// response has ended.
pub(crate) async fn send(
    shared: &Shared,
    route: &Route,
    protocol: Protocol,
    req: http::Request<RequestBody>,
    pool: &ambit_core::traffic::Pool,
) -> Result<(http::Response<Incoming>, Option<Lease>), UpstreamError> {
    let Some(key) = key_of(route, protocol) else {
        return Err(match route {
            Route::NoSubset { subset, .. } => UpstreamError::NoSubset(subset.clone()),
            _ => UpstreamError::NoHealthy,
        });
    };
    let entry = shared.upstreams.entry(key);
    match protocol {
        Protocol::Http2 => {
            let worn = |uses: u32| pool.max_requests_per_connection.is_some_and(|m| uses >= m);
            let pooled = entry
                .h2
                .load_full()
                .filter(|s| !s.is_closed())
                .filter(|_| !worn(entry.h2_uses.fetch_add(1, Ordering::Relaxed)))
                .map(|s| http2::SendRequest::clone(&s));
            let mut sender = match pooled {
                Some(s) => s,
                None => {
                    let tunnel = open(shared, route, pool.connect_timeout).await?;
                    let (s, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .handshake(TokioIo::new(tunnel))
                        .await
                        .map_err(|e| UpstreamError::Connect(format!("HTTP/2 handshake: {e}")))?;
                    spawn_connection(shared, conn);
                    entry.h2.store(Some(Arc::new(s.clone())));
                    entry.h2_uses.store(1, Ordering::Relaxed);
                    s
                }
            };
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| UpstreamError::Reset(e.to_string()))?;
            Ok((resp, None))
        }
        Protocol::Http1 => {
            let mut sender = None;
            let mut uses = 0;
            while let Some(idle) = entry.h1_idle.try_lock().ok().and_then(|mut v| v.pop()) {
                let Idle {
                    sender: mut s,
                    uses: used,
                    since,
                } = idle;
                if s.is_closed() || pool.idle_timeout.is_some_and(|t| since.elapsed() > t) {
                    continue;
                }
                uses = used;
                // A connection goes back once its response has ended; it is ready at
                // once or about to be.
                if tokio::time::timeout(Duration::from_millis(50), s.ready())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    sender = Some(s);
                    break;
                }
            }
            let mut sender = match sender {
                Some(s) => s,
                None => {
                    uses = 0;
                    let tunnel = open(shared, route, pool.connect_timeout).await?;
                    let (s, conn) = http1::Builder::new()
                        .handshake(TokioIo::new(tunnel))
                        .await
                        .map_err(|e| UpstreamError::Connect(format!("HTTP/1.1 handshake: {e}")))?;
                    spawn_connection(shared, conn.with_upgrades());
                    s
                }
            };
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| UpstreamError::Reset(e.to_string()))?;
            Ok((
                resp,
                Some(Lease {
                    entry,
                    sender,
                    max_idle: shared.config.limits.max_idle_per_endpoint,
                    uses: uses + 1,
                    max_uses: pool.max_requests_per_connection,
                }),
            ))
        }
    }
}

fn spawn_connection<F, E>(shared: &Shared, conn: F)
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let gauge = shared.metrics.upstream_connections.clone();
    gauge.inc();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        gauge.dec();
    });
}

/// Requests (and opaque connections) in flight per endpoint workload (uid), for
/// least-request balancing. Read without a lock; a counter is added the first time an
/// endpoint is used, and idle ones are dropped by the sweep.
#[derive(Default)]
pub struct InFlight(ArcSwap<HashMap<Str, Arc<AtomicUsize>>>);

/// One request in flight to an endpoint; counted until dropped.
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn load(&self, uid: &str) -> usize {
        self.0
            .load()
            .get(uid)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn enter(&self, uid: &Str) -> InFlightGuard {
        let counter = match self.0.load().get(uid) {
            Some(c) => c.clone(),
            None => {
                let mut made = None;
                self.0.rcu(|m| {
                    if m.contains_key(uid) {
                        return m.clone();
                    }
                    let mut m = HashMap::clone(m);
                    m.insert(
                        uid.clone(),
                        made.get_or_insert_with(|| Arc::new(AtomicUsize::new(0)))
                            .clone(),
                    );
                    Arc::new(m)
                });
                self.0
                    .load()
                    .get(uid)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(AtomicUsize::new(0)))
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(counter)
    }

    /// Drops the counters of endpoints with nothing in flight.
    fn sweep(&self) {
        self.0.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|_, c| c.load(Ordering::Relaxed) > 0);
            Arc::new(m)
        });
    }
}

/// Every 10 s, forgets endpoints unused for a minute (closing their idle connections).
pub(crate) async fn sweep(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let up = &shared.upstreams;
        let now = up.epoch.elapsed().as_secs();
        up.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|_, e| now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < 60);
            Arc::new(m)
        });
        shared.in_flight.sweep();
        let state = shared.store.load();
        shared
            .traffic
            .sweep(|k| state.traffic_policies().any(|p| p.key.as_ref() == k));
    }
}
