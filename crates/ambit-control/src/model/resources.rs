//! The Kubernetes-style resources the control plane reads, as typed Rust values.
//!
//! Field names and shapes are those of the Kubernetes core API, Istio's
//! `security.istio.io` and `networking.istio.io` groups, and the Gateway API, so the same
//! manifests work here and in a cluster. Only the fields Ambit uses are modelled; the
//! other fields of each API are listed as known and ignored ([`Ignored`]). Everything is
//! strict: a field that is neither is an error, because a misspelt field silently ignored
//! can change who a workload is (`serviceAcountName` would give the pod the `default`
//! identity) or what a policy allows. Contents Ambit never reads (a container's
//! `resources`, a Node's `status`) are not checked.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::fields::{
    Annotations, IntOrString, IpBlock, Labels, Name, NamespaceName, NodeName, NonEmpty, Port,
};

/// A field of the API that Ambit knows and does not read: accepted with any content,
/// never serialized.
pub type Ignored = Option<IgnoredAny>;

/// `metadata` of every object.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: Name,
    /// Absent for cluster-scoped objects; namespaced objects without one are placed in
    /// `default`, as `kubectl apply` does.
    #[serde(default)]
    pub namespace: Option<NamespaceName>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Annotations,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default, skip_serializing)]
    pub generate_name: Ignored,
    #[serde(default, skip_serializing)]
    pub self_link: Ignored,
    #[serde(default, skip_serializing)]
    pub resource_version: Ignored,
    #[serde(default, skip_serializing)]
    pub generation: Ignored,
    /// RFC 3339; decides precedence between routes (the older first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing)]
    pub deletion_timestamp: Ignored,
    #[serde(default, skip_serializing)]
    pub deletion_grace_period_seconds: Ignored,
    #[serde(default, skip_serializing)]
    pub owner_references: Ignored,
    #[serde(default, skip_serializing)]
    pub finalizers: Ignored,
    #[serde(default, skip_serializing)]
    pub managed_fields: Ignored,
}

impl ObjectMeta {
    /// The namespace, for namespaced objects (set by the parser).
    pub fn namespace(&self) -> &str {
        self.namespace.as_ref().map_or("default", |n| n.as_str())
    }

    /// Seconds since the epoch of `creationTimestamp`; 0 when absent or unreadable.
    pub fn created(&self) -> i64 {
        self.creation_timestamp
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes core (v1)

/// `v1/Namespace`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub spec: Ignored,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
}

/// `v1/Node`: its labels give the locality of the pods on it
/// (`topology.kubernetes.io/region`, `topology.kubernetes.io/zone`,
/// `topology.istio.io/subzone`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub spec: Ignored,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
}

/// `v1/ServiceAccount`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub secrets: Ignored,
    #[serde(default, rename = "imagePullSecrets", skip_serializing)]
    pub image_pull_secrets: Ignored,
    #[serde(default, rename = "automountServiceAccountToken", skip_serializing)]
    pub automount_service_account_token: Ignored,
}

/// `v1/Pod`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    /// Defaults to `serviceAccount`, then to `default`, as in Kubernetes.
    #[serde(default)]
    pub service_account_name: Option<Name>,
    /// Kubernetes' deprecated spelling of `serviceAccountName`, used when that is absent.
    #[serde(default)]
    pub service_account: Option<Name>,
    /// The node the pod runs on. A pod without one is not scheduled.
    #[serde(default)]
    pub node_name: Option<NodeName>,
    #[serde(default)]
    pub host_network: bool,
    /// Only the ports are read (named `targetPort`s resolve through them).
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing)]
    pub active_deadline_seconds: Ignored,
    #[serde(default, skip_serializing)]
    pub affinity: Ignored,
    #[serde(default, skip_serializing)]
    pub automount_service_account_token: Ignored,
    #[serde(default, skip_serializing)]
    pub dns_config: Ignored,
    #[serde(default, skip_serializing)]
    pub dns_policy: Ignored,
    #[serde(default, skip_serializing)]
    pub enable_service_links: Ignored,
    #[serde(default, skip_serializing)]
    pub ephemeral_containers: Ignored,
    #[serde(default, skip_serializing)]
    pub host_aliases: Ignored,
    #[serde(default, rename = "hostIPC", skip_serializing)]
    pub host_ipc: Ignored,
    #[serde(default, rename = "hostPID", skip_serializing)]
    pub host_pid: Ignored,
    #[serde(default, skip_serializing)]
    pub host_users: Ignored,
    #[serde(default, skip_serializing)]
    pub hostname: Ignored,
    #[serde(default, skip_serializing)]
    pub hostname_override: Ignored,
    #[serde(default, skip_serializing)]
    pub image_pull_secrets: Ignored,
    #[serde(default, skip_serializing)]
    pub init_containers: Ignored,
    #[serde(default, skip_serializing)]
    pub node_selector: Ignored,
    #[serde(default, skip_serializing)]
    pub os: Ignored,
    #[serde(default, skip_serializing)]
    pub overhead: Ignored,
    #[serde(default, skip_serializing)]
    pub preemption_policy: Ignored,
    #[serde(default, skip_serializing)]
    pub priority: Ignored,
    #[serde(default, skip_serializing)]
    pub priority_class_name: Ignored,
    #[serde(default, skip_serializing)]
    pub readiness_gates: Ignored,
    #[serde(default, skip_serializing)]
    pub resource_claims: Ignored,
    #[serde(default, skip_serializing)]
    pub resources: Ignored,
    #[serde(default, skip_serializing)]
    pub restart_policy: Ignored,
    #[serde(default, skip_serializing)]
    pub runtime_class_name: Ignored,
    #[serde(default, skip_serializing)]
    pub scheduler_name: Ignored,
    #[serde(default, skip_serializing)]
    pub scheduling_gates: Ignored,
    #[serde(default, skip_serializing)]
    pub security_context: Ignored,
    #[serde(default, rename = "setHostnameAsFQDN", skip_serializing)]
    pub set_hostname_as_fqdn: Ignored,
    #[serde(default, skip_serializing)]
    pub share_process_namespace: Ignored,
    #[serde(default, skip_serializing)]
    pub subdomain: Ignored,
    #[serde(default, skip_serializing)]
    pub termination_grace_period_seconds: Ignored,
    #[serde(default, skip_serializing)]
    pub tolerations: Ignored,
    #[serde(default, skip_serializing)]
    pub topology_spread_constraints: Ignored,
    #[serde(default, skip_serializing)]
    pub volumes: Ignored,
}

/// A container: only its ports are read; the rest of it is not checked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: Port,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing)]
    pub host_port: Ignored,
    #[serde(default, rename = "hostIP", skip_serializing)]
    pub host_ip: Ignored,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodStatus {
    /// Defaults to `Running` when the pod has an IP, `Pending` otherwise (local manifests
    /// describe pods as they run and rarely spell this out).
    #[serde(default)]
    pub phase: Option<PodPhase>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
    #[serde(default, skip_serializing)]
    pub message: Ignored,
    #[serde(default, skip_serializing)]
    pub reason: Ignored,
    #[serde(default, skip_serializing)]
    pub nominated_node_name: Ignored,
    #[serde(default, rename = "hostIP", skip_serializing)]
    pub host_ip: Ignored,
    #[serde(default, rename = "hostIPs", skip_serializing)]
    pub host_ips: Ignored,
    #[serde(default, skip_serializing)]
    pub start_time: Ignored,
    #[serde(default, skip_serializing)]
    pub init_container_statuses: Ignored,
    #[serde(default, skip_serializing)]
    pub container_statuses: Ignored,
    #[serde(default, skip_serializing)]
    pub ephemeral_container_statuses: Ignored,
    #[serde(default, skip_serializing)]
    pub qos_class: Ignored,
    #[serde(default, skip_serializing)]
    pub resize: Ignored,
    #[serde(default, skip_serializing)]
    pub resource_claim_statuses: Ignored,
    #[serde(default, skip_serializing)]
    pub observed_generation: Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodIp {
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing)]
    pub last_probe_time: Ignored,
    #[serde(default, skip_serializing)]
    pub last_transition_time: Ignored,
    #[serde(default, skip_serializing)]
    pub message: Ignored,
    #[serde(default, skip_serializing)]
    pub reason: Ignored,
    #[serde(default, skip_serializing)]
    pub observed_generation: Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl Pod {
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_ref()
            .or(self.spec.service_account.as_ref())
            .map_or("default", |n| n.as_str())
    }

    pub fn node(&self) -> Option<&str> {
        self.spec.node_name.as_ref().map(|n| n.as_str())
    }

    /// The pod's IPs, `podIP` first, without duplicates.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.status.pod_ip.into_iter().collect();
        for p in &self.status.pod_ips {
            if !ips.contains(&p.ip) {
                ips.push(p.ip);
            }
        }
        ips
    }

    pub fn phase(&self) -> PodPhase {
        self.status.phase.unwrap_or(if self.ips().is_empty() {
            PodPhase::Pending
        } else {
            PodPhase::Running
        })
    }

    /// Whether the pod has ended (Succeeded or Failed) and will not run again.
    pub fn is_terminated(&self) -> bool {
        matches!(self.phase(), PodPhase::Succeeded | PodPhase::Failed)
    }

    /// The container port named `name` (TCP), for a Service's named `targetPort`.
    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| {
                p.name.as_deref() == Some(name)
                    && p.protocol.unwrap_or(Protocol::Tcp) == Protocol::Tcp
            })
            .map(|p| p.container_port.0)
    }

    /// Ready: the `Ready` condition if the manifest gives one, else Running.
    pub fn is_ready(&self) -> bool {
        match self.status.conditions.iter().find(|c| c.kind == "Ready") {
            Some(c) => c.status == ConditionStatus::True,
            None => self.phase() == PodPhase::Running,
        }
    }
}

/// `v1/Service`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Pods whose labels include all of these back the service. Absent: endpoints are
    /// managed elsewhere (none in local mode).
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `None` (the string) for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<ClusterIp>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<ClusterIp>,
    #[serde(default, rename = "type")]
    pub kind: Option<ServiceType>,
    #[serde(default)]
    pub external_name: Option<String>,
    /// `PreferClose` asks for same-zone/same-node endpoints first.
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default, skip_serializing)]
    pub allocate_load_balancer_node_ports: Ignored,
    #[serde(default, rename = "externalIPs", skip_serializing)]
    pub external_ips: Ignored,
    #[serde(default, skip_serializing)]
    pub external_traffic_policy: Ignored,
    #[serde(default, skip_serializing)]
    pub health_check_node_port: Ignored,
    #[serde(default, skip_serializing)]
    pub internal_traffic_policy: Ignored,
    #[serde(default, skip_serializing)]
    pub ip_families: Ignored,
    #[serde(default, skip_serializing)]
    pub ip_family_policy: Ignored,
    #[serde(default, skip_serializing)]
    pub load_balancer_class: Ignored,
    #[serde(default, rename = "loadBalancerIP", skip_serializing)]
    pub load_balancer_ip: Ignored,
    #[serde(default, skip_serializing)]
    pub load_balancer_source_ranges: Ignored,
    #[serde(default, skip_serializing)]
    pub publish_not_ready_addresses: Ignored,
    #[serde(default, skip_serializing)]
    pub session_affinity: Ignored,
    #[serde(default, skip_serializing)]
    pub session_affinity_config: Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// A `clusterIP` value: an address, or `None` for headless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ClusterIp {
    Ip(IpAddr),
    None,
}

impl<'de> Deserialize<'de> for ClusterIp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "None" {
            return Ok(ClusterIp::None);
        }
        s.parse().map(ClusterIp::Ip).map_err(|_| {
            serde::de::Error::custom(format!(
                "{s:?} is not an IP address (or \"None\" for a headless service)"
            ))
        })
    }
}

impl Service {
    /// The virtual IPs of the service (empty for headless).
    pub fn vips(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for ip in self.spec.cluster_ip.iter().chain(&self.spec.cluster_ips) {
            if let ClusterIp::Ip(ip) = ip
                && !out.contains(ip)
            {
                out.push(*ip);
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: Port,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    #[serde(default, skip_serializing)]
    pub node_port: Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

// ---------------------------------------------------------------------------------------
// security.istio.io (v1, v1beta1)

/// `security.istio.io/v1` AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Defaults to ALLOW.
    #[serde(default)]
    pub action: Option<AuthorizationAction>,
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthorizationAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: NonEmpty,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: NonEmpty,
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<NamespaceName>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

/// `rules[].from[].source`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<IpBlock>,
    #[serde(default)]
    pub not_ip_blocks: Vec<IpBlock>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<IpBlock>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<IpBlock>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub not_ports: Vec<Port>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: ConditionKey,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// A `when` key Istio understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ConditionKey(String);

impl ConditionKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
];
const CONDITION_KEY_PREFIXES: &[&str] = &[
    "request.headers[",
    "request.auth.claims[",
    "experimental.envoy.filters.",
];

impl<'de> Deserialize<'de> for ConditionKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let known = CONDITION_KEYS.contains(&s.as_str())
            || CONDITION_KEY_PREFIXES
                .iter()
                .any(|p| s.starts_with(p) && (!p.ends_with('[') || s.ends_with(']')));
        if known {
            Ok(Self(s))
        } else {
            Err(serde::de::Error::custom(format!(
                "unknown condition key {s:?}; supported: {}, request.headers[<name>], request.auth.claims[<name>]",
                CONDITION_KEYS.join(", ")
            )))
        }
    }
}

/// `security.istio.io/v1` PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthentication {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<Port, MutualTls>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: Option<MtlsMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

// ---------------------------------------------------------------------------------------
// networking.istio.io (v1, v1beta1, v1alpha3)

/// `networking.istio.io/v1` ServiceEntry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    pub spec: ServiceEntrySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<NonEmpty>,
    #[serde(default)]
    pub addresses: Vec<IpBlock>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub location: Option<ServiceEntryLocation>,
    #[serde(default)]
    pub resolution: Option<ServiceEntryResolution>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default)]
    pub workload_selector: Option<ServiceEntryWorkloadSelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: Port,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<Port>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceEntryLocation {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceEntryResolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntryWorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// `networking.istio.io/v1` WorkloadEntry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    pub spec: WorkloadEntrySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    /// An IP address, a hostname, or a unix socket path.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, Port>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<Name>,
}

// ---------------------------------------------------------------------------------------
// gateway.networking.k8s.io (v1, v1beta1)

/// Gateway API `Gateway` (a waypoint when `gatewayClassName: istio-waypoint`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    pub gateway_class_name: Name,
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    #[serde(default, skip_serializing)]
    pub infrastructure: Ignored,
    #[serde(default, rename = "backendTLS", skip_serializing)]
    pub backend_tls: Ignored,
    #[serde(default, skip_serializing)]
    pub allowed_listeners: Ignored,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    pub name: NonEmpty,
    #[serde(default)]
    pub hostname: Option<String>,
    pub port: Port,
    pub protocol: NonEmpty,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub allowed_routes: Option<serde_json::Value>,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayAddress {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub value: NonEmpty,
}

/// Gateway API `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<NonEmpty>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<NamespaceName>,
    pub name: Name,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<Port>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub filters: Vec<serde_json::Value>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub timeouts: Option<serde_json::Value>,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub retry: Option<serde_json::Value>,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub session_persistence: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPathMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: NonEmpty,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<NamespaceName>,
    #[serde(default)]
    pub port: Option<Port>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Kept as written; interpreted by the waypoint.
    #[serde(default)]
    pub filters: Vec<serde_json::Value>,
}

/// `discovery.k8s.io/v1` (and `v1beta1`) `EndpointSlice`: the endpoints of a Service,
/// named by its label `kubernetes.io/service-name`. Only those of Services without a
/// selector matter to the mesh (a selector's endpoints are its pods). Slices are written
/// by controllers, not people, and gain fields between Kubernetes versions: unknown
/// fields inside endpoints and ports are ignored rather than refused.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Vec<SlicePort>,
}

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    /// The Service these endpoints belong to.
    pub fn service(&self) -> Option<&str> {
        self.metadata.labels.get(SERVICE_NAME_LABEL)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub conditions: SliceConditions,
    #[serde(default)]
    pub target_ref: Option<SliceTargetRef>,
    #[serde(default)]
    pub node_name: Option<String>,
}

impl SliceEndpoint {
    /// A pod's endpoint: the pod is a workload of its own already.
    pub fn is_pod(&self) -> bool {
        self.target_ref.as_ref().and_then(|t| t.kind.as_deref()) == Some("Pod")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceConditions {
    /// Absent means ready (as Kubernetes reads it).
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceTargetRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<Port>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

/// Gateway API `GRPCRoute`: routing by gRPC service and method, which Ambit translates to
/// the HTTP paths gRPC uses (`/<service>/<method>`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRoute {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<NonEmpty>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Kept as written; interpreted by the translation.
    #[serde(default)]
    pub filters: Vec<serde_json::Value>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Kept as written; reported as not supported.
    #[serde(default)]
    pub session_persistence: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

/// Istio `VirtualService`, for services bound to a waypoint: its `http` routes (matches,
/// destinations, timeouts, retries, fault injection) are interpreted by the translation;
/// what it cannot apply is reported.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualService {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Kept as written; interpreted by the translation.
    #[serde(default)]
    pub http: Vec<serde_json::Value>,
    #[serde(default)]
    pub tcp: Vec<serde_json::Value>,
    #[serde(default)]
    pub tls: Vec<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// Istio `DestinationRule`: its `trafficPolicy` (load balancing, connection pool,
/// outlier detection, per-port settings) applies at the waypoint serving its host;
/// interpreted by the translation, which reports what it cannot apply.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationRule {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    /// Kept as written; interpreted by the translation.
    #[serde(default)]
    pub traffic_policy: Option<serde_json::Value>,
    #[serde(default)]
    pub subsets: Vec<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<serde_json::Value>,
}

/// Ambit's `LocalRateLimit` (`networking.ambit.io/v1alpha1`): a token bucket per
/// waypoint replica for the requests to the Services (or every Service of the waypoint
/// Gateways) it targets, with optional descriptors that have buckets of their own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRateLimit {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: LocalRateLimitSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRateLimitSpec {
    #[serde(default)]
    pub target_refs: Vec<RateLimitTargetRef>,
    #[serde(default)]
    pub token_bucket: Option<TokenBucketSpec>,
    #[serde(default)]
    pub descriptors: Vec<RateLimitDescriptorSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenBucketSpec {
    pub max_tokens: u32,
    /// Default: `maxTokens`.
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    /// A duration (`1s`, `500ms`, `1m`).
    pub fill_interval: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitDescriptorSpec {
    /// A request header's name; or set `sourcePrincipal`.
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub source_principal: bool,
    /// Only requests with this value; absent: each distinct value its own bucket.
    #[serde(default)]
    pub value: Option<String>,
    pub token_bucket: TokenBucketSpec,
}

/// The name of Istio's mesh config ConfigMap (in the root namespace; key `mesh`).
pub const MESH_CONFIG_MAP: &str = "istio";

/// `v1/ConfigMap`; only the mesh config (`istio`) is modelled.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMap {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: std::collections::BTreeMap<String, String>,
    #[serde(default, rename = "binaryData", skip_serializing)]
    pub binary_data: Ignored,
    #[serde(default, skip_serializing)]
    pub immutable: Ignored,
}

/// Istio's mesh config (the `mesh` key of the `istio` ConfigMap): Ambit reads its
/// `extensionProviders` (the external authorizers of CUSTOM policies); its other fields
/// configure Envoy-based proxies and are not read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProviderSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProviderSpec {
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpcSpec>,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<ExtAuthzHttpSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzGrpcSpec {
    pub service: String,
    pub port: u32,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    /// An HTTP status, written as a string in Istio's API.
    #[serde(default)]
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub clear_route_cache: bool,
    #[serde(default)]
    pub include_request_body_in_check: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzHttpSpec {
    pub service: String,
    pub port: u32,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
    #[serde(default)]
    pub clear_route_cache: bool,
    #[serde(default)]
    pub include_request_body_in_check: Option<serde_json::Value>,
    /// Deprecated in Istio; reported.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
}

/// Istio's `RequestAuthentication` (`security.istio.io`): which JSON Web Tokens a
/// workload accepts. In ambient mode the waypoint checks them, for the Services and
/// waypoint Gateways named in `targetRefs`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestAuthentication {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRuleSpec {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the control plane fetches the key set (`https://`, `http://`, `file://`).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The key set inline, as JSON.
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderSpec>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    /// How long a key fetch may take (Istio's field; the control plane's own limit
    /// applies).
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeaderSpec {
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeaderSpec {
    pub header: String,
    pub claim: String,
}

/// Gateway API `ReferenceGrant`: lets routes of other namespaces refer to objects
/// (Services) of its own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrant {
    #[serde(default, rename = "apiVersion", skip_serializing)]
    pub api_version: Ignored,
    #[serde(default, skip_serializing)]
    pub kind: Ignored,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub status: Ignored,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}
