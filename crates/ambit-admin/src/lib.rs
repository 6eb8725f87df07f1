//! The small HTTP/1.1 server behind every component's admin, metrics and readiness ports,
//! and the client the CLI reads them with.
//!
//! Pages are produced by a handler (path in, [`Page`] out); only GET is served. Meant for
//! localhost or a cluster-internal scrape; handlers must expose no secrets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A page handler: path in, response out.
pub type Handler = Arc<dyn Fn(&str) -> Option<Page> + Send + Sync>;

/// A response body with its content type.
pub struct Page {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
    /// More response headers (a cookie, a redirect's location, security headers).
    pub headers: Vec<(header::HeaderName, header::HeaderValue)>,
}

impl Page {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string_pretty(value) {
            Ok(body) => Self {
                status: StatusCode::OK,
                content_type: "application/json",
                body,
                headers: Vec::new(),
            },
            Err(e) => Self::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// Readiness: false until the component says it is ready.
#[derive(Debug, Default)]
pub struct Ready(AtomicBool);

impl Ready {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Connections one admin, metrics or readiness port serves at once; more are closed on
/// arrival.
pub const MAX_CONNECTIONS: usize = 256;
/// Of those, from one source address (a scraper, a probe and a person need a handful;
/// one noisy client cannot take the places the readiness probe needs).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// A connection is closed after this long, idle or not (clients reconnect).
pub const MAX_CONNECTION_LIFE: std::time::Duration = std::time::Duration::from_secs(60);

/// A handler that reads the whole request head (path, query, headers), for pages that
/// need more than the path (the mesh console: its query strings and its token).
pub type RequestHandler = Arc<dyn Fn(&http::request::Parts) -> Option<Page> + Send + Sync>;

/// Serves `handler` on `listener` until `stop` fires: at most [`MAX_CONNECTIONS`]
/// connections at once and [`MAX_CONNECTIONS_PER_SOURCE`] per source address, each for
/// at most [`MAX_CONNECTION_LIFE`] and 10 s to send its request headers.
pub async fn serve(listener: TcpListener, handler: Handler, stop: watch::Receiver<bool>) {
    let by_path: RequestHandler = Arc::new(move |req| handler(req.uri.path()));
    serve_requests(listener, by_path, stop).await
}

/// [`serve`], with a handler that sees the request head.
pub async fn serve_requests(
    listener: TcpListener,
    handler: RequestHandler,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Open connections per source; touched once per connection, on this port only.
    let per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "monitoring port at its connection limit; closing a new connection");
            continue;
        };
        let Some(source) = SourceSlot::take(&per_source, peer.ip()) else {
            tracing::debug!(%peer, "monitoring port at its limit for this source; closing a new connection");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slots = (slot, source);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(respond(&handler, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(MAX_CONNECTION_LIFE, conn).await {
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "monitoring connection ended with an error")
                }
                Ok(Ok(())) => {}
                Err(_) => tracing::debug!(%peer, "monitoring connection closed at its time limit"),
            }
        });
    }
}

/// One connection's place in the per-source count; given back when dropped.
struct SourceSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn respond(handler: &RequestHandler, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, _body) = req.into_parts();
    let page = if parts.method != Method::GET {
        Page::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n")
    } else {
        handler(&parts).unwrap_or_else(|| Page::text(StatusCode::NOT_FOUND, "no such page\n"))
    };
    let mut response = Response::new(Full::new(Bytes::from(page.body)));
    *response.status_mut() = page.status;
    if let Ok(v) = header::HeaderValue::from_str(page.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    for (name, value) in page.headers {
        response.headers_mut().append(name, value);
    }
    response
}

/// Binds the monitoring port with a message that says what to do when it is taken.
pub async fn bind(addr: SocketAddr, what: &str, flag: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("is another instance running? choose another address with {flag}")
        } else {
            format!("choose another address with {flag}")
        };
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for the {what}: {e}; {hint}"),
        )
    })
}

/// Fetches `path` from an admin port with a plain HTTP/1.1 GET; returns status and body.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot reach {addr}: {e}; is the component running?"),
        )
    })?;
    Connection::open(stream)
        .await?
        .get(&addr.to_string(), path)
        .await
}

/// An HTTP/1.1 client connection over any byte stream (a socket opened inside a pod's
/// network namespace, say); it stays open between requests until dropped.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

/// Largest response body read.
const MAX_BODY: usize = 4 << 20;

impl Connection {
    pub async fn open<IO>(io: IO) -> std::io::Result<Self>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// GETs `path` with `Host: host`; returns status and body (at most 4 MiB).
    pub async fn get(&mut self, host: &str, path: &str) -> std::io::Result<(StatusCode, String)> {
        self.request(Method::GET, host, path).await
    }

    /// Sends `method path` (no body) with `Host: host`; returns status and body (at most
    /// 4 MiB).
    pub async fn request(
        &mut self,
        method: Method,
        host: &str,
        path: &str,
    ) -> std::io::Result<(StatusCode, String)> {
        self.request_with(method, host, path, &[]).await
    }

    /// As [`Connection::request`], with more request headers.
    pub async fn request_with(
        &mut self,
        method: Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(StatusCode, String)> {
        use http_body_util::BodyExt;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(std::io::Error::other)?;
        // The connection takes the next request only once it has finished the last
        // (hyper refuses it as canceled otherwise).
        self.sender.ready().await.map_err(std::io::Error::other)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_per_source_limit_are_closed_and_the_port_recovers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|_: &str| Some(Page::text(StatusCode::OK, "ok\n")));
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve(listener, handler, stop_rx));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_SOURCE {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("an extra connection is closed, not left waiting");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // One idle connection leaves: the port serves again.
        idle.pop();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (status, body) = get(addr, "/").await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    }

    /// Requests one after another on one connection: each waits until the connection
    /// has finished the previous one. A server whose body arrives after its head (as
    /// through a proxy) made the next request fail as canceled before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_carries_many_requests_in_turn() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                buf.drain(..end);
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n")
                    .await
                    .unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                s.write_all(b"ok\n").await.unwrap();
            }
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut conn = Connection::open(stream).await.unwrap();
        for i in 0..20 {
            let (status, body) = conn
                .request_with(Method::GET, "admin", "/", &[("x-n", "1")])
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
        }
    }
}
