//! The demo's sample applications: an HTTP echo server that reports who called it, and
//! a client. Both are ordinary programs that know nothing of the mesh.

// The sample apps are small programs that report on their terminal.
#![allow(clippy::print_stderr)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ambit_hbone::socket::{Netns, SocketOptions};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::DemoError;

/// What the echo server answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Echo {
    /// The server's name.
    pub server: String,
    /// The caller's address as the server's socket sees it.
    pub client: SocketAddr,
    /// The server's process id and start time: the same values before and after
    /// enrollment show the application was not restarted.
    pub pid: u32,
    pub started_unix: u64,
    pub path: String,
}

/// Serves the echo application on `port` until the process is stopped.
pub async fn serve_echo(name: String, port: u16) -> Result<(), DemoError> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .map_err(|e| DemoError::App(format!("cannot listen on port {port}: {e}")))?;
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    eprintln!("echo server {name} listening on :{port}");
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let echo = Echo {
                    server: name.clone(),
                    client,
                    pid: std::process::id(),
                    started_unix,
                    path: req.uri().path().to_owned(),
                };
                async move {
                    let body = serde_json::to_string(&echo).unwrap_or_default() + "\n";
                    let response = Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An open client connection, from inside a pod's network namespace when one is given.
pub struct Client {
    conn: ambit_admin::Connection,
    host: String,
    pub local: SocketAddr,
}

impl Client {
    /// Connects to `target` (`http://<ip>:<port>`; no DNS in the demo).
    pub async fn connect(target: &str, netns: Option<Netns>) -> Result<(Self, String), DemoError> {
        let uri: Uri = target
            .parse()
            .map_err(|e| DemoError::App(format!("{target:?} is not a URL: {e}")))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| DemoError::App(format!("{target:?} has no host")))?;
        let addr: SocketAddr = match uri.port_u16() {
            Some(_) => host.parse(),
            None => format!("{host}:80").parse(),
        }
        .map_err(|_| DemoError::App(format!("{target:?}: the host must be an IP address")))?;
        let options = SocketOptions {
            netns,
            ..SocketOptions::default()
        };
        let stream = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            ambit_hbone::socket::connect(addr, &options),
        )
        .await
        .map_err(|_| DemoError::App(format!("connecting to {addr} timed out")))?
        .map_err(|e| DemoError::App(format!("cannot connect to {addr}: {e}")))?;
        let local = stream
            .local_addr()
            .map_err(|e| DemoError::App(e.to_string()))?;
        let conn = ambit_admin::Connection::open(stream)
            .await
            .map_err(|e| DemoError::App(e.to_string()))?;
        let path = uri.path().to_owned();
        Ok((Self { conn, host, local }, path))
    }

    /// One request without a body; its status and body (the connection stays open).
    pub async fn send(
        &mut self,
        method: http::Method,
        path: &str,
    ) -> Result<(StatusCode, String), DemoError> {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.conn.request(method, &self.host, path),
        )
        .await
        .map_err(|_| DemoError::App("no answer within 5 s".into()))?
        .map_err(|e| DemoError::App(format!("no answer from {}: {e}", self.host)))
    }

    /// One GET; the connection stays open for more.
    pub async fn get(&mut self, path: &str) -> Result<Echo, DemoError> {
        self.get_with(path, &[]).await
    }

    /// One GET with more headers; the connection stays open for more.
    pub async fn get_with(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Echo, DemoError> {
        let (status, body) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.conn
                .request_with(http::Method::GET, &self.host, path, headers),
        )
        .await
        .map_err(|_| DemoError::App("no answer within 5 s".into()))?
        .map_err(|e| {
            DemoError::App(format!(
                "no answer from {}: the connection was closed or reset ({e}); in the mesh the node proxies' access logs say why (a refusal by policy is logged as `denied by <policy>`)",
                self.host
            ))
        })?;
        if status != StatusCode::OK {
            return Err(DemoError::App(format!("HTTP {status}: {body}")));
        }
        serde_json::from_str(&body)
            .map_err(|e| DemoError::App(format!("unexpected answer ({e}): {body}")))
    }
}

/// `ambit demo get <url>`: one request, printed.
pub async fn get_once(target: &str) -> Result<Echo, DemoError> {
    let (mut client, path) = Client::connect(target, None).await?;
    client.get(&path).await
}
