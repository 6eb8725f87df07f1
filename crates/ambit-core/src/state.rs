//! The node proxy's indexed view of the mesh, read by the data path without locks.
//!
//! [`State`] is built from persistent (structurally shared) B-tree maps, so a copy costs
//! O(1) and an update O(log n). (B-trees rather than hash tries: at 100k workloads the
//! hash trie costs about 160 bytes of overhead per entry, the B-tree about 50.) The discovery client applies each batch of changes to a copy and
//! publishes it through [`Store`] with one atomic pointer swap; a connection reads
//! whatever version is current with one atomic load and never waits for a writer.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use imbl::{OrdMap, OrdSet};

use crate::discovery::{NetworkMode, Service, Str, Workload};
use crate::policy::{Authorization, PolicyScope};

/// Who owns an IP address on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AddressOwner {
    network: Str,
    key: Str,
}

/// The owners of one IP: almost always exactly one, kept inline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owners {
    One(AddressOwner),
    Many(Vec<AddressOwner>),
}

impl Owners {
    fn iter(&self) -> std::slice::Iter<'_, AddressOwner> {
        match self {
            Owners::One(o) => std::slice::from_ref(o).iter(),
            Owners::Many(v) => v.iter(),
        }
    }

    fn add(index: &mut OrdMap<IpAddr, Owners>, ip: IpAddr, owner: AddressOwner) {
        match index.get_mut(&ip) {
            None => {
                index.insert(ip, Owners::One(owner));
            }
            Some(Owners::One(first)) => {
                let first = first.clone();
                index.insert(ip, Owners::Many(vec![first, owner]));
            }
            Some(Owners::Many(v)) => v.push(owner),
        }
    }

    fn remove(index: &mut OrdMap<IpAddr, Owners>, ip: IpAddr, key: &str) {
        let empty = match index.get_mut(&ip) {
            None => return,
            Some(Owners::One(o)) => o.key.as_ref() == key,
            Some(Owners::Many(v)) => {
                v.retain(|o| o.key.as_ref() != key);
                if v.len() == 1 {
                    let last = v.remove(0);
                    index.insert(ip, Owners::One(last));
                    false
                } else {
                    v.is_empty()
                }
            }
        };
        if empty {
            index.remove(&ip);
        }
    }
}

/// One consistent version of everything the node proxy knows.
#[derive(Debug, Clone, Default)]
pub struct State {
    workloads: OrdMap<Str, Arc<Workload>>,
    workload_ips: OrdMap<IpAddr, Owners>,
    services: OrdMap<Str, Arc<Service>>,
    service_vips: OrdMap<IpAddr, Owners>,
    services_by_hostname: OrdMap<Str, OrdSet<Str>>,
    /// Service key -> uids of the workloads that back it.
    endpoints: OrdMap<Str, OrdSet<Str>>,
    policies: OrdMap<Str, Arc<Authorization>>,
    namespace_policies: OrdMap<Str, OrdSet<Str>>,
    global_policies: OrdSet<Str>,
    /// Waypoint policies (bound by `targetRefs`), and their keys by target
    /// (`<kind>/<namespace>/<name>`).
    targeted: OrdMap<Str, Arc<Authorization>>,
    by_target: OrdMap<Str, OrdSet<Str>>,
    /// Waypoint policies discovery sent and this proxy could not read
    /// (`<namespace>/<name>`).
    refused_targeted: OrdSet<Str>,
    /// Changes whenever a policy, or the policies a workload lists, may have changed.
    policy_epoch: u64,
    /// HTTPRoutes for waypoints (`<namespace>/<name>`), and their keys by parent service.
    http_routes: OrdMap<Str, Arc<crate::http_route::HttpRoute>>,
    routes_by_service: OrdMap<Str, OrdSet<Str>>,
    /// Each service's routes indexed for choosing ([`State::route_table`]): built on
    /// first use, replaced by an empty cell whenever one of its routes changes.
    route_tables: OrdMap<Str, Arc<std::sync::OnceLock<Arc<crate::http_route::RouteTable>>>>,
    /// Routes discovery sent and this proxy could not read.
    refused_routes: OrdSet<Str>,
    /// Traffic policies (`<namespace>/dr:<name>`, `<namespace>/rl:<name>`), and their
    /// keys by service and by waypoint Gateway.
    traffic: OrdMap<Str, Arc<crate::traffic::TrafficPolicy>>,
    traffic_by_target: OrdMap<Str, OrdSet<Str>>,
    /// Traffic policies discovery sent and this proxy could not read.
    refused_traffic: OrdSet<Str>,
    /// How many traffic policies hold a rate limit.
    rate_limits: usize,
    /// How many traffic policies hold a RequestAuthentication.
    authentications: usize,
    /// Changes whenever a traffic policy is added, replaced or removed.
    traffic_epoch: u64,
}

impl State {
    /// Adds or replaces a workload (resource name = its uid).
    pub fn upsert_workload(&mut self, workload: Workload) {
        let uid = workload.uid.clone();
        let same_policies = self.workloads.get(&uid).is_some_and(|old| {
            old.profile.namespace == workload.profile.namespace
                && old.profile.authorization_policies == workload.profile.authorization_policies
        });
        if !same_policies {
            self.policy_epoch += 1;
        }
        self.remove_workload(&uid);
        if workload.profile.network_mode == NetworkMode::Standard {
            for ip in workload.addresses.iter() {
                Owners::add(
                    &mut self.workload_ips,
                    *ip,
                    AddressOwner {
                        network: workload.profile.network.clone(),
                        key: uid.clone(),
                    },
                );
            }
        }
        for (service, _) in workload.profile.services.iter() {
            self.endpoints
                .entry(service.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.workloads.insert(uid, Arc::new(workload));
    }

    /// Adds or replaces a service (resource name = `<namespace>/<hostname>`).
    pub fn upsert_service(&mut self, service: Service) {
        let key: Str = service.key().into();
        self.remove_service(&key);
        for vip in &service.vips {
            Owners::add(
                &mut self.service_vips,
                vip.address,
                AddressOwner {
                    network: vip.network.clone(),
                    key: key.clone(),
                },
            );
        }
        self.services_by_hostname
            .entry(service.hostname.clone())
            .or_default()
            .insert(key.clone());
        self.services.insert(key, Arc::new(service));
    }

    /// Removes whatever `name` is: a workload uid or a service key. Returns whether it
    /// existed.
    pub fn remove_address(&mut self, name: &str) -> bool {
        self.remove_workload(name) || self.remove_service(name)
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for ip in old.addresses.iter() {
            Owners::remove(&mut self.workload_ips, *ip, uid);
        }
        for (service, _) in old.profile.services.iter() {
            if let Some(set) = self.endpoints.get_mut(service) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(service);
                }
            }
        }
        true
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for vip in &old.vips {
            Owners::remove(&mut self.service_vips, vip.address, key);
        }
        if let Some(set) = self.services_by_hostname.get_mut(&old.hostname) {
            set.remove(key);
            if set.is_empty() {
                self.services_by_hostname.remove(&old.hostname);
            }
        }
        true
    }

    /// Adds or replaces a policy (resource name = `<namespace>/<name>`).
    pub fn upsert_policy(&mut self, policy: Authorization) {
        let key: Str = policy.key().into();
        self.remove_policy(&key);
        self.policy_epoch += 1;
        match policy.scope {
            PolicyScope::Global => {
                self.global_policies.insert(key.clone());
            }
            PolicyScope::Namespace => {
                self.namespace_policies
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            // Found through the workloads that name them.
            PolicyScope::WorkloadSelector => {}
        }
        self.policies.insert(key, Arc::new(policy));
    }

    pub fn remove_policy(&mut self, key: &str) -> bool {
        let Some(old) = self.policies.remove(key) else {
            return false;
        };
        self.policy_epoch += 1;
        match old.scope {
            PolicyScope::Global => {
                self.global_policies.remove(key);
            }
            PolicyScope::Namespace => {
                if let Some(set) = self.namespace_policies.get_mut(&old.namespace) {
                    set.remove(key);
                    if set.is_empty() {
                        self.namespace_policies.remove(&old.namespace);
                    }
                }
            }
            PolicyScope::WorkloadSelector => {}
        }
        true
    }

    /// Adds or replaces a waypoint policy (resource name = `<namespace>/<name>`).
    pub fn upsert_targeted_policy(&mut self, policy: Authorization) {
        let key: Str = policy.key().into();
        self.remove_targeted_policy(&key);
        self.policy_epoch += 1;
        for t in &policy.targets {
            self.by_target
                .entry(target_key(&t.kind, &t.namespace, &t.name).into())
                .or_default()
                .insert(key.clone());
        }
        self.targeted.insert(key, Arc::new(policy));
    }

    pub fn remove_targeted_policy(&mut self, key: &str) -> bool {
        let Some(old) = self.targeted.remove(key) else {
            return false;
        };
        self.policy_epoch += 1;
        for t in &old.targets {
            let tk = target_key(&t.kind, &t.namespace, &t.name);
            if let Some(set) = self.by_target.get_mut(tk.as_str()) {
                set.remove(key);
                if set.is_empty() {
                    self.by_target.remove(tk.as_str());
                }
            }
        }
        true
    }

    /// The waypoint policies bound to `<kind> <namespace>/<name>` (a Gateway or a
    /// Service).
    pub fn policies_targeting<'a>(
        &'a self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
        self.by_target
            .get(target_key(kind, namespace, name).as_str())
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter_map(|k| self.targeted.get(k))
    }

    /// Records which waypoint policies could not be read (replacing the previous list).
    pub fn set_refused_targeted(&mut self, keys: Vec<String>) {
        let keys: OrdSet<Str> = keys.into_iter().map(Str::from).collect();
        if keys != self.refused_targeted {
            self.policy_epoch += 1;
            self.refused_targeted = keys;
        }
    }

    /// The waypoint policies that could not be read: what they would allow or deny is
    /// unknown.
    pub fn refused_targeted(&self) -> impl Iterator<Item = &Str> {
        self.refused_targeted.iter()
    }

    /// Every waypoint policy.
    pub fn targeted_policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.targeted.values()
    }

    /// Adds or replaces an HTTPRoute.
    pub fn upsert_http_route(&mut self, route: crate::http_route::HttpRoute) {
        let key = route.key.clone();
        self.remove_http_route(&key);
        for p in &route.parents {
            self.routes_by_service
                .entry(p.service.clone())
                .or_default()
                .insert(key.clone());
            self.route_tables
                .insert(p.service.clone(), Arc::new(std::sync::OnceLock::new()));
        }
        self.http_routes.insert(key, Arc::new(route));
    }

    pub fn remove_http_route(&mut self, key: &str) -> bool {
        let Some(old) = self.http_routes.remove(key) else {
            return false;
        };
        for p in &old.parents {
            if let Some(set) = self.routes_by_service.get_mut(p.service.as_ref()) {
                set.remove(key);
                if set.is_empty() {
                    self.routes_by_service.remove(p.service.as_ref());
                }
            }
            if self.routes_by_service.contains_key(p.service.as_ref()) {
                self.route_tables
                    .insert(p.service.clone(), Arc::new(std::sync::OnceLock::new()));
            } else {
                self.route_tables.remove(p.service.as_ref());
            }
        }
        true
    }

    /// The routes naming `service` as a parent, indexed for choosing a request's rule
    /// (built on first use after a change); `None` when it has none.
    pub fn route_table(&self, service: &str) -> Option<Arc<crate::http_route::RouteTable>> {
        let build = || {
            Arc::new(crate::http_route::RouteTable::new(
                self.routes_for(service).cloned().collect(),
            ))
        };
        if !self.routes_by_service.contains_key(service) {
            return None;
        }
        Some(match self.route_tables.get(service) {
            Some(cell) => cell.get_or_init(build).clone(),
            None => build(),
        })
    }

    /// The routes naming `service` (`<namespace>/<hostname>`) as a parent.
    pub fn routes_for<'a>(
        &'a self,
        service: &str,
    ) -> impl Iterator<Item = &'a Arc<crate::http_route::HttpRoute>> + 'a {
        self.routes_by_service
            .get(service)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter_map(|k| self.http_routes.get(k))
    }

    /// Every HTTPRoute.
    pub fn http_routes(&self) -> impl Iterator<Item = &Arc<crate::http_route::HttpRoute>> {
        self.http_routes.values()
    }

    /// Records which routes could not be read (replacing the previous list).
    pub fn set_refused_routes(&mut self, keys: Vec<String>) {
        self.refused_routes = keys.into_iter().map(Str::from).collect();
    }

    /// Routes that could not be read: where their requests should go is unknown.
    pub fn refused_routes(&self) -> impl Iterator<Item = &Str> {
        self.refused_routes.iter()
    }

    /// Adds or replaces a traffic policy.
    pub fn upsert_traffic_policy(&mut self, policy: crate::traffic::TrafficPolicy) {
        self.traffic_epoch += 1;
        let key = policy.key.clone();
        self.remove_traffic_policy(&key);
        for t in policy.services.iter().chain(&policy.gateways) {
            self.traffic_by_target
                .entry(t.clone())
                .or_default()
                .insert(key.clone());
        }
        if policy.rate_limit.is_some() {
            self.rate_limits += 1;
        }
        if policy.authentication.is_some() {
            self.authentications += 1;
        }
        self.traffic.insert(key, Arc::new(policy));
    }

    pub fn remove_traffic_policy(&mut self, key: &str) -> bool {
        let Some(old) = self.traffic.remove(key) else {
            return false;
        };
        self.traffic_epoch += 1;
        if old.rate_limit.is_some() {
            self.rate_limits -= 1;
        }
        if old.authentication.is_some() {
            self.authentications -= 1;
        }
        for t in old.services.iter().chain(&old.gateways) {
            if let Some(set) = self.traffic_by_target.get_mut(t.as_ref()) {
                set.remove(key);
                if set.is_empty() {
                    self.traffic_by_target.remove(t.as_ref());
                }
            }
        }
        true
    }

    /// The traffic policies naming `target`: a service (`<namespace>/<hostname>`) or a
    /// waypoint Gateway (`<namespace>/<name>`).
    pub fn traffic_for<'a>(
        &'a self,
        target: &str,
    ) -> impl Iterator<Item = &'a Arc<crate::traffic::TrafficPolicy>> + 'a {
        self.traffic_by_target
            .get(target)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter_map(|k| self.traffic.get(k))
    }

    /// The DestinationRule for `service` (its `backend` is set): the oldest (then by
    /// name), should the control plane have sent two.
    pub fn backend_policy(&self, service: &str) -> Option<&Arc<crate::traffic::TrafficPolicy>> {
        self.traffic_for(service)
            .filter(|p| p.backend.is_some())
            .min_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)))
    }

    /// Whether any traffic policy holds a rate limit.
    pub fn has_rate_limits(&self) -> bool {
        self.rate_limits > 0
    }

    /// A number that changes whenever a traffic policy does (caches of what they
    /// decided key on it).
    pub fn traffic_epoch(&self) -> u64 {
        self.traffic_epoch
    }

    /// Whether any traffic policy holds a RequestAuthentication.
    pub fn has_authentications(&self) -> bool {
        self.authentications > 0
    }

    /// Every traffic policy.
    pub fn traffic_policies(&self) -> impl Iterator<Item = &Arc<crate::traffic::TrafficPolicy>> {
        self.traffic.values()
    }

    /// Records which traffic policies could not be read (replacing the previous list).
    pub fn set_refused_traffic(&mut self, keys: Vec<String>) {
        self.refused_traffic = keys.into_iter().map(Str::from).collect();
    }

    /// Traffic policies that could not be read.
    pub fn refused_traffic(&self) -> impl Iterator<Item = &Str> {
        self.refused_traffic.iter()
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload that owns `ip` on `network`.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        let owner = self
            .workload_ips
            .get(&ip)?
            .iter()
            .find(|o| o.network.as_ref() == network)?;
        self.workloads.get(&owner.key)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The service whose virtual IP is `ip` on `network`.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        let owner = self
            .service_vips
            .get(&ip)?
            .iter()
            .find(|o| o.network.as_ref() == network)?;
        self.services.get(&owner.key)
    }

    /// Services with this hostname (one per namespace that defines it).
    pub fn services_by_hostname(&self, hostname: &str) -> impl Iterator<Item = &Arc<Service>> {
        self.services_by_hostname
            .get(hostname)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter_map(|k| self.services.get(k))
    }

    /// The workloads that back a service.
    pub fn endpoints(&self, service_key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .into_iter()
            .flat_map(|uids| uids.iter())
            .filter_map(|uid| self.workloads.get(uid))
    }

    /// A number that changes whenever the policies of some workload may have changed
    /// (a policy added, changed or removed; a workload's list of policies changed).
    pub fn policy_epoch(&self) -> u64 {
        self.policy_epoch
    }

    pub fn policy(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.policies.get(key)
    }

    /// The first policy `workload` names that this state does not hold, if any.
    pub fn missing_policy<'a>(&'a self, workload: &'a Workload) -> Option<&'a Str> {
        workload
            .profile
            .authorization_policies
            .iter()
            .find(|k| !self.policies.contains_key(*k))
    }

    /// Every policy that applies to `workload`: mesh-wide, its namespace's, and those
    /// selecting it. Cost depends on these, not on how many policies the mesh has.
    pub fn policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
        let global = self.global_policies.iter();
        let namespace = self
            .namespace_policies
            .get(&workload.profile.namespace)
            .into_iter()
            .flat_map(|s| s.iter());
        let selected = workload.profile.authorization_policies.iter();
        global
            .chain(namespace)
            .chain(selected)
            .filter_map(|k| self.policies.get(k))
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }
}

/// The current [`State`], shared between one writer and any number of readers.
#[derive(Debug, Default)]
pub struct Store {
    current: ArcSwap<State>,
    /// Serializes writers (only the discovery client writes); readers never take it.
    write: Mutex<()>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current version. Lock-free; the caller keeps it as long as it likes.
    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Applies `f` to a copy of the current version and publishes the result.
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let _writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = State::clone(&self.current.load());
        let out = f(&mut next);
        self.current.store(Arc::new(next));
        out
    }
}

/// The index key of a policy target.
fn target_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::*;
    use crate::policy::*;

    fn s(v: &str) -> Str {
        v.into()
    }

    pub(crate) fn workload(uid: &str, ns: &str, ip: &str, services: &[&str]) -> Workload {
        Workload {
            uid: s(uid),
            name: s(uid),
            workload_name: s(uid),
            node: s("node-1"),
            addresses: vec![ip.parse().unwrap()].into(),
            tunnel: TunnelProtocol::Hbone,
            status: Health::Healthy,
            native_tunnel: false,
            locality: None,
            waypoint: None,
            profile: Arc::new(profile(ns, services, &[])),
        }
    }

    pub(crate) fn profile(ns: &str, services: &[&str], policies: &[&str]) -> WorkloadProfile {
        WorkloadProfile {
            namespace: s(ns),
            network: s(""),
            trust_domain: s("cluster.local"),
            service_account: s("default"),
            canonical_name: s("app"),
            canonical_revision: s("latest"),
            cluster_id: s("Kubernetes"),
            workload_type: WorkloadType::Pod,
            network_mode: NetworkMode::Standard,
            services: services
                .iter()
                .map(|k| {
                    (
                        s(k),
                        vec![PortMapping {
                            service_port: 80,
                            target_port: 8080,
                        }]
                        .into(),
                    )
                })
                .collect(),
            authorization_policies: policies.iter().map(|p| s(p)).collect(),
            l7_metrics: false,
        }
    }

    fn service(ns: &str, name: &str, vip: &str) -> Service {
        Service {
            name: s(name),
            namespace: s(ns),
            hostname: format!("{name}.{ns}.svc.cluster.local").into(),
            vips: vec![NetworkAddress {
                network: s(""),
                address: vip.parse().unwrap(),
            }],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: None,
        }
    }

    fn policy(ns: &str, name: &str, scope: PolicyScope) -> Authorization {
        Authorization {
            name: s(name),
            namespace: s(ns),
            scope,
            action: PolicyAction::Deny,
            dry_run: false,
            refused: None,
            unenforced: None,
            targets: Vec::new(),
            custom: None,
            rules: vec![],
        }
    }

    #[test]
    fn indexes_follow_updates() {
        let mut st = State::default();
        let svc_key = "demo/echo.demo.svc.cluster.local";
        st.upsert_service(service("demo", "echo", "198.19.0.10"));
        st.upsert_workload(workload("w1", "demo", "198.18.0.1", &[svc_key]));
        st.upsert_workload(workload("w2", "demo", "198.18.0.2", &[svc_key]));

        let ip = |v: &str| v.parse::<IpAddr>().unwrap();
        assert_eq!(
            st.workload_by_ip("", ip("198.18.0.1"))
                .unwrap()
                .uid
                .as_ref(),
            "w1"
        );
        assert!(st.workload_by_ip("other-net", ip("198.18.0.1")).is_none());
        assert_eq!(
            st.service_by_vip("", ip("198.19.0.10")).unwrap().key(),
            svc_key
        );
        assert_eq!(st.endpoints(svc_key).count(), 2);
        assert_eq!(
            st.services_by_hostname("echo.demo.svc.cluster.local")
                .count(),
            1
        );

        // w1 moves to a new IP and leaves the service.
        st.upsert_workload(workload("w1", "demo", "198.18.0.9", &[]));
        assert!(st.workload_by_ip("", ip("198.18.0.1")).is_none());
        assert!(st.workload_by_ip("", ip("198.18.0.9")).is_some());
        assert_eq!(st.endpoints(svc_key).count(), 1);

        assert!(st.remove_address("w2"));
        assert_eq!(st.endpoints(svc_key).count(), 0);
        assert!(st.remove_address(svc_key));
        assert!(st.service_by_vip("", ip("198.19.0.10")).is_none());
        assert!(!st.remove_address("nope"));
        assert_eq!(st.counts(), (1, 0, 0));
    }

    #[test]
    fn policies_for_a_workload_come_from_three_scopes() {
        let mut st = State::default();
        st.upsert_policy(policy("istio-system", "mesh", PolicyScope::Global));
        st.upsert_policy(policy("demo", "ns-wide", PolicyScope::Namespace));
        st.upsert_policy(policy("other", "ns-wide", PolicyScope::Namespace));
        st.upsert_policy(policy("demo", "selected", PolicyScope::WorkloadSelector));
        st.upsert_policy(policy("demo", "unselected", PolicyScope::WorkloadSelector));
        let mut w = workload("w1", "demo", "198.18.0.1", &[]);
        w.profile = Arc::new(profile("demo", &[], &["demo/selected"]));
        let mut got: Vec<String> = st.policies_for(&w).map(|p| p.key()).collect();
        assert_eq!(w.namespace().as_ref(), "demo");
        got.sort();
        assert_eq!(got, ["demo/ns-wide", "demo/selected", "istio-system/mesh"]);

        assert!(st.remove_policy("demo/ns-wide"));
        assert_eq!(st.policies_for(&w).count(), 2);
    }

    #[test]
    fn the_policy_epoch_moves_only_with_policies() {
        let mut st = State::default();
        st.upsert_workload(workload("w1", "demo", "198.18.0.1", &[]));
        let e = st.policy_epoch();
        // Same policies, new address: no policy change.
        st.upsert_workload(workload("w1", "demo", "198.18.0.2", &[]));
        assert_eq!(st.policy_epoch(), e);
        let mut w = workload("w1", "demo", "198.18.0.2", &[]);
        w.profile = Arc::new(profile("demo", &[], &["demo/selected"]));
        st.upsert_workload(w);
        assert!(st.policy_epoch() > e);
        let e = st.policy_epoch();
        st.upsert_policy(policy("demo", "p", PolicyScope::Namespace));
        assert!(st.policy_epoch() > e);
        let e = st.policy_epoch();
        assert!(st.remove_policy("demo/p"));
        assert!(st.policy_epoch() > e);
        let e = st.policy_epoch();
        assert!(!st.remove_policy("demo/p"));
        assert_eq!(st.policy_epoch(), e);
    }

    #[test]
    fn host_network_workloads_are_not_indexed_by_ip() {
        let mut st = State::default();
        let mut w = workload("w1", "demo", "198.18.0.1", &[]);
        let mut p = profile("demo", &[], &[]);
        p.network_mode = NetworkMode::HostNetwork;
        w.profile = Arc::new(p);
        st.upsert_workload(w);
        assert!(
            st.workload_by_ip("", "198.18.0.1".parse().unwrap())
                .is_none()
        );
        assert!(st.workload("w1").is_some());
    }

    #[test]
    fn readers_keep_their_version_while_the_writer_moves_on() {
        let store = Store::new();
        store.update(|st| st.upsert_workload(workload("w1", "demo", "198.18.0.1", &[])));
        let before = store.load();
        store.update(|st| {
            st.remove_address("w1");
        });
        assert!(
            before.workload("w1").is_some(),
            "an old version is unchanged"
        );
        assert!(store.load().workload("w1").is_none());
    }
}
