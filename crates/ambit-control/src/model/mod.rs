//! The control plane's in-memory model of the mesh: every object read from the sources,
//! keyed by kind, namespace and name.
//!
//! A [`Model`] is immutable once built; a change produces a new one, published as an
//! `Arc<Model>` so readers (the CA, the discovery server) always see one consistent
//! version without locking. Its maps are persistent (`imbl`): [`Model::apply`] derives
//! the next version from a batch of events in O(log n) per event, sharing everything
//! else, and records what changed, so a consumer that saw a recent version learns the
//! changes from [`Model::changes_since`] without comparing whole models. A source that
//! rebuilds from scratch (the file source) uses [`Model::from_objects`]; the changes are
//! then found by [`Model::diff`].

pub mod fields;
pub mod parse;
pub mod resources;

use std::collections::BTreeMap;

use imbl::{OrdMap, Vector};
use std::fmt;
use std::sync::Arc;

use ambit_core::SpiffeId;
use serde::Serialize;

pub use resources::*;

/// The kinds of object the model holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Namespace,
    Node,
    ServiceAccount,
    Pod,
    Service,
    AuthorizationPolicy,
    PeerAuthentication,
    ServiceEntry,
    WorkloadEntry,
    Gateway,
    HTTPRoute,
    EndpointSlice,
    GRPCRoute,
    VirtualService,
    DestinationRule,
    LocalRateLimit,
    RequestAuthentication,
    ConfigMap,
    ReferenceGrant,
}

impl Kind {
    pub const ALL: [Kind; 19] = [
        Kind::Namespace,
        Kind::Node,
        Kind::ServiceAccount,
        Kind::Pod,
        Kind::Service,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Gateway,
        Kind::HTTPRoute,
        Kind::EndpointSlice,
        Kind::GRPCRoute,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::LocalRateLimit,
        Kind::RequestAuthentication,
        Kind::ConfigMap,
        Kind::ReferenceGrant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Gateway => "Gateway",
            Kind::HTTPRoute => "HTTPRoute",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::GRPCRoute => "GRPCRoute",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::LocalRateLimit => "LocalRateLimit",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::ConfigMap => "ConfigMap",
            Kind::ReferenceGrant => "ReferenceGrant",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key of an object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object of any kind. Cloning is cheap (a reference count).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Node(Arc<Node>),
    ServiceAccount(Arc<ServiceAccount>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
    ServiceEntry(Arc<ServiceEntry>),
    WorkloadEntry(Arc<WorkloadEntry>),
    Gateway(Arc<Gateway>),
    HttpRoute(Arc<HttpRoute>),
    EndpointSlice(Arc<EndpointSlice>),
    GrpcRoute(Arc<GrpcRoute>),
    VirtualService(Arc<VirtualService>),
    DestinationRule(Arc<DestinationRule>),
    LocalRateLimit(Arc<LocalRateLimit>),
    RequestAuthentication(Arc<RequestAuthentication>),
    ConfigMap(Arc<ConfigMap>),
    ReferenceGrant(Arc<ReferenceGrant>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::WorkloadEntry(_) => Kind::WorkloadEntry,
            Object::Gateway(_) => Kind::Gateway,
            Object::HttpRoute(_) => Kind::HTTPRoute,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::GrpcRoute(_) => Kind::GRPCRoute,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::LocalRateLimit(_) => Kind::LocalRateLimit,
            Object::RequestAuthentication(_) => Kind::RequestAuthentication,
            Object::ConfigMap(_) => Kind::ConfigMap,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::ServiceEntry(o) => &o.metadata,
            Object::WorkloadEntry(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::VirtualService(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
            Object::LocalRateLimit(o) => &o.metadata,
            Object::RequestAuthentication(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
        }
    }

    pub fn key(&self) -> ObjectRef {
        let kind = self.kind();
        let meta = self.metadata();
        ObjectRef {
            kind,
            namespace: if kind.is_namespaced() {
                meta.namespace().to_owned()
            } else {
                String::new()
            },
            name: meta.name.as_str().to_owned(),
        }
    }
}

/// What happened to one object between two model versions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Change {
    Added(ObjectRef),
    Updated(ObjectRef),
    Removed(ObjectRef),
}

/// One change a source observed: an object created or replaced, or one deleted.
#[derive(Debug, Clone)]
pub enum Event {
    Apply(Object),
    Delete(ObjectRef),
}

/// How many recent changes a model remembers for [`Model::changes_since`]; a consumer
/// further behind falls back to a full [`Model::diff`].
pub const CHANGE_LOG: usize = 65_536;

fn new_lineage() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One consistent version of the mesh.
#[derive(Debug, Default, Clone)]
pub struct Model {
    objects: OrdMap<ObjectRef, Object>,
    /// Pods by node name (derived), for the CA's node authorization.
    pods_by_node: imbl::HashMap<String, OrdMap<ObjectRef, Arc<Pod>>>,
    /// The most recent changes, each with the generation that made it, oldest first;
    /// `log_from` is the first generation whose changes are all here.
    log: Vector<(u64, Change)>,
    log_from: u64,
    /// Models derived from one another by [`Model::apply`] share a lineage (0: none yet);
    /// only within one is the change log meaningful.
    lineage: u64,
    /// Increases by one for every published version.
    pub generation: u64,
}

impl Model {
    /// Builds a model from objects. Objects are unique by key; a later duplicate replaces
    /// an earlier one (callers resolve conflicts before this point). It remembers no
    /// changes: consumers compare it with what they had.
    pub fn from_objects(generation: u64, objects: impl IntoIterator<Item = Object>) -> Self {
        let mut model = Model {
            generation,
            log_from: generation.saturating_add(1),
            lineage: new_lineage(),
            ..Model::default()
        };
        for object in objects {
            model.insert(object);
        }
        model
    }

    /// The next version: `events` applied in order, as generation `self.generation + 1`.
    /// An `Apply` equal to the object in force, or a `Delete` of an absent object, changes
    /// nothing. Costs O(log n) per event; the rest of the model is shared.
    pub fn apply(&self, events: impl IntoIterator<Item = Event>) -> Model {
        let mut next = self.clone();
        next.generation = self.generation + 1;
        if next.lineage == 0 {
            next.lineage = new_lineage();
            next.log_from = next.generation;
        }
        let generation = next.generation;
        for event in events {
            let change = match event {
                Event::Apply(object) => {
                    let key = object.key();
                    match next.objects.get(&key) {
                        Some(old) if *old == object => None,
                        Some(_) => {
                            next.insert(object);
                            Some(Change::Updated(key))
                        }
                        None => {
                            next.insert(object);
                            Some(Change::Added(key))
                        }
                    }
                }
                Event::Delete(key) => next.remove(&key).map(|_| Change::Removed(key)),
            };
            if let Some(change) = change {
                next.log.push_back((generation, change));
            }
        }
        while next.log.len() > CHANGE_LOG {
            if let Some((g, _)) = next.log.pop_front() {
                next.log_from = next.log_from.max(g + 1);
            }
        }
        next
    }

    /// What changed from `old` to `self`: from the change log when `self` descends from
    /// `old` within it (each object once, by its net effect), else by comparing both.
    pub fn changes_since(&self, old: &Model) -> Vec<Change> {
        let covered = self.lineage != 0
            && old.lineage == self.lineage
            && old.generation <= self.generation
            && old.generation + 1 >= self.log_from;
        if !covered {
            return self.diff(old);
        }
        let mut touched = std::collections::BTreeSet::new();
        for (g, change) in self.log.iter().rev() {
            if *g <= old.generation {
                break;
            }
            let (Change::Added(k) | Change::Updated(k) | Change::Removed(k)) = change;
            touched.insert(k);
        }
        let mut changes = Vec::with_capacity(touched.len());
        for key in touched {
            match (old.objects.get(key), self.objects.get(key)) {
                (None, Some(_)) => changes.push(Change::Added(key.clone())),
                (Some(_), None) => changes.push(Change::Removed(key.clone())),
                (Some(a), Some(b)) if a != b => changes.push(Change::Updated(key.clone())),
                _ => {}
            }
        }
        changes
    }

    fn insert(&mut self, object: Object) {
        let key = object.key();
        self.remove(&key);
        if let Object::Pod(pod) = &object
            && let Some(node) = pod.node()
        {
            self.pods_by_node
                .entry(node.to_owned())
                .or_default()
                .insert(key.clone(), pod.clone());
        }
        self.objects.insert(key, object);
    }

    fn remove(&mut self, key: &ObjectRef) -> Option<Object> {
        let object = self.objects.remove(key)?;
        if let Object::Pod(pod) = &object
            && let Some(node) = pod.node()
            && let Some(pods) = self.pods_by_node.get_mut(node)
        {
            pods.remove(key);
            if pods.is_empty() {
                self.pods_by_node.remove(node);
            }
        }
        Some(object)
    }

    pub fn get(&self, key: &ObjectRef) -> Option<&Object> {
        self.objects.get(key)
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Objects of one kind, in namespace/name order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        let start = ObjectRef {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, o)| o)
    }

    /// Objects of one kind in one namespace, in name order.
    pub fn in_namespace<'a>(
        &'a self,
        kind: Kind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> + 'a {
        let start = ObjectRef {
            kind,
            namespace: namespace.to_owned(),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(k, _)| k.kind == kind && k.namespace == namespace)
            .map(|(_, o)| o)
    }

    /// A cluster-scoped or namespaced object by kind, namespace and name.
    pub fn lookup(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Object> {
        self.objects.get(&ObjectRef {
            kind,
            namespace: if kind.is_namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        })
    }

    /// How many objects of each kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut out = BTreeMap::new();
        for key in self.objects.keys() {
            *out.entry(key.kind).or_insert(0) += 1;
        }
        out
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.of_kind(Kind::Pod).filter_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
    }

    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        match self.lookup(Kind::Namespace, "", name) {
            Some(Object::Namespace(n)) => Some(n),
            _ => None,
        }
    }

    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        match self.lookup(Kind::Node, "", name) {
            Some(Object::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// Pods the model places on `node`, in namespace/name order.
    pub fn pods_on_node(&self, node: &str) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Whether a pod that has not terminated runs on `node` with `identity` (same trust
    /// domain is checked by the caller): the CA's rule for what a node may obtain.
    pub fn node_runs_identity(&self, node: &str, identity: &SpiffeId) -> bool {
        self.pods_on_node(node).any(|pod| {
            !pod.is_terminated()
                && pod.metadata.namespace() == identity.namespace()
                && pod.service_account() == identity.service_account()
        })
    }

    /// What changed from `old` to `self`.
    pub fn diff(&self, old: &Model) -> Vec<Change> {
        let mut changes = Vec::new();
        for (key, object) in &self.objects {
            match old.objects.get(key) {
                None => changes.push(Change::Added(key.clone())),
                Some(previous) if previous != object => changes.push(Change::Updated(key.clone())),
                Some(_) => {}
            }
        }
        for key in old.objects.keys() {
            if !self.objects.contains_key(key) {
                changes.push(Change::Removed(key.clone()));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(generation: u64, yaml: &str) -> Model {
        let objects = parse::parse_manifest(yaml).expect("valid manifest");
        Model::from_objects(generation, objects)
    }

    const BASE: &str = "
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns1}
spec: {nodeName: node-1, serviceAccountName: sa-a}
status: {podIP: 198.18.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: ns1}
spec: {nodeName: node-1, serviceAccountName: sa-done}
status: {phase: Succeeded}
---
apiVersion: v1
kind: Namespace
metadata: {name: ns1, labels: {istio.io/dataplane-mode: ambient}}
";

    #[test]
    fn node_identity_rule() {
        let m = model(1, BASE);
        let id = |ns: &str, sa: &str| SpiffeId::new("cluster.local", ns, sa).unwrap();
        assert!(m.node_runs_identity("node-1", &id("ns1", "sa-a")));
        assert!(!m.node_runs_identity("node-2", &id("ns1", "sa-a")));
        assert!(!m.node_runs_identity("node-1", &id("ns2", "sa-a")));
        assert!(
            !m.node_runs_identity("node-1", &id("ns1", "sa-done")),
            "terminated pod"
        );
        assert_eq!(m.pods_on_node("node-1").count(), 2);
    }

    #[test]
    fn kinds_and_counts() {
        let m = model(1, BASE);
        assert_eq!(m.counts()[&Kind::Pod], 2);
        assert_eq!(m.counts()[&Kind::Namespace], 1);
        assert_eq!(m.pods().count(), 2);
        assert_eq!(
            m.namespace("ns1")
                .unwrap()
                .metadata
                .labels
                .get("istio.io/dataplane-mode"),
            Some("ambient")
        );
    }

    #[test]
    fn diff_reports_each_change() {
        let old = model(1, BASE);
        let new = model(
            2,
            &BASE
                .replace("198.18.0.10", "198.18.0.11")
                .replace("name: done", "name: other"),
        );
        let mut changes = new.diff(&old);
        changes.sort_by_key(|c| format!("{c:?}"));
        let pod = |name: &str| ObjectRef {
            kind: Kind::Pod,
            namespace: "ns1".into(),
            name: name.into(),
        };
        assert_eq!(
            changes,
            vec![
                Change::Added(pod("other")),
                Change::Removed(pod("done")),
                Change::Updated(pod("a")),
            ]
        );
        assert!(old.diff(&old).is_empty());
    }
    #[test]
    fn apply_records_changes_and_shares_the_rest() {
        let base = model(1, BASE);
        let pod = |name: &str| ObjectRef {
            kind: Kind::Pod,
            namespace: "ns1".into(),
            name: name.into(),
        };
        let moved = parse::parse_manifest(&BASE.replace("198.18.0.10", "198.18.0.11"))
            .unwrap()
            .into_iter()
            .find(|o| o.key() == pod("a"))
            .unwrap();
        let same = base.get(&pod("done")).unwrap().clone();
        let next = base.apply([
            Event::Apply(moved.clone()),
            Event::Apply(same),
            Event::Delete(pod("absent")),
        ]);
        assert_eq!(next.generation, 2);
        assert_eq!(next.changes_since(&base), vec![Change::Updated(pod("a"))]);
        let after = next.apply([Event::Delete(pod("done"))]);
        assert_eq!(
            after.changes_since(&base),
            vec![Change::Updated(pod("a")), Change::Removed(pod("done"))]
        );
        assert_eq!(
            after.changes_since(&next),
            vec![Change::Removed(pod("done"))]
        );
        assert_eq!(after.pods_on_node("node-1").count(), 1);
        assert!(after.changes_since(&after).is_empty());
        // The log agrees with a full comparison.
        let mut by_diff = after.diff(&base);
        by_diff.sort_by_key(|c| format!("{c:?}"));
        let mut by_log = after.changes_since(&base);
        by_log.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(by_diff, by_log);
        // An object added then removed within the window is no change at all.
        let back = after.apply([Event::Apply(base.get(&pod("done")).unwrap().clone())]);
        assert_eq!(back.changes_since(&next), vec![]);
        assert_eq!(back.changes_since(&after), vec![Change::Added(pod("done"))]);
    }

    #[test]
    fn changes_since_an_unrelated_model_compares_them() {
        let a = model(1, BASE);
        let b = model(5, &BASE.replace("name: done", "name: other"));
        let mut changes = b.changes_since(&a);
        changes.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(changes.len(), 2, "{changes:?}");
        // From the empty model every object is new.
        let fresh = Model::default().apply(a.objects().cloned().map(Event::Apply));
        assert_eq!(fresh.changes_since(&Model::default()).len(), a.len());
    }

    #[test]
    fn a_long_history_falls_back_to_comparing() {
        let base = model(1, BASE);
        let pod = base
            .get(&ObjectRef {
                kind: Kind::Pod,
                namespace: "ns1".into(),
                name: "done".into(),
            })
            .unwrap()
            .clone();
        let mut m = base.apply([]);
        let start = m.clone();
        for _ in 0..(CHANGE_LOG / 2 + 1) {
            m = m.apply([Event::Delete(pod.key())]);
            m = m.apply([Event::Apply(pod.clone())]);
        }
        assert!(m.log.len() <= CHANGE_LOG);
        assert!(m.log_from > start.generation + 1);
        assert!(
            m.changes_since(&start).is_empty(),
            "same objects: no change"
        );
    }
}
