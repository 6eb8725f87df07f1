use super::*;

/// Which side sent a piece of a conversation.
#[derive(Clone, Copy)]
enum Side {
    C,
    S,
}

/// Plays a conversation through a sniffer, `step` bytes at a time, and returns what it
/// reported and how it ended.
fn play(conversation: &[(Side, &[u8])], step: usize, close: bool) -> (Vec<Exchange>, Protocol) {
    let mut s = Sniffer::new();
    let mut seen = Vec::new();
    let now = Instant::now();
    for (side, bytes) in conversation {
        for chunk in bytes.chunks(step.max(1)) {
            match side {
                Side::C => s.client(chunk, now),
                Side::S => s.server(chunk, now, &mut |e| seen.push(e)),
            }
        }
    }
    let protocol = s.protocol();
    if close {
        s.server_closed(now, &mut |e| seen.push(e));
    }
    (seen, protocol)
}

/// The same conversation must give the same result however it is split.
fn play_all_splits(conversation: &[(Side, &[u8])], close: bool) -> (Vec<Exchange>, Protocol) {
    let whole = play(conversation, usize::MAX, close);
    for step in [1, 2, 3, 7, 64] {
        let split = play(conversation, step, close);
        assert_eq!(split, whole, "split into {step}-byte pieces");
    }
    whole
}

fn statuses(e: &[Exchange]) -> Vec<u16> {
    e.iter().map(|e| e.status).collect()
}

#[test]
fn keep_alive_requests_each_counted_with_their_sizes() {
    let req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let req2 = b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc";
    let resp2 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
    let (seen, protocol) = play_all_splits(
        &[
            (Side::C, req),
            (Side::S, resp),
            (Side::C, req2),
            (Side::S, resp2),
        ],
        false,
    );
    assert_eq!(protocol, Protocol::Http1);
    assert_eq!(statuses(&seen), [200, 503]);
    assert_eq!(seen[0].request_bytes, req.len() as u64);
    assert_eq!(seen[0].response_bytes, resp.len() as u64);
    assert_eq!(seen[1].request_bytes, req2.len() as u64);
    assert_eq!(seen[1].response_bytes, resp2.len() as u64);
    assert!(seen.iter().all(|e| !e.grpc && e.grpc_status.is_none()));
}

#[test]
fn pipelined_requests_are_matched_to_responses_in_order() {
    let reqs = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\n\r\n";
    // The HEAD response announces a length but carries no body.
    let resps = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
    let (seen, _) = play_all_splits(&[(Side::C, reqs), (Side::S, resps)], false);
    assert_eq!(statuses(&seen), [200, 404, 204]);
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let req = b"POST /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n";
    let resp =
        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n";
    let again = b"GET / HTTP/1.1\r\n\r\n";
    let resp2 = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let (seen, _) = play_all_splits(
        &[
            (Side::C, req),
            (Side::S, resp),
            (Side::C, again),
            (Side::S, resp2),
        ],
        false,
    );
    assert_eq!(statuses(&seen), [201, 200]);
    assert_eq!(seen[0].request_bytes, req.len() as u64);
    assert_eq!(seen[0].response_bytes, resp.len() as u64);
}

#[test]
fn interim_responses_do_not_end_the_exchange() {
    let req = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
    let (seen, _) = play_all_splits(
        &[
            (Side::C, req),
            (Side::S, b"HTTP/1.1 100 Continue\r\n\r\n"),
            (Side::C, b"hi"),
            (Side::S, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ],
        false,
    );
    assert_eq!(statuses(&seen), [200]);
}

#[test]
fn a_response_delimited_by_the_close_counts_when_the_server_closes() {
    let (seen, _) = play_all_splits(
        &[
            (Side::C, b"GET / HTTP/1.0\r\n\r\n"),
            (Side::S, b"HTTP/1.0 200 OK\r\n\r\nall of this is the body"),
        ],
        true,
    );
    assert_eq!(statuses(&seen), [200]);
    let (seen, _) = play(
        &[
            (Side::C, b"GET / HTTP/1.0\r\n\r\n"),
            (Side::S, b"HTTP/1.0 200 OK\r\n\r\nbody"),
        ],
        usize::MAX,
        false,
    );
    assert!(seen.is_empty(), "not complete before the close");
}

#[test]
fn an_upgrade_is_counted_then_followed_no_further() {
    let (seen, protocol) = play_all_splits(
        &[
            (
                Side::C,
                b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            ),
            (
                Side::S,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
            ),
            (Side::C, b"\x81\x85\0\0\0\0hello"),
        ],
        false,
    );
    assert_eq!(statuses(&seen), [101]);
    assert_eq!(protocol, Protocol::Opaque);
}

#[test]
fn garbage_turns_sniffing_off_without_reporting() {
    let cases: &[&[(Side, &[u8])]] = &[
        // TLS from the application: a ClientHello record.
        &[(Side::C, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")],
        // A binary protocol.
        &[(Side::C, b"\x00\x00\x00\x08\x04\xd2\x16\x2f")],
        // A server that speaks first (SMTP, MySQL, ...).
        &[(Side::S, b"220 mail.example ESMTP\r\n")],
        // A response without a request.
        &[
            (Side::C, b"GET / HTTP/1.1\r\n\r\n"),
            (Side::S, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            (Side::S, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        ],
        // Folded header lines, an unknown version, conflicting lengths, a bad length.
        &[(Side::C, b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n")],
        &[(Side::C, b"GET / HTTP/3.0\r\n\r\n")],
        &[(
            Side::C,
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        )],
        &[(Side::C, b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n")],
        &[(
            Side::C,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        )],
        &[(Side::C, b"CONNECT a:443 HTTP/1.1\r\n\r\n")],
        // A bad chunk size.
        &[(
            Side::C,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        )],
        // A status line that is not one.
        &[
            (Side::C, b"GET / HTTP/1.1\r\n\r\n"),
            (Side::S, b"HTTP/1.1 2x0 OK\r\n\r\n"),
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let (seen, protocol) = play_all_splits(case, true);
        assert!(seen.is_empty() || i == 3, "case {i} reported {seen:?}");
        assert_eq!(protocol, Protocol::Opaque, "case {i}");
    }
}

#[test]
fn a_half_request_reports_nothing() {
    let (seen, protocol) = play_all_splits(&[(Side::C, b"GET /only-half HTTP/1.1\r\nHo")], true);
    assert!(seen.is_empty());
    assert_eq!(protocol, Protocol::Http1);
}

#[test]
fn limits_end_sniffing() {
    let mut long = b"GET /".to_vec();
    long.extend(std::iter::repeat_n(b'a', MAX_LINE as usize + 1));
    long.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let (_, protocol) = play(&[(Side::C, &long)], usize::MAX, false);
    assert_eq!(protocol, Protocol::Opaque);

    let mut many = Vec::new();
    for _ in 0..=MAX_PIPELINED {
        many.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    }
    let (_, protocol) = play(&[(Side::C, &many)], usize::MAX, false);
    assert_eq!(protocol, Protocol::Opaque);
}

#[test]
fn methods_starting_like_the_http2_preface_are_http1() {
    let (seen, protocol) = play_all_splits(
        &[
            (Side::C, b"PRIVATE / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
            (
                Side::S,
                b"HTTP/1.1 405 No\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            ),
        ],
        false,
    );
    assert_eq!(protocol, Protocol::Http1);
    assert_eq!(statuses(&seen), [405, 200]);
}

// HTTP/2 ---------------------------------------------------------------------------------

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn settings() -> Vec<u8> {
    frame(4, 0, 0, &[0, 3, 0, 0, 0, 100])
}

#[test]
fn http2_concurrent_streams_and_grpc_status() {
    let mut client_enc = loona_hpack::Encoder::new();
    let mut server_enc = loona_hpack::Encoder::new();
    let req = |enc: &mut loona_hpack::Encoder<'_>, path: &[u8], grpc: bool| {
        let mut h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"svc"),
            (b":path", path),
        ];
        if grpc {
            h.push((b"content-type", b"application/grpc"));
        }
        enc.encode(h)
    };
    let mut c = PREFACE.to_vec();
    c.extend(settings());
    // Streams 1 (gRPC, ends later with grpc-status 5), 3 (plain, 404) and 5 (reset).
    c.extend(frame(
        1,
        END_HEADERS,
        1,
        &req(&mut client_enc, b"/pkg.S/M", true),
    ));
    c.extend(frame(
        1,
        END_HEADERS,
        3,
        &req(&mut client_enc, b"/x", false),
    ));
    c.extend(frame(0, END_STREAM, 1, &[0, 0, 0, 0, 2, 8, 1]));
    c.extend(frame(0, END_STREAM, 3, b"body"));
    c.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        5,
        &req(&mut client_enc, b"/y", false),
    ));
    let mut s = settings();
    s.extend(frame(4, 1, 0, &[]));
    // Stream 3's headers arrive split over a HEADERS and a CONTINUATION, padded with priority.
    let h3 = server_enc.encode([(&b":status"[..], &b"404"[..])]);
    let (a, b) = h3.split_at(1);
    let mut padded = vec![2u8];
    padded.extend_from_slice(&[0, 0, 0, 0, 16]);
    padded.extend_from_slice(a);
    padded.extend_from_slice(&[0, 0]);
    s.extend(frame(1, PADDED | PRIORITY, 3, &padded));
    s.extend(frame(CONTINUATION, END_HEADERS, 3, b));
    s.extend(frame(
        1,
        END_HEADERS,
        1,
        &server_enc.encode([
            (&b":status"[..], &b"200"[..]),
            (b"content-type", b"application/grpc"),
        ]),
    ));
    s.extend(frame(0, 0, 1, &[0, 0, 0, 0, 0]));
    s.extend(frame(0, END_STREAM, 3, b"nope"));
    s.extend(frame(3, 0, 5, &[0, 0, 0, 8]));
    s.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &server_enc.encode([(&b"grpc-status"[..], &b"5"[..])]),
    ));
    let (seen, protocol) = play_all_splits(&[(Side::C, &c), (Side::S, &s)], false);
    assert_eq!(protocol, Protocol::Http2);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].status, seen[0].grpc, seen[0].grpc_status),
        (404, false, None)
    );
    assert_eq!(
        (seen[1].status, seen[1].grpc, seen[1].grpc_status),
        (200, true, Some(5))
    );
    assert!(seen[1].response_bytes > 5);
}

#[test]
fn http2_server_speaking_first_is_followed() {
    let mut enc = loona_hpack::Encoder::new();
    let mut server = settings();
    let mut c = PREFACE.to_vec();
    c.extend(settings());
    c.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &enc.encode([(&b":method"[..], &b"GET"[..]), (b":path", b"/")]),
    ));
    let mut senc = loona_hpack::Encoder::new();
    let mut resp = frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &senc.encode([(&b":status"[..], &b"204"[..])]),
    );
    server.append(&mut resp);
    let s1 = settings();
    let (seen, _) = play_all_splits(
        &[
            (Side::S, &s1),
            (Side::C, &c),
            (Side::S, &server[s1.len()..]),
        ],
        false,
    );
    assert_eq!(statuses(&seen), [204]);
}

#[test]
fn broken_http2_turns_sniffing_off() {
    let mut c = PREFACE.to_vec();
    // A HEADERS block that is not HPACK (an index past both tables).
    c.extend(frame(1, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0x7f]));
    let (_, protocol) = play(&[(Side::C, &c)], usize::MAX, false);
    assert_eq!(protocol, Protocol::Opaque);

    // A frame other than CONTINUATION inside a header block.
    let mut c = PREFACE.to_vec();
    c.extend(frame(1, 0, 1, &[0x82]));
    c.extend(frame(0, 0, 1, b"x"));
    let (_, protocol) = play(&[(Side::C, &c)], usize::MAX, false);
    assert_eq!(protocol, Protocol::Opaque);

    // A header block past the limit.
    let mut c = PREFACE.to_vec();
    c.extend(frame(1, 0, 1, &vec![0x82; 16_000]));
    for _ in 0..5 {
        c.extend(frame(CONTINUATION, 0, 1, &vec![0x82; 16_000]));
    }
    let (_, protocol) = play(&[(Side::C, &c)], usize::MAX, false);
    assert_eq!(protocol, Protocol::Opaque);
}

const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[test]
fn requests_keep_their_method_path_and_trace_context() {
    let req = format!(
        "PATCH /items/7?x=1 HTTP/1.1\r\nHost: x\r\nTraceParent:  {TP} \r\n\r\nGET / HTTP/1.1\r\ntraceparent: garbage\r\n\r\n"
    );
    let resp =
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let (seen, _) = play_all_splits(&[(Side::C, req.as_bytes()), (Side::S, resp)], false);
    assert_eq!(seen[0].request.method(), "PATCH");
    assert_eq!(seen[0].request.path(), "/items/7?x=1");
    let tp = seen[0].request.trace.expect("the trace context");
    assert_eq!(tp.to_header(), TP);
    assert_eq!(seen[1].request.trace, None, "a malformed one is none");

    // A long path is cut, never grown into.
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(1000));
    let (seen, _) = play(
        &[
            (Side::C, long.as_bytes()),
            (Side::S, b"HTTP/1.1 204 No\r\n\r\n"),
        ],
        usize::MAX,
        false,
    );
    assert_eq!(seen[0].request.path().len(), MAX_PATH);

    // HTTP/2: from the header block.
    let mut enc = loona_hpack::Encoder::new();
    let mut c = PREFACE.to_vec();
    c.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &enc.encode([
            (&b":method"[..], &b"DELETE"[..]),
            (b":path", b"/a/b"),
            (b"traceparent", TP.as_bytes()),
        ]),
    ));
    let mut senc = loona_hpack::Encoder::new();
    let mut s = settings();
    s.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &senc.encode([(&b":status"[..], &b"202"[..])]),
    ));
    let (seen, _) = play_all_splits(&[(Side::C, &c), (Side::S, &s)], false);
    assert_eq!(seen[0].request.method(), "DELETE");
    assert_eq!(seen[0].request.path(), "/a/b");
    assert_eq!(
        seen[0].request.trace.map(|t| t.to_header()),
        Some(TP.to_owned())
    );
}

#[test]
fn a_body_of_many_small_chunks_is_followed_to_its_end() {
    let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..30_000 {
        resp.extend_from_slice(b"1\r\nx\r\n");
    }
    resp.extend_from_slice(b"0\r\n\r\n");
    let (seen, protocol) = play(
        &[(Side::C, b"GET /events HTTP/1.1\r\n\r\n"), (Side::S, &resp)],
        4096,
        false,
    );
    assert_eq!(protocol, Protocol::Http1);
    assert_eq!(statuses(&seen), [200]);
    assert_eq!(seen[0].response_bytes, resp.len() as u64);
}

#[test]
fn statuses_outside_the_http_range_and_odd_framing_headers_end_sniffing() {
    for status in [&b"042"[..], b"600", b"999"] {
        let mut resp = b"HTTP/1.1 ".to_vec();
        resp.extend_from_slice(status);
        resp.extend_from_slice(b" X\r\ncontent-length: 0\r\n\r\n");
        let (seen, protocol) = play_all_splits(
            &[(Side::C, b"GET / HTTP/1.1\r\n\r\n"), (Side::S, &resp)],
            false,
        );
        assert!(seen.is_empty());
        assert_eq!(protocol, Protocol::Opaque);
    }
    // "1 2" is not twelve.
    let (_, protocol) = play(
        &[(Side::C, b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n")],
        usize::MAX,
        false,
    );
    assert_eq!(protocol, Protocol::Opaque);
    // A trailing comma leaves "chunked" the last coding.
    let (seen, _) = play_all_splits(
        &[
            (
                Side::C,
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ),
            (
                Side::S,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip , \r\nContent-Length: 4\r\n\r\nthe body until close",
            ),
        ],
        true,
    );
    assert_eq!(statuses(&seen), [200]);
    assert_eq!(
        seen[0].response_bytes,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip , \r\nContent-Length: 4\r\n\r\nthe body until close".len() as u64,
        "a final coding other than chunked: delimited by the close, not the length"
    );
}

#[test]
fn http2_trailers_keep_the_status_and_grpc_codes_are_bounded() {
    let mut cenc = loona_hpack::Encoder::new();
    let mut senc = loona_hpack::Encoder::new();
    let mut c = PREFACE.to_vec();
    c.extend(frame(
        1,
        END_HEADERS,
        1,
        &cenc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/t.S/M"),
            (b"content-type", b"application/grpc"),
        ]),
    ));
    c.extend(frame(0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    let mut s = settings();
    s.extend(frame(
        1,
        END_HEADERS,
        1,
        &senc.encode([(&b":status"[..], &b"200"[..])]),
    ));
    s.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &senc.encode([(&b":status"[..], &b"0"[..]), (b"grpc-status", b"99")]),
    ));
    // Trailers from the client for a finished stream open nothing.
    let mut late = frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &cenc.encode([(&b"x"[..], &b"y"[..])]),
    );
    late.extend(frame(1, END_HEADERS | END_STREAM, 1, &[]));
    let (seen, protocol) =
        play_all_splits(&[(Side::C, &c), (Side::S, &s), (Side::C, &late)], false);
    assert_eq!(protocol, Protocol::Http2);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].status, seen[0].grpc_status), (200, Some(2)));
}

#[test]
fn a_small_block_that_decodes_huge_ends_sniffing() {
    // One large table entry, then a block of references to it.
    let mut c = PREFACE.to_vec();
    let mut block = vec![0x44, 0x7f, 0xa1, 0x1e]; // :path (static 4), literal of 4,000 bytes
    block.extend(std::iter::repeat_n(b'a', 4000));
    c.extend(frame(1, END_HEADERS | END_STREAM, 1, &block));
    let mut refs = Vec::new();
    refs.extend(std::iter::repeat_n(0xbe, 16_000)); // index 62: the entry above
    c.extend(frame(1, END_HEADERS | END_STREAM, 3, &refs));
    let (_, protocol) = play(&[(Side::C, &c)], usize::MAX, false);
    assert_eq!(protocol, Protocol::Opaque);
}

#[test]
fn empty_reads_change_nothing() {
    let mut s = Sniffer::new();
    let now = Instant::now();
    s.server(&[], now, &mut |_| {});
    s.client(b"GET / HTTP/1.1\r\n\r\n", now);
    let mut seen = Vec::new();
    s.server(b"HTTP/1.1 204 No\r\n\r\n", now, &mut |e| seen.push(e));
    assert_eq!(statuses(&seen), [204]);
}

#[test]
fn multi_digit_lengths_after_whitespace_are_read() {
    // nginx's answer in bench/run: a four-digit length after the usual space.
    let request = b"GET / HTTP/1.1\r\nHost: 198.18.2.10:8080\r\n\r\n";
    let mut response = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\nContent-Length:  1024 \r\nConnection: keep-alive\r\n\r\n".to_vec();
    response.extend(std::iter::repeat_n(b'x', 1024));
    let (seen, protocol) = play_all_splits(
        &[
            (Side::C, request),
            (Side::S, &response),
            (Side::C, request),
            (Side::S, &response),
        ],
        false,
    );
    assert_eq!(protocol, Protocol::Http1);
    assert_eq!(statuses(&seen), [200, 200]);
    assert_eq!(seen[1].response_bytes, response.len() as u64);
}
