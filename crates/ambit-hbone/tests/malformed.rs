//! Requests that are not well-formed HBONE CONNECTs never reach the handler.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use ambit_tls::spiffe::hbone_client_config;
use support::raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens an authenticated TLS connection to the server and speaks raw HTTP/2: sends the
/// preface, SETTINGS, and one HEADERS frame on stream 1; returns the frames received.
async fn send_raw(env: &Env, headers: &[(&[u8], &[u8])]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let config = hbone_client_config(
        env.client_cert.clone(),
        &env.pki.bundle(),
        vec![env.server_id.clone()],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(env.addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(SETTINGS, ACK, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &header_block(headers)));
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    // Collect what comes back for a moment.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    parse_frames(&got)
}

/// Whether stream 1 was answered 400, reset, or the connection closed with an error.
fn refused(frames: &[(u8, u8, u32, Vec<u8>)]) -> Option<&'static str> {
    for (kind, _, stream, payload) in frames {
        // GOAWAY with an error code: the whole connection was refused.
        if *kind == GOAWAY && payload.len() >= 8 && payload[4..8] != [0, 0, 0, 0] {
            return Some("goaway");
        }
        if *stream != 1 {
            continue;
        }
        if *kind == RST_STREAM {
            return Some("reset");
        }
        // `:status: 400` is HPACK static table entry 12, sent as the indexed byte 0x8c.
        if *kind == HEADERS && payload.first() == Some(&0x8c) {
            return Some("400");
        }
    }
    None
}

#[tokio::test]
async fn malformed_requests_are_refused_before_the_handler() {
    let env = Env::start().await;
    type Fields = Vec<(&'static [u8], &'static [u8])>;
    let cases: Vec<(&str, Fields, &str)> = vec![
        (
            "not CONNECT",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"198.18.0.1:80"),
                (b":path", b"/"),
            ],
            "400",
        ),
        (
            "authority is a host name",
            vec![(b":method", b"CONNECT"), (b":authority", b"echo.demo:80")],
            "400",
        ),
        (
            "authority without a port",
            vec![(b":method", b"CONNECT"), (b":authority", b"198.18.0.1")],
            "400",
        ),
        ("missing authority", vec![(b":method", b"CONNECT")], "400"),
        (
            "CONNECT with :scheme and :path",
            vec![
                (b":method", b"CONNECT"),
                (b":scheme", b"https"),
                (b":authority", b"198.18.0.1:80"),
                (b":path", b"/"),
            ],
            "reset",
        ),
        (
            "no method",
            vec![(b":authority", b"198.18.0.1:80")],
            "reset",
        ),
        (
            "uppercase header name",
            vec![
                (b":method", b"CONNECT"),
                (b":authority", b"198.18.0.1:80"),
                (b"Forwarded", b"x"),
            ],
            "goaway",
        ),
    ];
    for (what, headers, want) in cases {
        let frames = send_raw(&env, &headers).await;
        assert_eq!(refused(&frames), Some(want), "{what}: {frames:?}");
    }
    assert_eq!(env.calls(), 0, "a malformed request reached the handler");

    // The same path accepts a well-formed CONNECT.
    let frames = send_raw(
        &env,
        &[(b":method", b"CONNECT"), (b":authority", b"198.18.0.1:1")],
    )
    .await;
    assert!(
        frames
            .iter()
            .any(|(k, _, s, p)| *k == HEADERS && *s == 1 && p.first() == Some(&0x88)),
        "expected :status 200 (static index 8): {frames:?}"
    );
    assert_eq!(env.calls(), 1);
}

#[tokio::test]
async fn an_oversized_header_block_is_refused() {
    let env = Env::start().await;
    let big = vec![b'a'; 20 * 1024];
    let frames = send_raw(
        &env,
        &[
            (b":method", b"CONNECT"),
            (b":authority", b"198.18.0.1:1"),
            (b"baggage", &big),
        ],
    )
    .await;
    // Over max_header_list_size: the stream is refused (h2 answers 431 or resets).
    let answered_ok = frames
        .iter()
        .any(|(k, _, s, p)| *k == HEADERS && *s == 1 && p.first() == Some(&0x88));
    assert!(!answered_ok, "{frames:?}");
    assert_eq!(env.calls(), 0);
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let env = Env::start_with(ambit_hbone::ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let start = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(start.elapsed() >= Duration::from_millis(250));
}
