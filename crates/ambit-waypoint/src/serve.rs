//! One HBONE tunnel into the waypoint: is its authority served here, and what protocol
//! runs inside it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use ambit_core::discovery::{GatewayAddress, GatewayDestination, Service, Workload};
use ambit_core::route::{Route, route_from_waypoint};
use ambit_core::state::State;
use ambit_core::telemetry::{ConnFacts, ConnLabels, Reporter};
use ambit_hbone::server::PeerInfo;
use ambit_hbone::{ConnectHandler, H2Stream, IncomingConnect};
use bytes::{Buf, Bytes};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::Shared;
use crate::upstream::Protocol;

/// The HBONE server's handler.
pub(crate) struct Handler(pub Arc<Shared>);

/// What a tunnel is for: a bound service (addressed by its VIP) or a bound workload
/// (addressed by its IP).
#[derive(Debug, Clone)]
pub struct Target {
    /// The CONNECT authority: the original destination.
    pub authority: SocketAddr,
    pub service: Option<Arc<Service>>,
    pub workload: Option<Arc<Workload>>,
    /// A DestinationRule subset a route chose: only its endpoints are picked.
    pub subset: Option<ambit_core::discovery::Str>,
}

/// Who sent a tunnel: the client's SPIFFE ID, its address, and its workload when the
/// mesh knows one at that address with that identity.
#[derive(Debug, Clone)]
pub struct Client {
    pub peer: PeerInfo,
    pub workload: Option<Arc<Workload>>,
}

impl ConnectHandler for Handler {
    async fn handle(&self, connect: IncomingConnect) {
        let shared = &self.0;
        if !shared.synced.borrow().synced {
            // Until discovery has synced the waypoint cannot tell what it serves (nor
            // enforce what applies); the client's node proxy retries or fails.
            shared.metrics.refused("not_synced");
            tracing::debug!(authority = %connect.authority, "tunnel refused: discovery has not synced");
            connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        let state = shared.store.load();
        let Some(target) = resolve(shared, &state, connect.authority, connect.peer.local) else {
            shared.metrics.refused("not_served");
            tracing::info!(
                authority = %connect.authority,
                source = %connect.peer.identity,
                "tunnel refused: the waypoint does not serve this destination"
            );
            connect.refuse(StatusCode::FORBIDDEN);
            return;
        };
        let client = Client {
            workload: state
                .workload_by_ip(&shared.config.network, connect.peer.addr.ip())
                .filter(|w| w.identity().as_ref() == Some(&connect.peer.identity))
                .cloned(),
            peer: connect.peer.clone(),
        };
        drop(state);
        let mut stream = match connect.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel gone before it was accepted");
                return;
            }
        };
        let (protocol, first) = sniff(&mut stream, shared.config.limits.sniff_timeout).await;
        let io = Rewind::new(first, stream);
        match protocol {
            Some(p) => crate::http::serve(shared.clone(), client, target, p, io).await,
            None => tcp(shared.clone(), client, target, io).await,
        }
    }
}

/// Whether `gateway` names this waypoint: its Service's hostname in its namespace, or
/// the address the tunnel arrived on.
fn is_mine(shared: &Shared, gateway: &GatewayAddress, local: SocketAddr) -> bool {
    match &gateway.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => {
            let c = &shared.config;
            namespace.as_ref() == c.namespace
                && hostname
                    .strip_prefix(c.name.as_str())
                    .and_then(|h| h.strip_prefix('.'))
                    .and_then(|h| h.strip_prefix(c.namespace.as_str()))
                    .is_some_and(|h| h.starts_with('.'))
        }
        GatewayDestination::Address(a) => a.address == local.ip(),
    }
}

/// The destination a tunnel may reach through this waypoint: a service bound to it, on
/// one of the service's ports, or a workload bound to it. Anything else is refused: a
/// waypoint is not an open proxy.
pub fn resolve_in(
    state: &State,
    network: &str,
    authority: SocketAddr,
    mine: impl Fn(&GatewayAddress) -> bool,
) -> Option<Target> {
    if let Some(service) = state.service_by_vip(network, authority.ip()) {
        let bound = service.waypoint.as_ref().is_some_and(&mine);
        let has_port = service
            .ports
            .iter()
            .any(|p| p.service_port == authority.port());
        return (bound && has_port).then(|| Target {
            subset: None,
            authority,
            service: Some(service.clone()),
            workload: None,
        });
    }
    let workload = state.workload_by_ip(network, authority.ip())?;
    workload
        .waypoint
        .as_deref()
        .is_some_and(&mine)
        .then(|| Target {
            subset: None,
            authority,
            service: None,
            workload: Some(workload.clone()),
        })
}

fn resolve(
    shared: &Shared,
    state: &State,
    authority: SocketAddr,
    local: SocketAddr,
) -> Option<Target> {
    resolve_in(state, &shared.config.network, authority, |g| {
        is_mine(shared, g, local)
    })
}

/// The start of an HTTP/2 connection (prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the first bytes of a tunnel and decides: `Some(Http1 | Http2)`, or `None` for
/// opaque TCP (not HTTP, nothing within `timeout`, or the client closed). Returns
/// what was read, to be replayed.
async fn sniff(stream: &mut H2Stream, timeout: std::time::Duration) -> (Option<Protocol>, Bytes) {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(decided) = classify(&buf) {
            return (decided, Bytes::from(buf));
        }
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (None, Bytes::from(buf)),
        }
    }
}

/// `Some(decision)` once the bytes tell; `None` while more are needed.
pub fn classify(buf: &[u8]) -> Option<Option<Protocol>> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Some(Protocol::Http2));
    }
    // An HTTP/1.x request line starts with a method token (RFC 9110: letters here,
    // at most 20 of them) and a space.
    for (i, b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < 20 => continue,
            b' ' if i > 0 => return Some(Some(Protocol::Http1)),
            _ => return Some(None),
        }
    }
    if buf.len() >= 20 { Some(None) } else { None }
}

/// A stream that first returns bytes already read from it.
pub struct Rewind<S> {
    first: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(first: Bytes, inner: S) -> Self {
        Self { first, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that counts the bytes read from it and written to it.
struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the waypoint sends traffic for `target`: the endpoint chosen as the service's
/// DestinationRule says (by default the less loaded of two, by requests in flight; never
/// one outlier detection ejected), the upstream authority and HBONE address, or why
/// there is none.
pub(crate) fn pick(
    shared: &Shared,
    target: &Target,
    local: SocketAddr,
    key: &PickKey<'_>,
) -> Route {
    use ambit_core::traffic::Balance;
    let state = shared.store.load();
    let network = &shared.config.network;
    let me = state.workload_by_ip(network, local.ip()).cloned();
    let load = |w: &Workload| shared.in_flight.load(&w.uid);
    let service = target.service.as_ref().map(|s| s.key());
    let backend = service
        .as_deref()
        .and_then(|k| state.backend_policy(k))
        .and_then(|p| p.backend.as_ref());
    // A subset's endpoints only, with its own settings when it has them.
    let subset = match &target.subset {
        None => None,
        Some(name) => match backend.and_then(|b| b.subsets.iter().find(|s| &s.name == name)) {
            Some(s) => Some(s),
            None => {
                return Route::NoSubset {
                    service: target.service.clone(),
                    subset: name.to_string(),
                };
            }
        },
    };
    let settings = subset
        .and_then(|s| s.settings.as_ref())
        .or_else(|| backend.map(|b| b.for_port(target.authority.port())));
    let traffic = service.as_deref().map(|k| shared.traffic.service(k));
    let now = shared.traffic.now_ms();
    let outliers = settings.is_some_and(|s| s.outlier.is_some());
    let ejected = |w: &Workload| {
        subset.is_some_and(|s| !s.contains(&w.uid))
            || (outliers && traffic.as_ref().is_some_and(|t| t.is_ejected(&w.uid, now)))
    };
    let default = Balance::LeastRequest;
    let balance = settings.map_or(&default, |s| &s.balance);
    let hash = match balance {
        Balance::Hash(on) => key.hash(on),
        _ => None,
    };
    let no_turn = std::sync::atomic::AtomicUsize::new(0);
    let balancer = ambit_core::route::Balancer {
        load: &load,
        balance,
        hash,
        excluded: &ejected,
        turn: traffic.as_ref().map_or(&no_turn, |t| &t.turn),
    };
    route_from_waypoint(
        &state,
        network,
        me.as_deref(),
        target.authority,
        ambit_hbone::HBONE_PORT,
        &balancer,
    )
}

/// What consistent hashing may key a request on.
pub(crate) struct PickKey<'a> {
    pub headers: Option<&'a http::HeaderMap>,
    pub source: std::net::IpAddr,
}

impl PickKey<'_> {
    fn hash(&self, on: &ambit_core::traffic::HashOn) -> Option<u64> {
        use ambit_core::traffic::{HashOn, fnv};
        match on {
            HashOn::SourceIp => Some(match self.source {
                std::net::IpAddr::V4(a) => fnv(&a.octets()),
                std::net::IpAddr::V6(a) => fnv(&a.octets()),
            }),
            HashOn::Header(h) => self.headers?.get(h.as_str()).map(|v| fnv(v.as_bytes())),
            HashOn::Cookie(name) => ambit_core::http_route::cookies(self.headers?)
                .find_map(|(k, v)| (k == name).then(|| fnv(v.as_bytes()))),
        }
    }
}

/// Labels for what the waypoint reports about a connection or request.
pub(crate) fn facts<'a>(
    client: &'a Client,
    target: &'a Target,
    destination: Option<&'a Workload>,
    request_protocol: &'static str,
) -> ConnFacts<'a> {
    ConnFacts {
        reporter: Reporter::Waypoint,
        source: client.workload.as_deref(),
        source_principal: Some(client.peer.identity.to_string()),
        destination: destination.or(target.workload.as_deref()),
        destination_service: target.service.as_deref(),
        mutual_tls: true,
        request_protocol,
    }
}

/// Opaque TCP through the waypoint: one upstream tunnel per connection, bytes copied.
async fn tcp<S>(shared: Arc<Shared>, client: Client, target: Target, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let route = pick(
        &shared,
        &target,
        client.peer.local,
        &PickKey {
            headers: None,
            source: client.peer.addr.ip(),
        },
    );
    let destination = match &route {
        Route::Hbone { workload, .. } => Some(workload.clone()),
        Route::Direct { workload, .. } => workload.clone(),
        _ => None,
    };
    let labels = |flags: &'static str| {
        ConnLabels::new(
            &facts(&client, &target, destination.as_deref(), "tcp"),
            flags,
        )
    };
    let decision = crate::authz::decide(
        &shared.store.load(),
        (&shared.config.namespace, &shared.config.name),
        &shared.trust_domains,
        &client,
        &target,
        None,
    );
    shared.metrics.decided(&decision.counted);
    if !decision.allowed {
        let l = labels("-");
        shared.metrics.tcp_opened(&l);
        shared.metrics.tcp_closed(&l, 0, 0);
        tracing::info!(
            target: "ambit::access",
            protocol = "tcp",
            src.addr = %client.peer.addr,
            src.identity = %client.peer.identity,
            dst = %target.authority,
            authz = %decision.reason,
            "waypoint connection denied"
        );
        return;
    }
    let upstream = crate::upstream::open(&shared, &route, None).await;
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            let l = labels(e.flags());
            shared.metrics.tcp_opened(&l);
            shared.metrics.tcp_closed(&l, 0, 0);
            tracing::info!(
                target: "ambit::access",
                protocol = "tcp",
                src.addr = %client.peer.addr,
                src.identity = %client.peer.identity,
                dst = %target.authority,
                flags = e.flags(),
                error = %e,
                "waypoint connection refused"
            );
            return;
        }
    };
    let l = labels("-");
    shared.metrics.tcp_opened(&l);
    let _in_flight = destination.as_ref().map(|w| shared.in_flight.enter(&w.uid));
    // Counted as they pass, so a connection that ends in an error or a reset (a normal
    // end for a tunnel) still reports what it moved.
    let mut io = Counted::new(io);
    let mut upstream = upstream;
    let error = match tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        Ok(_) => None,
        Err(e) => (!ambit_hbone::stream::is_reset(&e)).then(|| e.to_string()),
    };
    let (received, sent) = (io.read, io.written);
    let stats = ambit_hbone::stream::CopyStats { sent, received };
    shared.metrics.tcp_closed(&l, stats.sent, stats.received);
    tracing::info!(
        target: "ambit::access",
        protocol = "tcp",
        src.addr = %client.peer.addr,
        src.identity = %client.peer.identity,
        dst = %target.authority,
        sent = stats.sent,
        received = stats.received,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.as_deref().unwrap_or(""),
        "waypoint connection closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_told_apart_from_their_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Some(Protocol::Http1)));
        assert_eq!(
            classify(b"M-SEARCH * HTTP/1.1"),
            Some(Some(Protocol::Http1))
        );
        assert_eq!(classify(b"PRI * HT"), None, "the start of the h2 preface");
        assert_eq!(classify(H2_PREFACE), Some(Some(Protocol::Http2)));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Some(Protocol::Http1)));
        assert_eq!(classify(b"\x16\x03\x01"), Some(None), "TLS is opaque");
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(None),
            "methods are upper case"
        );
        assert_eq!(classify(b" GET"), Some(None));
        assert_eq!(classify(&[b'A'; 25]), Some(None), "no method is that long");
    }
}
