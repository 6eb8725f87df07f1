//! Arbitrary HTTP/2 request headers (or arbitrary frames) sent to the HBONE server's
//! request handling: it must never panic or hang, and only well-formed CONNECTs may reach
//! the handler.
#![no_main]

#[path = "../../crates/ambit-hbone/tests/support/raw.rs"]
mod raw;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ambit_hbone::server::{PeerInfo, serve_connection};
use ambit_hbone::{ConnectHandler, IncomingConnect, ServerConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Handler(AtomicUsize);

impl ConnectHandler for Handler {
    async fn handle(&self, c: IncomingConnect) {
        // Whatever arrives here passed the checks (its authority is an ip:port by type).
        self.0.fetch_add(1, Ordering::Relaxed);
        if c.authority.port() % 2 == 0 {
            drop(c.accept());
        } else {
            c.refuse(http::StatusCode::UNAUTHORIZED);
        }
    }
}

/// Input: a mode byte, then either length-prefixed header fields or raw frame bytes.
fn frames(data: &[u8]) -> Vec<u8> {
    let mut out = raw::PREFACE.to_vec();
    out.extend(raw::frame(raw::SETTINGS, 0, 0, &[]));
    let Some((&mode, rest)) = data.split_first() else {
        return out;
    };
    if mode < 0x80 {
        let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
        let mut r = rest;
        while r.len() >= 2 {
            let nl = (r[0] as usize).min(r.len() - 1);
            let name = &r[1..1 + nl];
            r = &r[1 + nl..];
            let Some((&vl, rr)) = r.split_first() else { break };
            let vl = (vl as usize).min(rr.len());
            fields.push((name, &rr[..vl]));
            r = &rr[vl..];
        }
        let flags = raw::END_HEADERS | if mode & 1 == 1 { raw::END_STREAM } else { 0 };
        let stream = 1 + 2 * u32::from(mode >> 1 & 0x3);
        out.extend(raw::frame(raw::HEADERS, flags, stream, &raw::header_block(&fields)));
    } else {
        out.extend_from_slice(rest);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
    }
    let bytes = frames(data);
    RT.with(|rt| {
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let handler = Arc::new(Handler(AtomicUsize::new(0)));
            let peer = PeerInfo {
                identity: ambit_core::SpiffeId::new("cluster.local", "fuzz", "fuzz").expect("id"),
                addr: "198.18.0.1:40000".parse().expect("addr"),
                local: "198.18.0.2:15008".parse().expect("addr"),
            };
            let (_drain_tx, drain_rx) = tokio::sync::watch::channel(None);
            let config = ServerConfig::default();
            let h = handler.clone();
            let server = tokio::spawn(async move {
                let _ = serve_connection(server, peer, &config, h, drain_rx, None).await;
            });
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            // Drain what the server writes so it never blocks on a full pipe.
            let reader = async {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = client.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let finished = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(reader, server)
            })
            .await;
            assert!(finished.is_ok(), "the server hung on this input");
        });
    });
});
