//! What the node proxy knows about the mesh: workloads, services and L4 policies, as the
//! control plane describes them (Istio's `istio.workload.Address` and
//! `istio.security.Authorization` discovery types, decoded and validated).
//!
//! Strings that repeat across many objects (namespaces, nodes, service accounts, ...) are
//! shared `Arc<str>`s, so a large mesh costs little memory per workload.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::identity::SpiffeId;

/// A shared, immutable string.
pub type Str = Arc<str>;

/// A workload: one pod (or VM) with its addresses and identity.
///
/// What replicas of one deployment have in common (namespace, service account, services,
/// policies, ...) lives in a [`WorkloadProfile`] they share, so a workload itself is a
/// few pointers: about 130 bytes plus its name and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The discovery resource name, e.g. `Kubernetes//Pod/demo/echo-1`.
    pub uid: Str,
    pub name: Str,
    /// The owning workload's name (the pod name when it has no owner).
    pub workload_name: Str,
    pub node: Str,
    pub addresses: Box<[IpAddr]>,
    pub tunnel: TunnelProtocol,
    pub status: Health,
    /// The workload receives HBONE itself (a waypoint, for instance).
    pub native_tunnel: bool,
    pub locality: Option<Arc<Locality>>,
    pub waypoint: Option<Arc<GatewayAddress>>,
    #[serde(flatten)]
    pub profile: Arc<WorkloadProfile>,
}

/// The part of a workload that its replicas share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct WorkloadProfile {
    pub namespace: Str,
    pub network: Str,
    pub trust_domain: Str,
    pub service_account: Str,
    pub canonical_name: Str,
    pub canonical_revision: Str,
    pub cluster_id: Str,
    pub workload_type: WorkloadType,
    pub network_mode: NetworkMode,
    /// Services these workloads back, by service key (`<namespace>/<hostname>`), with
    /// their port mapping for each.
    pub services: Box<[(Str, Box<[PortMapping]>)]>,
    /// Selector-based policies that apply (`<namespace>/<name>`).
    pub authorization_policies: Box<[Str]>,
    /// The node proxy records request metrics for these workloads' plaintext HTTP
    /// (opted in by annotation; see [`L7_METRICS_EXTENSION`]).
    pub l7_metrics: bool,
}

/// The workload extension that turns on request metrics at the node proxy.
pub const L7_METRICS_EXTENSION: &str = "ambit.io/l7-metrics";

impl Workload {
    /// The workload's SPIFFE ID, if its parts are valid.
    pub fn identity(&self) -> Option<SpiffeId> {
        let p = &self.profile;
        SpiffeId::new(
            p.trust_domain.as_ref(),
            p.namespace.as_ref(),
            p.service_account.as_ref(),
        )
        .ok()
    }

    pub fn namespace(&self) -> &Str {
        &self.profile.namespace
    }

    pub fn network(&self) -> &Str {
        &self.profile.network
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TunnelProtocol {
    /// Plain TCP: the workload is not in the mesh.
    None,
    /// HBONE to port 15008.
    Hbone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Health {
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum WorkloadType {
    Deployment,
    CronJob,
    Pod,
    Job,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum NetworkMode {
    Standard,
    /// The address is the node's, shared by many workloads: never look it up by IP.
    HostNetwork,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: Str,
    pub zone: Str,
    pub subzone: Str,
}

/// A port a service exposes and the port on the workload it maps to (0: use the
/// workload's own mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// An address on a network (empty network: the default one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NetworkAddress {
    pub network: Str,
    pub address: IpAddr,
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// Where a waypoint or network gateway is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum GatewayDestination {
    /// A service, `<namespace>/<hostname>`.
    Hostname {
        namespace: Str,
        hostname: Str,
    },
    Address(NetworkAddress),
}

/// A service: a name, virtual IPs and ports in front of the workloads that back it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: Str,
    pub namespace: Str,
    pub hostname: Str,
    pub vips: Vec<NetworkAddress>,
    pub ports: Vec<PortMapping>,
    pub subject_alt_names: Vec<Str>,
    pub waypoint: Option<GatewayAddress>,
    pub load_balancing: Option<LoadBalancing>,
}

impl Service {
    /// The discovery resource name: `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// How endpoints are chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadBalancing {
    /// Scopes to keep traffic within, most important first.
    pub routing_preference: Vec<LocalityScope>,
    pub mode: LoadBalancingMode,
    pub include_unhealthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LocalityScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LoadBalancingMode {
    Unspecified,
    /// Only endpoints matching every preference.
    Strict,
    /// Prefer endpoints matching the most preferences, fall back to fewer.
    Failover,
    /// No endpoint selection: pass through to the original destination.
    Passthrough,
}
