//! HBONE against plain TCP on loopback, in the same run.
//!
//! `cargo bench -p ambit-hbone --bench tunnel`
//!
//! - `throughput`: one stream moving 64 MiB: plain TCP; written straight into a tunnel
//!   stream; and the node-proxy shape, app socket -> proxy copy -> tunnel -> proxy copy
//!   -> backend socket.
//! - `round_trip_1k`: 1 KiB written and echoed back, on a warm connection: plain TCP to
//!   an echo server, and app -> proxy -> tunnel -> proxy -> echo server.
//! - `new_stream`: a CONNECT answered 200 and closed, on a warm connection.
//!
//! `AMBIT_BENCH_FRAME` and `AMBIT_BENCH_WINDOW` override the HTTP/2 frame size and stream
//! window (connection window = 4 x stream window) to compare settings.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ambit_hbone::socket::SocketOptions;
use ambit_hbone::stream::copy_bidirectional;
use ambit_hbone::{
    ConnectHandler, ConnectHeaders, ConnectRequest, IncomingConnect, Pool, PoolConfig, Server,
    ServerConfig,
};
use ambit_tls::spiffe::hbone_server_config;
use ambit_tls::testing::TestPki;
use divan::counter::BytesCount;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BULK: usize = 64 << 20;
const CHUNK: usize = 256 << 10;

const SINK: u16 = 1;
const ECHO: u16 = 2;
const FORWARD: u16 = 3;
const OPEN: u16 = 4;

struct Env {
    rt: tokio::runtime::Runtime,
    plain_sink: SocketAddr,
    plain_echo: SocketAddr,
    /// App-facing port of the client-side proxy (forwards into the tunnel).
    proxy_sink: SocketAddr,
    proxy_echo: SocketAddr,
    pool: Pool,
    request: ConnectRequest,
    _pki: TestPki,
}

struct Handler {
    backend_sink: SocketAddr,
    backend_echo: SocketAddr,
}

impl ConnectHandler for Handler {
    async fn handle(&self, c: IncomingConnect) {
        match c.authority.port() {
            SINK => {
                let mut s = c.accept().unwrap();
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"k").await;
                let _ = s.shutdown().await;
            }
            ECHO | FORWARD => {
                let backend = if c.authority.port() == ECHO {
                    self.backend_echo
                } else {
                    self.backend_sink
                };
                let s = c.accept().unwrap();
                let tcp = TcpStream::connect(backend).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (r, w) = tcp.into_split();
                let _ = copy_bidirectional(r, w, s).await;
            }
            OPEN => {
                let mut s = c.accept().unwrap();
                let _ = s.shutdown().await;
            }
            _ => {}
        }
    }
}

async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"k").await;
            });
        }
    });
    addr
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The client-side node proxy's shape: each app connection becomes a tunnel stream.
async fn proxy(pool: Pool, request: ConnectRequest) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (app, _) = l.accept().await.unwrap();
            app.set_nodelay(true).unwrap();
            let (pool, request) = (pool.clone(), request.clone());
            tokio::spawn(async move {
                let stream = pool.connect(request).await.unwrap();
                let (r, w) = app.into_split();
                let _ = copy_bidirectional(r, w, stream).await;
            });
        }
    });
    addr
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pki = TestPki::new();
        let (pool, request, plain_sink, plain_echo, proxy_sink, proxy_echo) = rt.block_on(async {
            let plain_sink = sink_server().await;
            let plain_echo = echo_server().await;
            let server_id = TestPki::id("bench", "server");
            let client_id = TestPki::id("bench", "client");
            let tls = hbone_server_config(
                Arc::new(ambit_tls::testing::FixedCert(
                    pki.issue(&server_id, Duration::from_secs(86400)),
                )),
                &pki.bundle(),
                &TestPki::trust_domains(),
            )
            .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let hbone = listener.local_addr().unwrap();
            let handler = Arc::new(Handler {
                backend_sink: plain_sink,
                backend_echo: plain_echo,
            });
            let mut h2 = ambit_hbone::H2Settings::default();
            if let Ok(v) = std::env::var("AMBIT_BENCH_FRAME") {
                h2.max_frame_size = v.parse().unwrap();
            }
            if let Ok(v) = std::env::var("AMBIT_BENCH_WINDOW") {
                h2.stream_window = v.parse().unwrap();
                h2.connection_window = 4 * h2.stream_window;
            }
            let server_config = ServerConfig {
                h2: h2.clone(),
                ..ServerConfig::default()
            };
            std::mem::forget(Server::new(tls, server_config).serve(listener, handler));
            let pool = Pool::new(
                PoolConfig {
                    h2,
                    ..PoolConfig::default()
                },
                pki.bundle(),
            );
            let request = ConnectRequest {
                source: client_id.clone(),
                source_cert: pki.issue(&client_id, Duration::from_secs(86400)),
                destination: hbone,
                expected: vec![server_id],
                authority: SocketAddr::from(([198, 18, 0, 1], SINK)),
                headers: ConnectHeaders::default(),
                socket: SocketOptions::default(),
            };
            let mut fwd = request.clone();
            fwd.authority.set_port(FORWARD);
            let proxy_sink = proxy(pool.clone(), fwd).await;
            let mut echo = request.clone();
            echo.authority.set_port(ECHO);
            let proxy_echo = proxy(pool.clone(), echo).await;
            (
                pool, request, plain_sink, plain_echo, proxy_sink, proxy_echo,
            )
        });
        Env {
            rt,
            plain_sink,
            plain_echo,
            proxy_sink,
            proxy_echo,
            pool,
            request,
            _pki: pki,
        }
    })
}

async fn send_bulk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let buf = vec![0x5au8; CHUNK];
    let mut left = BULK;
    while left > 0 {
        let n = left.min(CHUNK);
        s.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
}

/// mimalloc, as in the `ambit` binary, wrapped to count allocations per iteration.
#[global_allocator]
static ALLOC: divan::AllocProfiler<mimalloc::MiMalloc> =
    divan::AllocProfiler::new(mimalloc::MiMalloc);

fn main() {
    divan::main();
}

mod throughput {
    use super::*;

    #[divan::bench(sample_count = 10, sample_size = 1)]
    fn plain_tcp(b: divan::Bencher<'_, '_>) {
        let e = env();
        b.counter(BytesCount::new(BULK)).bench_local(|| {
            e.rt.block_on(async {
                let s = TcpStream::connect(e.plain_sink).await.unwrap();
                s.set_nodelay(true).unwrap();
                send_bulk(s).await;
            })
        });
    }

    #[divan::bench(sample_count = 10, sample_size = 1)]
    fn hbone_stream(b: divan::Bencher<'_, '_>) {
        let e = env();
        b.counter(BytesCount::new(BULK)).bench_local(|| {
            e.rt.block_on(async {
                let s = e.pool.connect(e.request.clone()).await.unwrap();
                send_bulk(s).await;
            })
        });
    }

    #[divan::bench(sample_count = 10, sample_size = 1)]
    fn hbone_proxied(b: divan::Bencher<'_, '_>) {
        let e = env();
        b.counter(BytesCount::new(BULK)).bench_local(|| {
            e.rt.block_on(async {
                let s = TcpStream::connect(e.proxy_sink).await.unwrap();
                s.set_nodelay(true).unwrap();
                send_bulk(s).await;
            })
        });
    }
}

mod round_trip_1k {
    use super::*;
    use divan::counter::ItemsCount;

    /// Round trips per sample, run inside one `block_on` so the harness's own wake-ups
    /// do not dominate.
    const BATCH: usize = 200;

    fn run(addr: SocketAddr, b: divan::Bencher<'_, '_>) {
        let e = env();
        let mut s = e.rt.block_on(async {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s
        });
        let msg = [7u8; 1024];
        let mut back = [0u8; 1024];
        b.counter(ItemsCount::new(BATCH)).bench_local(|| {
            e.rt.block_on(async {
                for _ in 0..BATCH {
                    s.write_all(&msg).await.unwrap();
                    s.read_exact(&mut back).await.unwrap();
                }
            })
        });
    }

    #[divan::bench(sample_count = 30, sample_size = 1)]
    fn plain_tcp(b: divan::Bencher<'_, '_>) {
        run(env().plain_echo, b);
    }

    #[divan::bench(sample_count = 30, sample_size = 1)]
    fn hbone_proxied(b: divan::Bencher<'_, '_>) {
        run(env().proxy_echo, b);
    }
}

mod new_stream {
    use super::*;
    use divan::counter::ItemsCount;

    const BATCH: usize = 200;

    #[divan::bench(sample_count = 30, sample_size = 1)]
    fn warm_connection(b: divan::Bencher<'_, '_>) {
        let e = env();
        let mut req = e.request.clone();
        req.authority.set_port(OPEN);
        // Warm the pool.
        e.rt.block_on(async { drop(e.pool.connect(req.clone()).await.unwrap()) });
        b.counter(ItemsCount::new(BATCH)).bench_local(|| {
            e.rt.block_on(async {
                for _ in 0..BATCH {
                    let mut s = e.pool.connect(req.clone()).await.unwrap();
                    let mut buf = [0u8; 1];
                    let _ = s.read(&mut buf).await;
                }
            })
        });
    }
}
