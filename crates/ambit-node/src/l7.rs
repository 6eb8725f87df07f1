//! Request metrics at the node proxy, for pods that turned them on (the
//! `ambit.io/l7-metrics: enabled` annotation on the pod or its namespace).
//!
//! A [`RequestTap`] sits on the plaintext side of one connection: the application's
//! socket of an outbound connection (the pod is the client; `reporter="source"`) or of an
//! inbound one (the pod is the server; `reporter="destination"`). It shows each chunk the
//! copy moves to a [`Sniffer`] and records each exchange the sniffer completes under
//! Istio's request metrics, with the connection's labels and `request_protocol` `http` or
//! `grpc`. Bytes pass through unchanged and undelayed whatever the sniffer makes of them.
//!
//! The tap's lock is the connection's own: both directions of a copy run in that
//! connection's task, so it is never contended. Once the sniffer gives up, a flag skips
//! it and the lock altogether.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ambit_hbone::stream::Tap;

use crate::metrics::{ConnLabels, Metrics, RequestLabels, RequestSeries, Value};
use crate::sniff::{Exchange, Protocol, Sniffer};

/// The label sets a connection keeps ready (status and gRPC status combinations); others
/// are looked up per request.
const CACHED_SERIES: usize = 16;

/// Watches one connection for requests. See the module documentation.
pub struct RequestTap {
    /// The socket's side is the client (outbound) rather than the server (inbound).
    socket_is_client: bool,
    off: AtomicBool,
    state: std::sync::Mutex<TapState>,
}

struct TapState {
    sniffer: Sniffer,
    recorder: Recorder,
}

/// gRPC or not, the status, the gRPC status.
type SeriesKey = (bool, u16, Option<u32>);

/// Turns exchanges into metrics.
struct Recorder {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    cache: Vec<(SeriesKey, RequestSeries)>,
}

impl Recorder {
    fn record(&mut self, e: Exchange) {
        let key = (e.grpc, e.status, e.grpc_status);
        let series = match self.cache.iter().position(|(k, _)| *k == key) {
            Some(i) => self.cache[i].1.clone(),
            None => {
                let mut conn = self.labels.clone();
                conn.request_protocol = if e.grpc { "grpc" } else { "http" };
                let labels = RequestLabels {
                    conn,
                    response_code: e.status,
                    grpc_response_status: Value(match e.grpc_status {
                        Some(code) => code.to_string().into(),
                        None => "-".into(),
                    }),
                };
                let series = self.metrics.request_series(&labels);
                if self.cache.len() < CACHED_SERIES {
                    self.cache.push((key, series.clone()));
                }
                series
            }
        };
        series.record(e.duration, e.request_bytes, e.response_bytes);
    }
}

impl RequestTap {
    /// A tap for a connection with these labels (its `istio_tcp_*` ones).
    pub fn new(metrics: Arc<Metrics>, labels: &ConnLabels, socket_is_client: bool) -> Self {
        Self {
            socket_is_client,
            off: AtomicBool::new(false),
            state: std::sync::Mutex::new(TapState {
                sniffer: Sniffer::new(),
                recorder: Recorder {
                    metrics,
                    labels: labels.clone(),
                    cache: Vec::new(),
                },
            }),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Sniffer, &mut Recorder, Instant)) {
        if self.off.load(Ordering::Relaxed) {
            return;
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let TapState { sniffer, recorder } = &mut *guard;
        f(sniffer, recorder, Instant::now());
        if sniffer.is_off() {
            self.off.store(true, Ordering::Relaxed);
        }
    }

    /// Bytes the client sent.
    pub fn client(&self, bytes: &[u8]) {
        self.with(|s, _, now| s.client(bytes, now));
    }

    /// Bytes the server sent.
    pub fn server(&self, bytes: &[u8]) {
        self.with(|s, r, now| s.server(bytes, now, &mut |e| r.record(e)));
    }

    /// The server finished sending.
    pub fn server_closed(&self) {
        self.with(|s, r, now| s.server_closed(now, &mut |e| r.record(e)));
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Unknown => "unknown",
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Opaque => "opaque",
    }
}

/// Counts what the connection turned out to be, once, when it is done.
impl Drop for RequestTap {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let protocol = protocol_name(state.sniffer.protocol());
        state.recorder.metrics.sniffed(protocol);
    }
}

impl Tap for RequestTap {
    fn read_socket(&self, bytes: &[u8]) {
        if self.socket_is_client {
            self.client(bytes);
        } else {
            self.server(bytes);
        }
    }

    fn write_socket(&self, bytes: &[u8]) {
        if self.socket_is_client {
            self.server(bytes);
        } else {
            self.client(bytes);
        }
    }

    fn socket_closed(&self) {
        if !self.socket_is_client {
            self.server_closed();
        }
    }

    fn tunnel_closed(&self) {
        if self.socket_is_client {
            self.server_closed();
        }
    }
}
