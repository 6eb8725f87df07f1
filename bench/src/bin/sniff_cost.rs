//! What request metrics cost the node proxy per request, with the proxy's own data path
//! left out: a keep-alive HTTP/1.1 conversation (wrk's request, a 1 KiB response, as in
//! `bench/run`) and an HTTP/2 one (HPACK-encoded heads, one stream per request) played
//! through the same `RequestTap` a connection uses (sniffer, metric series, histograms),
//! one read per message as a socket would deliver them; and a connection that is not
//! HTTP, once the sniffer has given up. Compare with the proxies' CPU per 1,000 requests
//! in `bench/results/mesh.md` (about 20 µs per request per proxy).
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin sniff-cost
//! ```

#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use ambit_core::telemetry::{ConnFacts, ConnLabels, Reporter};
use ambit_hbone::stream::Tap;
use ambit_node::l7::RequestTap;
use ambit_node::metrics::Metrics;

const REQUESTS: usize = 200_000;

fn labels() -> ConnLabels {
    ConnLabels::new(
        &ConnFacts {
            reporter: Reporter::Destination,
            source: None,
            source_principal: Some("spiffe://cluster.local/ns/bench/sa/client".into()),
            destination: None,
            destination_service: None,
            mutual_tls: true,
            request_protocol: "tcp",
        },
        "-",
    )
}

/// Nanoseconds per request of `play`, which plays `n` requests on one tap.
fn time(label: &str, metrics: &Arc<Metrics>, play: impl Fn(&RequestTap, usize)) -> f64 {
    // Warm up on a connection of its own.
    play(
        &RequestTap::new(metrics.clone(), &labels(), false, None),
        1000,
    );
    let tap = RequestTap::new(metrics.clone(), &labels(), false, None);
    let start = Instant::now();
    play(&tap, REQUESTS);
    let ns = start.elapsed().as_nanos() as f64 / REQUESTS as f64;
    println!("| {label} | {ns:.0} ns |");
    ns
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn main() {
    let metrics = Arc::new(Metrics::default());
    println!("| Per request, one core | Cost |\n|---|---|");

    let request = b"GET / HTTP/1.1\r\nHost: 198.18.2.10:8080\r\n\r\n";
    let mut response = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\nContent-Type: application/octet-stream\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n".to_vec();
    response.extend(std::iter::repeat_n(b'x', 1024));
    // Inbound: the tunnel brings the request (write_socket), the application answers.
    let h1 = time("HTTP/1.1 keep-alive, 1 KiB response", &metrics, |tap, n| {
        for _ in 0..n {
            tap.write_socket(black_box(request));
            tap.read_socket(black_box(&response));
        }
    });
    let page = metrics.encode();
    assert!(
        page.contains("istio_requests_total{") && page.contains("response_code=\"200\""),
        "the requests were recorded"
    );

    // HTTP/2: the heads after the first are mostly dynamic-table references, as real
    // clients and servers send them.
    let req_head: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"198.18.2.10:8080"),
        (b":path", b"/"),
        (b"user-agent", b"bench"),
    ];
    let resp_head: Vec<(&[u8], &[u8])> = vec![
        (b":status", b"200"),
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"1024"),
    ];
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(frame(4, 0, 0, &[]));
    let settings = frame(4, 0, 0, &[]);
    let h2 = time(
        "HTTP/2, one stream per request, 1 KiB response",
        &metrics,
        |tap, n| {
            // Encoded before the clock matters: the first heads fill the dynamic tables,
            // every later one is the same references.
            let mut cenc = loona_hpack::Encoder::new();
            let mut senc = loona_hpack::Encoder::new();
            let first = (
                frame(1, 0x5, 1, &cenc.encode(req_head.iter().copied())),
                frame(1, 0x4, 1, &senc.encode(resp_head.iter().copied())),
            );
            let mut req = frame(1, 0x5, 1, &cenc.encode(req_head.iter().copied()));
            let mut resp = frame(1, 0x4, 1, &senc.encode(resp_head.iter().copied()));
            let head_len = resp.len();
            resp.extend(frame(0, 1, 1, &[b'x'; 1024]));
            tap.write_socket(&preface);
            tap.read_socket(&settings);
            tap.write_socket(&first.0);
            let mut first_resp = first.1.clone();
            first_resp.extend(frame(0, 1, 1, &[b'x'; 1024]));
            tap.read_socket(&first_resp);
            for i in 1..n {
                let id = (2 * i + 1) as u32;
                req[5..9].copy_from_slice(&id.to_be_bytes());
                resp[5..9].copy_from_slice(&id.to_be_bytes());
                resp[head_len + 5..head_len + 9].copy_from_slice(&id.to_be_bytes());
                tap.write_socket(black_box(&req));
                tap.read_socket(black_box(&resp));
            }
        },
    );
    assert!(
        metrics.encode().contains("istio_requests_total{"),
        "the HTTP/2 requests were recorded"
    );

    // Not HTTP: the sniffer gives up on the first bytes; the rest is the flag check.
    let blob = vec![0x16u8; 16 * 1024];
    let opaque = time(
        "not HTTP (16 KiB reads), after giving up",
        &metrics,
        |tap, n| {
            for _ in 0..n {
                tap.read_socket(black_box(&blob));
            }
        },
    );
    println!(
        "\nAgainst about 20 µs of proxy CPU per request per proxy: HTTP/1.1 +{:.1}%, HTTP/2 +{:.1}%, not HTTP +{:.2}%.",
        h1 / 200.0,
        h2 / 200.0,
        opaque / 200.0
    );
}
