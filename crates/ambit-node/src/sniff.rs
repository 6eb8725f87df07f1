//! Request metrics without a waypoint: recognises HTTP/1.1 and HTTP/2 (prior knowledge) in
//! the plaintext side of a connection the node proxy already carries.
//!
//! The [`Sniffer`] only watches. It is shown each chunk after the copy loop has read it
//! and before (or while) it is written on, keeps no copy of the stream beyond the header
//! block of one HTTP/2 frame sequence (bounded by [`MAX_HEADER_BLOCK`]), and never
//! changes, delays or holds back a byte. HTTP/1.1 heads are parsed one byte at a time by
//! a state machine, so a head split over any number of reads needs no buffer; bodies are
//! skipped by length, in one step per chunk.
//!
//! Anything it does not understand makes it give up for the rest of the connection: the
//! first bytes are not an HTTP request (TLS from the application, a database protocol,
//! binary garbage), a head is malformed or longer than the limits below, a response comes
//! with no request, an HTTP/2 frame sequence breaks the rules it relies on, a header block
//! does not decode, or a connection is upgraded (`101`, `CONNECT`). Exchanges completed
//! before that stay counted; the connection is still counted at L4 whatever happens.
//!
//! Memory per connection is bounded: the HTTP/1.1 state is a few dozen bytes plus at most
//! [`MAX_PIPELINED`] waiting requests; HTTP/2 holds at most [`MAX_STREAMS`] open streams,
//! one header block of at most [`MAX_HEADER_BLOCK`] bytes per direction, and two HPACK
//! dynamic tables of at most [`MAX_HPACK_TABLE`] bytes each.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A request line, status line or header line longer than this ends sniffing.
pub const MAX_LINE: u32 = 16 * 1024;
/// A head (start line and headers, or trailers) longer than this ends sniffing.
pub const MAX_HEAD: u32 = 64 * 1024;
/// Requests sent ahead of their responses (HTTP/1.1 pipelining) beyond this end sniffing.
pub const MAX_PIPELINED: usize = 64;
/// Concurrent HTTP/2 streams beyond this end sniffing.
pub const MAX_STREAMS: usize = 1024;
/// An HTTP/2 header block (HEADERS and its CONTINUATIONs) longer than this ends sniffing.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The largest HPACK dynamic table an encoder may ask for before sniffing ends.
pub const MAX_HPACK_TABLE: usize = 64 * 1024;
/// A header block that decodes to more than this (names, values and 32 bytes per field,
/// as HTTP/2 counts a header list) ends sniffing: a small block of references to one large
/// table entry must not cost more than a large block would.
pub const MAX_HEADER_LIST: usize = 256 * 1024;

/// Bytes of a request's path kept for its span (longer paths are cut).
pub const MAX_PATH: usize = 128;
/// Bytes of a request's method kept (longer methods are cut).
const MAX_METHOD: usize = 16;
/// The length of a version-00 `traceparent` value.
const TRACEPARENT_LEN: usize = 55;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the sniffer keeps of a request for its span: method, path (cut at [`MAX_PATH`]
/// bytes) and W3C trace context. Fixed size: nothing is allocated per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts {
    method: [u8; MAX_METHOD],
    method_len: u8,
    path: [u8; MAX_PATH],
    path_len: u8,
    /// The request's `traceparent`, if it carried a well-formed one.
    pub trace: Option<ambit_hbone::headers::TraceParent>,
}

impl Default for RequestFacts {
    fn default() -> Self {
        Self {
            method: [0; MAX_METHOD],
            method_len: 0,
            path: [0; MAX_PATH],
            path_len: 0,
            trace: None,
        }
    }
}

impl RequestFacts {
    pub fn method(&self) -> &str {
        text(&self.method[..usize::from(self.method_len)])
    }

    /// The path as sent (its first [`MAX_PATH`] bytes).
    pub fn path(&self) -> &str {
        text(&self.path[..usize::from(self.path_len)])
    }

    fn push_method(&mut self, b: u8) {
        if usize::from(self.method_len) < MAX_METHOD {
            self.method[usize::from(self.method_len)] = b;
            self.method_len += 1;
        }
    }

    fn push_path(&mut self, b: u8) {
        if usize::from(self.path_len) < MAX_PATH {
            self.path[usize::from(self.path_len)] = b;
            self.path_len += 1;
        }
    }

    fn set_method(&mut self, v: &[u8]) {
        let n = v.len().min(MAX_METHOD);
        self.method[..n].copy_from_slice(&v[..n]);
        self.method_len = n as u8;
    }

    fn set_path(&mut self, v: &[u8]) {
        let n = v.len().min(MAX_PATH);
        self.path[..n].copy_from_slice(&v[..n]);
        self.path_len = n as u8;
    }
}

/// The longest UTF-8 prefix of `b` (a path cut inside a character loses that character).
fn text(b: &[u8]) -> &str {
    match std::str::from_utf8(b) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or_default(),
    }
}

fn traceparent(v: &[u8]) -> Option<ambit_hbone::headers::TraceParent> {
    // Version 00 is 55 bytes; a longer value is not read at all.
    if v.len() > 2 * TRACEPARENT_LEN {
        return None;
    }
    ambit_hbone::headers::TraceParent::parse(std::str::from_utf8(v).ok()?)
}

/// One request and its response, complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// A gRPC call (HTTP/2 with an `application/grpc` content type).
    pub grpc: bool,
    pub status: u16,
    /// The `grpc-status` the response ended with, for gRPC calls that sent one.
    pub grpc_status: Option<u32>,
    /// From the request's first byte to the response's last.
    pub duration: Duration,
    /// Bytes of the request as carried: its head (or HEADERS frames) and body.
    pub request_bytes: u64,
    /// Bytes of the response as carried.
    pub response_bytes: u64,
    pub request: RequestFacts,
}

/// What the connection turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Too few bytes seen to tell.
    Unknown,
    Http1,
    Http2,
    /// Not HTTP, or HTTP that went somewhere the sniffer does not follow (see the module
    /// documentation); counted at L4 only from then on.
    Opaque,
}

/// Watches one connection's two directions. See the module documentation.
pub struct Sniffer {
    mode: Mode,
    /// What the connection was when sniffing ended (meaningful once `mode` is `Off`).
    ended: Protocol,
}

enum Mode {
    /// The first bytes from the client matched this much of the HTTP/2 preface (and
    /// therefore also of an HTTP/1.1 request line starting `PRI`). The server's first
    /// bytes, if it spoke first, went to a tentative HTTP/2 reader.
    Detect {
        matched: usize,
        server: Option<Box<H2>>,
    },
    Http1(Box<Http1>),
    Http2(Box<H2>),
    Off,
}

impl Default for Sniffer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Sniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sniffer")
            .field("protocol", &self.protocol())
            .finish()
    }
}

impl Sniffer {
    pub fn new() -> Self {
        Self {
            mode: Mode::Detect {
                matched: 0,
                server: None,
            },
            ended: Protocol::Opaque,
        }
    }

    pub fn protocol(&self) -> Protocol {
        match &self.mode {
            Mode::Detect { .. } => Protocol::Unknown,
            Mode::Http1(_) => Protocol::Http1,
            Mode::Http2(_) => Protocol::Http2,
            Mode::Off => self.ended,
        }
    }

    /// Whether sniffing has ended for this connection (nothing more will be reported).
    pub fn is_off(&self) -> bool {
        matches!(self.mode, Mode::Off)
    }

    /// Bytes the client sent, in order. (Exchanges complete with their responses.)
    pub fn client(&mut self, mut bytes: &[u8], now: Instant) {
        if bytes.is_empty() {
            return;
        }
        if let Mode::Detect { matched, server } = &mut self.mode {
            let mut m = *matched;
            let mut taken = 0;
            while m < PREFACE.len() && taken < bytes.len() && bytes[taken] == PREFACE[m] {
                m += 1;
                taken += 1;
            }
            if m == PREFACE.len() {
                let h2 = server.take().unwrap_or_else(|| Box::new(H2::new()));
                self.mode = Mode::Http2(h2);
                bytes = &bytes[taken..];
            } else if taken == bytes.len() {
                *matched = m;
                return;
            } else {
                // Not the preface. An HTTP/1.1 server never speaks first; whatever it said
                // is not something the sniffer follows.
                if server.is_some() {
                    self.mode = Mode::Off;
                    return;
                }
                let mut h1 = Box::new(Http1::new());
                // The bytes matched so far are the preface's own: replayed from it.
                let replay = m - taken;
                if h1.client(&PREFACE[..replay], now).is_err() {
                    self.mode = Mode::Off;
                    return;
                }
                self.mode = Mode::Http1(h1);
            }
        }
        let result = match &mut self.mode {
            Mode::Http1(h1) => h1.client(bytes, now),
            Mode::Http2(h2) => h2.client(bytes, now),
            Mode::Detect { .. } | Mode::Off => return,
        };
        if result.is_err() {
            self.mode = Mode::Off;
        }
    }

    /// Bytes the server sent, in order. Completed exchanges go to `out`.
    pub fn server(&mut self, bytes: &[u8], now: Instant, out: &mut impl FnMut(Exchange)) {
        if bytes.is_empty() {
            return;
        }
        let result = match &mut self.mode {
            Mode::Detect { server, .. } => server
                .get_or_insert_with(|| Box::new(H2::new()))
                .server(bytes, now, out),
            Mode::Http1(h1) => h1.server(bytes, now, out),
            Mode::Http2(h2) => h2.server(bytes, now, out),
            Mode::Off => Ok(()),
        };
        if result.is_err() {
            self.mode = Mode::Off;
        }
    }

    /// The server finished sending (EOF): completes a response delimited by the close.
    pub fn server_closed(&mut self, now: Instant, out: &mut impl FnMut(Exchange)) {
        if let Mode::Http1(h1) = &mut self.mode {
            h1.server_closed(now, out);
        }
        self.ended = self.protocol();
        self.mode = Mode::Off;
    }
}

/// The sniffer cannot follow this connection any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUp;

type Step = Result<(), GiveUp>;

// ---------------------------------------------------------------------------------------
// HTTP/1.1

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Request,
    Response,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Between messages.
    Idle,
    Method,
    Target,
    /// Position in `HTTP/1.` of the request line's version.
    ReqVersion(u8),
    RespVersion(u8),
    /// Status digits read so far.
    Status(u8),
    Reason,
    /// A CR was read at the end of a line; LF must follow.
    Lf(LineKind),
    LineStart,
    Name,
    Value,
    Fixed(u64),
    ChunkSize,
    ChunkExt,
    ChunkData(u64),
    /// After a chunk's data: CRLF.
    ChunkDataCr,
    ChunkDataLf,
    UntilClose,
}

/// Which line a CR ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Start,
    Header,
    /// The empty line ending a head (or the trailers).
    End,
    ChunkSize,
}

/// Headers whose values the sniffer reads.
const CONTENT_LENGTH: u8 = 1;
const TRANSFER_ENCODING: u8 = 2;
const TRACEPARENT: u8 = 3;
const NAMES: [(&[u8], u8); 3] = [
    (b"content-length", CONTENT_LENGTH),
    (b"transfer-encoding", TRANSFER_ENCODING),
    (b"traceparent", TRACEPARENT),
];

/// The head facts of one message.
#[derive(Debug, Clone, Copy, Default)]
struct Head {
    /// Request: `HEAD` or `CONNECT` (the two methods that change response framing).
    method_head: bool,
    method_connect: bool,
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    /// A transfer-encoding other than a final `chunked`.
    other_encoding: bool,
}

/// One direction's HTTP/1.1 parser.
struct H1 {
    role: Role,
    st: St,
    line: u32,
    head_bytes: u32,
    in_trailers: bool,
    /// The request's method, path and trace context (requests only).
    facts: RequestFacts,
    /// The `traceparent` value being read.
    trace: [u8; TRACEPARENT_LEN],
    trace_len: u8,
    trace_bad: bool,
    head: Head,
    /// Header name matching: the candidates still possible and the position in them.
    name_pos: u8,
    name_candidates: u8,
    /// The header whose value is being read (one of the constants above, or 0).
    header: u8,
    /// Content-Length value being read.
    number: Option<u64>,
    number_bad: bool,
    /// Whitespace came after the number's digits.
    number_gap: bool,
    /// Transfer-Encoding: the current coding, as far as it can still be `chunked`.
    coding_pos: u8,
    coding_ok: bool,
    coding_any: bool,
    /// The verdict (`chunked` or not) of the last complete element of the line.
    coding_last: Option<bool>,
    chunk_digits: u8,
    /// Bytes of the current message.
    bytes: u64,
}

/// What happened while feeding an [`H1`].
enum H1Event {
    Start,
    /// The head ended; the callback returns the body's framing.
    HeadDone,
    Done,
}

impl H1 {
    fn new(role: Role) -> Self {
        Self {
            role,
            st: St::Idle,
            line: 0,
            head_bytes: 0,
            in_trailers: false,
            facts: RequestFacts::default(),
            trace: [0; TRACEPARENT_LEN],
            trace_len: 0,
            trace_bad: false,
            head: Head::default(),
            name_pos: 0,
            name_candidates: 0,
            header: 0,
            number: None,
            number_bad: false,
            number_gap: false,
            coding_pos: 0,
            coding_ok: false,
            coding_any: false,
            coding_last: None,
            chunk_digits: 0,
            bytes: 0,
        }
    }

    /// Feeds bytes; `on` is told of each event and, for `HeadDone`, answers the framing.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        on: &mut impl FnMut(H1Event, &H1) -> Result<Body, GiveUp>,
    ) -> Step {
        while !bytes.is_empty() {
            // Bodies are skipped in bulk.
            match self.st {
                St::Fixed(left) | St::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.bytes += n;
                    let left = left - n;
                    self.st = match (self.st, left) {
                        (St::Fixed(_), 0) => {
                            self.done(on)?;
                            St::Idle
                        }
                        (St::Fixed(_), l) => St::Fixed(l),
                        (_, 0) => St::ChunkDataCr,
                        (_, l) => St::ChunkData(l),
                    };
                    continue;
                }
                St::UntilClose => {
                    self.bytes += bytes.len() as u64;
                    return Ok(());
                }
                // The runs of a head that need no decision byte by byte (a header value
                // the sniffer does not read, a reason phrase, a target, a name no
                // candidate matches) are skipped in one step up to the byte that ends
                // them, which then goes through `byte` like any other.
                St::Value | St::Reason if self.header == 0 || matches!(self.st, St::Reason) => {
                    let n = run(bytes, |b| (b >= b' ' || b == b'\t') && b != 0x7f);
                    if n > 0 {
                        self.skip_line_bytes(n)?;
                        bytes = &bytes[n..];
                        continue;
                    }
                }
                St::Target => {
                    let n = run(bytes, |b| b > b' ' && b != 0x7f);
                    if n > 0 {
                        let room = MAX_PATH - usize::from(self.facts.path_len);
                        for &b in &bytes[..n.min(room)] {
                            self.facts.push_path(b);
                        }
                        self.skip_line_bytes(n)?;
                        bytes = &bytes[n..];
                        continue;
                    }
                }
                St::Name if self.name_candidates == 0 => {
                    let n = run(bytes, is_tchar);
                    if n > 0 {
                        self.skip_line_bytes(n)?;
                        bytes = &bytes[n..];
                        continue;
                    }
                }
                _ => {}
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            self.byte(b, on)?;
        }
        Ok(())
    }

    fn done(&mut self, on: &mut impl FnMut(H1Event, &H1) -> Result<Body, GiveUp>) -> Step {
        on(H1Event::Done, self)?;
        self.st = St::Idle;
        Ok(())
    }

    /// What `byte` does for `n` ordinary bytes of a line: counted, and bounded.
    fn skip_line_bytes(&mut self, n: usize) -> Step {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        self.bytes += n as u64;
        self.line = self.line.saturating_add(n32);
        self.head_bytes = self.head_bytes.saturating_add(n32);
        if self.line > MAX_LINE || self.head_bytes > MAX_HEAD {
            return Err(GiveUp);
        }
        Ok(())
    }

    fn count_line(&mut self) -> Step {
        self.line += 1;
        self.head_bytes += 1;
        if self.line > MAX_LINE || self.head_bytes > MAX_HEAD {
            return Err(GiveUp);
        }
        Ok(())
    }

    fn byte(&mut self, b: u8, on: &mut impl FnMut(H1Event, &H1) -> Result<Body, GiveUp>) -> Step {
        self.bytes += 1;
        match self.st {
            St::Idle => {
                // A message starts here (a client may send a stray CRLF between requests).
                if self.role == Role::Request && (b == b'\r' || b == b'\n') {
                    self.bytes = 0;
                    return Ok(());
                }
                self.bytes = 1;
                self.line = 0;
                self.head_bytes = 0;
                self.in_trailers = false;
                self.head = Head::default();
                on(H1Event::Start, self)?;
                self.count_line()?;
                match self.role {
                    Role::Request => {
                        if !is_tchar(b) {
                            return Err(GiveUp);
                        }
                        self.facts = RequestFacts::default();
                        self.facts.push_method(b);
                        self.st = St::Method;
                    }
                    Role::Response => {
                        if b != b'H' {
                            return Err(GiveUp);
                        }
                        self.st = St::RespVersion(1);
                    }
                }
            }
            St::Method => {
                self.count_line()?;
                if b == b' ' {
                    let m = self.facts.method();
                    self.head.method_head = m == "HEAD";
                    self.head.method_connect = m == "CONNECT";
                    self.st = St::Target;
                } else if is_tchar(b) {
                    // Cut at MAX_METHOD bytes (then neither HEAD nor CONNECT).
                    self.facts.push_method(b);
                } else {
                    return Err(GiveUp);
                }
            }
            St::Target => {
                self.count_line()?;
                if b == b' ' {
                    self.st = St::ReqVersion(0);
                } else if b <= b' ' || b == 0x7f {
                    return Err(GiveUp);
                } else {
                    self.facts.push_path(b);
                }
            }
            St::ReqVersion(pos) => {
                self.count_line()?;
                self.version_byte(b, pos, St::ReqVersion)?;
            }
            St::RespVersion(pos) => {
                self.count_line()?;
                self.version_byte(b, pos, St::RespVersion)?;
            }
            St::Status(n) => {
                self.count_line()?;
                if n < 3 {
                    if !b.is_ascii_digit() {
                        return Err(GiveUp);
                    }
                    self.head.status = self.head.status * 10 + u16::from(b - b'0');
                    self.st = St::Status(n + 1);
                } else if !(100..600).contains(&self.head.status) {
                    return Err(GiveUp);
                } else if b == b' ' {
                    self.st = St::Reason;
                } else if b == b'\r' {
                    self.st = St::Lf(LineKind::Start);
                } else if b == b'\n' {
                    self.line_end(LineKind::Start, on)?;
                } else {
                    return Err(GiveUp);
                }
            }
            St::Reason => {
                self.count_line()?;
                if b == b'\r' {
                    self.st = St::Lf(LineKind::Start);
                } else if b == b'\n' {
                    self.line_end(LineKind::Start, on)?;
                } else if b < b' ' && b != b'\t' {
                    return Err(GiveUp);
                }
            }
            St::Lf(kind) => {
                self.head_bytes += 1;
                if b != b'\n' {
                    return Err(GiveUp);
                }
                self.line_end(kind, on)?;
            }
            St::LineStart => {
                self.count_line()?;
                match b {
                    b'\r' => self.st = St::Lf(LineKind::End),
                    b'\n' => self.line_end(LineKind::End, on)?,
                    // Obsolete line folding: not followed.
                    b' ' | b'\t' => return Err(GiveUp),
                    _ if is_tchar(b) => {
                        self.name_pos = 0;
                        self.name_candidates = match (self.in_trailers, self.role) {
                            (true, _) => 0,
                            (false, Role::Request) => 0b111,
                            (false, Role::Response) => 0b011,
                        };
                        self.header = 0;
                        self.name_byte(b);
                        self.st = St::Name;
                    }
                    _ => return Err(GiveUp),
                }
            }
            St::Name => {
                self.count_line()?;
                if b == b':' {
                    self.header = 0;
                    for (i, (name, id)) in NAMES.iter().enumerate() {
                        if self.name_candidates & (1 << i) != 0
                            && usize::from(self.name_pos) == name.len()
                        {
                            self.header = *id;
                        }
                    }
                    self.number = None;
                    self.number_bad = false;
                    self.number_gap = false;
                    self.coding_last = None;
                    self.coding_pos = 0;
                    self.coding_ok = true;
                    self.coding_any = false;
                    self.trace_len = 0;
                    self.trace_bad = false;
                    self.st = St::Value;
                } else if is_tchar(b) {
                    self.name_byte(b);
                } else {
                    return Err(GiveUp);
                }
            }
            St::Value => {
                self.count_line()?;
                match b {
                    b'\r' => self.st = St::Lf(LineKind::Header),
                    b'\n' => self.line_end(LineKind::Header, on)?,
                    0..=8 | 0x0a..=0x1f | 0x7f => return Err(GiveUp),
                    _ => self.value_byte(b),
                }
            }
            St::ChunkSize => {
                self.count_line()?;
                match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = u64::from(hex(b));
                        self.chunk_digits += 1;
                        // 15 hex digits is far beyond any real chunk; more is refused.
                        if self.chunk_digits > 15 {
                            return Err(GiveUp);
                        }
                        let n = self.number.unwrap_or(0);
                        self.number = Some(n * 16 + digit);
                    }
                    b';' | b' ' | b'\t' if self.chunk_digits > 0 => self.st = St::ChunkExt,
                    b'\r' if self.chunk_digits > 0 => self.st = St::Lf(LineKind::ChunkSize),
                    b'\n' if self.chunk_digits > 0 => self.line_end(LineKind::ChunkSize, on)?,
                    _ => return Err(GiveUp),
                }
            }
            St::ChunkExt => {
                self.count_line()?;
                match b {
                    b'\r' => self.st = St::Lf(LineKind::ChunkSize),
                    b'\n' => self.line_end(LineKind::ChunkSize, on)?,
                    0..=8 | 0x0a..=0x1f | 0x7f => return Err(GiveUp),
                    _ => {}
                }
            }
            St::ChunkDataCr => match b {
                b'\r' => self.st = St::ChunkDataLf,
                b'\n' => self.chunk_header(),
                _ => return Err(GiveUp),
            },
            St::ChunkDataLf => {
                if b != b'\n' {
                    return Err(GiveUp);
                }
                self.chunk_header();
            }
            St::Fixed(_) | St::ChunkData(_) | St::UntilClose => {
                unreachable!("bodies are skipped in bulk by feed")
            }
        }
        Ok(())
    }

    fn chunk_header(&mut self) {
        self.st = St::ChunkSize;
        self.line = 0;
        // Each chunk-size line is bounded as a line; a body of many chunks is not a head.
        self.head_bytes = 0;
        self.number = None;
        self.chunk_digits = 0;
    }

    fn version_byte(&mut self, b: u8, pos: u8, next: fn(u8) -> St) -> Step {
        const V: &[u8] = b"HTTP/1.";
        let pos = usize::from(pos);
        if pos < V.len() {
            if b != V[pos] {
                return Err(GiveUp);
            }
            self.st = next(pos as u8 + 1);
            return Ok(());
        }
        if pos == V.len() {
            if b != b'0' && b != b'1' {
                return Err(GiveUp);
            }
            self.st = next(pos as u8 + 1);
            return Ok(());
        }
        // After the version: the request line ends; the status line goes on to a code.
        match (self.role, b) {
            (Role::Request, b'\r') => self.st = St::Lf(LineKind::Start),
            (Role::Request, b'\n') => self.st = St::LineStart,
            (Role::Response, b' ') => self.st = St::Status(0),
            _ => return Err(GiveUp),
        }
        if self.st == St::LineStart {
            self.line = 0;
        }
        Ok(())
    }

    fn name_byte(&mut self, b: u8) {
        let lower = b.to_ascii_lowercase();
        let pos = usize::from(self.name_pos);
        for (i, (name, _)) in NAMES.iter().enumerate() {
            if self.name_candidates & (1 << i) != 0 && name.get(pos) != Some(&lower) {
                self.name_candidates &= !(1 << i);
            }
        }
        self.name_pos = self.name_pos.saturating_add(1);
    }

    fn value_byte(&mut self, b: u8) {
        match self.header {
            CONTENT_LENGTH => match b {
                // A digit after whitespace that followed digits ("1 2") is not a number.
                b'0'..=b'9' if self.number.is_some() && self.number_gap => self.number_bad = true,
                b'0'..=b'9' => {
                    let n = self.number.unwrap_or(0);
                    match n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(b - b'0')))
                    {
                        Some(v) if !self.number_bad => self.number = Some(v),
                        _ => self.number_bad = true,
                    }
                }
                // Surrounding whitespace is allowed; a list ("5, 5") is not followed.
                b' ' | b'\t' => self.number_gap = self.number.is_some(),
                _ => self.number_bad = true,
            },
            TRANSFER_ENCODING => {
                const CHUNKED: &[u8] = b"chunked";
                match b {
                    b',' => {
                        // An empty element (",,", a trailing ",") leaves the verdict of
                        // the last coding standing.
                        if self.coding_any {
                            self.coding_last = Some(self.coding_chunked());
                        }
                        self.coding_pos = 0;
                        self.coding_ok = true;
                        self.coding_any = false;
                    }
                    b' ' | b'\t' => {
                        // Whitespace ends the token (parameters are not chunked's).
                        if self.coding_any {
                            self.coding_ok &= usize::from(self.coding_pos) == CHUNKED.len();
                            self.coding_pos = u8::MAX;
                        }
                    }
                    _ => {
                        self.coding_any = true;
                        let pos = usize::from(self.coding_pos);
                        if CHUNKED.get(pos) == Some(&b.to_ascii_lowercase()) {
                            self.coding_pos += 1;
                        } else {
                            self.coding_ok = false;
                        }
                    }
                }
            }
            TRACEPARENT => match b {
                b' ' | b'\t' => {}
                _ if usize::from(self.trace_len) < TRACEPARENT_LEN => {
                    self.trace[usize::from(self.trace_len)] = b;
                    self.trace_len += 1;
                }
                _ => self.trace_bad = true,
            },
            _ => {}
        }
    }

    /// Whether the coding read so far in a Transfer-Encoding element is `chunked`.
    fn coding_chunked(&self) -> bool {
        let ended = self.coding_pos == u8::MAX;
        self.coding_ok && (ended || usize::from(self.coding_pos) == b"chunked".len())
    }

    fn line_end(
        &mut self,
        kind: LineKind,
        on: &mut impl FnMut(H1Event, &H1) -> Result<Body, GiveUp>,
    ) -> Step {
        self.line = 0;
        match kind {
            LineKind::Start => self.st = St::LineStart,
            LineKind::Header => {
                self.header_done()?;
                self.st = St::LineStart;
            }
            LineKind::End => {
                if self.in_trailers {
                    return self.done(on);
                }
                let body = on(H1Event::HeadDone, self)?;
                match body {
                    Body::None => self.done(on)?,
                    Body::Length(0) => self.done(on)?,
                    Body::Length(n) => self.st = St::Fixed(n),
                    Body::Chunked => self.chunk_header(),
                    Body::UntilClose => self.st = St::UntilClose,
                }
            }
            LineKind::ChunkSize => {
                let size = self.number.unwrap_or(0);
                if size == 0 {
                    // The last chunk: trailers (header lines) up to an empty line, bounded
                    // like a head of their own.
                    self.in_trailers = true;
                    self.head_bytes = 0;
                    self.st = St::LineStart;
                } else {
                    self.st = St::ChunkData(size);
                }
            }
        }
        Ok(())
    }

    fn header_done(&mut self) -> Step {
        match self.header {
            CONTENT_LENGTH => {
                let Some(n) = self.number.filter(|_| !self.number_bad) else {
                    return Err(GiveUp);
                };
                if self.head.content_length.is_some_and(|c| c != n) {
                    return Err(GiveUp);
                }
                self.head.content_length = Some(n);
            }
            TRACEPARENT => {
                self.facts.trace = if self.trace_bad {
                    None
                } else {
                    traceparent(&self.trace[..usize::from(self.trace_len)])
                };
            }
            TRANSFER_ENCODING => {
                let last = if self.coding_any {
                    Some(self.coding_chunked())
                } else {
                    self.coding_last
                };
                // Only the final coding decides; a later header line replaces the verdict.
                // A line with no coding at all is not one the sniffer follows.
                match last {
                    Some(true) => {
                        self.head.chunked = true;
                        self.head.other_encoding = false;
                    }
                    Some(false) | None => {
                        self.head.chunked = false;
                        self.head.other_encoding = true;
                    }
                }
            }
            _ => {}
        }
        self.header = 0;
        Ok(())
    }
}

/// How many bytes at the start of `bytes` satisfy `ok`.
fn run(bytes: &[u8], ok: impl Fn(u8) -> bool) -> usize {
    bytes.iter().position(|&b| !ok(b)).unwrap_or(bytes.len())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// A request waiting for its response.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    started: Instant,
    head: bool,
    bytes: u64,
    facts: RequestFacts,
}

/// Both directions of an HTTP/1.1 connection.
struct Http1 {
    client: H1,
    server: H1,
    pending: VecDeque<Pending>,
    /// Sequence number of the request being read.
    seq: u64,
    started: Option<Instant>,
    /// The response being read is an interim (1xx) one.
    interim: bool,
    /// A response ended the connection's HTTP (101 Switching Protocols).
    upgraded: bool,
}

impl Http1 {
    fn new() -> Self {
        Self {
            client: H1::new(Role::Request),
            server: H1::new(Role::Response),
            pending: VecDeque::new(),
            seq: 0,
            started: None,
            interim: false,
            upgraded: false,
        }
    }

    fn client(&mut self, bytes: &[u8], now: Instant) -> Step {
        let pending = &mut self.pending;
        let seq = &mut self.seq;
        let started = &mut self.started;
        self.client.feed(bytes, &mut |event, h1| {
            match event {
                H1Event::Start => {
                    *seq += 1;
                    *started = Some(now);
                }
                H1Event::HeadDone => {
                    let head = &h1.head;
                    if head.method_connect {
                        // A tunnel follows: not followed.
                        return Err(GiveUp);
                    }
                    if pending.len() >= MAX_PIPELINED {
                        return Err(GiveUp);
                    }
                    pending.push_back(Pending {
                        seq: *seq,
                        started: started.unwrap_or(now),
                        head: head.method_head,
                        bytes: h1.bytes,
                        facts: h1.facts,
                    });
                    // A request body must be delimited; a server would refuse another coding.
                    if head.other_encoding {
                        return Err(GiveUp);
                    }
                    return Ok(if head.chunked {
                        Body::Chunked
                    } else {
                        Body::Length(head.content_length.unwrap_or(0))
                    });
                }
                H1Event::Done => {
                    if let Some(p) = pending.back_mut().filter(|p| p.seq == *seq) {
                        p.bytes = h1.bytes;
                    }
                }
            }
            Ok(Body::None)
        })
    }

    fn server(&mut self, bytes: &[u8], now: Instant, out: &mut impl FnMut(Exchange)) -> Step {
        if self.upgraded {
            return Err(GiveUp);
        }
        let pending = &mut self.pending;
        let interim = &mut self.interim;
        let upgraded = &mut self.upgraded;
        self.server.feed(bytes, &mut |event, h1| {
            match event {
                H1Event::Start => {
                    if pending.is_empty() {
                        // A response to no request.
                        return Err(GiveUp);
                    }
                }
                H1Event::HeadDone => {
                    let head = &h1.head;
                    let front = pending.front().ok_or(GiveUp)?;
                    *interim = (100..200).contains(&head.status);
                    if head.status == 101 {
                        *upgraded = true;
                        return Ok(Body::None);
                    }
                    if *interim || front.head || head.status == 204 || head.status == 304 {
                        return Ok(Body::None);
                    }
                    return Ok(if head.chunked {
                        Body::Chunked
                    } else if head.other_encoding {
                        Body::UntilClose
                    } else if let Some(n) = head.content_length {
                        Body::Length(n)
                    } else {
                        Body::UntilClose
                    });
                }
                H1Event::Done => {
                    if *interim && !*upgraded {
                        return Ok(Body::None);
                    }
                    let p = pending.pop_front().ok_or(GiveUp)?;
                    out(Exchange {
                        grpc: false,
                        status: h1.head.status,
                        grpc_status: None,
                        duration: now.saturating_duration_since(p.started),
                        request_bytes: p.bytes,
                        response_bytes: h1.bytes,
                        request: p.facts,
                    });
                    if *upgraded {
                        return Err(GiveUp);
                    }
                }
            }
            Ok(Body::None)
        })
    }

    fn server_closed(&mut self, now: Instant, out: &mut impl FnMut(Exchange)) {
        if self.server.st == St::UntilClose
            && let Some(p) = self.pending.pop_front()
        {
            out(Exchange {
                grpc: false,
                status: self.server.head.status,
                grpc_status: None,
                duration: now.saturating_duration_since(p.started),
                request_bytes: p.bytes,
                response_bytes: self.server.bytes,
                request: p.facts,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/2

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The frame being read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    len: u32,
    /// Payload bytes read so far.
    pos: u32,
    /// Where the header block fragment starts and ends in the payload (HEADERS,
    /// PUSH_PROMISE, CONTINUATION); known once the pad length byte is read.
    frag_start: u32,
    frag_end: u32,
}

/// One direction's frame reader, with its HPACK decoder.
struct H2Dir {
    header: [u8; 9],
    header_len: u8,
    frame: Option<Frame>,
    /// The header block being gathered, and its stream (0: none open).
    block: Vec<u8>,
    block_stream: u32,
    block_kind: u8,
    block_end_stream: bool,
    decoder: loona_hpack::Decoder<'static>,
    /// The next frame must be SETTINGS (a server's connection preface).
    expect_settings: bool,
}

impl H2Dir {
    fn new(expect_settings: bool) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_HPACK_TABLE);
        Self {
            header: [0; 9],
            header_len: 0,
            frame: None,
            block: Vec::new(),
            block_stream: 0,
            block_kind: 0,
            block_end_stream: false,
            decoder,
            expect_settings,
        }
    }

    /// Reads frames from `bytes`, calling `on` for each DATA payload piece (stream, length,
    /// end of stream) and each complete header block (stream, kind, block, end of stream).
    fn feed(&mut self, mut bytes: &[u8], on: &mut impl FnMut(H2Event) -> Step) -> Step {
        while !bytes.is_empty() {
            let Some(frame) = &mut self.frame else {
                let take = (9 - usize::from(self.header_len)).min(bytes.len());
                self.header[usize::from(self.header_len)..usize::from(self.header_len) + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take as u8;
                bytes = &bytes[take..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = &self.header;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    let f = Frame {
                        kind: h[3],
                        flags: h[4],
                        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                        len,
                        pos: 0,
                        frag_start: 0,
                        frag_end: len,
                    };
                    self.start_frame(f, on)?;
                }
                continue;
            };
            let left = (frame.len - frame.pos) as usize;
            let n = left.min(bytes.len());
            let chunk = &bytes[..n];
            bytes = &bytes[n..];
            let f = *frame;
            match f.kind {
                DATA => on(H2Event::Data {
                    stream: f.stream,
                    len: n as u64,
                })?,
                HEADERS | PUSH_PROMISE | CONTINUATION => self.fragment(chunk)?,
                _ => {}
            }
            let frame = self.frame.as_mut().ok_or(GiveUp)?;
            frame.pos += n as u32;
            if frame.pos == frame.len {
                self.end_frame(on)?;
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, mut f: Frame, on: &mut impl FnMut(H2Event) -> Step) -> Step {
        if self.expect_settings {
            if f.kind != SETTINGS || f.stream != 0 || !f.len.is_multiple_of(6) {
                return Err(GiveUp);
            }
            self.expect_settings = false;
        }
        // Inside a header block only its CONTINUATIONs may come.
        if self.block_stream != 0 && (f.kind != CONTINUATION || f.stream != self.block_stream) {
            return Err(GiveUp);
        }
        match f.kind {
            HEADERS | PUSH_PROMISE => {
                if f.stream == 0 {
                    return Err(GiveUp);
                }
                // Padding and priority are read as they come (see `fragment`).
                f.frag_start = u32::MAX;
                self.block.clear();
                self.block_stream = f.stream;
                self.block_kind = f.kind;
                self.block_end_stream = f.kind == HEADERS && f.flags & END_STREAM != 0;
            }
            CONTINUATION if self.block_stream == 0 => return Err(GiveUp),
            RST_STREAM => on(H2Event::Reset { stream: f.stream })?,
            _ => {}
        }
        self.frame = Some(f);
        if f.len == 0 {
            self.end_frame(on)?;
        }
        Ok(())
    }

    /// Gathers the header block fragment of the frame being read.
    fn fragment(&mut self, chunk: &[u8]) -> Step {
        let f = self.frame.as_mut().ok_or(GiveUp)?;
        let mut chunk = chunk;
        let mut pos = f.pos;
        if f.frag_start == u32::MAX {
            // First payload byte of HEADERS/PUSH_PROMISE: the pad length, if PADDED.
            let padded = f.flags & PADDED != 0;
            let pad = if padded {
                let p = u32::from(*chunk.first().ok_or(GiveUp)?);
                chunk = &chunk[1..];
                pos += 1;
                p
            } else {
                0
            };
            let mut start = u32::from(padded);
            if f.kind == HEADERS && f.flags & PRIORITY != 0 {
                start += 5;
            }
            if f.kind == PUSH_PROMISE {
                start += 4;
            }
            if start + pad > f.len {
                return Err(GiveUp);
            }
            f.frag_start = start;
            f.frag_end = f.len - pad;
        }
        // The part of this chunk inside [frag_start, frag_end).
        let chunk_end = pos + chunk.len() as u32;
        let from = f.frag_start.max(pos);
        let to = f.frag_end.min(chunk_end);
        if from < to {
            let piece = &chunk[(from - pos) as usize..(to - pos) as usize];
            if self.block.len() + piece.len() > MAX_HEADER_BLOCK {
                return Err(GiveUp);
            }
            self.block.extend_from_slice(piece);
        }
        Ok(())
    }

    fn end_frame(&mut self, on: &mut impl FnMut(H2Event) -> Step) -> Step {
        let f = self.frame.take().ok_or(GiveUp)?;
        match f.kind {
            DATA if f.flags & END_STREAM != 0 => on(H2Event::End { stream: f.stream })?,
            HEADERS | PUSH_PROMISE | CONTINUATION if f.flags & END_HEADERS != 0 => {
                let stream = self.block_stream;
                self.block_stream = 0;
                let mut status = None;
                let mut grpc_status = None;
                let mut grpc = false;
                let mut facts = RequestFacts::default();
                let mut list = 0usize;
                self.decoder
                    .decode_with_cb(&self.block, |name, value| {
                        list += name.len() + value.len() + 32;
                        if list > MAX_HEADER_LIST {
                            return;
                        }
                        match &*name {
                            b":status" => status = parse_u32(&value),
                            b"grpc-status" => grpc_status = parse_u32(&value),
                            b"content-type" => grpc = value.starts_with(b"application/grpc"),
                            b":method" => facts.set_method(&value),
                            b":path" => facts.set_path(&value),
                            b"traceparent" => facts.trace = traceparent(&value),
                            _ => {}
                        }
                    })
                    .map_err(|_| GiveUp)?;
                if list > MAX_HEADER_LIST {
                    return Err(GiveUp);
                }
                if self.block_kind == HEADERS {
                    on(H2Event::Headers {
                        stream,
                        bytes: self.block.len() as u64,
                        status,
                        grpc_status,
                        grpc,
                        end_stream: self.block_end_stream,
                        facts,
                    })?;
                }
                self.block.clear();
                if self.block.capacity() > 4096 {
                    self.block = Vec::new();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn parse_u32(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 9 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
}

enum H2Event {
    Data {
        stream: u32,
        len: u64,
    },
    End {
        stream: u32,
    },
    Headers {
        stream: u32,
        bytes: u64,
        status: Option<u32>,
        grpc_status: Option<u32>,
        grpc: bool,
        end_stream: bool,
        facts: RequestFacts,
    },
    Reset {
        stream: u32,
    },
}

/// One open stream.
#[derive(Debug, Clone, Copy)]
struct Stream {
    id: u32,
    started: Instant,
    grpc: bool,
    status: u16,
    grpc_status: Option<u32>,
    request_bytes: u64,
    response_bytes: u64,
    facts: RequestFacts,
}

/// Both directions of an HTTP/2 connection.
struct H2 {
    client: H2Dir,
    server: H2Dir,
    streams: Vec<Stream>,
    /// The highest stream the client opened: a new stream's id is higher (RFC 9113
    /// 5.1.1), so HEADERS on a lower id not in the table belong to a finished stream.
    last_stream: u32,
}

impl H2 {
    fn new() -> Self {
        Self {
            client: H2Dir::new(false),
            server: H2Dir::new(true),
            streams: Vec::new(),
            last_stream: 0,
        }
    }

    fn client(&mut self, bytes: &[u8], now: Instant) -> Step {
        let streams = &mut self.streams;
        let last_stream = &mut self.last_stream;
        self.client.feed(bytes, &mut |event| {
            match event {
                H2Event::Headers {
                    stream,
                    bytes,
                    grpc,
                    facts,
                    ..
                } => {
                    if let Some(s) = streams.iter_mut().find(|s| s.id == stream) {
                        // Request trailers.
                        s.request_bytes += bytes;
                    } else if stream > *last_stream {
                        if stream % 2 == 0 || streams.len() >= MAX_STREAMS {
                            return Err(GiveUp);
                        }
                        *last_stream = stream;
                        streams.push(Stream {
                            id: stream,
                            started: now,
                            grpc,
                            status: 0,
                            grpc_status: None,
                            request_bytes: bytes,
                            response_bytes: 0,
                            facts,
                        });
                    }
                }
                H2Event::Data { stream, len } => {
                    if let Some(s) = streams.iter_mut().find(|s| s.id == stream) {
                        s.request_bytes += len;
                    }
                }
                H2Event::Reset { stream } => streams.retain(|s| s.id != stream),
                H2Event::End { .. } => {}
            }
            Ok(())
        })
    }

    fn server(&mut self, bytes: &[u8], now: Instant, out: &mut impl FnMut(Exchange)) -> Step {
        let streams = &mut self.streams;
        let mut finish = |streams: &mut Vec<Stream>, stream: u32| {
            if let Some(i) = streams.iter().position(|s| s.id == stream) {
                let s = streams.swap_remove(i);
                if s.status != 0 {
                    out(Exchange {
                        grpc: s.grpc,
                        status: s.status,
                        grpc_status: s.grpc_status.filter(|_| s.grpc),
                        duration: now.saturating_duration_since(s.started),
                        request_bytes: s.request_bytes,
                        response_bytes: s.response_bytes,
                        request: s.facts,
                    });
                }
            }
        };
        self.server.feed(bytes, &mut |event| {
            match event {
                H2Event::Headers {
                    stream,
                    bytes,
                    status,
                    grpc_status,
                    end_stream,
                    ..
                } => {
                    if let Some(s) = streams.iter_mut().find(|s| s.id == stream) {
                        s.response_bytes += bytes;
                        // The first final status counts; trailers carry none.
                        if let Some(code) = status
                            && (200..600).contains(&code)
                            && s.status == 0
                        {
                            s.status = code as u16;
                        }
                        if let Some(g) = grpc_status {
                            // gRPC defines codes 0 to 16; anything else is UNKNOWN (2),
                            // so a peer cannot mint metric series at will.
                            s.grpc_status = Some(if g <= 16 { g } else { 2 });
                        }
                    }
                    if end_stream {
                        finish(streams, stream);
                    }
                }
                H2Event::Data { stream, len } => {
                    if let Some(s) = streams.iter_mut().find(|s| s.id == stream) {
                        s.response_bytes += len;
                    }
                }
                H2Event::End { stream } => finish(streams, stream),
                H2Event::Reset { stream } => streams.retain(|s| s.id != stream),
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
