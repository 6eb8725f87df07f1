//! The node proxy's metrics: Istio's TCP metrics with Istio's label set (so dashboards and
//! alerts written for Istio work unchanged), plus a few of the proxy's own.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::discovery::Workload;
pub use ambit_core::telemetry::{
    AtomicHistogram, ConnFacts, ConnLabels, Reporter, RequestLabels, Value, WorkloadKey,
};
use ambit_core::telemetry::{BYTES_BUCKETS, DURATION_BUCKETS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric the node proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    /// Istio's request metrics, for the pods that opted in (see [`crate::l7`]).
    requests: Family<RequestLabels, Counter>,
    durations: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    /// Connections whose bytes were sniffed for requests, by what they turned out to be.
    sniffed: Family<ProtocolLabel, Counter>,
    /// Every label set of the request families (removed with their connection series).
    request_series: std::sync::Mutex<std::collections::HashSet<RequestLabels>>,
    pub pods: Gauge,
    /// Connections whose destination could not be reached (flag CONNECT). Counted when
    /// a connection's metrics close with that flag, like the two below.
    connect_failures: Counter,
    /// Connections refused by authorization, by where the policy was enforced: `inbound`
    /// (this proxy's policy) or `outbound` (the destination's proxy answered 401).
    policy_denials: Family<DirectionLabel, Counter>,
    /// Inbound connections decided, by the policy that decided (or was reported) and how.
    policy_decisions: Family<DecisionLabels, Counter>,
    /// Connections refused because their destination, or its waypoint, had no ready
    /// endpoint (flag NR).
    no_route: Counter,
    pub unsynced_refusals: Counter,
    unavailable_policies: Family<ReasonLabel, Counter>,
    hbone_refused: Family<LimitLabel, Counter>,
    hbone_connections: Gauge,
    hbone_handshakes: Gauge,
    /// Read when metrics are encoded, for the two gauges above.
    pub admission: std::sync::OnceLock<Arc<ambit_hbone::admission::Admission>>,
    /// Work that ran on a data-path thread against the rules of
    /// [`ambit_core::datapath`], copied from its counts when metrics are encoded.
    data_path_violations: Family<WorkLabel, Counter>,
    /// Connections each data-path thread carries, read when metrics are encoded.
    worker_connections: Family<WorkerLabel, Gauge>,
    pub workers: std::sync::OnceLock<ambit_hbone::Workers>,
    /// Every label set of the `istio_tcp_*` families, and since when each has named a
    /// workload discovery no longer knows (see [`Metrics::forget_gone`]). Locked only
    /// when a new series appears and by the sweep, never per byte.
    series: std::sync::Mutex<std::collections::HashMap<ConnLabels, Option<std::time::Instant>>>,
}

type Histograms = Family<RequestLabels, AtomicHistogram, fn() -> AtomicHistogram>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

/// The shared series of one request label set, held by a connection so each request
/// it records costs no lookup.
#[derive(Debug, Clone)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration: AtomicHistogram,
    pub request_bytes: AtomicHistogram,
    pub response_bytes: AtomicHistogram,
}

impl RequestSeries {
    pub fn record(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkLabel {
    work: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<ConnLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        let closed = Family::<ConnLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        let sent = Family::<ConnLabels, Counter>::default();
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from the destination back to the source",
            sent.clone(),
        );
        let received = Family::<ConnLabels, Counter>::default();
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the source by the destination",
            received.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "istio_requests",
            "HTTP requests seen in the plaintext of connections this node proxy carries, for pods that turned request metrics on",
            requests.clone(),
        );
        let durations: Histograms =
            Family::new_with_constructor(|| AtomicHistogram::new(&DURATION_BUCKETS));
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's first byte to its response's last",
            durations.clone(),
        );
        let request_bytes: Histograms =
            Family::new_with_constructor(|| AtomicHistogram::new(&BYTES_BUCKETS));
        registry.register(
            "istio_request_bytes",
            "Request sizes as carried (head and body)",
            request_bytes.clone(),
        );
        let response_bytes: Histograms =
            Family::new_with_constructor(|| AtomicHistogram::new(&BYTES_BUCKETS));
        registry.register(
            "istio_response_bytes",
            "Response sizes as carried (head and body)",
            response_bytes.clone(),
        );
        let own = registry.sub_registry_with_prefix("ambit_node");
        let sniffed = Family::<ProtocolLabel, Counter>::default();
        own.register(
            "sniffed_connections",
            "Connections watched for request metrics, by what they turned out to be when they closed: http1, http2, opaque (not HTTP, or HTTP the node proxy does not follow, such as an upgrade; counted at L4 only), unknown (closed before it could tell)",
            sniffed.clone(),
        );
        let pods = Gauge::default();
        own.register("pods", "Pods the node proxy serves", pods.clone());
        let connect_failures = Counter::default();
        own.register(
            "connect_failures",
            "Connections closed because their destination could not be reached",
            connect_failures.clone(),
        );
        let policy_denials = Family::<DirectionLabel, Counter>::default();
        own.register(
            "policy_denials",
            "Connections refused by authorization policy: direction inbound when this proxy's policy denied, outbound when the destination's proxy did",
            policy_denials.clone(),
        );
        for direction in ["inbound", "outbound"] {
            let _ = policy_denials.get_or_create(&DirectionLabel { direction });
        }
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        own.register(
            "policy_decisions",
            "Inbound connections decided by this proxy's policies, by policy (<namespace>/<name>; no-allow-matched when ALLOW policies apply and none matched) and decision: allow, deny, dry_run_deny (a dry-run policy would have denied), audit",
            policy_decisions.clone(),
        );
        let no_route = Counter::default();
        own.register(
            "no_route",
            "Connections refused because their destination, or the waypoint it is bound to, had no ready endpoint",
            no_route.clone(),
        );
        let unsynced_refusals = Counter::default();
        own.register(
            "unsynced_refusals",
            "Connections refused because discovery had not synced within the wait",
            unsynced_refusals.clone(),
        );
        let unavailable_policies = Family::<ReasonLabel, Counter>::default();
        own.register(
            "unavailable_policies",
            "Policies that applied to a connection while this node proxy did not hold them (missing) or could not accept them (refused); each counted once",
            unavailable_policies.clone(),
        );
        let hbone_refused = Family::<LimitLabel, Counter>::default();
        own.register(
            "hbone_refused",
            "Connections to port 15008 closed on arrival because a limit was reached (connections, handshakes, source_handshakes)",
            hbone_refused.clone(),
        );
        let hbone_connections = Gauge::default();
        own.register(
            "hbone_connections",
            "Open connections on port 15008, every pod together",
            hbone_connections.clone(),
        );
        let hbone_handshakes = Gauge::default();
        own.register(
            "hbone_handshakes",
            "Connections on port 15008 still in their TLS handshake",
            hbone_handshakes.clone(),
        );
        let data_path_violations = Family::<WorkLabel, Counter>::default();
        own.register(
            "data_path_violations",
            "Work that must stay off the data path and ran on a data-path thread anyway, delaying its connections: certificate (never there), allocator_collection (only on a thread carrying no connection). Always zero; anything else is a defect",
            data_path_violations.clone(),
        );
        for work in ambit_core::datapath::OffPathWork::ALL {
            let _ = data_path_violations.get_or_create(&WorkLabel {
                work: work.as_str(),
            });
        }
        let worker_connections = Family::<WorkerLabel, Gauge>::default();
        own.register(
            "worker_connections",
            "Connections each data-path thread carries (a new connection goes to the least loaded)",
            worker_connections.clone(),
        );
        Self {
            registry,
            opened,
            closed,
            sent,
            received,
            requests,
            durations,
            request_bytes,
            response_bytes,
            sniffed,
            request_series: std::sync::Mutex::new(std::collections::HashSet::new()),
            pods,
            connect_failures,
            policy_denials,
            policy_decisions,
            no_route,
            unsynced_refusals,
            unavailable_policies,
            hbone_refused,
            hbone_connections,
            hbone_handshakes,
            admission: std::sync::OnceLock::new(),
            data_path_violations,
            worker_connections,
            workers: std::sync::OnceLock::new(),
            series: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Metrics {
    /// Counts a policy that was needed and not available (`missing` or `refused`).
    pub fn unavailable_policy(&self, reason: &'static str) {
        self.unavailable_policies
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Notes a label set, if it is new (a series about to be created).
    fn track(&self, labels: &ConnLabels, family: &Family<ConnLabels, Counter>) {
        if family.get(labels).is_none() {
            self.series
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(labels.clone())
                .or_insert(None);
        }
    }

    /// Removes the series of workloads that are gone: a label set whose source or
    /// destination workload `exists` no longer finds (by namespace, workload name,
    /// canonical service and revision, so a rollout to a new version retires the old
    /// version's series too) is marked, and removed from every `istio_tcp_*` family once
    /// it has stayed so for `retention` (a connection still open then records into a
    /// fresh series when it closes, which Prometheus reads as a counter reset). Returns
    /// how many were removed.
    pub fn forget_gone(
        &self,
        exists: impl Fn(&WorkloadKey<'_>) -> bool,
        retention: Duration,
    ) -> usize {
        let now = std::time::Instant::now();
        let known = |name: &Value, ns: &Value, service: &Value, revision: &Value| {
            name.0.as_ref() == "unknown"
                || exists(&WorkloadKey {
                    namespace: &ns.0,
                    workload: &name.0,
                    canonical_service: &service.0,
                    canonical_revision: &revision.0,
                })
        };
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        for (labels, since) in series.iter_mut() {
            let live = known(
                &labels.source_workload,
                &labels.source_workload_namespace,
                &labels.source_canonical_service,
                &labels.source_canonical_revision,
            ) && known(
                &labels.destination_workload,
                &labels.destination_workload_namespace,
                &labels.destination_canonical_service,
                &labels.destination_canonical_revision,
            );
            match (live, *since) {
                (true, _) => *since = None,
                (false, None) => *since = Some(now),
                (false, Some(t)) if now.duration_since(t) >= retention => gone.push(labels.clone()),
                (false, Some(_)) => {}
            }
        }
        for labels in &gone {
            series.remove(labels);
            for family in [&self.opened, &self.closed, &self.sent, &self.received] {
                family.remove(labels);
            }
        }
        if !gone.is_empty() {
            let gone: std::collections::HashSet<&ConnLabels> = gone.iter().collect();
            let mut requests = self
                .request_series
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            requests.retain(|r| {
                if !gone.contains(&r.conn) {
                    return true;
                }
                self.requests.remove(r);
                for h in [&self.durations, &self.request_bytes, &self.response_bytes] {
                    h.remove(r);
                }
                false
            });
        }
        gone.len()
    }

    /// The series of a request label set, created if new (and then tracked, so it goes
    /// with its workloads).
    pub fn request_series(&self, labels: &RequestLabels) -> RequestSeries {
        if self.requests.get(labels).is_none() {
            self.series
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(labels.conn.clone())
                .or_insert(None);
            self.request_series
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(labels.clone());
        }
        RequestSeries {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.durations.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Counts a sniffed connection by what it turned out to be.
    pub fn sniffed(&self, protocol: &'static str) {
        self.sniffed
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }

    /// Label sets currently tracked.
    pub fn series_count(&self) -> usize {
        self.series.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Counts a connection to port 15008 refused on arrival.
    pub fn hbone_refused(&self, limit: &'static str) {
        self.hbone_refused
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    /// Counts how policies decided a new inbound connection (once per connection; the
    /// re-checks after a policy change are not counted).
    pub fn decided(&self, e: &ambit_core::policy::Evaluation<'_>) {
        ambit_core::policy::each_counted_decision(e, |policy, decision| {
            self.policy_decisions
                .get_or_create(&DecisionLabels { policy, decision })
                .inc();
        });
    }

    pub fn encode(&self) -> String {
        if let Some(a) = self.admission.get() {
            self.hbone_connections.set(a.open_connections() as i64);
            self.hbone_handshakes.set(a.pending_handshakes() as i64);
        }
        for work in ambit_core::datapath::OffPathWork::ALL {
            let c = self.data_path_violations.get_or_create(&WorkLabel {
                work: work.as_str(),
            });
            let now = ambit_core::datapath::violations(work);
            c.inc_by(now.saturating_sub(c.get()));
        }
        if let Some(w) = self.workers.get() {
            for i in 0..w.len() {
                self.worker_connections
                    .get_or_create(&WorkerLabel {
                        worker: i.to_string(),
                    })
                    .set(w.load(i) as i64);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One connection's metrics: opened now, closed (with its bytes) when dropped or closed.
pub struct ConnMetrics {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    closed: bool,
}

impl ConnMetrics {
    pub fn open(metrics: Arc<Metrics>, labels: ConnLabels) -> Self {
        metrics.track(&labels, &metrics.opened);
        metrics.opened.get_or_create(&labels).inc();
        Self {
            metrics,
            labels,
            closed: false,
        }
    }

    /// The connection's labels.
    pub fn labels(&self) -> &ConnLabels {
        &self.labels
    }

    /// Records the close: `from_source` bytes went source -> destination, `to_source`
    /// came back.
    pub fn close(mut self, from_source: u64, to_source: u64, flags: Option<&'static str>) {
        if let Some(f) = flags {
            self.labels.response_flags = f;
            let m = &self.metrics;
            match f {
                "CONNECT" => {
                    m.connect_failures.inc();
                }
                "NR" => {
                    m.no_route.inc();
                }
                "DENY" => {
                    let direction = if self.labels.reporter == "destination" {
                        "inbound"
                    } else {
                        "outbound"
                    };
                    m.policy_denials
                        .get_or_create(&DirectionLabel { direction })
                        .inc();
                }
                _ => {}
            }
        }
        self.record(from_source, to_source);
    }

    fn record(&mut self, from_source: u64, to_source: u64) {
        self.closed = true;
        let m = &self.metrics;
        // Closing may name another series (response flags).
        m.track(&self.labels, &m.closed);
        m.closed.get_or_create(&self.labels).inc();
        m.received.get_or_create(&self.labels).inc_by(from_source);
        m.sent.get_or_create(&self.labels).inc_by(to_source);
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        if !self.closed {
            self.record(0, 0);
        }
    }
}

/// A short human form of a workload for logs.
pub fn describe(w: Option<&Workload>) -> String {
    match w {
        Some(w) => {
            let mut s = String::new();
            let _ = write!(s, "{}/{}", w.profile.namespace, w.name);
            s
        }
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use ambit_core::discovery::TunnelProtocol;

    use super::*;
    use ambit_core::testing::workload;

    #[test]
    fn labels_carry_both_ends_locality_and_unknown_without_one() {
        let src = workload(
            "sleep",
            "198.18.1.10",
            "n1",
            "zone-a",
            TunnelProtocol::Hbone,
            &[],
        );
        let dst = workload("echo", "198.18.2.10", "n2", "", TunnelProtocol::Hbone, &[]);
        let facts = ConnFacts {
            reporter: Reporter::Destination,
            source: Some(&src),
            source_principal: None,
            destination: Some(&dst),
            destination_service: None,
            mutual_tls: true,
            request_protocol: "tcp",
        };
        let l = ConnLabels::new(&facts, "-");
        assert_eq!((&*l.source_region.0, &*l.source_zone.0), ("r", "zone-a"));
        // An empty zone is unknown, like a missing locality.
        assert_eq!(
            (&*l.destination_region.0, &*l.destination_zone.0),
            ("r", "unknown")
        );
        let mut bare = dst.clone();
        bare.locality = None;
        let l2 = ConnLabels::new(
            &ConnFacts {
                destination: Some(&bare),
                ..facts.clone()
            },
            "-",
        );
        assert_eq!(&*l2.destination_region.0, "unknown");

        // In the exposition, after connection_security_policy as Istio orders them.
        let m = Arc::new(Metrics::default());
        ConnMetrics::open(m.clone(), l).close(1, 2, None);
        let page = m.encode();
        let line = page
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap();
        let tail = &line[line.find("connection_security_policy").unwrap()..];
        assert!(
            tail.contains("source_region=\"r\",source_zone=\"zone-a\",destination_region=\"r\",destination_zone=\"unknown\""),
            "{line}"
        );
    }

    #[test]
    fn series_of_a_workload_that_is_gone_are_removed_after_the_retention() {
        let src = workload(
            "sleep",
            "198.18.1.10",
            "n1",
            "z",
            TunnelProtocol::Hbone,
            &[],
        );
        let dst = workload("echo", "198.18.2.10", "n2", "z", TunnelProtocol::Hbone, &[]);
        let facts = ConnFacts {
            reporter: Reporter::Source,
            source: Some(&src),
            source_principal: None,
            destination: Some(&dst),
            destination_service: None,
            mutual_tls: true,
            request_protocol: "tcp",
        };
        let m = Arc::new(Metrics::default());
        ConnMetrics::open(m.clone(), ConnLabels::new(&facts, "-")).close(1, 1, Some("DENY"));
        assert_eq!(
            m.series_count(),
            2,
            "the opened series and the closed (flagged) one"
        );
        let retention = Duration::from_millis(50);
        let everyone = |_: &WorkloadKey<'_>| true;
        assert_eq!(m.forget_gone(everyone, retention), 0);
        // echo goes: first marked, removed once the retention has passed.
        let without_echo = |k: &WorkloadKey<'_>| k.workload != "echo";
        assert_eq!(m.forget_gone(without_echo, retention), 0);
        assert!(m.encode().contains("destination_workload=\"echo\""));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(m.forget_gone(without_echo, retention), 2);
        assert!(
            !m.encode().contains("destination_workload=\"echo\""),
            "{}",
            m.encode()
        );
        assert_eq!(m.series_count(), 0);
        // A workload that comes back before the retention keeps its series.
        ConnMetrics::open(m.clone(), ConnLabels::new(&facts, "-")).close(1, 1, None);
        assert_eq!(m.forget_gone(without_echo, retention), 0);
        assert_eq!(m.forget_gone(everyone, retention), 0);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            m.forget_gone(without_echo, retention),
            0,
            "the clock started again"
        );
    }
}
