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
