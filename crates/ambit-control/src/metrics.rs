//! The control plane's Prometheus metrics (served on the monitoring port at `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::Model;
use crate::source::SourceStatus;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the control plane exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Certificate requests by outcome: `issued`, `unauthenticated`, `permission_denied`,
    /// `invalid_argument`, `internal`.
    pub ca_requests: Family<ResultLabel, Counter>,
    pub config_objects: Family<KindLabel, Gauge>,
    pub config_files: Gauge,
    pub config_files_refused: Gauge,
    pub config_conflicts: Gauge,
    pub config_generation: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ambit");
        let ca_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "ca_requests",
            "Certificate signing requests by result",
            ca_requests.clone(),
        );
        let config_objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "config_objects",
            "Objects in the mesh model by kind",
            config_objects.clone(),
        );
        let config_files = Gauge::default();
        registry.register("config_files", "Manifest files read", config_files.clone());
        let config_files_refused = Gauge::default();
        registry.register(
            "config_files_refused",
            "Manifest files refused (their last good version stays in force)",
            config_files_refused.clone(),
        );
        let config_conflicts = Gauge::default();
        registry.register(
            "config_conflicts",
            "Objects defined in more than one manifest file",
            config_conflicts.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "Version number of the current mesh model",
            config_generation.clone(),
        );
        // Every result label exists from the start so rate() works before the first event.
        for result in CA_RESULTS {
            let _ = ca_requests.get_or_create(&ResultLabel { result });
        }
        Self {
            registry,
            ca_requests,
            config_objects,
            config_files,
            config_files_refused,
            config_conflicts,
            config_generation,
        }
    }
}

/// The values of the `result` label of `ambit_ca_requests_total`.
pub const CA_RESULTS: [&str; 5] = [
    "issued",
    "unauthenticated",
    "permission_denied",
    "invalid_argument",
    "internal",
];

impl Metrics {
    pub fn ca_request(&self, result: &'static str) {
        self.ca_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Refreshes the configuration gauges from the latest model and source status.
    pub fn observe_config(&self, model: &Model, status: &SourceStatus) {
        let counts = model.counts();
        for kind in crate::model::Kind::ALL {
            self.config_objects
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .set(counts.get(&kind).copied().unwrap_or(0) as i64);
        }
        self.config_files.set(status.files as i64);
        self.config_files_refused
            .set(status.file_errors.len() as i64);
        self.config_conflicts.set(status.conflicts.len() as i64);
        self.config_generation.set(model.generation as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
