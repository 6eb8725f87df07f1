//! Waypoints on Kubernetes, as Istio's control plane runs them: for every Gateway of class
//! `istio-waypoint`, the leader creates and keeps its ServiceAccount, Service (ports 15008
//! and 15021), Deployment (pods running `ambit waypoint run`) and a ConfigMap with the
//! mesh roots, all owned by the Gateway (owner references, so the cluster's garbage
//! collector removes them with it; the leader also removes what it made for a Gateway that
//! is gone or no longer a waypoint). It writes the Gateway's status: Accepted, and
//! Programmed with the Service's address once a waypoint pod is ready.
//!
//! Objects are written with server-side apply (field manager `ambit-control`), so a
//! reconcile is idempotent and a field an operator changed that Ambit does not set stays.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ambit_control::model::{ClusterIp, Gateway, Kind, Model, Object};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::Discovery;
use serde_json::json;
use tokio::sync::watch;

/// The label on everything this controller makes.
pub const MANAGED_BY: &str = "ambit.io/managed-by";
const MANAGER: &str = "ambit-control";
/// Gateway API's label naming a waypoint's Gateway (the Service selects pods by it).
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

#[derive(Debug, Clone)]
pub struct WaypointOptions {
    /// The container image with the `ambit` binary.
    pub image: String,
    /// `host:port` of the control plane's gRPC port, as the waypoint pods reach it.
    pub control_plane: String,
    pub trust_domain: String,
    /// The mesh root(s), PEM, published to the waypoints in a ConfigMap.
    pub roots_pem: String,
}

/// Reconciles while this replica leads: on every model change, a change of leadership,
/// and every 30 s.
pub async fn run(
    client: kube::Client,
    mut model: watch::Receiver<Arc<Model>>,
    mut leading: watch::Receiver<bool>,
    options: WaypointOptions,
) {
    let mut written: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut gateway_resource: Option<ApiResource> = None;
    loop {
        if *leading.borrow_and_update() {
            if gateway_resource.is_none() {
                gateway_resource = find_gateway_resource(&client).await;
            }
            let current = model.borrow_and_update().clone();
            if let Err(e) = reconcile(
                &client,
                &current,
                &options,
                gateway_resource.as_ref(),
                &mut written,
            )
            .await
            {
                tracing::warn!(error = %e, "reconciling waypoint deployments failed; retrying");
            }
        } else {
            written.clear();
        }
        tokio::select! {
            r = model.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Fold a burst of changes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn find_gateway_resource(client: &kube::Client) -> Option<ApiResource> {
    let discovery = Discovery::new(client.clone())
        .filter(&["gateway.networking.k8s.io"])
        .run()
        .await
        .ok()?;
    discovery
        .get("gateway.networking.k8s.io")?
        .recommended_kind("Gateway")
        .map(|(r, _)| r)
}

fn waypoints(model: &Model) -> Vec<Arc<Gateway>> {
    model
        .of_kind(Kind::Gateway)
        .filter_map(|o| match o {
            Object::Gateway(g) if g.spec.gateway_class_name.as_str() == "istio-waypoint" => {
                Some(g.clone())
            }
            _ => None,
        })
        .filter(|g| g.metadata.uid.is_some())
        .collect()
}

/// Everything one waypoint needs, as server-side-apply bodies.
pub fn desired(
    gateway: &Gateway,
    api_version: &str,
    options: &WaypointOptions,
) -> Vec<(&'static str, serde_json::Value)> {
    let name = gateway.metadata.name.as_str();
    let ns = gateway.metadata.namespace();
    let uid = gateway.metadata.uid.clone().unwrap_or_default();
    let roots = format!("{name}-ambit-ca-root");
    let meta = |extra: serde_json::Value| {
        let mut labels = json!({ GATEWAY_NAME: name, MANAGED_BY: MANAGER });
        if let (Some(l), Some(e)) = (labels.as_object_mut(), extra.as_object()) {
            l.extend(e.clone());
        }
        json!({
            "name": name,
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": api_version,
                "kind": "Gateway",
                "name": name,
                "uid": uid,
                "controller": true,
            }]
        })
    };
    let mut roots_meta = meta(json!({}));
    roots_meta["name"] = json!(roots);
    vec![
        (
            "ServiceAccount",
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(json!({}))}),
        ),
        (
            "ConfigMap",
            json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": roots_meta,
                "data": {"root-cert.pem": options.roots_pem}
            }),
        ),
        (
            "Service",
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": meta(json!({})),
                "spec": {
                    "selector": { GATEWAY_NAME: name },
                    "ports": [
                        {"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "all"},
                        {"name": "status-port", "port": 15021, "protocol": "TCP"}
                    ]
                }
            }),
        ),
        (
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(json!({})),
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": { GATEWAY_NAME: name }},
                    "template": {
                        "metadata": {"labels": {
                            GATEWAY_NAME: name,
                            MANAGED_BY: MANAGER,
                            "istio.io/dataplane-mode": "none"
                        }},
                        "spec": {
                            "serviceAccountName": name,
                            "terminationGracePeriodSeconds": 30,
                            "containers": [{
                                "name": "waypoint",
                                "image": options.image,
                                "args": ["waypoint", "run", "--name", name, "--namespace", ns,
                                         "--trust-domain", options.trust_domain],
                                "env": [
                                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                                    {"name": "AMBIT_CONTROL_PLANE", "value": options.control_plane},
                                    {"name": "AMBIT_CA_ROOT", "value": "/var/run/ambit/ca/root-cert.pem"},
                                    {"name": "AMBIT_TOKEN_FILE", "value": "/var/run/secrets/tokens/istio-token"}
                                ],
                                "ports": [
                                    {"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
                                    {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
                                    {"name": "status-port", "containerPort": 15021, "protocol": "TCP"}
                                ],
                                "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
                                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                                "securityContext": {
                                    "runAsNonRoot": true, "runAsUser": 1337,
                                    "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}
                                },
                                "volumeMounts": [
                                    {"name": "ca-root", "mountPath": "/var/run/ambit/ca", "readOnly": true},
                                    {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}
                                ]
                            }],
                            "volumes": [
                                {"name": "ca-root", "configMap": {"name": roots}},
                                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                                    "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"
                                }}]}}
                            ]
                        }
                    }
                }
            }),
        ),
    ]
}

async fn apply(
    client: &kube::Client,
    kind: &str,
    ns: &str,
    body: &serde_json::Value,
) -> Result<(), kube::Error> {
    let name = body["metadata"]["name"].as_str().unwrap_or_default();
    let params = PatchParams::apply(MANAGER).force();
    let patch = Patch::Apply(body);
    match kind {
        "ServiceAccount" => {
            Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        "ConfigMap" => {
            Api::<ConfigMap>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        "Service" => {
            Api::<Service>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        _ => {
            Api::<Deployment>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
    }
    Ok(())
}

/// The metadata of the object `kind` `ns/name`, if it exists.
async fn existing(
    client: &kube::Client,
    kind: &str,
    ns: &str,
    name: &str,
) -> Result<Option<kube::api::ObjectMeta>, kube::Error> {
    Ok(match kind {
        "ServiceAccount" => Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|o| o.metadata),
        "ConfigMap" => Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|o| o.metadata),
        "Service" => Api::<Service>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|o| o.metadata),
        _ => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|o| o.metadata),
    })
}

/// An object of the waypoint's names that exists and is not the Gateway's: it is never
/// taken over (a Gateway named after a Service would otherwise capture its traffic, and
/// deleting the Gateway would delete it).
async fn conflict(
    client: &kube::Client,
    desired: &[(&'static str, serde_json::Value)],
    ns: &str,
    uid: &str,
) -> Result<Option<String>, kube::Error> {
    for (kind, body) in desired {
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        if let Some(meta) = existing(client, kind, ns, name).await? {
            let ours = meta
                .owner_references
                .unwrap_or_default()
                .iter()
                .any(|r| r.uid == uid);
            if !ours {
                return Ok(Some(format!(
                    "{kind} {ns}/{name} exists and does not belong to this Gateway; rename the Gateway or remove the {kind}"
                )));
            }
        }
    }
    Ok(None)
}

async fn reconcile(
    client: &kube::Client,
    model: &Model,
    options: &WaypointOptions,
    gateway_resource: Option<&ApiResource>,
    written: &mut BTreeMap<(String, String), String>,
) -> Result<(), kube::Error> {
    let gateways = waypoints(model);
    let api_version =
        gateway_resource.map_or("gateway.networking.k8s.io/v1", |r| r.api_version.as_str());
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for g in &gateways {
        let ns = g.metadata.namespace().to_owned();
        let name = g.metadata.name.as_str().to_owned();
        let objects = desired(g, api_version, options);
        let uid = g.metadata.uid.clone().unwrap_or_default();
        let clash = conflict(client, &objects, &ns, &uid).await?;
        match &clash {
            Some(why) => {
                tracing::warn!(gateway = %format!("{ns}/{name}"), %why, "not running this waypoint")
            }
            None => {
                for (kind, body) in &objects {
                    apply(client, kind, &ns, body).await?;
                }
            }
        }
        if let Some(resource) = gateway_resource {
            write_status(client, model, g, resource, clash, written).await?;
        }
        wanted.insert((ns, name));
    }
    remove_orphans(client, &wanted, gateway_resource).await?;
    written.retain(|k, _| wanted.contains(k));
    Ok(())
}

/// Accepted, and Programmed (with the Service's address) once a waypoint pod is ready.
async fn write_status(
    client: &kube::Client,
    model: &Model,
    g: &Gateway,
    resource: &ApiResource,
    clash: Option<String>,
    written: &mut BTreeMap<(String, String), String>,
) -> Result<(), kube::Error> {
    let ns = g.metadata.namespace();
    let name = g.metadata.name.as_str();
    let ready = model.in_namespace(Kind::Pod, ns).any(|o| match o {
        Object::Pod(p) => {
            p.metadata.labels.get(GATEWAY_NAME) == Some(name) && p.is_ready() && !p.ips().is_empty()
        }
        _ => false,
    });
    let address = match model.lookup(Kind::Service, ns, name) {
        Some(Object::Service(s)) => match s.spec.cluster_ip {
            Some(ClusterIp::Ip(ip)) => Some(ip.to_string()),
            _ => None,
        },
        _ => None,
    };
    let programmed = clash.is_none() && ready && address.is_some();
    let key = (ns.to_owned(), name.to_owned());
    let summary = format!("{programmed} {address:?} {clash:?}");
    if written.get(&key) == Some(&summary) {
        return Ok(());
    }
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
    let generation = api
        .get_opt(name)
        .await?
        .and_then(|o| o.metadata.generation)
        .unwrap_or(0);
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
        .to_string();
    let addresses: Vec<serde_json::Value> = match (&address, programmed) {
        (Some(ip), true) => vec![json!({"type": "IPAddress", "value": ip})],
        _ => Vec::new(),
    };
    let status = json!({"status": {
        "addresses": addresses,
        "conditions": [
            match &clash {
                None => json!({"type": "Accepted", "status": "True", "reason": "Accepted",
                     "message": "Ambit runs this waypoint", "observedGeneration": generation,
                     "lastTransitionTime": now}),
                Some(why) => json!({"type": "Accepted", "status": "False", "reason": "Invalid",
                     "message": why, "observedGeneration": generation,
                     "lastTransitionTime": now}),
            },
            if programmed {
                json!({"type": "Programmed", "status": "True", "reason": "Programmed",
                       "message": "a waypoint pod is ready", "observedGeneration": generation,
                       "lastTransitionTime": now})
            } else {
                json!({"type": "Programmed", "status": "False", "reason": "Pending",
                       "message": "waiting for a ready waypoint pod", "observedGeneration": generation,
                       "lastTransitionTime": now})
            }
        ]
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    written.insert(key, summary);
    Ok(())
}

/// Deletes what this controller made for waypoints that are gone: not in the model, and
/// (asked directly) not an istio-waypoint Gateway in the cluster either (one the model
/// lacks because it could not be read keeps its waypoint).
async fn remove_orphans(
    client: &kube::Client,
    wanted: &BTreeSet<(String, String)>,
    gateway_resource: Option<&ApiResource>,
) -> Result<(), kube::Error> {
    let mut confirmed: BTreeMap<(String, String), bool> = BTreeMap::new();
    let mut still_a_waypoint = async |ns: &str, gateway: &str| -> Result<bool, kube::Error> {
        let key = (ns.to_owned(), gateway.to_owned());
        if let Some(v) = confirmed.get(&key) {
            return Ok(*v);
        }
        let exists = match gateway_resource {
            None => false,
            Some(r) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, r)
                .get_opt(gateway)
                .await?
                .is_some_and(|g| g.data["spec"]["gatewayClassName"] == "istio-waypoint"),
        };
        confirmed.insert(key, exists);
        Ok(exists)
    };
    let selector = ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
    let candidate = |meta: &kube::api::ObjectMeta| {
        let ns = meta.namespace.clone().unwrap_or_default();
        let gateway = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME))
            .cloned()
            .unwrap_or_default();
        (!wanted.contains(&(ns.clone(), gateway.clone())))
            .then(|| (ns, gateway, meta.name.clone().unwrap_or_default()))
    };
    let delete = DeleteParams::default();
    for d in Api::<Deployment>::all(client.clone())
        .list(&selector)
        .await?
    {
        if let Some((ns, gateway, name)) = candidate(&d.metadata)
            && !still_a_waypoint(&ns, &gateway).await?
        {
            tracing::info!(%ns, %name, "removing the Deployment of a waypoint that is gone");
            let _ = Api::<Deployment>::namespaced(client.clone(), &ns)
                .delete(&name, &delete)
                .await;
        }
    }
    for s in Api::<Service>::all(client.clone()).list(&selector).await? {
        if let Some((ns, gateway, name)) = candidate(&s.metadata)
            && !still_a_waypoint(&ns, &gateway).await?
        {
            let _ = Api::<Service>::namespaced(client.clone(), &ns)
                .delete(&name, &delete)
                .await;
        }
    }
    for s in Api::<ServiceAccount>::all(client.clone())
        .list(&selector)
        .await?
    {
        if let Some((ns, gateway, name)) = candidate(&s.metadata)
            && !still_a_waypoint(&ns, &gateway).await?
        {
            let _ = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                .delete(&name, &delete)
                .await;
        }
    }
    for c in Api::<ConfigMap>::all(client.clone())
        .list(&selector)
        .await?
    {
        if let Some((ns, gateway, name)) = candidate(&c.metadata)
            && !still_a_waypoint(&ns, &gateway).await?
        {
            let _ = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .delete(&name, &delete)
                .await;
        }
    }
    Ok(())
}
