//! Installing Ambit on a cluster, and checking it, as `istioctl install` and
//! `linkerd check` do.
//!
//! [`render`] produces every object (Istio's CRDs, the namespace, service accounts,
//! least-privilege RBAC, the control plane's Deployment, Service and disruption budget,
//! the mesh CA's Secret and the roots ConfigMap, the node proxy's DaemonSet), each labelled
//! `app.kubernetes.io/managed-by=ambit-install`. [`apply`] writes them with server-side
//! apply (idempotent; an existing CA Secret is kept, never regenerated), [`uninstall`]
//! removes them, [`check`] runs named checks with a hint for each failure.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::discovery::Discovery;
use serde_json::{Value, json};

/// The label on everything the installer writes.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const INSTALLER: &str = "ambit-install";
/// The Secret holding the mesh's root certificate and key.
pub const CA_SECRET: &str = "ambit-ca";
/// The ConfigMap with the mesh root, mounted by node proxies.
pub const ROOTS_CONFIG_MAP: &str = "ambit-ca-root";

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub namespace: String,
    pub image: String,
    pub control_plane_replicas: u32,
    pub trust_domain: String,
    pub log_level: String,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            namespace: "istio-system".into(),
            image: "ambit:latest".into(),
            control_plane_replicas: 2,
            trust_domain: "cluster.local".into(),
            log_level: "info".into(),
        }
    }
}

impl InstallOptions {
    /// One `--set key=value`.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("--set {assignment:?}: expected KEY=VALUE"))?;
        match key {
            "namespace" => self.namespace = value.to_owned(),
            "image" => self.image = value.to_owned(),
            "controlPlane.replicas" => {
                self.control_plane_replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=10).contains(n))
                    .ok_or_else(|| {
                    format!("--set controlPlane.replicas={value}: a number from 1 to 10")
                })?;
            }
            "trustDomain" => self.trust_domain = value.to_owned(),
            "logLevel" => self.log_level = value.to_owned(),
            _ => {
                return Err(format!(
                    "--set {key}: unknown setting (known: namespace, image, controlPlane.replicas, trustDomain, logLevel)"
                ));
            }
        }
        Ok(())
    }
}

/// The mesh CA: a root certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub root_cert: String,
    pub root_key: String,
}

/// Istio's CRDs Ambit reads: (group, kind, plural, versions, storage version).
const CRDS: [(&str, &str, &str, &[&str]); 8] = [
    (
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
        &["v1", "v1beta1"],
    ),
    (
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
        &["v1", "v1beta1"],
    ),
    (
        "security.istio.io",
        "RequestAuthentication",
        "requestauthentications",
        &["v1", "v1beta1"],
    ),
    (
        "networking.istio.io",
        "ServiceEntry",
        "serviceentries",
        &["v1", "v1beta1", "v1alpha3"],
    ),
    (
        "networking.istio.io",
        "WorkloadEntry",
        "workloadentries",
        &["v1", "v1beta1", "v1alpha3"],
    ),
    (
        "networking.istio.io",
        "DestinationRule",
        "destinationrules",
        &["v1", "v1beta1", "v1alpha3"],
    ),
    (
        "networking.istio.io",
        "VirtualService",
        "virtualservices",
        &["v1", "v1beta1", "v1alpha3"],
    ),
    (
        "networking.ambit.io",
        "LocalRateLimit",
        "localratelimits",
        &["v1alpha1"],
    ),
];

fn labels(component: &str) -> Value {
    json!({ MANAGED_BY: INSTALLER, "app.kubernetes.io/name": "ambit", "app.kubernetes.io/component": component })
}

/// Every object of an install, in the order they are applied.
pub fn render(o: &InstallOptions, ca: &CaFiles) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let mut out = Vec::new();
    for (group, kind, plural, versions) in CRDS {
        out.push(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}"), "labels": labels("crd")},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                          "listKind": format!("{kind}List")},
                // Ambit checks every field itself and reports errors in its status and
                // `/debug/config`; the schema only keeps the object structural.
                "versions": versions.iter().enumerate().map(|(i, v)| json!({
                    "name": v, "served": true, "storage": i == 0,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
                })).collect::<Vec<_>>()
            }
        }));
    }
    out.push(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": labels("namespace")}}));
    for sa in ["ambit-control", "ambit-node", "ambit-cni"] {
        out.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": ns, "labels": labels(sa)}}));
    }
    // The control plane reads the mesh, reviews tokens, runs waypoints and writes the
    // Gateways' status; nothing else.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "ambit-control", "labels": labels("ambit-control")},
        "rules": [
            {"apiGroups": [""], "resources": ["namespaces", "nodes", "pods", "services", "serviceaccounts"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["security.istio.io", "networking.istio.io", "networking.ambit.io"], "resources": ["*"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways", "httproutes", "grpcroutes", "referencegrants"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": ["security.istio.io"], "resources": ["authorizationpolicies/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            // Waypoint Deployments and what goes with them.
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
            {"apiGroups": [""], "resources": ["services", "serviceaccounts", "configmaps"],
             "verbs": ["create", "patch", "update", "delete"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}
        ]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "ambit-control", "labels": labels("ambit-control")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ambit-control"},
        "subjects": [{"kind": "ServiceAccount", "name": "ambit-control", "namespace": ns}]
    }));
    // The node agent reads pods' and namespaces' labels when the runtime creates a pod,
    // and its own DaemonSet when it stops (an uninstall removes the CNI plugin).
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "ambit-cni", "labels": labels("ambit-cni")},
        "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get"]}]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "ambit-cni", "labels": labels("ambit-cni")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ambit-cni"},
        "subjects": [{"kind": "ServiceAccount", "name": "ambit-cni", "namespace": ns}]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "ambit-cni", "namespace": ns, "labels": labels("ambit-cni")},
        "rules": [{"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["ambit-cni"], "verbs": ["get"]},
                  // A token for the CNI plugin, not bound to the agent's pod.
                  {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["ambit-cni"], "verbs": ["create"]}]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "ambit-cni", "namespace": ns, "labels": labels("ambit-cni")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ambit-cni"},
        "subjects": [{"kind": "ServiceAccount", "name": "ambit-cni", "namespace": ns}]
    }));
    // The leader election's Lease, in the control plane's namespace only.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "ambit-control", "namespace": ns, "labels": labels("ambit-control")},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "ambit-control", "namespace": ns, "labels": labels("ambit-control")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ambit-control"},
        "subjects": [{"kind": "ServiceAccount", "name": "ambit-control", "namespace": ns}]
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": CA_SECRET, "namespace": ns, "labels": labels("ca")},
        "stringData": {"root-cert.pem": ca.root_cert, "root-key.pem": ca.root_key}
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOTS_CONFIG_MAP, "namespace": ns, "labels": labels("ca")},
        "data": {"root-cert.pem": ca.root_cert}
    }));
    let control = labels("ambit-control");
    out.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "ambit-control", "namespace": ns, "labels": control},
        "spec": {
            "replicas": o.control_plane_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/component": "ambit-control"}},
            "template": {
                "metadata": {"labels": control},
                "spec": {
                    "serviceAccountName": "ambit-control",
                    "containers": [{
                        "name": "control", "image": o.image,
                        "args": ["--log-format", "json", "--log-level", o.log_level, "control", "--kubernetes",
                                 "--state-dir", "/var/lib/ambit/control",
                                 "--grpc-addr", "0.0.0.0:15012", "--monitoring-addr", "0.0.0.0:15014",
                                 "--root-namespace", ns, "--trust-domain", o.trust_domain,
                                 "--server-name", format!("ambit-control.{ns}.svc"),
                                 "--waypoint-image", o.image],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "grpc", "containerPort": 15012, "protocol": "TCP"},
                                  {"name": "monitoring", "containerPort": 15014, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15014}, "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 1337, "allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [{"name": "state", "mountPath": "/var/lib/ambit/control"},
                                         {"name": "ca", "mountPath": "/var/lib/ambit/control/ca", "readOnly": true}]
                    }],
                    "volumes": [{"name": "state", "emptyDir": {}},
                                {"name": "ca", "secret": {"secretName": CA_SECRET, "defaultMode": 0o400}}]
                }
            }
        }
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "ambit-control", "namespace": ns, "labels": control},
        "spec": {"selector": {"app.kubernetes.io/component": "ambit-control"},
                 "ports": [{"name": "grpc", "port": 15012, "protocol": "TCP"},
                           {"name": "monitoring", "port": 15014, "protocol": "TCP"}]}
    }));
    out.push(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "ambit-control", "namespace": ns, "labels": control},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/component": "ambit-control"}}}
    }));
    let node = labels("ambit-node");
    out.push(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ambit-node", "namespace": ns, "labels": node},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/component": "ambit-node"}},
            "updateStrategy": {"rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": node},
                "spec": {
                    "serviceAccountName": "ambit-node",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "node", "image": o.image,
                        "args": ["--log-format", "json", "--log-level", o.log_level, "node",
                                 "--zds-socket", "/var/run/ambit/zds.sock",
                                 "--readiness-addr", "0.0.0.0:15021", "--metrics-addr", "0.0.0.0:15020"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "AMBIT_CONTROL_PLANE", "value": format!("ambit-control.{ns}.svc:15012")},
                            {"name": "AMBIT_CA_ROOT", "value": "/var/run/ambit/ca/root-cert.pem"},
                            {"name": "AMBIT_TOKEN_FILE", "value": "/var/run/secrets/tokens/istio-token"}
                        ],
                        "ports": [{"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
                                  {"name": "readiness", "containerPort": 15021, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "200m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
                        // It opens listeners inside pods' network namespaces and marks sockets.
                        "securityContext": {"privileged": false, "runAsUser": 0, "allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}},
                        "volumeMounts": [
                            {"name": "ca", "mountPath": "/var/run/ambit/ca", "readOnly": true},
                            {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                            {"name": "run", "mountPath": "/var/run/ambit"}
                        ]
                    }],
                    "volumes": [
                        {"name": "ca", "configMap": {"name": ROOTS_CONFIG_MAP}},
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                        {"name": "run", "hostPath": {"path": "/var/run/ambit", "type": "DirectoryOrCreate"}}
                    ]
                }
            }
        }
    }));
    let agent = labels("ambit-cni");
    out.push(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ambit-cni", "namespace": ns, "labels": agent},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/component": "ambit-cni"}},
            "updateStrategy": {"rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": agent},
                "spec": {
                    "serviceAccountName": "ambit-cni",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    // The host's network namespace (the plugin reaches the agent's socket
                    // on the host) and process table (pods' namespaces by address).
                    "hostNetwork": true,
                    "hostPID": true,
                    "containers": [{
                        "name": "cni", "image": o.image,
                        "args": ["--log-format", "json", "--log-level", o.log_level, "cni", "--kubernetes",
                                 "--zds-socket", "/var/run/ambit/zds.sock",
                                 "--cni-socket", "/var/run/ambit/cni.sock",
                                 "--cni-conf-dir", "/host/etc/cni/net.d", "--cni-bin-dir", "/host/opt/cni/bin",
                                 "--daemonset", format!("{ns}/ambit-cni"),
                                 "--admin-addr", "0.0.0.0:15030"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                            {"name": "AMBIT_CONTROL_PLANE", "value": format!("ambit-control.{ns}.svc:15012")},
                            {"name": "AMBIT_CA_ROOT", "value": "/var/run/ambit/ca/root-cert.pem"},
                            {"name": "AMBIT_TOKEN_FILE", "value": "/var/run/secrets/tokens/istio-token"}
                        ],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15030}, "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                        // It enters pods' network namespaces (SYS_ADMIN), writes their
                        // nftables rules (NET_ADMIN) and opens other processes' namespace
                        // files (SYS_PTRACE); not privileged.
                        "securityContext": {"privileged": false, "runAsUser": 0, "readOnlyRootFilesystem": true,
                                            "capabilities": {"add": ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]}},
                        "volumeMounts": [
                            {"name": "ca", "mountPath": "/var/run/ambit/ca", "readOnly": true},
                            {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                            {"name": "run", "mountPath": "/var/run/ambit"},
                            {"name": "netns", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
                            {"name": "cni-conf", "mountPath": "/host/etc/cni/net.d"},
                            {"name": "cni-bin", "mountPath": "/host/opt/cni/bin"}
                        ]
                    }],
                    "volumes": [
                        {"name": "ca", "configMap": {"name": ROOTS_CONFIG_MAP}},
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                        {"name": "run", "hostPath": {"path": "/var/run/ambit", "type": "DirectoryOrCreate"}},
                        {"name": "netns", "hostPath": {"path": "/var/run/netns", "type": "DirectoryOrCreate"}},
                        {"name": "cni-conf", "hostPath": {"path": "/etc/cni/net.d", "type": "DirectoryOrCreate"}},
                        {"name": "cni-bin", "hostPath": {"path": "/opt/cni/bin", "type": "DirectoryOrCreate"}}
                    ]
                }
            }
        }
    }));
    out
}

/// Renders as YAML documents (JSON is YAML: one object per document).
pub fn to_yaml(objects: &[Value]) -> String {
    let mut out = String::from("# Ambit, rendered by `ambit install --dry-run -o yaml`.\n");
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(o).unwrap_or_default());
        out.push('\n');
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("asking the API server what it serves: {0}")]
    Discovery(String),
    #[error("the API server does not serve {0}")]
    NotServed(String),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
}

/// Where each object goes: its resource as the API server serves it. A
/// PodDisruptionBudget falls back to `policy/v1beta1` on servers older than 1.21.
struct Resources(Discovery);

impl Resources {
    async fn new(client: &kube::Client) -> Result<Self, InstallError> {
        Discovery::new(client.clone())
            .run()
            .await
            .map(Self)
            .map_err(|e| InstallError::Discovery(e.to_string()))
    }

    fn find(&self, api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let g = self.0.get(group)?;
        let tries = if kind == "PodDisruptionBudget" {
            vec![version, "v1beta1"]
        } else {
            vec![version]
        };
        for v in tries {
            if let Some((r, caps)) = g
                .versioned_resources(v)
                .into_iter()
                .find(|(r, _)| r.kind == kind)
            {
                return Some((r, caps.scope == kube::discovery::Scope::Namespaced));
            }
        }
        None
    }
}

fn api_for(
    client: &kube::Client,
    resources: &Resources,
    o: &Value,
) -> Result<(Api<DynamicObject>, String, ApiResource), InstallError> {
    let api_version = o["apiVersion"].as_str().unwrap_or_default();
    let kind = o["kind"].as_str().unwrap_or_default();
    let name = o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (resource, namespaced) = resources
        .find(api_version, kind)
        .ok_or_else(|| InstallError::NotServed(format!("{api_version} {kind}")))?;
    let api = match (namespaced, o["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    Ok((api, name, resource))
}

/// The mesh CA already installed, if any (an install never replaces it: every workload
/// certificate chains to it).
pub async fn existing_ca(
    client: &kube::Client,
    namespace: &str,
) -> Result<Option<CaFiles>, InstallError> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(CA_SECRET)
        .await
        .map_err(|source| InstallError::Api {
            what: format!("reading Secret {namespace}/{CA_SECRET}"),
            source,
        })?;
    let Some(data) = secret.and_then(|s| s.data) else {
        return Ok(None);
    };
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Ok(match (text("root-cert.pem"), text("root-key.pem")) {
        (Some(root_cert), Some(root_key)) => Some(CaFiles {
            root_cert,
            root_key,
        }),
        _ => None,
    })
}

/// Applies `objects` in order with server-side apply; `progress` gets a line each.
pub async fn apply(
    client: &kube::Client,
    objects: &[Value],
    mut progress: impl FnMut(String),
) -> Result<(), InstallError> {
    let mut resources = Resources::new(client).await?;
    let params = PatchParams::apply(INSTALLER).force();
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        // Objects of CRDs just created need the API server to serve them first.
        let (api, name, resource) = match api_for(client, &resources, o) {
            Ok(r) => r,
            Err(InstallError::NotServed(_)) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                resources = Resources::new(client).await?;
                api_for(client, &resources, o)?
            }
            Err(e) => return Err(e),
        };
        // Istio's own CRDs, if installed, stay Istio's: taking them over would let
        // `ambit uninstall --crds` delete them with every policy.
        if kind == "CustomResourceDefinition"
            && let Some(current) = api
                .get_opt(&name)
                .await
                .map_err(|source| InstallError::Api {
                    what: format!("reading {kind} {name}"),
                    source,
                })?
            && current
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY))
                .map(String::as_str)
                != Some(INSTALLER)
        {
            progress(format!("kept {kind} {name} (installed by someone else)"));
            continue;
        }
        let mut body = o.clone();
        body["apiVersion"] = json!(resource.api_version);
        api.patch(&name, &params, &Patch::Apply(&body))
            .await
            .map_err(|source| InstallError::Api {
                what: format!("applying {kind} {name}"),
                source,
            })?;
        let ns = o["metadata"]["namespace"]
            .as_str()
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        progress(format!("applied {kind} {ns}{name}"));
    }
    Ok(())
}

/// Deletes what [`render`] describes, except the namespace (it may hold more than
/// Ambit), unless `crds` the CRDs (deleting them deletes every policy written with
/// them), and unless `purge` the mesh CA's Secret.
pub async fn uninstall(
    client: &kube::Client,
    objects: &[Value],
    crds: bool,
    purge: bool,
    mut progress: impl FnMut(String),
) -> Result<(), InstallError> {
    let resources = Resources::new(client).await?;
    for o in objects.iter().rev() {
        let kind = o["kind"].as_str().unwrap_or_default();
        // The namespace may hold more than Ambit: it stays. The mesh CA stays unless
        // `purge`: without its key no certificate issued so far can be renewed by a
        // reinstalled control plane.
        let is_ca = kind == "Secret" && o["metadata"]["name"] == CA_SECRET;
        if kind == "Namespace" || (kind == "CustomResourceDefinition" && !crds) || (is_ca && !purge)
        {
            continue;
        }
        let Ok((api, name, _)) = api_for(client, &resources, o) else {
            continue;
        };
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                progress(format!("deleted {kind} {name}"));
                if kind == "DaemonSet" && name == "ambit-cni" {
                    // Each agent removes the CNI plugin from its node as it stops, if it
                    // can still read that its DaemonSet is gone: its permissions go last.
                    let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
                    wait_for_agents_to_stop(client, ns, &mut progress).await;
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(InstallError::Api {
                    what: format!("deleting {kind} {name}"),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Waits (up to a minute) until no node agent pod is left.
async fn wait_for_agents_to_stop(
    client: &kube::Client,
    namespace: &str,
    progress: &mut impl FnMut(String),
) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let selector = kube::api::ListParams::default().labels("app.kubernetes.io/component=ambit-cni");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut told = false;
    loop {
        let left = pods.list(&selector).await.map_or(0, |l| l.items.len());
        if left == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            progress(format!(
                "{left} node agent pod(s) still stopping; nodes where they have not removed the CNI plugin need `ambit cni-plugin uninstall`"
            ));
            return;
        }
        if !told {
            told = true;
            progress(format!(
                "waiting for {left} node agent pod(s) to stop and remove the CNI plugin from their nodes"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One named check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What to do when it failed.
    pub hint: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>, hint: &str) -> Check {
    Check {
        name: name.to_owned(),
        ok,
        detail: detail.into(),
        hint: if ok { String::new() } else { hint.to_owned() },
    }
}

/// The checks: with `pre`, whether an install can proceed; else whether the installed
/// mesh is healthy.
pub async fn run_checks(client: &kube::Client, namespace: &str, pre: bool) -> Vec<Check> {
    let mut out = Vec::new();
    // API server reachable, its version, and the clock against it.
    let sent = std::time::SystemTime::now();
    match client.apiserver_version().await {
        Ok(v) => out.push(check(
            "API server reachable",
            true,
            format!("Kubernetes {}.{} ({})", v.major, v.minor, v.git_version),
            "",
        )),
        Err(e) => {
            out.push(check(
                "API server reachable",
                false,
                e.to_string(),
                "check the kubeconfig (--kubeconfig, KUBECONFIG) and that the API server is up",
            ));
            return out;
        }
    }
    out.push(clock_skew(client, sent).await);
    // RBAC: can this caller install?
    let can = |group: &str, resource: &str, verb: &str, ns: Option<&str>| {
        let review = k8s_openapi::api::authorization::v1::SelfSubjectAccessReview {
            spec: k8s_openapi::api::authorization::v1::SelfSubjectAccessReviewSpec {
                resource_attributes: Some(
                    k8s_openapi::api::authorization::v1::ResourceAttributes {
                        group: Some(group.to_owned()),
                        resource: Some(resource.to_owned()),
                        verb: Some(verb.to_owned()),
                        namespace: ns.map(str::to_owned),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview> =
            Api::all(client.clone());
        async move {
            api.create(&Default::default(), &review)
                .await
                .ok()
                .and_then(|r| r.status)
                .is_some_and(|s| s.allowed)
        }
    };
    let mut missing = Vec::new();
    for (group, resource, ns) in [
        ("apiextensions.k8s.io", "customresourcedefinitions", None),
        ("rbac.authorization.k8s.io", "clusterroles", None),
        ("apps", "deployments", Some(namespace)),
        ("apps", "daemonsets", Some(namespace)),
        ("", "secrets", Some(namespace)),
    ] {
        if !can(group, resource, "create", ns).await {
            missing.push(format!("create {resource}"));
        }
    }
    out.push(check(
        "RBAC allows the install",
        missing.is_empty(),
        if missing.is_empty() {
            "may create CRDs, cluster roles, deployments, daemonsets and secrets".to_owned()
        } else {
            format!("not allowed: {}", missing.join(", "))
        },
        "run as a cluster administrator",
    ));
    if pre {
        return out;
    }
    // CRDs.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let mut absent = Vec::new();
    for (group, _, plural, _) in CRDS {
        if crds
            .get_opt(&format!("{plural}.{group}"))
            .await
            .ok()
            .flatten()
            .is_none()
        {
            absent.push(format!("{plural}.{group}"));
        }
    }
    out.push(check(
        "Istio CRDs present",
        absent.is_empty(),
        if absent.is_empty() {
            format!("{} CRDs", CRDS.len())
        } else {
            format!("missing: {}", absent.join(", "))
        },
        "run `ambit install`",
    ));
    let gateway_api = crds
        .get_opt("gateways.gateway.networking.k8s.io")
        .await
        .ok()
        .flatten()
        .is_some();
    out.push(check(
        "Gateway API CRDs present",
        gateway_api,
        if gateway_api {
            "gateways.gateway.networking.k8s.io"
        } else {
            "not installed: waypoints are declared as Gateways"
        },
        "install the Gateway API's standard CRDs (its release's standard-install.yaml)",
    ));
    // The control plane.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), namespace);
    let control = deployments.get_opt("ambit-control").await.ok().flatten();
    let (wanted, ready) = control
        .as_ref()
        .map(|d| {
            (
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                d.status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0),
            )
        })
        .unwrap_or((0, 0));
    out.push(check(
        "control plane ready",
        control.is_some() && ready > 0,
        match &control {
            None => "no Deployment ambit-control".to_owned(),
            Some(_) => format!("{ready} of {wanted} replicas ready"),
        },
        &format!(
            "see `kubectl -n {namespace} describe deployment ambit-control` and its pods' logs (pods need a kubelet and the image)"
        ),
    ));
    // Node proxies: one ready on every node.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node_count = nodes
        .list(&Default::default())
        .await
        .map_or(0, |l| l.items.len());
    out.push(
        daemonset_check(
            client,
            namespace,
            "ambit-node",
            "a node proxy ready on every node",
            node_count,
        )
        .await,
    );
    out.push(
        daemonset_check(
            client,
            namespace,
            "ambit-cni",
            "a node agent ready on every node (pod capture)",
            node_count,
        )
        .await,
    );
    // The mesh root.
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), namespace);
    let root = config_maps
        .get_opt(ROOTS_CONFIG_MAP)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.data)
        .and_then(|d| d.get("root-cert.pem").cloned());
    out.push(match root {
        None => check(
            "mesh root certificate valid",
            false,
            format!("no ConfigMap {namespace}/{ROOTS_CONFIG_MAP}"),
            "run `ambit install`",
        ),
        Some(pem) => match root_not_after(&pem) {
            Ok(expiry) => {
                let left = expiry
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                check(
                    "mesh root certificate valid",
                    left > Duration::from_secs(30 * 86_400),
                    format!("expires in {} days", left.as_secs() / 86_400),
                    "rotate the mesh root before it expires",
                )
            }
            Err(e) => check(
                "mesh root certificate valid",
                false,
                e,
                "reinstall the CA Secret and roots ConfigMap",
            ),
        },
    });
    out
}

/// One ready pod of a DaemonSet on every node.
async fn daemonset_check(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    what: &str,
    node_count: usize,
) -> Check {
    let daemonsets: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(client.clone(), namespace);
    let ds = daemonsets.get_opt(name).await.ok().flatten();
    let ready = ds
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .map_or(0, |s| s.number_ready);
    check(
        what,
        ds.is_some() && node_count > 0 && ready as usize >= node_count,
        match &ds {
            None => format!("no DaemonSet {name}"),
            Some(_) => format!("{ready} of {node_count} nodes"),
        },
        &format!(
            "see `kubectl -n {namespace} get pods -l app.kubernetes.io/component={name} -o wide`"
        ),
    )
}

fn root_not_after(pem: &str) -> Result<std::time::SystemTime, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("the root certificate is not PEM: {e}"))?;
    ambit_tls::x509::inspect(&der).map(|i| i.not_after)
}

async fn clock_skew(client: &kube::Client, sent: std::time::SystemTime) -> Check {
    let request = http::Request::get("/version").body(kube::client::Body::from(Vec::new()));
    let date = match request {
        Ok(r) => client.send(r).await.ok().and_then(|resp| {
            resp.headers()
                .get(http::header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(httpdate_parse)
        }),
        Err(_) => None,
    };
    match date {
        None => check(
            "clock skew",
            false,
            "the API server sent no Date header",
            "check the API server's clock by hand",
        ),
        Some(theirs) => {
            let skew = match theirs.duration_since(sent) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            // The Date header has one-second resolution.
            let ok = skew <= Duration::from_secs(5);
            check(
                "clock skew",
                ok,
                format!("{} s from the API server's clock", skew.as_secs()),
                "synchronise the clocks (certificates and tokens are time-limited)",
            )
        }
    }
}

/// An HTTP date (`Tue, 01 Dec 2026 03:00:00 GMT`).
fn httpdate_parse(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(&to_rfc3339(s)?).ok()
}

fn to_rfc3339(s: &str) -> Option<String> {
    let mut parts = s.split_whitespace().skip(1);
    let day: u32 = parts.next()?.parse().ok()?;
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let name = parts.next()?;
    let month = months.iter().position(|m| *m == name)? + 1;
    let year: u32 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    Some(format!("{year:04}-{month:02}-{day:02}T{time}Z"))
}

/// Counts of what was rendered, by kind, for the summary line.
pub fn summary(objects: &[Value]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in objects {
        *counts.entry(o["kind"].as_str().unwrap_or("?")).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        let t = httpdate_parse("Tue, 01 Dec 2026 03:04:05 GMT").unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2026-12-01T03:04:05Z"
        );
        assert!(httpdate_parse("yesterday").is_none());
    }

    #[test]
    fn settings_are_checked() {
        let mut o = InstallOptions::default();
        o.set("image=registry.example/ambit:1").unwrap();
        o.set("controlPlane.replicas=3").unwrap();
        assert_eq!(
            (o.image.as_str(), o.control_plane_replicas),
            ("registry.example/ambit:1", 3)
        );
        assert!(o.set("controlPlane.replicas=0").is_err());
        assert!(
            o.set("imagePullPolicy=Always")
                .unwrap_err()
                .contains("unknown")
        );
        assert!(o.set("image").is_err());
    }

    #[test]
    fn every_object_is_labelled_and_namespaced_where_it_should_be() {
        let o = InstallOptions::default();
        let objects = render(
            &o,
            &CaFiles {
                root_cert: "C".into(),
                root_key: "K".into(),
            },
        );
        for obj in &objects {
            assert_eq!(obj["metadata"]["labels"][MANAGED_BY], INSTALLER, "{obj}");
        }
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert!(kinds.starts_with(&["CustomResourceDefinition"; 8]));
        assert!(kinds.contains(&"DaemonSet") && kinds.contains(&"PodDisruptionBudget"));
        // The node proxy has no cluster permissions: its token only proves its node.
        assert!(
            !objects
                .iter()
                .any(|o| o["kind"] == "ClusterRoleBinding"
                    && o["subjects"][0]["name"] == "ambit-node")
        );
        let yaml = to_yaml(&objects);
        assert!(yaml.contains("root-key.pem"));
        assert_eq!(yaml.matches("\n---\n").count(), objects.len());
    }
}
