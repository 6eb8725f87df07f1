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
//! With `--otlp-endpoint`, a request that carries a sampled W3C `traceparent` also
//! becomes a span: a child of the caller's span (the node proxy cannot add a header, so
//! the next hop's parent stays the caller's, or the waypoint's when one is between),
//! `CLIENT` at the source, `SERVER` at the destination, with Istio's span tags. The node
//! proxy never starts a trace.
//!
//! The tap's lock is the connection's own: both directions of a copy run in that
//! connection's task, so it is never contended. Once the sniffer gives up, a flag skips
//! it and the lock altogether.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ambit_hbone::stream::Tap;

use ambit_proto::otlp::{Span, Status, span, status};
use ambit_xds::trace::{Tracer, attr};

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

/// The node proxy's span exporter and what its spans say about it.
#[derive(Clone)]
pub struct NodeTracer {
    pub tracer: Arc<Tracer>,
    pub node: Arc<str>,
    pub mesh_id: Arc<str>,
}

/// gRPC or not, the status, the gRPC status.
type SeriesKey = (bool, u16, Option<u32>);

/// Turns exchanges into metrics.
struct Recorder {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    cache: Vec<(SeriesKey, RequestSeries)>,
    tracer: Option<NodeTracer>,
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
        if let Some(t) = &self.tracer
            && let Some(trace) = e.request.trace
            && trace.flags & 1 == 1
        {
            t.tracer.record(
                self.span(t, &e, trace),
                ambit_proto::telemetry::TracedRequest {
                    trace_id: hex(&trace.trace_id),
                    source: self.labels.source_principal.0.to_string(),
                    service: self.labels.destination_service.0.to_string(),
                    method: e.request.method().to_owned(),
                    path: e.request.path().to_owned(),
                    status: u32::from(e.status),
                    duration_ms: e.duration.as_millis() as u64,
                    at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                },
            );
        }
    }

    /// The exchange as an OTLP span, child of the caller's span, with Istio's tags.
    fn span(&self, t: &NodeTracer, e: &Exchange, trace: ambit_hbone::headers::TraceParent) -> Span {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let start = end.saturating_sub(e.duration.as_nanos() as u64);
        let l = &self.labels;
        let source = self.labels.reporter == "source";
        // The pod this node proxy reports for: the client at the source, the server at
        // the destination.
        let (namespace, canonical) = if source {
            (&l.source_workload_namespace, &l.source_canonical_service)
        } else {
            (
                &l.destination_workload_namespace,
                &l.destination_canonical_service,
            )
        };
        let host = &l.destination_service.0;
        let mut attributes = vec![
            attr("component", "proxy"),
            attr("node_id", format!("ambit-node~{}", t.node)),
            attr("http.method", e.request.method()),
            attr("http.url", format!("http://{host}{}", e.request.path())),
            attr("http.status_code", e.status.to_string()),
            attr("request_size", e.request_bytes.to_string()),
            attr("response_size", e.response_bytes.to_string()),
            attr("upstream_cluster", host.to_string()),
            attr("peer.address", l.source_principal.0.to_string()),
            attr("istio.namespace", namespace.0.to_string()),
            attr("istio.canonical_service", canonical.0.to_string()),
            attr("istio.mesh_id", t.mesh_id.to_string()),
            attr("reporter", l.reporter),
        ];
        if let Some(g) = e.grpc_status {
            attributes.push(attr("grpc.status_code", g.to_string()));
        }
        let failed = e.status >= 500;
        let path = e.request.path();
        Span {
            trace_id: trace.trace_id.to_vec(),
            span_id: span_id().to_vec(),
            parent_span_id: trace.parent_id.to_vec(),
            name: format!("{host}{}", path.split('?').next().unwrap_or("")),
            kind: if source {
                span::SpanKind::Client
            } else {
                span::SpanKind::Server
            } as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: Some(Status {
                code: if failed {
                    status::StatusCode::Error
                } else {
                    status::StatusCode::Unset
                } as i32,
                message: String::new(),
            }),
            ..Default::default()
        }
    }
}

/// A random, non-zero span id.
fn span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl RequestTap {
    /// A tap for a connection with these labels (its `istio_tcp_*` ones).
    pub fn new(
        metrics: Arc<Metrics>,
        labels: &ConnLabels,
        socket_is_client: bool,
        tracer: Option<NodeTracer>,
    ) -> Self {
        Self {
            socket_is_client,
            off: AtomicBool::new(false),
            state: std::sync::Mutex::new(TapState {
                sniffer: Sniffer::new(),
                recorder: Recorder {
                    metrics,
                    labels: labels.clone(),
                    cache: Vec::new(),
                    tracer,
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
