//! HBONE client and server against each other on loopback: real TCP, TLS and HTTP/2.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_hbone::client::ConnectError;
use ambit_hbone::server::ServerConfig;
use ambit_hbone::stream::copy_bidirectional;
use ambit_hbone::{ConnectHeaders, Keepalive, PoolConfig};
use ambit_tls::testing::TestPki;
use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_returns_exact_bytes_for_a_large_transfer() {
    let env = Env::start().await;
    let pool = env.pool();
    let data = pattern(24 << 20, 1);
    let stream = pool.connect(env.request(ECHO)).await.unwrap();
    let back = round_trip(stream, &data).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "payload corrupted");
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() {
    let env = Env::start().await;
    let pool = env.pool();
    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            let pool = pool.clone();
            let req = env.request(ECHO);
            tokio::spawn(async move {
                let data = pattern(200_000 + i as usize * 1000, i);
                let stream = pool.connect(req).await.unwrap();
                assert!(
                    round_trip(stream, &data).await == data,
                    "stream {i} corrupted"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.handshakes, 1, "{stats:?}");
    assert_eq!(stats.connections, 1);
    assert_eq!(env.calls(), 100);
}

#[tokio::test]
async fn a_full_connection_makes_the_pool_open_another() {
    let env = Env::start().await;
    let pool = env.pool_with(PoolConfig {
        max_streams_per_connection: 2,
        ..PoolConfig::default()
    });
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.connect(env.request(HOLD)).await.unwrap());
    }
    let stats = pool.stats();
    assert_eq!(
        (stats.connections, stats.active_streams),
        (3, 5),
        "{stats:?}"
    );
    drop(held);
}

#[tokio::test]
async fn sequential_requests_reuse_the_connection() {
    let env = Env::start().await;
    let pool = env.pool();
    for i in 0..20 {
        let stream = pool.connect(env.request(ECHO)).await.unwrap();
        let data = pattern(1000, i);
        assert_eq!(round_trip(stream, &data).await, data);
    }
    assert_eq!(pool.stats().handshakes, 1);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_handshake() {
    let env = Env::start().await;
    let pool = env.pool();
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (pool, req, barrier) = (pool.clone(), env.request(HOLD), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                pool.connect(req).await
            })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap().unwrap());
    }
    assert_eq!(pool.stats().handshakes, 1);
    assert_eq!(pool.stats().active_streams, 20);
}

#[tokio::test]
async fn different_keys_get_different_connections() {
    let env = Env::start().await;
    let pool = env.pool();
    let _a = pool.connect(env.request(HOLD)).await.unwrap();
    // Another source identity.
    let other_id = TestPki::id("client-ns", "other");
    let mut req = env.request(HOLD);
    req.source = other_id.clone();
    req.source_cert = env.pki.issue(&other_id, Duration::from_secs(3600));
    let _b = pool.connect(req).await.unwrap();
    // Another expected identity set.
    let mut req = env.request(HOLD);
    req.expected.push(TestPki::id("server-ns", "waypoint"));
    let _c = pool.connect(req).await.unwrap();
    // Same key as the first: reused.
    let _d = pool.connect(env.request(HOLD)).await.unwrap();
    let stats = pool.stats();
    assert_eq!((stats.handshakes, stats.connections), (3, 3), "{stats:?}");
    let seen = env.handler.seen.lock().await;
    assert_eq!(seen[1].peer, other_id, "the server saw the second identity");
}

#[tokio::test]
async fn the_client_fin_reaches_the_server_and_the_reverse() {
    let env = Env::start().await;
    let pool = env.pool();
    // Client finishes sending first; the server counts to EOF, answers, then finishes.
    let mut stream = pool.connect(env.request(COUNT)).await.unwrap();
    stream.write_all(&[7u8; 12345]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "12345");

    // Server finishes first: it half-closes while the client can still send.
    let client = pool.connect(env.request(HOLD)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut server = env.handler.held.lock().await.pop().unwrap();
    server.write_all(b"bye").await.unwrap();
    server.shutdown().await.unwrap();
    let (mut cr, mut cw) = tokio::io::split(client);
    let mut got = Vec::new();
    cr.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    // The client's send side is still open after the server's FIN.
    cw.write_all(b"still here").await.unwrap();
    cw.shutdown().await.unwrap();
    let mut from_client = Vec::new();
    server.read_to_end(&mut from_client).await.unwrap();
    assert_eq!(from_client, b"still here");
}

#[tokio::test]
async fn a_refusal_carries_its_status() {
    let env = Env::start().await;
    let err = env
        .pool()
        .connect(env.request(REFUSE_401))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");
}

#[tokio::test]
async fn resets_propagate_both_ways() {
    let env = Env::start().await;
    let pool = env.pool();
    // Server resets: the client's read fails with ConnectionReset.
    let mut stream = pool.connect(env.request(RESET)).await.unwrap();
    let mut buf = [0u8; 16];
    let err = stream.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // Client resets: the server's read fails.
    let client = pool.connect(env.request(HOLD)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut server = env.handler.held.lock().await.pop().unwrap();
    client.reset();
    let err = server.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn the_wrong_server_identity_is_refused_clearly() {
    let env = Env::start().await;
    let mut req = env.request(ECHO);
    req.expected = vec![TestPki::id("server-ns", "someone-else")];
    let err = env.pool().connect(req).await.unwrap_err();
    match &err {
        ConnectError::WrongIdentity { message, .. } => {
            assert!(message.contains("ns/server-ns/sa/server"), "{message}");
            assert!(
                message.contains("ns/server-ns/sa/someone-else"),
                "{message}"
            );
        }
        other => panic!("expected WrongIdentity, got {other}"),
    }
    assert_eq!(env.calls(), 0);
}

#[tokio::test]
async fn a_client_from_another_mesh_is_refused() {
    let env = Env::start().await;
    let foreign = TestPki::new();
    let mut req = env.request(ECHO);
    req.source_cert = foreign.issue(&env.client_id, Duration::from_secs(3600));
    let err = env.pool().connect(req).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::Tls { .. } | ConnectError::Http2 { .. }),
        "{err}"
    );
    assert_eq!(env.calls(), 0);
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let env = Env::start().await;
    let mut req = env.request(ECHO);
    req.source_cert = env.pki.issue(&env.client_id, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(env.pool().connect(req).await.is_err());
    assert_eq!(env.calls(), 0);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    use tokio_rustls::TlsConnector;
    let env = Env::start().await;
    let mut config =
        rustls::ClientConfig::builder_with_provider(ambit_tls::config::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(env.addr.ip().into());
    let result = async {
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // TLS 1.3: the server's verdict on the client certificate arrives with the first read.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 1];
        tls.read(&mut buf).await
    }
    .await;
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("CertificateRequired") || err.to_string().contains("certificate"),
        "{err}"
    );
    assert_eq!(env.calls(), 0);
}

#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ambit_tls::config::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn headers_reach_the_handler() {
    let env = Env::start().await;
    let mut req = env.request(HOLD);
    req.headers = ConnectHeaders {
        forwarded_for: Some(
            "198.18.5.5:41000"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        ),
        forwarded_host: Some("echo.demo.svc.cluster.local".into()),
        baggage: vec![("k8s.namespace.name".into(), "demo".into())],
        traceparent: None,
    };
    let _s = env.pool().connect(req.clone()).await.unwrap();
    let seen = env.handler.seen.lock().await.pop().unwrap();
    assert_eq!(seen.headers, req.headers);
    assert_eq!(seen.authority, authority(HOLD));
    assert_eq!(seen.peer, env.client_id);
}

#[tokio::test]
async fn a_dead_peer_is_evicted_by_ping() {
    let env = Env::start().await;
    let relay = Relay::start(env.addr).await;
    let pool = env.pool_with(PoolConfig {
        keepalive: Keepalive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
        },
        ..PoolConfig::default()
    });
    let mut req = env.request(ECHO);
    req.destination = relay.addr;
    let stream = pool.connect(req.clone()).await.unwrap();
    assert_eq!(round_trip(stream, b"hi").await, b"hi");
    assert_eq!(pool.stats().connections, 1);

    relay.freeze();
    let start = Instant::now();
    while pool.stats().connections > 0 {
        assert!(start.elapsed() < Duration::from_secs(3), "not evicted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new request opens a new connection.
    relay.thaw();
    let stream = pool.connect(req).await.unwrap();
    assert_eq!(round_trip(stream, b"again").await, b"again");
    assert_eq!(pool.stats().handshakes, 2);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let env = Env::start().await;
    let pool = env.pool_with(PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    });
    let stream = pool.connect(env.request(ECHO)).await.unwrap();
    let _ = round_trip(stream, b"x").await;
    assert_eq!(pool.stats().connections, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pool.stats().connections, 0);
}

#[tokio::test]
async fn the_server_closes_a_connection_left_idle_by_its_client() {
    // A client that would keep its connection for an hour: the server does not.
    let env = Env::start_with(ambit_hbone::ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let pool = env.pool_with(PoolConfig {
        idle_timeout: Duration::from_secs(3600),
        ..PoolConfig::default()
    });
    let stream = pool.connect(env.request(ECHO)).await.unwrap();
    let _ = round_trip(stream, b"x").await;
    assert_eq!(pool.stats().connections, 1);
    let start = std::time::Instant::now();
    while pool.stats().connections != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the idle connection was not closed by the server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new request simply opens a new connection.
    let stream = pool.connect(env.request(ECHO)).await.unwrap();
    assert_eq!(round_trip(stream, b"again").await, b"again");
}

#[tokio::test]
async fn goaway_drain_lets_open_streams_finish() {
    let mut env = Env::start().await;
    let pool = env.pool();
    let client = pool.connect(env.request(HOLD)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let server_side = env.handler.held.lock().await.pop().unwrap();

    let server = env.server.take().unwrap();
    let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shutdown.is_finished(), "an open stream holds the drain");

    // The open stream still carries data both ways while draining.
    let echo = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(server_side);
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let data = pattern(1 << 20, 9);
    assert!(round_trip(client, &data).await == data);
    echo.await.unwrap();

    // With the stream done, the drain finishes well before its deadline.
    let start = Instant::now();
    shutdown.await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    // New tunnels are refused: the listener is closed.
    assert!(pool.connect(env.request(ECHO)).await.is_err());
}

#[tokio::test]
async fn the_drain_deadline_closes_streams_that_do_not_finish() {
    let mut env = Env::start().await;
    let pool = env.pool();
    let mut client = pool.connect(env.request(HOLD)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    env.server
        .take()
        .unwrap()
        .shutdown(Duration::from_millis(300))
        .await;
    assert!(start.elapsed() < Duration::from_secs(2));
    env.handler.held.lock().await.clear();
    let mut buf = [0u8; 1];
    // The stream is gone: either an error or EOF, never a hang.
    let r = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await;
    assert!(matches!(r, Ok(Err(_)) | Ok(Ok(0))), "{r:?}");
}

#[tokio::test]
async fn too_many_streams_on_one_connection_are_refused_by_the_server() {
    let env = Env::start_with(ServerConfig {
        max_concurrent_streams: 3,
        ..ServerConfig::default()
    })
    .await;
    // The pool would put 10 streams on one connection; the server allows 3 at a time.
    let pool = env.pool_with(PoolConfig {
        max_streams_per_connection: 10,
        ..PoolConfig::default()
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.connect(env.request(HOLD)).await.unwrap());
    }
    // The fourth waits for a free slot (HTTP/2 flow of SETTINGS_MAX_CONCURRENT_STREAMS)
    // rather than exceeding the limit.
    let fourth =
        tokio::time::timeout(Duration::from_millis(300), pool.connect(env.request(HOLD))).await;
    assert!(fourth.is_err(), "the server limit was exceeded");
    held.pop();
    let fourth =
        tokio::time::timeout(Duration::from_secs(2), pool.connect(env.request(HOLD))).await;
    assert!(matches!(fourth, Ok(Ok(_))));
}

#[tokio::test]
async fn copy_bidirectional_moves_both_ways_and_counts() {
    let env = Env::start().await;
    let pool = env.pool();
    // A local "application" on one side of a socket pair, the tunnel on the other.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
    let (app, accepted) = tokio::join!(app, listener.accept());
    let (mut app, (proxy_side, _)) = (app.unwrap(), accepted.unwrap());
    let stream = pool.connect(env.request(ECHO)).await.unwrap();
    let copy = tokio::spawn(async move {
        let (r, w) = proxy_side.into_split();
        copy_bidirectional(r, w, stream).await
    });
    let data = pattern(3 << 20, 4);
    let (mut ar, mut aw) = app.split();
    let write = async {
        aw.write_all(&data).await.unwrap();
        aw.shutdown().await.unwrap();
    };
    let read = async {
        let mut v = Vec::new();
        ar.read_to_end(&mut v).await.unwrap();
        v
    };
    let ((), back) = tokio::join!(write, read);
    assert!(back == data);
    let (stats, result) = copy.await.unwrap();
    result.unwrap();
    assert_eq!(stats.sent, data.len() as u64);
    assert_eq!(stats.received, data.len() as u64);
    drop(app);
}

/// A TCP relay that can stop forwarding (a peer that goes silent without closing).
struct Relay {
    addr: std::net::SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(ir) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(ow) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(or), Box::new(iw)),
                ] {
                    let f = f.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while f.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Relay { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn thaw(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
