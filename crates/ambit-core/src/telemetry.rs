//! Istio's telemetry label sets, shared by the node proxy (`istio_tcp_*`) and the
//! waypoint (`istio_requests_total` and the other HTTP metrics), so both report the same
//! names and a dashboard written for Istio reads either.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::discovery::{Service, Str, Workload};

/// A label value that is a shared string (no allocation per connection).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Value(pub Str);

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(&self.0)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value(s.into())
    }
}

/// Istio's label set for `istio_tcp_*`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: &'static str,
    pub source_workload: Value,
    pub source_canonical_service: Value,
    pub source_canonical_revision: Value,
    pub source_workload_namespace: Value,
    pub source_principal: Value,
    pub source_app: Value,
    pub source_version: Value,
    pub source_cluster: Value,
    pub destination_service: Value,
    pub destination_service_namespace: Value,
    pub destination_service_name: Value,
    pub destination_workload: Value,
    pub destination_canonical_service: Value,
    pub destination_canonical_revision: Value,
    pub destination_workload_namespace: Value,
    pub destination_principal: Value,
    pub destination_app: Value,
    pub destination_version: Value,
    pub destination_cluster: Value,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    pub source_region: Value,
    pub source_zone: Value,
    pub destination_region: Value,
    pub destination_zone: Value,
}

/// What identifies a workload in the `istio_tcp_*` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkloadKey<'a> {
    pub namespace: &'a str,
    pub workload: &'a str,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
}

impl<'a> WorkloadKey<'a> {
    pub fn of(w: &'a Workload) -> Self {
        Self {
            namespace: &w.profile.namespace,
            workload: &w.workload_name,
            canonical_service: &w.profile.canonical_name,
            canonical_revision: &w.profile.canonical_revision,
        }
    }
}

/// Who reports a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
    /// The waypoint, for the requests (and connections) it proxies.
    Waypoint,
}

/// The facts about one connection that its labels are made of.
#[derive(Debug, Clone)]
pub struct ConnFacts<'a> {
    pub reporter: Reporter,
    pub source: Option<&'a Workload>,
    /// The source's SPIFFE ID, when known (mTLS).
    pub source_principal: Option<String>,
    pub destination: Option<&'a Workload>,
    pub destination_service: Option<&'a Service>,
    pub mutual_tls: bool,
    /// `tcp`, `http` or `grpc`.
    pub request_protocol: &'static str,
}

impl ConnLabels {
    pub fn new(f: &ConnFacts<'_>, response_flags: &'static str) -> Self {
        let unknown = || Value("unknown".into());
        let w = |w: Option<&Workload>, pick: fn(&Workload) -> Str| {
            w.map_or_else(unknown, |w| Value(pick(w)))
        };
        let principal = |w: Option<&Workload>| {
            w.and_then(Workload::identity)
                .map_or_else(unknown, |id| Value(id.to_string().into()))
        };
        // Locality from the Node's topology labels; "unknown" where there are none.
        let place = |w: Option<&Workload>, pick: fn(&crate::discovery::Locality) -> &Str| {
            w.and_then(|w| w.locality.as_deref())
                .map(pick)
                .filter(|v| !v.is_empty())
                .map_or_else(unknown, |v| Value(v.clone()))
        };
        let svc = |pick: fn(&Service) -> Str| {
            f.destination_service
                .map_or_else(unknown, |s| Value(pick(s)))
        };
        ConnLabels {
            reporter: match f.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
                Reporter::Waypoint => "waypoint",
            },
            source_workload: w(f.source, |w| w.workload_name.clone()),
            source_canonical_service: w(f.source, |w| w.profile.canonical_name.clone()),
            source_canonical_revision: w(f.source, |w| w.profile.canonical_revision.clone()),
            source_workload_namespace: w(f.source, |w| w.profile.namespace.clone()),
            source_principal: match &f.source_principal {
                Some(p) => Value(p.as_str().into()),
                None if f.mutual_tls => principal(f.source),
                None => unknown(),
            },
            source_app: w(f.source, |w| w.profile.canonical_name.clone()),
            source_version: w(f.source, |w| w.profile.canonical_revision.clone()),
            source_cluster: w(f.source, |w| w.profile.cluster_id.clone()),
            destination_service: svc(|s| s.hostname.clone()),
            destination_service_namespace: svc(|s| s.namespace.clone()),
            destination_service_name: svc(|s| s.name.clone()),
            destination_workload: w(f.destination, |w| w.workload_name.clone()),
            destination_canonical_service: w(f.destination, |w| w.profile.canonical_name.clone()),
            destination_canonical_revision: w(f.destination, |w| {
                w.profile.canonical_revision.clone()
            }),
            destination_workload_namespace: w(f.destination, |w| w.profile.namespace.clone()),
            destination_principal: if f.mutual_tls {
                principal(f.destination)
            } else {
                unknown()
            },
            destination_app: w(f.destination, |w| w.profile.canonical_name.clone()),
            destination_version: w(f.destination, |w| w.profile.canonical_revision.clone()),
            destination_cluster: w(f.destination, |w| w.profile.cluster_id.clone()),
            request_protocol: f.request_protocol,
            response_flags,
            connection_security_policy: if f.mutual_tls { "mutual_tls" } else { "none" },
            source_region: place(f.source, |l| &l.region),
            source_zone: place(f.source, |l| &l.zone),
            destination_region: place(f.destination, |l| &l.region),
            destination_zone: place(f.destination, |l| &l.zone),
        }
    }
}

/// Istio's label set for `istio_requests_total` and the other HTTP metrics: the
/// connection's labels plus the response.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub conn: ConnLabels,
    pub response_code: u16,
    /// The gRPC status (`grpc-status`), `-` for other protocols.
    pub grpc_response_status: Value,
}

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for the request and response sizes: powers of ten, 1 B to 100 MB.
pub const BYTES_BUCKETS: [f64; 9] = [1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// A Prometheus histogram whose observations take no lock: a counter per bucket, the sum
/// kept as the bits of an `f64` (updated by compare-and-swap). Connections that share a
/// series never wait on one another. Clones share the same series.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(std::sync::Arc<HistogramCells>);

#[derive(Debug)]
pub struct HistogramCells {
    bounds: &'static [f64],
    /// One per bound, then the `+Inf` bucket; not cumulative.
    counts: Box<[std::sync::atomic::AtomicU64]>,
    count: std::sync::atomic::AtomicU64,
    sum_bits: std::sync::atomic::AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with these (ascending) upper bounds, plus `+Inf`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(std::sync::Arc::new(HistogramCells {
            bounds,
            counts: (0..=bounds.len())
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            count: std::sync::atomic::AtomicU64::new(0),
            sum_bits: std::sync::atomic::AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, v: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0;
        // The first bucket whose bound is at least `v` (`le` semantics).
        let i = c.bounds.partition_point(|b| *b < v);
        c.counts[i].fetch_add(1, Relaxed);
        c.count.fetch_add(1, Relaxed);
        let _ = c.sum_bits.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for AtomicHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = c
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(c.counts.iter().map(|n| n.load(Relaxed)))
            .collect();
        // The count is the buckets' total, so the two always agree in one scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            f64::from_bits(c.sum_bits.load(Relaxed)),
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn observations_land_in_le_buckets_and_encode_cumulatively() {
        use prometheus_client::metrics::family::Family;
        let family: Family<RequestLabelsForTest, AtomicHistogram, fn() -> AtomicHistogram> =
            Family::new_with_constructor(|| AtomicHistogram::new(&[1.0, 10.0]));
        let h = family
            .get_or_create(&RequestLabelsForTest { code: 200 })
            .clone();
        for v in [0.5, 1.0, 1.5, 10.0, 11.0] {
            h.observe(v);
        }
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("t", "test", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_sum{code=\"200\"} 24.0"), "{text}");
        assert!(text.contains("t_count{code=\"200\"} 5"), "{text}");
        assert!(
            text.contains("t_bucket{le=\"1.0\",code=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("t_bucket{le=\"10.0\",code=\"200\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("t_bucket{le=\"+Inf\",code=\"200\"} 5"),
            "{text}"
        );
        assert_eq!(h.count(), 5);
    }

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct RequestLabelsForTest {
        code: u16,
    }
}
