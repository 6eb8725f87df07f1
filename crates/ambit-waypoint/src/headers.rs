//! What the waypoint changes in the headers it forwards, as an HTTP proxy must
//! (RFC 9110 section 7.6): hop-by-hop headers removed, the client appended to
//! `x-forwarded-for`, a request id and a trace span of its own.

use std::net::IpAddr;

use ambit_hbone::headers::TraceParent;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1, plus the
/// historic ones every proxy drops).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_REQUEST_ID: &str = "x-request-id";

/// Removes hop-by-hop headers and those the `Connection` header names. `upgrade`
/// keeps `Connection: upgrade` and `Upgrade` (a WebSocket handshake passes through);
/// `te: trailers` stays (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in named {
        if name != header::CONTENT_LENGTH {
            headers.remove(&name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade && let Some(v) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, v);
    }
}

/// Whether a request asks to switch to WebSocket (HTTP/1.1 `Upgrade: websocket`). Other
/// upgrades (`h2c`, custom tokens) are not passed on: after a switch the connection is a
/// byte stream nobody checks, so only the one protocol a proxy is expected to carry
/// switches.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Why a request path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with /")]
    NotAbsolute,
    #[error("the path has a malformed percent-encoding")]
    BadEscape,
}

/// The path as policies see it and as the endpoint receives it (what Istio's default
/// normalization does, and merging slashes): percent-encoded unreserved characters
/// decoded (`%61` is `a`; `%2F` stays encoded), hex digits of other escapes upper-cased,
/// `\` read as `/`, runs of `/` merged, `.` and `..` segments resolved (never above the
/// root). The query string is kept as sent. `*` (OPTIONS) stays.
pub fn normalize_path(path_and_query: &str) -> Result<String, PathError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if path == "*" {
        return Ok(path_and_query.to_owned());
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    decoded.push(c as char);
                } else {
                    decoded.push('%');
                    decoded.push_str(&format!("{c:02X}"));
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                // Whole UTF-8 characters: copy up to the next escape or backslash.
                let next = bytes[i..]
                    .iter()
                    .position(|b| *b == b'%' || *b == b'\\')
                    .map_or(bytes.len(), |n| i + n);
                decoded.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    if !decoded.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing = n == last,
            "." => trailing = n == last,
            ".." => {
                out.pop();
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normalized = format!("/{}", out.join("/"));
    if trailing && normalized != "/" {
        normalized.push('/');
    }
    if let Some(q) = query {
        normalized.push('?');
        normalized.push_str(q);
    }
    Ok(normalized)
}

/// What the waypoint adds to a request it forwards; returns the request id and the
/// trace id (hex) for the access log.
pub fn annotate_request(headers: &mut HeaderMap, client: Option<IpAddr>) -> (String, String) {
    let (id, span) = annotate_request_traced(headers, client, 0);
    (id, span.trace_hex())
}

/// This hop's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    /// The waypoint's span (the backend's parent).
    pub span_id: [u8; 8],
    /// The caller's span, when it sent one.
    pub parent_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl SpanIds {
    pub fn trace_hex(&self) -> String {
        let mut trace = String::with_capacity(32);
        for b in self.trace_id {
            trace.push_str(&format!("{b:02x}"));
        }
        trace
    }
}

/// [`annotate_request`], with this hop's span: a trace started here is sampled with
/// probability `sample_per_million` / 1,000,000; a continued one keeps its flag.
pub fn annotate_request_traced(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    sample_per_million: u32,
) -> (String, SpanIds) {
    if let Some(ip) = client {
        let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
            _ => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    let request_id = match headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => {
            let id = new_request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(X_REQUEST_ID, v);
            }
            id
        }
    };
    // W3C Trace Context: keep the trace, make this hop a span of its own (the
    // caller's span is its parent); a missing or malformed header starts a trace.
    let parent = headers
        .get(ambit_hbone::headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let flags = match &parent {
        Some(p) => p.flags,
        None => u8::from(sample_per_million > 0 && fastrand::u32(..1_000_000) < sample_per_million),
    };
    let span = TraceParent {
        trace_id: parent.as_ref().map_or_else(random_id, |p| p.trace_id),
        parent_id: random_id(),
        flags,
    };
    if let Ok(v) = HeaderValue::from_str(&span.to_header()) {
        headers.insert(ambit_hbone::headers::TRACEPARENT, v);
    }
    (
        request_id,
        SpanIds {
            trace_id: span.trace_id,
            span_id: span.parent_id,
            parent_id: parent.map(|p| p.parent_id),
            sampled: flags & 1 == 1,
        },
    )
}

/// Random bytes, never all zero (W3C forbids a zero trace or span id).
fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        for b in &mut id {
            *b = fastrand::u8(..);
        }
        if id != [0; N] {
            return id;
        }
    }
}

/// A UUID-shaped random request id (version 4 layout).
fn new_request_id() -> String {
    let b: [u8; 16] = random_id();
    let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn paths_are_normalized_before_policies_and_the_endpoint_see_them() {
        for (sent, seen) in [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("//admin//users/", "/admin/users/"),
            ("/a\\..\\admin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("/a/./", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a?x=/../y", "/a?x=/../y"),
            ("/é/%C3%A9", "/é/%C3%A9"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(sent).as_deref(), Ok(seen), "{sent}");
        }
        assert_eq!(normalize_path("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%4"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("admin"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn only_websocket_upgrades() {
        let h = map(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert!(!is_upgrade(&h));
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(is_upgrade(&h));
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn te_trailers_and_an_upgrade_survive() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        let mut h = map(&[("connection", "close"), ("upgrade", "websocket")]);
        assert!(
            !is_upgrade(&h),
            "an Upgrade without Connection: upgrade is not one"
        );
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn the_client_is_appended_and_ids_are_added_or_kept() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-request-id", "abc"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ]);
        let (id, trace) = annotate_request(&mut h, Some("198.18.1.10".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.18.1.10");
        assert_eq!(id, "abc");
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        let tp = h["traceparent"].to_str().unwrap();
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(tp.ends_with("-01"), "{tp}");
        assert!(!tp.contains("b7ad6b7169203331"), "a new span id: {tp}");

        let mut h = map(&[("traceparent", "garbage")]);
        let (id, trace) = annotate_request(&mut h, None);
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(h["x-request-id"], id.as_str());
        assert_eq!(trace.len(), 32);
        assert!(TraceParent::parse(h["traceparent"].to_str().unwrap()).is_some());
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-for"));
    }

    #[test]
    fn sampling_is_the_callers_decision_or_the_configured_rate() {
        let tp = |flags: &str| {
            map(&[(
                "traceparent",
                if flags == "01" {
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                } else {
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                },
            )])
        };
        // The caller's flag wins over any rate.
        let (_, s) = annotate_request_traced(&mut tp("01"), None, 0);
        assert!(s.sampled);
        assert_eq!(
            s.parent_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        let (_, s) = annotate_request_traced(&mut tp("00"), None, 1_000_000);
        assert!(!s.sampled);
        // A trace started here: always at 100%, never at 0%; the header says so.
        let mut h = HeaderMap::new();
        let (_, s) = annotate_request_traced(&mut h, None, 1_000_000);
        assert!(s.sampled && s.parent_id.is_none());
        assert!(h["traceparent"].to_str().unwrap().ends_with("-01"));
        let mut h = HeaderMap::new();
        let (_, s) = annotate_request_traced(&mut h, None, 0);
        assert!(!s.sampled);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        // The span id sent on is this hop's, not the caller's.
        let mut h = tp("01");
        let (_, s) = annotate_request_traced(&mut h, None, 0);
        let sent = TraceParent::parse(h["traceparent"].to_str().unwrap()).unwrap();
        assert_eq!(sent.parent_id, s.span_id);
        assert_ne!(Some(s.span_id), s.parent_id);
    }
}
