//! Arbitrary bytes as a conversation the node proxy sniffs for requests: a sequence of
//! pieces, each one header byte (top bit: the server sent it; the other seven: its
//! length) and its bytes. The sniffer never panics, reports nothing larger than what was
//! sent, reports only real HTTP statuses and gRPC codes, and reports the same exchanges
//! however the pieces are split into reads (empty reads included).
#![no_main]

use std::time::Instant;

use ambit_node::sniff::{Exchange, Protocol, Sniffer};
use libfuzzer_sys::fuzz_target;

/// The conversation's pieces: (from the server, bytes).
fn pieces(mut data: &[u8]) -> Vec<(bool, &[u8])> {
    let mut out = Vec::new();
    while let Some((&h, rest)) = data.split_first() {
        let n = usize::from(h & 0x7f).min(rest.len());
        out.push((h & 0x80 != 0, &rest[..n]));
        data = &rest[n..];
    }
    out
}

/// Plays the conversation with reads of at most `step` bytes.
fn play(pieces: &[(bool, &[u8])], step: usize) -> (Vec<Exchange>, Protocol) {
    let now = Instant::now();
    let mut s = Sniffer::new();
    let mut seen = Vec::new();
    let mut was_off = false;
    for (server, bytes) in pieces {
        // An empty read (an empty DATA frame, say) between pieces changes nothing.
        s.client(&[], now);
        s.server(&[], now, &mut |e| seen.push(e));
        for chunk in bytes.chunks(step) {
            if *server {
                s.server(chunk, now, &mut |e| seen.push(e));
            } else {
                s.client(chunk, now);
            }
            // Once given up, never back.
            assert!(!was_off || s.is_off());
            was_off = s.is_off();
        }
    }
    let protocol = s.protocol();
    s.server_closed(now, &mut |e| seen.push(e));
    assert!(s.is_off());
    (seen, protocol)
}

fuzz_target!(|data: &[u8]| {
    let pieces = pieces(data);
    let sent = |server: bool| -> u64 {
        pieces
            .iter()
            .filter(|(s, _)| *s == server)
            .map(|(_, b)| b.len() as u64)
            .sum()
    };
    let (whole, protocol) = play(&pieces, usize::MAX);
    let requests: u64 = whole.iter().map(|e| e.request_bytes).sum();
    let responses: u64 = whole.iter().map(|e| e.response_bytes).sum();
    assert!(requests <= sent(false), "more request bytes than the client sent");
    assert!(responses <= sent(true), "more response bytes than the server sent");
    for e in &whole {
        assert!((100..600).contains(&e.status), "status {}", e.status);
        assert!(e.grpc_status.is_none_or(|g| g <= 16), "grpc-status {:?}", e.grpc_status);
        assert!(e.grpc || e.grpc_status.is_none());
    }
    // Splitting the reads differently changes nothing.
    for step in [1, 5] {
        assert_eq!(play(&pieces, step), (whole.clone(), protocol), "reads of {step}");
    }
});
