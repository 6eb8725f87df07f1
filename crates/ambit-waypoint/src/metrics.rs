//! The waypoint's metrics: Istio's HTTP metrics with `reporter="waypoint"` for the
//! requests it proxies, Istio's TCP metrics for the opaque connections it proxies, and
//! a few of its own.

use std::time::Duration;

use ambit_core::telemetry::{BYTES_BUCKETS, ConnLabels, DURATION_BUCKETS, RequestLabels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExtAuthzLabels {
    provider: String,
    result: &'static str,
}

/// Every metric the waypoint exports.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    tcp_opened: Family<ConnLabels, Counter>,
    tcp_closed: Family<ConnLabels, Counter>,
    tcp_sent: Family<ConnLabels, Counter>,
    tcp_received: Family<ConnLabels, Counter>,
    refused: Family<ReasonLabel, Counter>,
    mirrors: Family<ReasonLabel, Counter>,
    ejections: Family<NameLabel, Counter>,
    rate_limited: Family<NameLabel, Counter>,
    overflows: Family<NameLabel, Counter>,
    ext_authz: Family<ExtAuthzLabels, Counter>,
    policy_decisions: Family<DecisionLabels, Counter>,
    pub active_requests: Gauge,
    pub upstream_connections: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            refused: Family::default(),
            mirrors: Family::default(),
            ejections: Family::default(),
            rate_limited: Family::default(),
            overflows: Family::default(),
            ext_authz: Family::default(),
            policy_decisions: Family::default(),
            active_requests: Gauge::default(),
            upstream_connections: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut m.registry;
        r.register(
            "ambit_waypoint_mirrored_requests",
            "Requests copied by a RequestMirror, by outcome: sent, failed (including a copy abandoned because its mirror read its body slower than the request was sent)",
            m.mirrors.clone(),
        );
        r.register(
            "ambit_waypoint_outlier_ejections",
            "Endpoints ejected by a DestinationRule's outlier detection, by service (name = <namespace>/<hostname>)",
            m.ejections.clone(),
        );
        r.register(
            "ambit_waypoint_rate_limited_requests",
            "Requests answered 429 by a LocalRateLimit, by policy (name = <namespace>/rl:<name>)",
            m.rate_limited.clone(),
        );
        r.register(
            "ambit_waypoint_ext_authz_checks",
            "Requests a CUSTOM policy handed to its external authorizer, by provider and result: allowed, denied, failed (answered statusOnError), failed_open (let through by failOpen)",
            m.ext_authz.clone(),
        );
        r.register(
            "ambit_waypoint_policy_decisions",
            "Requests and opaque connections decided by the waypoint's policies, by policy (<namespace>/<name>; no-allow-matched when ALLOW policies apply and none matched) and decision: allow, deny, dry_run_deny (a dry-run policy would have denied), audit",
            m.policy_decisions.clone(),
        );
        r.register(
            "ambit_waypoint_overflow_requests",
            "Requests answered 503 UO by a DestinationRule's connection pool, by service",
            m.overflows.clone(),
        );
        r.register(
            "istio_requests",
            "Requests the waypoint proxied",
            m.requests.clone(),
        );
        r.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival to the end of its response",
            m.duration.clone(),
        );
        r.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        r.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        r.register(
            "istio_tcp_connections_opened",
            "Opaque TCP connections the waypoint proxied, opened",
            m.tcp_opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "Opaque TCP connections the waypoint proxied, closed",
            m.tcp_closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client on opaque TCP connections",
            m.tcp_sent.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client on opaque TCP connections",
            m.tcp_received.clone(),
        );
        r.register(
            "ambit_waypoint_refused_tunnels",
            "HBONE tunnels the waypoint refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "ambit_waypoint_active_requests",
            "Requests in flight",
            m.active_requests.clone(),
        );
        r.register(
            "ambit_waypoint_upstream_connections",
            "Pooled upstream HTTP connections open",
            m.upstream_connections.clone(),
        );
        m
    }
}

impl Metrics {
    /// One finished request (its response ended, or it failed).
    pub fn request(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration
            .get_or_create(labels)
            .observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }

    pub fn tcp_opened(&self, labels: &ConnLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    pub fn tcp_closed(&self, labels: &ConnLabels, sent: u64, received: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_sent.get_or_create(labels).inc_by(sent);
        self.tcp_received.get_or_create(labels).inc_by(received);
    }

    /// A tunnel refused before any byte reached a destination.
    pub fn mirrored(&self, reason: &'static str) {
        self.mirrors.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn ejected(&self, service: &str) {
        self.ejections
            .get_or_create(&NameLabel {
                name: service.to_owned(),
            })
            .inc();
    }

    pub fn rate_limited(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&NameLabel {
                name: policy.to_owned(),
            })
            .inc();
    }

    /// Counts how the policies decided a request or connection.
    pub fn decided(&self, counted: &[(String, &'static str)]) {
        for (policy, decision) in counted {
            self.policy_decisions
                .get_or_create(&DecisionLabels {
                    policy: policy.clone(),
                    decision,
                })
                .inc();
        }
    }

    pub fn ext_authz(&self, provider: &str, result: &'static str) {
        self.ext_authz
            .get_or_create(&ExtAuthzLabels {
                provider: provider.to_owned(),
                result,
            })
            .inc();
    }

    pub fn overflowed(&self, service: &str) {
        self.overflows
            .get_or_create(&NameLabel {
                name: service.to_owned(),
            })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
