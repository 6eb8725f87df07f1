//! The control plane's in-memory model of the mesh: every object read from the sources,
//! keyed by kind, namespace and name.
//!
//! A [`Model`] is immutable once built; a change produces a new one, published as an
//! `Arc<Model>` so readers (the CA, the discovery server) always see one consistent
//! version without locking. [`Model::diff`] tells what changed between two versions.

pub mod fields;
pub mod parse;
pub mod resources;

use std::collections::{BTreeMap, HashMap};
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
}

impl Kind {
    pub const ALL: [Kind; 11] = [
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

/// One consistent version of the mesh.
#[derive(Debug, Default)]
pub struct Model {
    objects: BTreeMap<ObjectRef, Object>,
    /// Pods by node name (derived), for the CA's node authorization.
    pods_by_node: HashMap<String, Vec<Arc<Pod>>>,
    /// Increases by one for every published version.
    pub generation: u64,
}

impl Model {
    /// Builds a model from objects. Objects are unique by key; a later duplicate replaces
    /// an earlier one (callers resolve conflicts before this point).
    pub fn from_objects(generation: u64, objects: impl IntoIterator<Item = Object>) -> Self {
        let objects: BTreeMap<ObjectRef, Object> =
            objects.into_iter().map(|o| (o.key(), o)).collect();
        let mut pods_by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        for object in objects.values() {
            if let Object::Pod(pod) = object
                && let Some(node) = pod.node()
            {
                pods_by_node
                    .entry(node.to_owned())
                    .or_default()
                    .push(pod.clone());
            }
        }
        Self {
            objects,
            pods_by_node,
            generation,
        }
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

    /// Pods the model places on `node`.
    pub fn pods_on_node(&self, node: &str) -> &[Arc<Pod>] {
        self.pods_by_node.get(node).map_or(&[], Vec::as_slice)
    }

    /// Whether a pod that has not terminated runs on `node` with `identity` (same trust
    /// domain is checked by the caller): the CA's rule for what a node may obtain.
    pub fn node_runs_identity(&self, node: &str, identity: &SpiffeId) -> bool {
        self.pods_on_node(node).iter().any(|pod| {
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
        assert_eq!(m.pods_on_node("node-1").len(), 2);
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
}
