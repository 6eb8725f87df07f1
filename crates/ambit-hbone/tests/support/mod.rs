//! Shared test fixtures: a PKI, an HBONE server with a scriptable handler, a pool.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a different subset

pub mod raw;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_hbone::server::{ServerConfig, ServerHandle};
use ambit_hbone::socket::SocketOptions;
use ambit_hbone::{
    ConnectHandler, ConnectHeaders, ConnectRequest, IncomingConnect, Pool, PoolConfig, Server,
};
use ambit_tls::spiffe::hbone_server_config;
use ambit_tls::testing::{FixedCert, TestPki};
use http::StatusCode;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// What the server does, chosen by the port of the CONNECT authority.
pub const ECHO: u16 = 1;
pub const REFUSE_401: u16 = 2;
/// Reads to EOF, answers with the byte count as text, closes.
pub const COUNT: u16 = 3;
/// Accepts and records the stream for the test to drive.
pub const HOLD: u16 = 4;
/// Accepts, then resets the stream.
pub const RESET: u16 = 5;

pub fn authority(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1], port))
}

#[derive(Default)]
pub struct Handler {
    pub calls: AtomicUsize,
    pub held: Mutex<Vec<ambit_hbone::H2Stream>>,
    pub seen: Mutex<Vec<IncomingSummary>>,
}

#[derive(Debug, Clone)]
pub struct IncomingSummary {
    pub peer: SpiffeId,
    pub peer_addr: SocketAddr,
    pub authority: SocketAddr,
    pub headers: ConnectHeaders,
}

impl ConnectHandler for Handler {
    async fn handle(&self, c: IncomingConnect) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().await.push(IncomingSummary {
            peer: c.peer.identity.clone(),
            peer_addr: c.peer.addr,
            authority: c.authority,
            headers: c.headers.clone(),
        });
        match c.authority.port() {
            ECHO => {
                let stream = c.accept().unwrap();
                let (mut r, mut w) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
            REFUSE_401 => c.refuse(StatusCode::UNAUTHORIZED),
            COUNT => {
                let mut stream = c.accept().unwrap();
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = stream.write_all(n.to_string().as_bytes()).await;
                let _ = stream.shutdown().await;
            }
            HOLD => {
                let stream = c.accept().unwrap();
                self.held.lock().await.push(stream);
            }
            RESET => {
                // Reset once the client has had time to see the 200.
                let stream = c.accept().unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                stream.reset();
            }
            _ => c.refuse(StatusCode::NOT_FOUND),
        }
    }
}

pub struct Env {
    pub pki: TestPki,
    pub server_id: SpiffeId,
    pub client_id: SpiffeId,
    pub client_cert: Arc<CertifiedKey>,
    pub addr: SocketAddr,
    pub handler: Arc<Handler>,
    pub server: Option<ServerHandle>,
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> Env {
        let pki = TestPki::new();
        let server_id = TestPki::id("server-ns", "server");
        let client_id = TestPki::id("client-ns", "client");
        let server_cert = pki.issue(&server_id, Duration::from_secs(3600));
        let client_cert = pki.issue(&client_id, Duration::from_secs(3600));
        let tls = hbone_server_config(
            Arc::new(FixedCert(server_cert)),
            &pki.bundle(),
            &TestPki::trust_domains(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(Handler::default());
        let server = Server::new(tls, config).serve(listener, handler.clone());
        Env {
            pki,
            server_id,
            client_id,
            client_cert,
            addr,
            handler,
            server: Some(server),
        }
    }

    pub fn pool(&self) -> Pool {
        self.pool_with(PoolConfig::default())
    }

    pub fn pool_with(&self, config: PoolConfig) -> Pool {
        Pool::new(config, self.pki.bundle())
    }

    pub fn request(&self, port: u16) -> ConnectRequest {
        ConnectRequest {
            source: self.client_id.clone(),
            source_cert: self.client_cert.clone(),
            destination: self.addr,
            expected: vec![self.server_id.clone()],
            authority: authority(port),
            headers: ConnectHeaders::default(),
            socket: SocketOptions::default(),
        }
    }

    pub fn calls(&self) -> usize {
        self.handler.calls.load(Ordering::SeqCst)
    }
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Writes `data` and reads back everything until EOF, concurrently.
pub async fn round_trip(stream: ambit_hbone::H2Stream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async {
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut out = Vec::with_capacity(data.len());
        r.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(writer, reader);
    out
}
