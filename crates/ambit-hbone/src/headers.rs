//! The request headers HBONE carries besides `:authority`.
//!
//! - `forwarded` (RFC 7239): `for="<ip>:<port>"` is the original client, `host=` the
//!   service hostname when the client addressed a service.
//! - `baggage` (W3C Baggage): `key=value` pairs, e.g. `k8s.namespace.name=demo`.
//! - `traceparent` (W3C Trace Context): `00-<trace id>-<parent id>-<flags>`.
//!
//! Parsing is lenient where the standards allow and strict on size: a malformed header is
//! treated as absent (it describes the request, it does not authorize it).

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};

pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// Most baggage members kept (the W3C limit is 64).
pub const MAX_BAGGAGE_MEMBERS: usize = 64;
/// Longest baggage header read (the W3C limit is 8192 bytes).
pub const MAX_BAGGAGE_BYTES: usize = 8192;

/// The headers of one CONNECT, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// `forwarded: for=`: the original client address (port optional).
    pub forwarded_for: Option<ForwardedFor>,
    /// `forwarded: host=`: the hostname the client addressed.
    pub forwarded_host: Option<String>,
    pub baggage: Vec<(String, String)>,
    pub traceparent: Option<TraceParent>,
}

/// A `for=` node: an address, with a port when one was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedFor {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl From<SocketAddr> for ForwardedFor {
    fn from(a: SocketAddr) -> Self {
        Self {
            ip: a.ip(),
            port: Some(a.port()),
        }
    }
}

/// A W3C `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Reads a `traceparent` value; `None` when it is malformed (W3C: then start a new
    /// trace).
    pub fn parse(v: &str) -> Option<Self> {
        parse_traceparent(v)
    }

    /// The header value, version 00.
    pub fn to_header(&self) -> String {
        let mut v = String::with_capacity(55);
        v.push_str("00-");
        hex(&self.trace_id, &mut v);
        v.push('-');
        hex(&self.parent_id, &mut v);
        write!(v, "-{:02x}", self.flags).expect("writing to a String cannot fail");
        v
    }
}

impl ConnectHeaders {
    /// Reads the headers of a request; malformed values count as absent.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        if let Some(v) = headers.get(FORWARDED).and_then(|v| v.to_str().ok()) {
            let (for_, host) = parse_forwarded(v);
            out.forwarded_for = for_;
            out.forwarded_host = host;
        }
        if let Some(v) = headers.get(BAGGAGE).and_then(|v| v.to_str().ok()) {
            out.baggage = parse_baggage(v);
        }
        if let Some(v) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
            out.traceparent = parse_traceparent(v);
        }
        out
    }

    /// Writes the headers onto a request.
    pub fn write(&self, headers: &mut HeaderMap) {
        if self.forwarded_for.is_some() || self.forwarded_host.is_some() {
            let mut v = String::new();
            if let Some(f) = self.forwarded_for {
                match (f.ip, f.port) {
                    (IpAddr::V4(ip), Some(p)) => write!(v, "for=\"{ip}:{p}\""),
                    (IpAddr::V6(ip), Some(p)) => write!(v, "for=\"[{ip}]:{p}\""),
                    (IpAddr::V4(ip), None) => write!(v, "for={ip}"),
                    (IpAddr::V6(ip), None) => write!(v, "for=\"[{ip}]\""),
                }
                .expect("writing to a String cannot fail");
            }
            if let Some(h) = self
                .forwarded_host
                .as_deref()
                .filter(|h| is_token_or_host(h))
            {
                if !v.is_empty() {
                    v.push(';');
                }
                v.push_str("host=");
                v.push_str(h);
            }
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(FORWARDED, v);
            }
        }
        if !self.baggage.is_empty() {
            let mut v = String::new();
            for (k, val) in self.baggage.iter().take(MAX_BAGGAGE_MEMBERS) {
                if !is_token(k) {
                    continue;
                }
                if !v.is_empty() {
                    v.push(',');
                }
                v.push_str(k);
                v.push('=');
                percent_encode(val, &mut v);
            }
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(BAGGAGE, v);
            }
        }
        if let Some(t) = &self.traceparent
            && let Ok(v) = HeaderValue::from_str(&t.to_header())
        {
            headers.insert(TRACEPARENT, v);
        }
    }

    /// The value of a baggage member.
    pub fn baggage(&self, key: &str) -> Option<&str> {
        self.baggage
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the first `forwarded` element's `for` and `host` parameters.
fn parse_forwarded(value: &str) -> (Option<ForwardedFor>, Option<String>) {
    // Only the first element: HBONE senders write exactly one, naming the original client.
    let first = value.split(',').next().unwrap_or("");
    let mut for_ = None;
    let mut host = None;
    for pair in first.split(';') {
        let Some((name, val)) = pair.split_once('=') else {
            continue;
        };
        let val = unquote(val.trim());
        match name.trim().to_ascii_lowercase().as_str() {
            "for" => for_ = parse_node(val),
            "host" if !val.is_empty() && is_token_or_host(val) => host = Some(val.to_owned()),
            _ => {}
        }
    }
    (for_, host)
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80`.
fn parse_node(v: &str) -> Option<ForwardedFor> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Some(a.into());
    }
    let bare = v
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(v);
    bare.parse::<IpAddr>()
        .ok()
        .map(|ip| ForwardedFor { ip, port: None })
}

fn parse_baggage(value: &str) -> Vec<(String, String)> {
    if value.len() > MAX_BAGGAGE_BYTES {
        return Vec::new();
    }
    let mut out = Vec::new();
    for member in value.split(',') {
        if out.len() >= MAX_BAGGAGE_MEMBERS {
            break;
        }
        // Properties after ';' are not used.
        let kv = member.split(';').next().unwrap_or("");
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let k = k.trim();
        if !is_token(k) {
            continue;
        }
        if let Some(v) = percent_decode(v.trim()) {
            out.push((k.to_owned(), v));
        }
    }
    out
}

fn parse_traceparent(v: &str) -> Option<TraceParent> {
    let b = v.trim().as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 characters; later versions may append fields.
    let version = unhex_byte(&b[0..2])?;
    if version == 0xff || (version == 0 && b.len() != 55) {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, out) in trace_id.iter_mut().enumerate() {
        *out = unhex_byte(&b[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, out) in parent_id.iter_mut().enumerate() {
        *out = unhex_byte(&b[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = unhex_byte(&b[53..55])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        flags,
    })
}

fn unhex_byte(two: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(two[0])? << 4 | d(two[1])?)
}

fn hex(bytes: &[u8], out: &mut String) {
    for b in bytes {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
    }
}

/// An RFC 7230 token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_token_or_host(s: &str) -> bool {
    is_token(s)
        || s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = *b.get(i + 1)?;
            let lo = *b.get(i + 2)?;
            let hexval = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            out.push(hexval(hi)? << 4 | hexval(lo)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        // W3C baggage-octet: printable ASCII except space, '"', ',', ';', '\\' and '%'.
        if (0x21..=0x7e).contains(&b) && !b"\",;\\%".contains(&b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").expect("writing to a String cannot fail");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn forwarded_forms() {
        let cases = [
            (
                "for=\"198.18.0.1:40000\"",
                Some(("198.18.0.1", Some(40000))),
                None,
            ),
            ("for=198.18.0.1", Some(("198.18.0.1", None)), None),
            (
                "for=\"[fd00::1]:8080\";host=echo.demo.svc.cluster.local",
                Some(("fd00::1", Some(8080))),
                Some("echo.demo.svc.cluster.local"),
            ),
            ("For=\"[fd00::1]\"", Some(("fd00::1", None)), None),
            ("host=a.b;for=_hidden", None, Some("a.b")),
            ("for=garbage, for=198.18.0.2", None, None),
            ("nonsense", None, None),
        ];
        for (v, want_for, want_host) in cases {
            let h = ConnectHeaders::parse(&map(&[(FORWARDED, v)]));
            let got = h.forwarded_for.map(|f| (f.ip.to_string(), f.port));
            assert_eq!(got, want_for.map(|(ip, p)| (ip.to_owned(), p)), "{v}");
            assert_eq!(h.forwarded_host.as_deref(), want_host, "{v}");
        }
    }

    #[test]
    fn baggage_round_trip() {
        let h = ConnectHeaders {
            baggage: vec![
                ("k8s.namespace.name".into(), "demo".into()),
                ("note".into(), "a b,c;d%".into()),
            ],
            ..Default::default()
        };
        let mut m = HeaderMap::new();
        h.write(&mut m);
        assert_eq!(
            m.get(BAGGAGE).unwrap(),
            "k8s.namespace.name=demo,note=a%20b%2Cc%3Bd%25"
        );
        let back = ConnectHeaders::parse(&m);
        assert_eq!(back.baggage, h.baggage);
        assert_eq!(back.baggage("k8s.namespace.name"), Some("demo"));
    }

    #[test]
    fn baggage_is_bounded_and_lenient() {
        let long = (0..100)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            ConnectHeaders::parse(&map(&[(BAGGAGE, &long)]))
                .baggage
                .len(),
            MAX_BAGGAGE_MEMBERS
        );
        let messy = "a=1;prop=x, bad key=2,=3,c=%zz,d=4";
        let got = ConnectHeaders::parse(&map(&[(BAGGAGE, messy)])).baggage;
        assert_eq!(
            got,
            [
                ("a".to_owned(), "1".to_owned()),
                ("d".to_owned(), "4".to_owned())
            ]
        );
        let huge = "a=".to_owned() + &"x".repeat(MAX_BAGGAGE_BYTES);
        assert!(
            ConnectHeaders::parse(&map(&[(BAGGAGE, &huge)]))
                .baggage
                .is_empty()
        );
    }

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = ConnectHeaders::parse(&map(&[(TRACEPARENT, v)]))
            .traceparent
            .unwrap();
        assert_eq!(t.flags, 1);
        assert_eq!(t.parent_id[7], 0xb7);
        let mut m = HeaderMap::new();
        ConnectHeaders {
            traceparent: Some(t),
            ..Default::default()
        }
        .write(&mut m);
        assert_eq!(m.get(TRACEPARENT).unwrap(), v);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-short",
            "",
        ] {
            assert!(
                ConnectHeaders::parse(&map(&[(TRACEPARENT, bad)]))
                    .traceparent
                    .is_none(),
                "{bad}"
            );
        }
        // A later version may append fields.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(
            ConnectHeaders::parse(&map(&[(TRACEPARENT, v1)]))
                .traceparent
                .is_some()
        );
    }

    #[test]
    fn forwarded_round_trip() {
        for addr in ["198.18.0.1:1234", "[fd00::7]:99"] {
            let h = ConnectHeaders {
                forwarded_for: Some(addr.parse::<SocketAddr>().unwrap().into()),
                forwarded_host: Some("echo.demo.svc.cluster.local".into()),
                ..Default::default()
            };
            let mut m = HeaderMap::new();
            h.write(&mut m);
            assert_eq!(ConnectHeaders::parse(&m), h, "{:?}", m.get(FORWARDED));
        }
    }
}
