//! Traces: spans exported over OTLP/gRPC to a collector (`--otlp-endpoint`, off by
//! default), for the waypoint (a span per request it serves) and the node proxy (a span
//! per request it sees, where request metrics are on).
//!
//! Sampling follows W3C Trace Context: a request that arrives with a `traceparent`
//! keeps its sampled flag (the caller decided). A waypoint that starts a trace samples
//! at its configured rate (Istio's default, 1%); the node proxy never starts one (it
//! cannot add a header), it records the sampled requests of traces already running.
//!
//! Spans leave the request path by `try_send` into a bounded queue (a full queue drops
//! the span and counts it: a slow collector never slows requests); one task batches
//! them (up to 512, or every second) and exports them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ambit_proto::otlp::trace_service_client::TraceServiceClient;
use ambit_proto::otlp::{
    AnyValue, ExportTraceServiceRequest, InstrumentationScope, KeyValue, Resource, ResourceSpans,
    ScopeSpans, Span, any_value,
};
use tokio::sync::{mpsc, watch};

/// Spans waiting for export at most.
pub const QUEUE: usize = 8192;
/// Spans per export at most.
pub const BATCH: usize = 512;

/// Recent traced requests kept for the console.
pub const RECENT: usize = 100;

/// A proxy's span exporter.
pub struct Tracer {
    tx: mpsc::Sender<Span>,
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
    /// The last [`RECENT`] traced requests, for the console (a request that finds it
    /// busy skips it: never waits).
    recent: std::sync::Mutex<std::collections::VecDeque<ambit_proto::telemetry::TracedRequest>>,
}

/// A string attribute.
pub fn attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

impl Tracer {
    /// Starts exporting to `endpoint` (`host:port` of an OTLP/gRPC collector) with the
    /// resource attributes `resource`.
    /// `scope` names the instrumentation (`ambit-waypoint`, `ambit-node`).
    pub fn start(
        endpoint: &str,
        scope: &'static str,
        resource: Vec<KeyValue>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let tracer = Arc::new(Self {
            tx,
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            recent: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(RECENT)),
        });
        tokio::spawn(export(
            endpoint.to_owned(),
            scope,
            resource,
            rx,
            tracer.clone(),
            stop,
        ));
        tracer
    }

    /// Queues a span and remembers the request; never waits.
    pub fn record(&self, span: Span, request: ambit_proto::telemetry::TracedRequest) {
        if let Ok(mut recent) = self.recent.try_lock() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(request);
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The recent traced requests, oldest first.
    pub fn recent(&self) -> Vec<ambit_proto::telemetry::TracedRequest> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

async fn export(
    endpoint: String,
    scope: &'static str,
    resource: Vec<KeyValue>,
    mut rx: mpsc::Receiver<Span>,
    tracer: Arc<Tracer>,
    mut stop: watch::Receiver<bool>,
) {
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy(),
        Err(e) => {
            tracing::warn!(%endpoint, error = %e, "traces are off: the OTLP endpoint is not host:port");
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = stop.changed() => return,
        }
        // Gather for up to a second more, to send fewer, larger exports.
        let deadline = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                _ = &mut deadline => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: resource.clone(),
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: scope.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: batch,
                }],
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                tracer.exported.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!(%endpoint, "span export works again");
                    failing = false;
                }
            }
            Err(status) => {
                tracer.dropped.fetch_add(n, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(%endpoint, error = %status, "span export to the OTLP collector failed; spans are dropped until it works");
                    failing = true;
                }
            }
        }
    }
}
