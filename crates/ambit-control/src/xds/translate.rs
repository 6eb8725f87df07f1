//! From the model (Kubernetes-style objects) to discovery resources (Istio's
//! `istio.workload.Address` and `istio.security.Authorization`), encoded once.
//!
//! - Every running pod with an IP becomes a `Workload` named `<cluster>//Pod/<ns>/<name>`:
//!   tunnel protocol HBONE when the pod or its namespace carries
//!   `istio.io/dataplane-mode=ambient` (a pod label `none` opts out; host-network pods are
//!   never enrolled), NONE otherwise, so traffic to it stays plain.
//! - Every Service becomes a `Service` named `<ns>/<hostname>`.
//! - Every AuthorizationPolicy for the node proxy (selector, namespace-wide or mesh-wide;
//!   not `targetRefs`, which bind it to a waypoint) becomes an `Authorization` named
//!   `<ns>/<name>`. Fields that need L7 (methods, paths, hosts, request principals,
//!   headers) cannot be checked at L4: as in Istio, an ALLOW rule using them matches
//!   nothing, a DENY rule keeps its other conditions (so it denies at least as much as
//!   written), and a warning says so. AUDIT and dry-run policies travel in Ambit's
//!   log-only extension (see `authorization.proto`); CUSTOM is not supported (warning).
//! - Every PeerAuthentication that decides some workload's mTLS mode becomes a DENY of
//!   plaintext on the STRICT ports ([`super::peer_authn`]).
//!
//! [`Translator`] keeps the last result and, given the model's changes, re-translates only
//! the resources those changes can affect.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ambit_core::discovery::Str;
use ambit_proto::prost::Message;
use ambit_proto::security as pb_sec;
use ambit_proto::workload as pb;
use imbl::OrdMap;

use super::peer_authn;

pub mod routes;
pub mod traffic;
pub mod waypoint_policy;

use crate::model::fields::{IntOrString, Labels};
use crate::model::resources::ObjectMeta;
use crate::model::resources::{Condition, Operation, Protocol, Rule as ApRule, Source};
use crate::model::{
    AuthorizationAction, AuthorizationPolicy, Change, EndpointSlice, Kind, Model, Object,
    ObjectRef, Pod, PodPhase, Service, ServiceType,
};

/// The label that enrolls a namespace or pod.
pub use ambit_core::enrollment::DATAPLANE_MODE_LABEL;
/// How the warnings of HTTPRoutes are keyed (policies' are `<ns>/<name>`).
pub const ROUTE_WARNING_PREFIX: &str = "HTTPRoute ";
/// How the warnings of GRPCRoutes are keyed.
pub const GRPC_ROUTE_WARNING_PREFIX: &str = "GRPCRoute ";
/// How the warnings of VirtualServices are keyed.
pub const VS_WARNING_PREFIX: &str = "VirtualService ";
/// How the warnings of DestinationRules are keyed.
pub const DR_WARNING_PREFIX: &str = "DestinationRule ";
/// How the warnings of LocalRateLimits are keyed.
pub const RL_WARNING_PREFIX: &str = "LocalRateLimit ";
/// How the warnings of RequestAuthentications are keyed.
pub const RA_WARNING_PREFIX: &str = "RequestAuthentication ";
/// Whether waypoints apply the routes they are sent.
pub const ROUTES_APPLIED: bool = true;
/// What an HTTPRoute does today.
pub const ROUTE_NOT_ENFORCED: &str = "Ambit does not route by HTTPRoute yet; requests to its parents go to them as if the route did not exist";

/// The annotation (on a pod or its namespace; the pod's wins) that turns on request
/// metrics at the node proxy: `enabled` or `disabled`.
pub const L7_METRICS_ANNOTATION: &str = "ambit.io/l7-metrics";

/// Whether a pod's node proxy records request metrics for it.
fn l7_metrics(model: &Model, pod: &Pod) -> bool {
    let own = pod.metadata.annotations.get(L7_METRICS_ANNOTATION);
    let ns = model.namespace(pod.metadata.namespace()).and_then(|n| {
        n.metadata
            .annotations
            .get(L7_METRICS_ANNOTATION)
            .map(str::to_owned)
    });
    own.or(ns.as_deref()) == Some("enabled")
}

/// The annotation that makes a policy log-only.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Settings that shape the translation.
#[derive(Debug, Clone)]
pub struct TranslateOptions {
    pub trust_domain: String,
    /// Istio's cluster ID; part of every workload uid.
    pub cluster_id: String,
    /// Service hostnames are `<name>.<namespace>.svc.<domain_suffix>`.
    pub domain_suffix: String,
    /// Policies here without a selector apply mesh-wide.
    pub root_namespace: String,
    /// Key sets fetched for RequestAuthentication `jwksUri`.
    pub jwks: crate::jwks::JwksCache,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            trust_domain: ambit_core::DEFAULT_TRUST_DOMAIN.to_owned(),
            cluster_id: "Kubernetes".to_owned(),
            domain_suffix: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
            jwks: Default::default(),
        }
    }
}

/// Which discovery type a resource belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Address,
    Authorization,
    /// Ambit's own: AuthorizationPolicies bound to waypoints (only waypoints ask).
    WaypointPolicy,
    /// Ambit's own: HTTPRoutes for waypoints (only waypoints ask).
    WaypointRoute,
    /// Ambit's own: DestinationRules and LocalRateLimits for waypoints.
    WaypointTraffic,
}

/// How many discovery types there are.
pub const TYPES: usize = 5;

impl ResourceType {
    pub const ALL: [ResourceType; TYPES] = [
        ResourceType::Address,
        ResourceType::Authorization,
        ResourceType::WaypointPolicy,
        ResourceType::WaypointRoute,
        ResourceType::WaypointTraffic,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Address => pb::ADDRESS_TYPE_URL,
            ResourceType::Authorization => pb_sec::AUTHORIZATION_TYPE_URL,
            ResourceType::WaypointPolicy => ambit_proto::waypoint::POLICY_TYPE_URL,
            ResourceType::WaypointRoute => ambit_proto::waypoint::ROUTE_TYPE_URL,
            ResourceType::WaypointTraffic => ambit_proto::waypoint::TRAFFIC_TYPE_URL,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One encoded resource. The version is a digest of the bytes, so it is the same for the
/// same content across restarts of the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub version: String,
    pub body: Arc<[u8]>,
}

impl Encoded {
    fn of(message: &impl Message) -> Self {
        let body = message.encode_to_vec();
        let digest = ambit_core::crypto::sha256(&body);
        let version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            version,
            body: body.into(),
        }
    }
}

/// What a translation changed, per type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub changed: [BTreeSet<String>; TYPES],
    pub removed: [BTreeSet<String>; TYPES],
}

impl Delta {
    /// Adds what `later` changed and removed after this delta.
    pub fn merge(&mut self, later: Delta) {
        for i in 0..TYPES {
            for n in later.changed[i].iter() {
                self.removed[i].remove(n);
            }
            for n in later.removed[i].iter() {
                self.changed[i].remove(n);
            }
            self.changed[i].extend(later.changed[i].iter().cloned());
            self.removed[i].extend(later.removed[i].iter().cloned());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changed.iter().all(BTreeSet::is_empty) && self.removed.iter().all(BTreeSet::is_empty)
    }
}

/// The unit of (re)translation: the object a resource comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Unit {
    Pod(String, String),
    Service(String, String),
    Policy(String, String),
    PeerAuthn(String, String),
    /// The L4 policy a waypoint's Gateway asks for with [`WAYPOINT_ONLY_ANNOTATION`].
    WaypointOnly(String, String),
    /// One workload per endpoint address of a Service without a selector.
    EndpointSlice(String, String),
    /// An HTTPRoute for waypoints.
    Route(String, String),
    /// A GRPCRoute for waypoints.
    GrpcRoute(String, String),
    /// A VirtualService for waypoints.
    VirtualService(String, String),
    /// A DestinationRule for waypoints.
    DestinationRule(String, String),
    /// A LocalRateLimit for waypoints.
    RateLimit(String, String),
    /// A RequestAuthentication for waypoints.
    RequestAuthn(String, String),
}

/// Incremental translator.
#[derive(Debug)]
pub struct Translator {
    options: TranslateOptions,
    /// Resource name -> its encoding, per type. Persistent maps: a snapshot of them is a
    /// cheap clone.
    resources: [OrdMap<Str, Arc<Encoded>>; TYPES],
    /// Which resources each unit produced (so their removal or rename can be undone).
    produced: BTreeMap<Unit, Vec<(ResourceType, String)>>,
    /// Warnings from the last translation of each policy.
    warnings: BTreeMap<String, Vec<String>>,
    /// Policies published with an `ambit.io/*` extension (AUDIT, not enforced): only
    /// Ambit's node proxies are sent them.
    ambit_only: BTreeSet<String>,
}

impl Translator {
    pub fn new(options: TranslateOptions) -> Self {
        Self {
            options,
            resources: Default::default(),
            produced: BTreeMap::new(),
            warnings: BTreeMap::new(),
            ambit_only: BTreeSet::new(),
        }
    }

    pub fn resources(&self, t: ResourceType) -> &OrdMap<Str, Arc<Encoded>> {
        &self.resources[t.index()]
    }

    /// Policy translation warnings, by `<ns>/<name>`.
    /// Policy resources only Ambit's node proxies understand (see the field).
    pub fn ambit_only(&self) -> &BTreeSet<String> {
        &self.ambit_only
    }

    pub fn warnings(&self) -> &BTreeMap<String, Vec<String>> {
        &self.warnings
    }

    /// Translates everything (the first model).
    pub fn full(&mut self, model: &Model) -> Delta {
        #[cfg(test)]
        if model.namespace("panic-now").is_some() {
            panic!("injected by the test");
        }
        let mut units = BTreeSet::new();
        for object in model.objects() {
            units.extend(units_of(object));
        }
        // Units that produced something before but may no longer exist.
        units.extend(self.produced.keys().cloned());
        self.retranslate(model, units)
    }

    /// Re-translates every RequestAuthentication (the key sets they name by URI were
    /// fetched or changed).
    pub fn refresh_authentications(&mut self, model: &Model) -> Delta {
        let units = model
            .of_kind(Kind::RequestAuthentication)
            .map(|o| {
                let k = o.key();
                Unit::RequestAuthn(k.namespace, k.name)
            })
            .collect();
        self.retranslate(model, units)
    }

    /// Re-translates what `changes` can affect.
    pub fn apply(&mut self, model: &Model, old: &Model, changes: &[Change]) -> Delta {
        // Fault injection for the recovery test: a namespace of this name makes the
        // translator panic.
        #[cfg(test)]
        if model.namespace("panic-now").is_some() {
            panic!("injected by the test");
        }
        let mut units = BTreeSet::new();
        for change in changes {
            let key = match change {
                Change::Added(k) | Change::Updated(k) | Change::Removed(k) => k,
            };
            self.affected(model, old, key, &mut units);
        }
        self.retranslate(model, units)
    }

    /// Units whose translation may depend on object `key` (in either model version).
    fn affected(&self, model: &Model, old: &Model, key: &ObjectRef, out: &mut BTreeSet<Unit>) {
        // Routes resolve Services (parents, backends) and their waypoints (namespace
        // labels, Gateways): they are few, so any such change looks at all of them.
        if matches!(
            key.kind,
            Kind::Service | Kind::Namespace | Kind::Gateway | Kind::HTTPRoute | Kind::GRPCRoute
        ) {
            // A VirtualService is refused where a route already routes its host.
            for m in [model, old] {
                for o in m.of_kind(Kind::VirtualService) {
                    let k = o.key();
                    out.insert(Unit::VirtualService(k.namespace, k.name));
                }
            }
        }
        // Traffic policies resolve Services and their waypoints too; DestinationRules
        // also each other (the oldest for a host applies).
        if matches!(
            key.kind,
            Kind::Service | Kind::Namespace | Kind::Gateway | Kind::DestinationRule
        ) {
            for m in [model, old] {
                for o in m.of_kind(Kind::DestinationRule) {
                    let k = o.key();
                    out.insert(Unit::DestinationRule(k.namespace, k.name));
                }
                for o in m.of_kind(Kind::LocalRateLimit) {
                    let k = o.key();
                    out.insert(Unit::RateLimit(k.namespace, k.name));
                }
                for o in m.of_kind(Kind::RequestAuthentication) {
                    let k = o.key();
                    out.insert(Unit::RequestAuthn(k.namespace, k.name));
                }
            }
        }
        if matches!(
            key.kind,
            Kind::Service | Kind::Namespace | Kind::Gateway | Kind::ReferenceGrant
        ) {
            for m in [model, old] {
                for o in m.of_kind(Kind::HTTPRoute) {
                    let k = o.key();
                    out.insert(Unit::Route(k.namespace, k.name));
                }
                for o in m.of_kind(Kind::GRPCRoute) {
                    let k = o.key();
                    out.insert(Unit::GrpcRoute(k.namespace, k.name));
                }
            }
        }
        // CUSTOM policies resolve the mesh config's providers and their Services, in any
        // namespace.
        if matches!(key.kind, Kind::ConfigMap | Kind::Service) {
            for m in [model, old] {
                for o in m.of_kind(Kind::AuthorizationPolicy) {
                    if let Object::AuthorizationPolicy(p) = o
                        && p.spec.action == Some(AuthorizationAction::Custom)
                    {
                        let k = o.key();
                        out.insert(Unit::Policy(k.namespace, k.name));
                    }
                }
            }
        }
        let ns = key.namespace.clone();
        let name = key.name.clone();
        let pods_in = |m: &Model, ns: &str, out: &mut BTreeSet<Unit>| {
            for o in m.in_namespace(Kind::Pod, ns) {
                let k = o.key();
                out.insert(Unit::Pod(k.namespace, k.name));
            }
        };
        match key.kind {
            Kind::Pod => {
                // Subsets list the pods their labels select.
                for m in [model, old] {
                    for o in m.of_kind(Kind::DestinationRule) {
                        if let Object::DestinationRule(d) = o
                            && !d.spec.subsets.is_empty()
                        {
                            let k = o.key();
                            out.insert(Unit::DestinationRule(k.namespace, k.name));
                        }
                    }
                }
                out.insert(Unit::Pod(ns, name));
            }
            // A service's selection and ports appear in its pods' workloads.
            Kind::Service => {
                out.insert(Unit::Service(ns.clone(), name.clone()));
                pods_in(model, &ns, out);
                pods_in(old, &ns, out);
                // Its selector and ports decide its slices' workloads.
                for m in [model, old] {
                    for o in m.in_namespace(Kind::EndpointSlice, &ns) {
                        if let Object::EndpointSlice(slice) = o
                            && slice.service() == Some(name.as_str())
                        {
                            let k = o.key();
                            out.insert(Unit::EndpointSlice(k.namespace, k.name));
                        }
                    }
                }
                // Whether a waypoint serves the service decides its policies' warnings.
                targeted_policies_in(model, Some(&ns), out);
                targeted_policies_in(old, Some(&ns), out);
            }
            // Enrollment and waypoint bindings come from the namespace's labels.
            Kind::Namespace => {
                pods_in(model, &name, out);
                pods_in(old, &name, out);
                for m in [model, old] {
                    for o in m.in_namespace(Kind::Service, &name) {
                        let k = o.key();
                        out.insert(Unit::Service(k.namespace, k.name));
                    }
                    targeted_policies_in(m, Some(&name), out);
                }
            }
            // What a waypoint takes (its Gateway's labels) decides who binds to it, from
            // any namespace: rare, so everything is looked at again.
            Kind::Gateway => {
                out.insert(Unit::WaypointOnly(ns.clone(), name.clone()));
                for m in [model, old] {
                    targeted_policies_in(m, None, out);
                    for o in m.of_kind(Kind::Pod).chain(m.of_kind(Kind::Service)) {
                        let k = o.key();
                        out.insert(match o {
                            Object::Service(_) => Unit::Service(k.namespace, k.name),
                            _ => Unit::Pod(k.namespace, k.name),
                        });
                    }
                }
            }
            // Locality comes from the node's labels.
            Kind::Node => {
                for m in [model, old] {
                    for pod in m.pods_on_node(&name) {
                        out.insert(Unit::Pod(
                            pod.metadata.namespace().to_owned(),
                            pod.metadata.name.as_str().to_owned(),
                        ));
                    }
                }
            }
            // Selector-based policies are listed on the workloads they select.
            Kind::AuthorizationPolicy => {
                out.insert(Unit::Policy(ns.clone(), name));
                pods_in(model, &ns, out);
                pods_in(old, &ns, out);
            }
            // A PeerAuthentication can change which converted policy the workloads of its
            // namespace list and what the selector ones there say; a mesh-wide one, of
            // every namespace.
            Kind::PeerAuthentication => {
                out.insert(Unit::PeerAuthn(ns.clone(), name));
                let everywhere = ns == self.options.root_namespace;
                for m in [model, old] {
                    let pas: Vec<&Object> = if everywhere {
                        m.of_kind(Kind::PeerAuthentication).collect()
                    } else {
                        m.in_namespace(Kind::PeerAuthentication, &ns).collect()
                    };
                    for o in pas {
                        let k = o.key();
                        out.insert(Unit::PeerAuthn(k.namespace, k.name));
                    }
                    if everywhere {
                        for pod in m.pods() {
                            out.insert(Unit::Pod(
                                pod.metadata.namespace().to_owned(),
                                pod.metadata.name.as_str().to_owned(),
                            ));
                        }
                    } else {
                        pods_in(m, &ns, out);
                    }
                }
            }
            // A slice makes workloads, and whether its Service has any endpoints.
            Kind::EndpointSlice => {
                out.insert(Unit::EndpointSlice(ns.clone(), name.clone()));
                for m in [model, old] {
                    if let Some(Object::EndpointSlice(slice)) =
                        m.lookup(Kind::EndpointSlice, &ns, &name)
                        && let Some(svc) = slice.service()
                    {
                        out.insert(Unit::Service(ns.clone(), svc.to_owned()));
                    }
                }
            }
            Kind::HTTPRoute => {
                out.insert(Unit::Route(ns, name));
            }
            Kind::GRPCRoute => {
                out.insert(Unit::GrpcRoute(ns, name));
            }
            Kind::VirtualService => {
                out.insert(Unit::VirtualService(ns, name));
            }
            Kind::DestinationRule => {
                out.insert(Unit::DestinationRule(ns, name));
            }
            Kind::LocalRateLimit => {
                out.insert(Unit::RateLimit(ns, name));
            }
            Kind::RequestAuthentication => {
                out.insert(Unit::RequestAuthn(ns, name));
            }
            // The mesh config: CUSTOM policies are looked at above.
            Kind::ConfigMap => {}
            // Routes are looked at above.
            Kind::ReferenceGrant => {}
            Kind::ServiceAccount | Kind::ServiceEntry | Kind::WorkloadEntry => {}
        }
    }

    fn retranslate(&mut self, model: &Model, units: BTreeSet<Unit>) -> Delta {
        let mut delta = Delta::default();
        for unit in units {
            let produced = self.translate_unit(model, &unit);
            let previous = self.produced.remove(&unit).unwrap_or_default();
            for (t, old_name) in previous {
                if !produced.iter().any(|(nt, n, _)| (*nt, n) == (t, &old_name)) {
                    self.resources[t.index()].remove(old_name.as_str());
                    delta.removed[t.index()].insert(old_name);
                }
            }
            let mut names = Vec::with_capacity(produced.len());
            for (nt, new_name, enc) in produced {
                self.put(nt, new_name.clone(), enc, &mut delta);
                names.push((nt, new_name));
            }
            if !names.is_empty() {
                self.produced.insert(unit, names);
            }
        }
        // A name both removed and re-added within one batch is a change, not a removal.
        for t in ResourceType::ALL {
            let i = t.index();
            let readded: Vec<String> = delta.removed[i]
                .iter()
                .filter(|n| self.resources[i].contains_key(n.as_str()))
                .cloned()
                .collect();
            for n in readded {
                delta.removed[i].remove(&n);
                delta.changed[i].insert(n);
            }
        }
        delta
    }

    fn put(&mut self, t: ResourceType, name: String, enc: Encoded, delta: &mut Delta) {
        let map = &mut self.resources[t.index()];
        if map.get(name.as_str()).map(|e| e.as_ref()) != Some(&enc) {
            map.insert(Str::from(name.as_str()), Arc::new(enc));
            delta.changed[t.index()].insert(name);
        }
    }

    fn translate_unit(
        &mut self,
        model: &Model,
        unit: &Unit,
    ) -> Vec<(ResourceType, String, Encoded)> {
        if let Unit::EndpointSlice(ns, name) = unit {
            return match model.lookup(Kind::EndpointSlice, ns, name) {
                Some(Object::EndpointSlice(slice)) => translate_slice(model, slice, &self.options)
                    .into_iter()
                    .map(|w| {
                        let name = w.uid.clone();
                        let address = pb::Address {
                            r#type: Some(pb::address::Type::Workload(w)),
                        };
                        (ResourceType::Address, name, Encoded::of(&address))
                    })
                    .collect(),
                _ => Vec::new(),
            };
        }
        self.translate_one(model, unit).into_iter().collect()
    }

    fn translate_one(
        &mut self,
        model: &Model,
        unit: &Unit,
    ) -> Option<(ResourceType, String, Encoded)> {
        match unit {
            // Several resources: [`Translator::translate_unit`].
            Unit::EndpointSlice(..) => None,
            Unit::DestinationRule(ns, name)
            | Unit::RateLimit(ns, name)
            | Unit::RequestAuthn(ns, name) => {
                let (prefix, kind) = match unit {
                    Unit::RateLimit(..) => (RL_WARNING_PREFIX, Kind::LocalRateLimit),
                    Unit::RequestAuthn(..) => (RA_WARNING_PREFIX, Kind::RequestAuthentication),
                    _ => (DR_WARNING_PREFIX, Kind::DestinationRule),
                };
                let key = format!("{prefix}{ns}/{name}");
                let (policy, warnings) = match model.lookup(kind, ns, name) {
                    Some(Object::DestinationRule(d)) => {
                        traffic::translate_dr(model, d, &self.options)
                    }
                    Some(Object::LocalRateLimit(r)) => {
                        traffic::translate_rl(model, r, &self.options)
                    }
                    Some(Object::RequestAuthentication(r)) => {
                        traffic::translate_ra(model, r, &self.options)
                    }
                    _ => {
                        self.warnings.remove(&key);
                        return None;
                    }
                };
                for w in &warnings {
                    tracing::warn!(resource = %key, warning = %w, "traffic policy");
                }
                if warnings.is_empty() {
                    self.warnings.remove(&key);
                } else {
                    self.warnings.insert(key, warnings);
                }
                let policy = policy?;
                Some((
                    ResourceType::WaypointTraffic,
                    format!("{ns}/{}", policy.name),
                    Encoded::of(&policy),
                ))
            }
            Unit::Route(ns, name) | Unit::GrpcRoute(ns, name) | Unit::VirtualService(ns, name) => {
                let (prefix, kind) = match unit {
                    Unit::GrpcRoute(..) => (GRPC_ROUTE_WARNING_PREFIX, Kind::GRPCRoute),
                    Unit::VirtualService(..) => (VS_WARNING_PREFIX, Kind::VirtualService),
                    _ => (ROUTE_WARNING_PREFIX, Kind::HTTPRoute),
                };
                let key = format!("{prefix}{ns}/{name}");
                let translated = match model.lookup(kind, ns, name) {
                    Some(Object::HttpRoute(r)) => routes::translate(model, r, &self.options),
                    Some(Object::GrpcRoute(r)) => routes::translate_grpc(model, r, &self.options),
                    Some(Object::VirtualService(r)) => {
                        routes::translate_vs(model, r, &self.options)
                    }
                    _ => {
                        self.warnings.remove(&key);
                        return None;
                    }
                };
                let (route, mut warnings) = translated;
                if !ROUTES_APPLIED {
                    warnings.insert(0, format!("NOT ENFORCED: {ROUTE_NOT_ENFORCED}"));
                }
                for w in &warnings {
                    tracing::warn!(route = %format!("{prefix}{ns}/{name}"), warning = %w, "route");
                }
                if warnings.is_empty() {
                    self.warnings.remove(&key);
                } else {
                    self.warnings.insert(key, warnings);
                }
                let route = route?;
                Some((
                    ResourceType::WaypointRoute,
                    format!("{ns}/{}", route.name),
                    Encoded::of(&route),
                ))
            }
            Unit::Pod(ns, name) => {
                let Some(Object::Pod(pod)) = model.lookup(Kind::Pod, ns, name) else {
                    return None;
                };
                let w = translate_pod(model, pod, &self.options)?;
                let name = w.uid.clone();
                let address = pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                };
                Some((ResourceType::Address, name, Encoded::of(&address)))
            }
            Unit::Service(ns, name) => {
                let Some(Object::Service(svc)) = model.lookup(Kind::Service, ns, name) else {
                    return None;
                };
                let s = translate_service(model, svc, &self.options);
                if !has_endpoint_source(model, svc) && s.waypoint.is_none() {
                    // Its endpoints are not pods (the API server's `kubernetes` Service,
                    // EndpointSlices written by hand), which the mesh does not model:
                    // published without endpoints, every connection to it would be
                    // refused. Left out, the node proxy passes it to its original
                    // destination, as without a mesh.
                    return None;
                }
                let name = format!("{}/{}", s.namespace, s.hostname);
                let address = pb::Address {
                    r#type: Some(pb::address::Type::Service(s)),
                };
                Some((ResourceType::Address, name, Encoded::of(&address)))
            }
            Unit::Policy(ns, name) => {
                let key = format!("{ns}/{name}");
                let Some(Object::AuthorizationPolicy(p)) =
                    model.lookup(Kind::AuthorizationPolicy, ns, name)
                else {
                    self.warnings.remove(&key);
                    self.ambit_only.remove(&key);
                    return None;
                };
                if waypoint_policy::is_waypoint_policy(p) {
                    self.ambit_only.remove(&key);
                    let (policy, warnings) = waypoint_policy::translate(model, p, &self.options);
                    if warnings.is_empty() {
                        self.warnings.remove(&key);
                    } else {
                        for w in &warnings {
                            tracing::warn!(policy = %key, warning = %w, "AuthorizationPolicy for a waypoint");
                        }
                        self.warnings.insert(key.clone(), warnings);
                    }
                    let policy = policy?;
                    return Some((ResourceType::WaypointPolicy, key, Encoded::of(&policy)));
                }
                let (auth, warnings) = translate_policy(p, &self.options);
                if warnings.is_empty() {
                    self.warnings.remove(&key);
                } else {
                    for w in &warnings {
                        if w.starts_with("NOT ENFORCED") {
                            tracing::warn!(policy = %key, warning = %w, "AuthorizationPolicy is not enforced");
                        } else {
                            tracing::warn!(policy = %key, warning = %w, "AuthorizationPolicy is enforced differently at L4");
                        }
                    }
                    self.warnings.insert(key.clone(), warnings);
                }
                let Some(auth) = auth else {
                    self.ambit_only.remove(&key);
                    return None;
                };
                if auth.extensions.is_empty() {
                    self.ambit_only.remove(&key);
                } else {
                    self.ambit_only.insert(key.clone());
                }
                Some((ResourceType::Authorization, key, Encoded::of(&auth)))
            }
            Unit::WaypointOnly(ns, name) => {
                let Some(Object::Gateway(g)) = model.lookup(Kind::Gateway, ns, name) else {
                    return None;
                };
                let auth = waypoint_only_policy(g, &self.options)?;
                let key = format!("{}/{}", auth.namespace, auth.name);
                Some((ResourceType::Authorization, key, Encoded::of(&auth)))
            }
            Unit::PeerAuthn(ns, name) => {
                let warn_key = format!("PeerAuthentication {ns}/{name}");
                let Some(Object::PeerAuthentication(pa)) =
                    model.lookup(Kind::PeerAuthentication, ns, name)
                else {
                    self.warnings.remove(&warn_key);
                    return None;
                };
                let (auth, warnings) =
                    peer_authn::converted(model, pa, &self.options.root_namespace);
                if warnings.is_empty() {
                    self.warnings.remove(&warn_key);
                } else {
                    for w in &warnings {
                        tracing::warn!(policy = %warn_key, warning = %w, "PeerAuthentication is enforced differently");
                    }
                    self.warnings.insert(warn_key, warnings);
                }
                let auth = auth?;
                let key = format!("{}/{}", auth.namespace, auth.name);
                Some((ResourceType::Authorization, key, Encoded::of(&auth)))
            }
        }
    }
}

/// Adds the AuthorizationPolicies with `targetRefs` (of `namespace`, or everywhere).
fn targeted_policies_in(model: &Model, namespace: Option<&str>, out: &mut BTreeSet<Unit>) {
    let policies: Vec<&Object> = match namespace {
        Some(ns) => model.in_namespace(Kind::AuthorizationPolicy, ns).collect(),
        None => model.of_kind(Kind::AuthorizationPolicy).collect(),
    };
    for o in policies {
        if let Object::AuthorizationPolicy(p) = o
            && waypoint_policy::is_waypoint_policy(p)
        {
            let k = o.key();
            out.insert(Unit::Policy(k.namespace, k.name));
        }
    }
}

fn units_of(object: &Object) -> Option<Unit> {
    let k = object.key();
    match k.kind {
        Kind::Pod => Some(Unit::Pod(k.namespace, k.name)),
        Kind::Service => Some(Unit::Service(k.namespace, k.name)),
        Kind::AuthorizationPolicy => Some(Unit::Policy(k.namespace, k.name)),
        Kind::PeerAuthentication => Some(Unit::PeerAuthn(k.namespace, k.name)),
        Kind::Gateway => Some(Unit::WaypointOnly(k.namespace, k.name)),
        Kind::EndpointSlice => Some(Unit::EndpointSlice(k.namespace, k.name)),
        Kind::HTTPRoute => Some(Unit::Route(k.namespace, k.name)),
        Kind::GRPCRoute => Some(Unit::GrpcRoute(k.namespace, k.name)),
        Kind::VirtualService => Some(Unit::VirtualService(k.namespace, k.name)),
        Kind::DestinationRule => Some(Unit::DestinationRule(k.namespace, k.name)),
        Kind::LocalRateLimit => Some(Unit::RateLimit(k.namespace, k.name)),
        Kind::RequestAuthentication => Some(Unit::RequestAuthn(k.namespace, k.name)),
        _ => None,
    }
}

/// Whether a pod is in the mesh: its own label, else its namespace's.
pub fn is_enrolled(model: &Model, pod: &Pod) -> bool {
    let namespace = model
        .namespace(pod.metadata.namespace())
        .and_then(|ns| ns.metadata.labels.get(DATAPLANE_MODE_LABEL));
    ambit_core::enrollment::is_enrolled(
        pod.metadata.labels.get(DATAPLANE_MODE_LABEL),
        namespace,
        pod.spec.host_network,
    )
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn first_label(labels: &Labels, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| labels.get(k).filter(|v| !v.is_empty()))
        .map(str::to_owned)
}

fn service_hostname(svc: &Service, o: &TranslateOptions) -> String {
    format!(
        "{}.{}.svc.{}",
        svc.metadata.name,
        svc.metadata.namespace(),
        o.domain_suffix
    )
}

/// Traffic a waypoint takes (`istio.io/waypoint-for` on its Gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
}

/// The label that binds an object (or every object of a namespace) to a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Next to it: the waypoint's namespace, when not the object's own.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint's Gateway: what traffic it takes (`service`, the default, `workload`,
/// `all`, `none`).
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";

/// The waypoint `object` is bound to, as Istio's control plane publishes it
/// (`hostname { namespace, hostname }` of the waypoint's Service, HBONE port 15008).
///
/// The object's own `istio.io/use-waypoint` label wins over its namespace's (`none`
/// opts out). The binding holds if the waypoint takes this kind of traffic: a Service
/// binds unless the waypoint's Gateway says otherwise (`service` is the default), a
/// workload only if the Gateway says `workload` or `all`. It is published whether or not
/// the waypoint runs: the node proxies refuse traffic they cannot send through it, so
/// naming a waypoint never leaves a way around it. Waypoints themselves never get one.
pub fn waypoint(
    model: &Model,
    object: &ObjectMeta,
    traffic: WaypointFor,
    o: &TranslateOptions,
) -> Option<pb::GatewayAddress> {
    if is_waypoint(&object.labels) {
        return None;
    }
    let own_ns = object.namespace();
    let ns_labels = model.namespace(own_ns).map(|n| &n.metadata.labels);
    let (labels, home) = match object.labels.get(USE_WAYPOINT) {
        Some(_) => (&object.labels, own_ns),
        None => (ns_labels?, own_ns),
    };
    let name = labels.get(USE_WAYPOINT)?;
    if name == "none" || name.is_empty() {
        return None;
    }
    let ns = labels.get(USE_WAYPOINT_NAMESPACE).unwrap_or(home);
    let takes = match model.lookup(Kind::Gateway, ns, name) {
        Some(Object::Gateway(gw)) => gw
            .metadata
            .labels
            .get(WAYPOINT_FOR)
            .unwrap_or("service")
            .to_owned(),
        _ => "service".to_owned(),
    };
    let bound = matches!(
        (traffic, takes.as_str()),
        (_, "all") | (WaypointFor::Service, "service") | (WaypointFor::Workload, "workload")
    );
    bound.then(|| pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: ns.to_owned(),
                hostname: format!("{name}.{ns}.svc.{}", o.domain_suffix),
            },
        )),
        hbone_mtls_port: 15008,
    })
}

/// On a waypoint's Gateway: `"true"` makes the pods behind the services (and the
/// workloads) bound to it accept connections from the waypoint only, so nothing reaches
/// them around it (Istio's documented pattern, made one line, and as a DENY of every
/// other caller so that no ALLOW reopens it).
pub const WAYPOINT_ONLY_ANNOTATION: &str = "ambit.io/waypoint-only";

/// The name of the L4 policy [`WAYPOINT_ONLY_ANNOTATION`] makes for waypoint `name`.
fn waypoint_only_name(name: &str) -> String {
    format!("ambit-waypoint-only-{name}")
}

/// The L4 policy a waypoint-only Gateway gives its bound pods: a DENY of every
/// connection not from the waypoint's identity (plaintext included), so no ALLOW on the
/// pods can open a way around it (selector-scoped: only pods that list it, see
/// [`translate_pod`]).
fn waypoint_only_policy(
    g: &crate::model::resources::Gateway,
    o: &TranslateOptions,
) -> Option<pb_sec::Authorization> {
    if g.spec.gateway_class_name.as_str() != waypoint_policy::WAYPOINT_CLASS
        || g.metadata.annotations.get(WAYPOINT_ONLY_ANNOTATION) != Some("true")
    {
        return None;
    }
    let ns = g.metadata.namespace();
    let name = g.metadata.name.as_str();
    Some(pb_sec::Authorization {
        name: waypoint_only_name(name),
        namespace: ns.to_owned(),
        scope: pb_sec::Scope::WorkloadSelector as i32,
        action: pb_sec::Action::Deny as i32,
        rules: vec![pb_sec::Rule {
            clauses: vec![pb_sec::Clause {
                matches: vec![pb_sec::Match {
                    not_principals: string_matches(&[format!(
                        "{}/ns/{ns}/sa/{name}",
                        o.trust_domain
                    )]),
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
        extensions: Vec::new(),
    })
}

/// The waypoint-only policy a pod must list, if `gateway` (as published in a
/// `waypoint` field) asks for one.
fn waypoint_only_key(
    model: &Model,
    gateway: &pb::GatewayAddress,
    o: &TranslateOptions,
) -> Option<String> {
    let key = waypoint_policy::gateway_of(gateway, o)?;
    let (ns, name) = key.split_once('/')?;
    match model.lookup(Kind::Gateway, ns, name) {
        Some(Object::Gateway(g)) if waypoint_only_policy(g, o).is_some() => {
            Some(format!("{ns}/{}", waypoint_only_name(name)))
        }
        _ => None,
    }
}

/// Whether an object belongs to a waypoint (its pods and Service carry the name of their
/// Gateway).
fn is_waypoint(labels: &Labels) -> bool {
    labels
        .get("gateway.networking.k8s.io/gateway-name")
        .is_some()
        || labels.get("gateway.istio.io/managed") == Some("istio.io-mesh-controller")
}

/// A running pod with an IP as a workload; `None` for any other pod.
pub fn translate_pod(model: &Model, pod: &Pod, o: &TranslateOptions) -> Option<pb::Workload> {
    let ips = pod.ips();
    if pod.phase() != PodPhase::Running || ips.is_empty() {
        return None;
    }
    let ns = pod.metadata.namespace();
    let name = pod.metadata.name.as_str();
    let labels = &pod.metadata.labels;

    // The services selecting this pod, with this pod's port mapping for each.
    let mut services = std::collections::HashMap::new();
    // Waypoints bound to them (or to the pod) that accept no way around them.
    let mut waypoint_only: Vec<String> = Vec::new();
    for object in model.in_namespace(Kind::Service, ns) {
        let Object::Service(svc) = object else {
            continue;
        };
        let Some(selector) = &svc.spec.selector else {
            continue;
        };
        if selector.is_empty() || !labels.matches(selector) {
            continue;
        }
        let mut ports = Vec::new();
        for p in &svc.spec.ports {
            if p.protocol.unwrap_or(Protocol::Tcp) != Protocol::Tcp {
                continue;
            }
            let target = match &p.target_port {
                None => Some(p.port.0),
                Some(IntOrString::Int(t)) => Some(t.0),
                Some(IntOrString::String(n)) => pod.named_port(n),
            };
            if let Some(target) = target {
                ports.push(pb::Port {
                    service_port: u32::from(p.port.0),
                    target_port: u32::from(target),
                });
            }
        }
        services.insert(
            format!("{ns}/{}", service_hostname(svc, o)),
            pb::PortList { ports },
        );
        if let Some(gw) = waypoint(model, &svc.metadata, WaypointFor::Service, o)
            && let Some(key) = waypoint_only_key(model, &gw, o)
        {
            waypoint_only.push(key);
        }
    }
    if let Some(gw) = waypoint(model, &pod.metadata, WaypointFor::Workload, o)
        && let Some(key) = waypoint_only_key(model, &gw, o)
    {
        waypoint_only.push(key);
    }

    // Selector-based policies in this namespace that select this pod.
    let mut policies = Vec::new();
    for object in model.in_namespace(Kind::AuthorizationPolicy, ns) {
        let Object::AuthorizationPolicy(p) = object else {
            continue;
        };
        if let Some(sel) = &p.spec.selector
            && !sel.match_labels.is_empty()
            && node_proxy_mode(p).is_some()
            && labels.matches(&sel.match_labels)
        {
            policies.push(format!("{ns}/{}", p.metadata.name));
        }
    }
    policies.extend(peer_authn::policy_for_pod(
        model,
        ns,
        labels,
        &o.root_namespace,
    ));
    waypoint_only.sort();
    waypoint_only.dedup();
    policies.extend(waypoint_only);

    let locality = pod.node().and_then(|n| model.node(n)).and_then(|node| {
        let l = &node.metadata.labels;
        let region = l.get("topology.kubernetes.io/region").unwrap_or_default();
        let zone = l.get("topology.kubernetes.io/zone").unwrap_or_default();
        let subzone = l.get("topology.istio.io/subzone").unwrap_or_default();
        (!region.is_empty() || !zone.is_empty() || !subzone.is_empty()).then(|| pb::Locality {
            region: region.to_owned(),
            zone: zone.to_owned(),
            subzone: subzone.to_owned(),
        })
    });

    Some(pb::Workload {
        uid: format!("{}//Pod/{ns}/{name}", o.cluster_id),
        name: name.to_owned(),
        namespace: ns.to_owned(),
        addresses: ips.into_iter().map(ip_bytes).collect(),
        tunnel_protocol: if is_enrolled(model, pod) {
            pb::TunnelProtocol::Hbone as i32
        } else {
            pb::TunnelProtocol::None as i32
        },
        trust_domain: o.trust_domain.clone(),
        service_account: pod.service_account().to_owned(),
        node: pod.node().unwrap_or_default().to_owned(),
        canonical_name: first_label(
            labels,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
        )
        .unwrap_or_else(|| name.to_owned()),
        canonical_revision: first_label(
            labels,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
        )
        .unwrap_or_else(|| "latest".to_owned()),
        workload_type: pb::WorkloadType::Pod as i32,
        workload_name: name.to_owned(),
        waypoint: waypoint(model, &pod.metadata, WaypointFor::Workload, o),
        services,
        authorization_policies: policies,
        status: if pod.is_ready() {
            pb::WorkloadStatus::Healthy as i32
        } else {
            pb::WorkloadStatus::Unhealthy as i32
        },
        cluster_id: o.cluster_id.clone(),
        locality,
        extensions: if l7_metrics(model, pod) {
            vec![pb::Extension {
                name: ambit_core::discovery::L7_METRICS_EXTENSION.to_owned(),
                config: None,
            }]
        } else {
            Vec::new()
        },
        network_mode: if pod.spec.host_network {
            pb::NetworkMode::HostNetwork as i32
        } else {
            pb::NetworkMode::Standard as i32
        },
        ..Default::default()
    })
}

/// A Service as a discovery service.
pub fn translate_service(model: &Model, svc: &Service, o: &TranslateOptions) -> pb::Service {
    let ports = svc
        .spec
        .ports
        .iter()
        .filter(|p| p.protocol.unwrap_or(Protocol::Tcp) == Protocol::Tcp)
        .map(|p| pb::Port {
            service_port: u32::from(p.port.0),
            target_port: match &p.target_port {
                None => u32::from(p.port.0),
                Some(IntOrString::Int(t)) => u32::from(t.0),
                // Named: each workload carries its own number.
                Some(IntOrString::String(_)) => 0,
            },
        })
        .collect();
    let distribution = svc
        .metadata
        .annotations
        .get("networking.istio.io/traffic-distribution")
        .or(svc.spec.traffic_distribution.as_deref());
    let load_balancing = distribution.and_then(|d| {
        use pb::load_balancing::Scope as S;
        let mut scopes = vec![S::Network, S::Region, S::Zone, S::Subzone];
        match d {
            "PreferClose" | "PreferSameZone" => {}
            "PreferSameNode" => scopes.push(S::Node),
            _ => return None,
        }
        Some(pb::LoadBalancing {
            routing_preference: scopes.into_iter().map(|s| s as i32).collect(),
            mode: pb::load_balancing::Mode::Failover as i32,
            health_policy: pb::load_balancing::HealthPolicy::OnlyHealthy as i32,
        })
    });
    let addresses = if svc.spec.kind == Some(ServiceType::ExternalName) {
        Vec::new()
    } else {
        svc.vips()
            .into_iter()
            .map(|ip| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
            })
            .collect()
    };
    pb::Service {
        name: svc.metadata.name.as_str().to_owned(),
        namespace: svc.metadata.namespace().to_owned(),
        hostname: service_hostname(svc, o),
        addresses,
        ports,
        load_balancing,
        waypoint: waypoint(model, &svc.metadata, WaypointFor::Service, o),
        ..Default::default()
    }
}

/// Whether the mesh knows a Service's endpoints: its selector picks pods, or (without
/// one, or with an empty one, which Kubernetes treats the same) EndpointSlices name it.
pub fn has_endpoint_source(model: &Model, svc: &Service) -> bool {
    selects_pods(svc)
        || model
            .in_namespace(Kind::EndpointSlice, svc.metadata.namespace())
            .any(|o| matches!(o, Object::EndpointSlice(s) if s.service() == Some(svc.metadata.name.as_str())))
}

fn selects_pods(svc: &Service) -> bool {
    svc.spec.selector.as_ref().is_some_and(|s| !s.is_empty())
}

/// The workloads of an EndpointSlice of a Service without a selector: one per endpoint
/// address that is not a pod's, outside the mesh (tunnel NONE), listing the Service with
/// the slice's port for each service port (matched by port name, as kube-proxy does).
pub fn translate_slice(
    model: &Model,
    slice: &EndpointSlice,
    o: &TranslateOptions,
) -> Vec<pb::Workload> {
    let ns = slice.metadata.namespace();
    let Some(Object::Service(svc)) = slice
        .service()
        .and_then(|s| model.lookup(Kind::Service, ns, s))
    else {
        return Vec::new();
    };
    if selects_pods(svc) {
        return Vec::new();
    }
    let ports: Vec<pb::Port> = svc
        .spec
        .ports
        .iter()
        .filter(|p| p.protocol.unwrap_or(Protocol::Tcp) == Protocol::Tcp)
        .filter_map(|p| {
            let target = slice
                .ports
                .iter()
                .find(|sp| {
                    sp.name == p.name && sp.protocol.unwrap_or(Protocol::Tcp) == Protocol::Tcp
                })?
                .port?;
            Some(pb::Port {
                service_port: u32::from(p.port.0),
                target_port: u32::from(target.0),
            })
        })
        .collect();
    let key = format!("{ns}/{}", service_hostname(svc, o));
    let slice_name = slice.metadata.name.as_str();
    slice
        .endpoints
        .iter()
        .filter(|e| !e.is_pod())
        .flat_map(|e| e.addresses.iter().map(move |ip| (e, ip)))
        .map(|(e, ip)| pb::Workload {
            uid: format!(
                "{}/discovery.k8s.io/EndpointSlice/{ns}/{slice_name}/{ip}",
                o.cluster_id
            ),
            name: slice_name.to_owned(),
            namespace: ns.to_owned(),
            addresses: vec![ip_bytes(*ip)],
            tunnel_protocol: pb::TunnelProtocol::None as i32,
            trust_domain: o.trust_domain.clone(),
            node: e.node_name.clone().unwrap_or_default(),
            canonical_name: svc.metadata.name.as_str().to_owned(),
            canonical_revision: "latest".to_owned(),
            workload_name: svc.metadata.name.as_str().to_owned(),
            services: [(
                key.clone(),
                pb::PortList {
                    ports: ports.clone(),
                },
            )]
            .into(),
            status: if e.conditions.ready == Some(false) {
                pb::WorkloadStatus::Unhealthy as i32
            } else {
                pb::WorkloadStatus::Healthy as i32
            },
            cluster_id: o.cluster_id.clone(),
            ..Default::default()
        })
        .collect()
}

/// How the node proxy treats a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeProxyMode {
    Enforce,
    /// `istio.io/dry-run: "true"`: evaluated and reported only.
    DryRun,
    /// AUDIT: reported when it matches.
    Audit,
}

/// How the node proxy treats this policy; `None` when it is not the node proxy's
/// (bound to a waypoint by `targetRefs`, or CUSTOM).
pub fn node_proxy_mode(p: &AuthorizationPolicy) -> Option<NodeProxyMode> {
    let targeted = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
    if targeted {
        return None;
    }
    let dry_run = p.metadata.annotations.get(DRY_RUN_ANNOTATION) == Some("true");
    match p.spec.action {
        None | Some(AuthorizationAction::Allow) | Some(AuthorizationAction::Deny) => {
            Some(if dry_run {
                NodeProxyMode::DryRun
            } else {
                NodeProxyMode::Enforce
            })
        }
        Some(AuthorizationAction::Audit) => Some(NodeProxyMode::Audit),
        Some(AuthorizationAction::Custom) => None,
    }
}

/// Why nothing enforces `p` when it reaches [`translate_policy`] and
/// [`node_proxy_mode`] is `None`: action CUSTOM (policies with `targetRefs` otherwise go
/// to the waypoints, [`waypoint_policy`]). The control plane says so wherever it can
/// (log, `/debug/xds`, `ambit control validate`, `ambit_policies_unenforced`, and every
/// node proxy's `ambit config policies`).
pub fn unenforced_reason(p: &AuthorizationPolicy) -> String {
    debug_assert!(p.spec.action == Some(AuthorizationAction::Custom));
    "action CUSTOM is enforced by waypoints, which call its external authorizer: bind it with targetRefs (a Service bound to a waypoint, or the waypoint's Gateway) instead of a selector"
        .to_owned()
}

/// How many policies in a translator's warnings are not enforced.
pub fn unenforced_count(warnings: &BTreeMap<String, Vec<String>>) -> usize {
    warnings
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(ROUTE_WARNING_PREFIX)
                && !k.starts_with(GRPC_ROUTE_WARNING_PREFIX)
                && !k.starts_with(VS_WARNING_PREFIX)
                && !k.starts_with(DR_WARNING_PREFIX)
                && !k.starts_with(RL_WARNING_PREFIX)
        })
        .filter(|(_, w)| w.iter().any(|m| m.starts_with("NOT ENFORCED")))
        .count()
}

/// An AuthorizationPolicy as an L4 policy, with warnings for what L4 cannot check.
/// A policy no node proxy enforces is published marked as such (see
/// [`unenforced_reason`]).
pub fn translate_policy(
    p: &AuthorizationPolicy,
    o: &TranslateOptions,
) -> (Option<pb_sec::Authorization>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = p.metadata.namespace();
    let Some(mode) = node_proxy_mode(p) else {
        // Published anyway, marked, so every node proxy shows it as not enforced.
        let reason = unenforced_reason(p);
        warnings.push(format!("NOT ENFORCED: {reason}"));
        let scope = if ns == o.root_namespace {
            pb_sec::Scope::Global
        } else {
            pb_sec::Scope::Namespace
        };
        let auth = pb_sec::Authorization {
            name: p.metadata.name.as_str().to_owned(),
            namespace: ns.to_owned(),
            scope: scope as i32,
            action: pb_sec::Action::Deny as i32,
            extensions: vec![pb_sec::Extension {
                name: pb_sec::UNENFORCED_EXTENSION.to_owned(),
                config: Some(ambit_proto::prost_types::Any {
                    type_url: pb_sec::STRING_VALUE_TYPE_URL.to_owned(),
                    value: ambit_proto::prost::Message::encode_to_vec(&reason),
                }),
            }],
            ..Default::default()
        };
        return (Some(auth), warnings);
    };
    let deny = matches!(
        p.spec.action,
        Some(AuthorizationAction::Deny) | Some(AuthorizationAction::Audit)
    );
    let selector = p
        .spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    let scope = if selector {
        pb_sec::Scope::WorkloadSelector
    } else if ns == o.root_namespace {
        pb_sec::Scope::Global
    } else {
        pb_sec::Scope::Namespace
    };
    let mut rules = Vec::new();
    for (i, rule) in p.spec.rules.iter().enumerate() {
        let (translated, unsupported) = translate_rule(rule, ns);
        if unsupported.is_empty() {
            rules.push(translated);
        } else if deny {
            warnings.push(format!(
                "rule {i} uses {} which the node proxy cannot check; it matches on the rule's other conditions alone",
                unsupported.join(", ")
            ));
            rules.push(translated);
        } else {
            warnings.push(format!(
                "rule {i} uses {} which the node proxy cannot check; the rule matches nothing",
                unsupported.join(", ")
            ));
        }
    }
    // Dry-run policies go out in Istio's own form (their real action and rules, flagged
    // dry_run), so Istio's node proxy logs their verdicts too. AUDIT has no counterpart
    // in Istio's node-proxy API: it is published as a DENY without rules, which matches
    // nothing, with its rules in an extension only Ambit reads.
    let mut auth = pb_sec::Authorization {
        name: p.metadata.name.as_str().to_owned(),
        namespace: ns.to_owned(),
        scope: scope as i32,
        action: if deny {
            pb_sec::Action::Deny
        } else {
            pb_sec::Action::Allow
        } as i32,
        rules,
        dry_run: mode == NodeProxyMode::DryRun,
        extensions: Vec::new(),
    };
    if mode == NodeProxyMode::Audit {
        let audit = pb_sec::Authorization {
            rules: std::mem::take(&mut auth.rules),
            ..Default::default()
        };
        auth.action = pb_sec::Action::Deny as i32;
        auth.extensions.push(pb_sec::Extension {
            name: pb_sec::AUDIT_EXTENSION.to_owned(),
            config: Some(ambit_proto::prost_types::Any {
                type_url: pb_sec::AUTHORIZATION_TYPE_URL.to_owned(),
                value: ambit_proto::prost::Message::encode_to_vec(&audit),
            }),
        });
    }
    (Some(auth), warnings)
}

fn string_matches(values: &[String]) -> Vec<pb_sec::StringMatch> {
    values
        .iter()
        .map(|v| {
            use pb_sec::string_match::MatchType;
            let m = if v == "*" {
                MatchType::Presence(())
            } else if let Some(p) = v.strip_suffix('*') {
                MatchType::Prefix(p.to_owned())
            } else if let Some(s) = v.strip_prefix('*') {
                MatchType::Suffix(s.to_owned())
            } else {
                MatchType::Exact(v.clone())
            };
            pb_sec::StringMatch {
                match_type: Some(m),
            }
        })
        .collect()
}

/// Service accounts as Istio's node proxy matches them: the peer identity's namespace
/// and service account, both exact. `<namespace>/<name>`, or a bare name in the
/// policy's own namespace. An entry of another shape is reported as unsupported (so the
/// rule fails closed), never dropped.
fn service_account_matches(
    values: &[String],
    policy_namespace: &str,
    unsupported: &mut Vec<String>,
) -> Vec<pb_sec::ServiceAccountMatch> {
    let mut out = Vec::new();
    for v in values {
        let (ns, sa) = v.split_once('/').unwrap_or((policy_namespace, v));
        if ns.is_empty() || sa.is_empty() || sa.contains('/') || v.contains('*') {
            unsupported.push(format!(
                "service account {v:?} (expected <namespace>/<name> or <name>)"
            ));
            continue;
        }
        out.push(pb_sec::ServiceAccountMatch {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        });
    }
    out
}

fn addresses(blocks: &[crate::model::fields::IpBlock]) -> Vec<pb_sec::Address> {
    blocks
        .iter()
        .map(|b| pb_sec::Address {
            address: ip_bytes(b.addr),
            length: u32::from(b.prefix),
        })
        .collect()
}

fn ip_values(values: &[String], unsupported: &mut Vec<String>, key: &str) -> Vec<pb_sec::Address> {
    let mut out = Vec::new();
    for v in values {
        match v.parse::<crate::model::fields::IpBlock>() {
            Ok(b) => out.push(pb_sec::Address {
                address: ip_bytes(b.addr),
                length: u32::from(b.prefix),
            }),
            Err(_) => unsupported.push(format!("when {key} value {v:?} (not an IP or CIDR)")),
        }
    }
    out
}

fn port_values(values: &[String], unsupported: &mut Vec<String>) -> Vec<u32> {
    let mut out = Vec::new();
    for v in values {
        match v.parse::<u16>() {
            Ok(p) if p > 0 => out.push(u32::from(p)),
            _ => unsupported.push(format!("when destination.port value {v:?} (not a port)")),
        }
    }
    out
}

/// One AuthorizationPolicy rule as one L4 rule: a clause for the `from` list, one for
/// the `to` list, one per `when` condition. Returns the names of L7-only fields used.
fn translate_rule(rule: &ApRule, policy_namespace: &str) -> (pb_sec::Rule, Vec<String>) {
    let mut unsupported = Vec::new();
    let mut clauses = Vec::new();

    if !rule.from.is_empty() {
        let matches = rule
            .from
            .iter()
            .map(|f| source_match(&f.source, policy_namespace, &mut unsupported))
            .collect();
        clauses.push(pb_sec::Clause { matches });
    }
    if !rule.to.is_empty() {
        let matches = rule
            .to
            .iter()
            .map(|t| operation_match(&t.operation, &mut unsupported))
            .collect();
        clauses.push(pb_sec::Clause { matches });
    }
    for c in &rule.when {
        if let Some(m) = condition_match(c, &mut unsupported) {
            clauses.push(pb_sec::Clause { matches: vec![m] });
        }
    }
    // An empty match list inside a clause would match nothing; drop such clauses (their
    // fields were all unsupported and are already reported).
    clauses.retain(|c: &pb_sec::Clause| c.matches.iter().any(|m| m != &pb_sec::Match::default()));
    (pb_sec::Rule { clauses }, unsupported)
}

fn source_match(
    s: &Source,
    policy_namespace: &str,
    unsupported: &mut Vec<String>,
) -> pb_sec::Match {
    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
        unsupported.push("source.requestPrincipals".into());
    }
    if !s.remote_ip_blocks.is_empty() || !s.not_remote_ip_blocks.is_empty() {
        unsupported.push("source.remoteIpBlocks".into());
    }
    pb_sec::Match {
        namespaces: string_matches(&s.namespaces),
        not_namespaces: string_matches(&s.not_namespaces),
        principals: string_matches(&s.principals),
        not_principals: string_matches(&s.not_principals),
        service_accounts: service_account_matches(
            &s.service_accounts,
            policy_namespace,
            unsupported,
        ),
        not_service_accounts: service_account_matches(
            &s.not_service_accounts,
            policy_namespace,
            unsupported,
        ),
        source_ips: addresses(&s.ip_blocks),
        not_source_ips: addresses(&s.not_ip_blocks),
        ..Default::default()
    }
}

fn operation_match(op: &Operation, unsupported: &mut Vec<String>) -> pb_sec::Match {
    for (used, name) in [
        (
            !op.hosts.is_empty() || !op.not_hosts.is_empty(),
            "operation.hosts",
        ),
        (
            !op.methods.is_empty() || !op.not_methods.is_empty(),
            "operation.methods",
        ),
        (
            !op.paths.is_empty() || !op.not_paths.is_empty(),
            "operation.paths",
        ),
    ] {
        if used {
            unsupported.push(name.into());
        }
    }
    pb_sec::Match {
        destination_ports: op.ports.iter().map(|p| u32::from(p.0)).collect(),
        not_destination_ports: op.not_ports.iter().map(|p| u32::from(p.0)).collect(),
        ..Default::default()
    }
}

fn condition_match(c: &Condition, unsupported: &mut Vec<String>) -> Option<pb_sec::Match> {
    let key = c.key.as_str();
    let mut m = pb_sec::Match::default();
    match key {
        "source.ip" => {
            m.source_ips = ip_values(&c.values, unsupported, key);
            m.not_source_ips = ip_values(&c.not_values, unsupported, key);
        }
        "source.namespace" => {
            m.namespaces = string_matches(&c.values);
            m.not_namespaces = string_matches(&c.not_values);
        }
        "source.principal" => {
            m.principals = string_matches(&c.values);
            m.not_principals = string_matches(&c.not_values);
        }
        "destination.ip" => {
            m.destination_ips = ip_values(&c.values, unsupported, key);
            m.not_destination_ips = ip_values(&c.not_values, unsupported, key);
        }
        "destination.port" => {
            m.destination_ports = port_values(&c.values, unsupported);
            m.not_destination_ports = port_values(&c.not_values, unsupported);
        }
        other => {
            unsupported.push(format!("when {other}"));
            return None;
        }
    }
    Some(m)
}

#[cfg(test)]
mod tests;
