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
    /// Times the manifest folder was read (after a change, or the 10 s safety net).
    pub config_rescans: Counter,
    pub xds_subscribers: Gauge,
    pub xds_pushes: Family<TypeLabel, Counter>,
    pub xds_resources_sent: Family<TypeLabel, Counter>,
    pub xds_nacks: Family<TypeLabel, Counter>,
    pub xds_generation: Gauge,
    pub xds_resources: Family<TypeLabel, Gauge>,
    /// AuthorizationPolicies no node proxy enforces (waypoint-bound or CUSTOM).
    pub policies_unenforced: Gauge,
    /// 1 while a component is failing (`manifests`, `translation`).
    pub failing: Family<ComponentLabel, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
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
        let config_rescans = Counter::default();
        registry.register(
            "config_rescans",
            "Times the manifest folder was read: after a change on disk, and every 10 s as a safety net",
            config_rescans.clone(),
        );
        let xds_subscribers = Gauge::default();
        registry.register(
            "xds_subscribers",
            "Node proxies connected to discovery",
            xds_subscribers.clone(),
        );
        let xds_pushes = Family::<TypeLabel, Counter>::default();
        registry.register(
            "xds_pushes",
            "Discovery pushes sent, by resource type",
            xds_pushes.clone(),
        );
        let xds_resources_sent = Family::<TypeLabel, Counter>::default();
        registry.register(
            "xds_resources_sent",
            "Discovery resources sent, by type",
            xds_resources_sent.clone(),
        );
        let xds_nacks = Family::<TypeLabel, Counter>::default();
        registry.register(
            "xds_nacks",
            "Discovery responses a node proxy rejected, by type",
            xds_nacks.clone(),
        );
        let xds_generation = Gauge::default();
        registry.register(
            "xds_generation",
            "Generation of the current discovery snapshot",
            xds_generation.clone(),
        );
        let xds_resources = Family::<TypeLabel, Gauge>::default();
        registry.register(
            "xds_resources",
            "Discovery resources in the current snapshot, by type",
            xds_resources.clone(),
        );
        let policies_unenforced = Gauge::default();
        registry.register(
            "policies_unenforced",
            "AuthorizationPolicies no node proxy enforces: bound to a waypoint by targetRefs, or action CUSTOM with a selector (only waypoints call external authorizers)",
            policies_unenforced.clone(),
        );
        let failing = Family::<ComponentLabel, Gauge>::default();
        registry.register(
            "failing",
            "1 while a control-plane component is failing (it panicked and is retrying; the last good state stays in force): manifests, translation",
            failing.clone(),
        );
        for component in ["manifests", "translation"] {
            let _ = failing.get_or_create(&ComponentLabel { component });
        }
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
            config_rescans,
            xds_subscribers,
            xds_pushes,
            xds_resources_sent,
            xds_nacks,
            xds_generation,
            xds_resources,
            policies_unenforced,
            failing,
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

    pub fn xds_push(&self, kind: &'static str, resources: u64) {
        self.xds_pushes
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
        self.xds_resources_sent
            .get_or_create(&TypeLabel { r#type: kind })
            .inc_by(resources);
    }

    pub fn xds_nack(&self, kind: &'static str) {
        self.xds_nacks
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    /// Refreshes the discovery gauges from a snapshot.
    pub fn observe_snapshot(&self, snapshot: &crate::xds::snapshot::Snapshot) {
        use crate::xds::translate::ResourceType;
        self.xds_generation.set(snapshot.generation as i64);
        self.policies_unenforced
            .set(crate::xds::translate::unenforced_count(&snapshot.warnings) as i64);
        self.failing
            .get_or_create(&ComponentLabel {
                component: "translation",
            })
            .set(i64::from(snapshot.failing.is_some()));
        for (t, kind) in [
            (ResourceType::Address, "Address"),
            (ResourceType::Authorization, "Authorization"),
        ] {
            self.xds_resources
                .get_or_create(&TypeLabel { r#type: kind })
                .set(snapshot.resources(t).len() as i64);
        }
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
        let counted = self.config_rescans.get();
        if status.rescans > counted {
            self.config_rescans.inc_by(status.rescans - counted);
        }
        self.failing
            .get_or_create(&ComponentLabel {
                component: "manifests",
            })
            .set(i64::from(status.failing.is_some()));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
