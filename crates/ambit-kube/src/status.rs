//! Policy status written back to the cluster, as Istio's control plane writes it in
//! ambient mode: each AuthorizationPolicy gets a `ZtunnelAccepted` condition (enforced
//! by the node proxies) or, when it targets a Service or Gateway, `WaypointAccepted`
//! (enforced by a waypoint). `True`/`Accepted` when it is enforced as written; `False`
//! with the reason when it is not: `UnsupportedValue` (part of it cannot be enforced
//! there, the message says which and what Ambit does instead, e.g. a service not bound
//! to a waypoint) or `Invalid` (Ambit could not read it; a denying stand-in or its last
//! good version is in force, the message says which). Only the leader writes, and only
//! what changed.
//!
//! Each HTTPRoute gets, per parent it names and under controller
//! `ambit.io/mesh-controller`, the Gateway API's `Accepted` and `ResolvedRefs`
//! conditions, with the reason and what to do when one is `False`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_control::model::{Kind, Model, Object};
use ambit_control::source::SourceStatus;
use ambit_control::xds::snapshot::Snapshot;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::discovery::Discovery;
use serde_json::{Value, json};
use tokio::sync::watch;

/// One condition as Ambit decides it (the time is added when written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCondition {
    pub kind: &'static str,
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The conditions every AuthorizationPolicy should carry, by `(namespace, name)`. A
/// policy the translation has not reached yet (`translated` says no, and it has no
/// warnings) gets none: the model can be newer than the snapshot, and a status must
/// not say Accepted before the control plane has read the policy.
pub fn desired(
    model: &Model,
    warnings: &BTreeMap<String, Vec<String>>,
    translated: &dyn Fn(&str) -> bool,
    source: &SourceStatus,
) -> BTreeMap<(String, String), PolicyCondition> {
    let refused: BTreeMap<String, String> = source
        .file_errors
        .iter()
        .filter_map(|f| {
            let key = f.file.strip_prefix("AuthorizationPolicy ")?;
            let why = f
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            Some((key.to_owned(), why))
        })
        .collect();
    let mut out = BTreeMap::new();
    for object in model.of_kind(Kind::AuthorizationPolicy) {
        let Object::AuthorizationPolicy(p) = object else {
            continue;
        };
        let ns = p.metadata.namespace().to_owned();
        let name = p.metadata.name.to_string();
        let key = format!("{ns}/{name}");
        let waypoint = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
        let kind = if waypoint {
            "WaypointAccepted"
        } else {
            "ZtunnelAccepted"
        };
        let condition = if let Some(why) = refused.get(&key) {
            let in_force = if p.metadata.annotations.get("ambit.io/stand-in").is_some() {
                "a policy denying all traffic to its targets is enforced in its place"
            } else {
                "its last readable version stays in force"
            };
            PolicyCondition {
                kind,
                accepted: false,
                reason: "Invalid",
                message: format!("Ambit cannot read this policy ({why}); {in_force}"),
            }
        } else if !warnings.contains_key(&key) && !translated(&key) {
            continue;
        } else {
            match warnings.get(&key) {
                Some(w) if !w.is_empty() => PolicyCondition {
                    kind,
                    accepted: false,
                    reason: "UnsupportedValue",
                    message: if waypoint {
                        w.join("; ")
                    } else {
                        format!(
                            "{}. The node proxies work at L4: to enforce HTTP conditions, bind the service to a waypoint and target the policy at it with targetRefs",
                            w.join("; ")
                        )
                    },
                },
                _ => PolicyCondition {
                    kind,
                    accepted: true,
                    reason: "Accepted",
                    message: if waypoint {
                        "enforced by the waypoint of its targets".into()
                    } else {
                        "enforced by the node proxies".into()
                    },
                },
            }
        };
        out.insert((ns, name), condition);
    }
    out
}

/// The controller name Ambit writes route status under.
pub const CONTROLLER: &str = "ambit.io/mesh-controller";

/// The `status.parents` each HTTPRoute should carry (without times), by `(ns, name)`,
/// read from the translation's warnings: per parent `Accepted` (`False` with
/// `NoMatchingParent` for a Service that does not exist, `UnsupportedValue` for a parent
/// Ambit cannot serve or a filter it does not implement) and `ResolvedRefs` (`False`
/// with `BackendNotFound`, `RefNotPermitted` or `InvalidKind`).
pub fn desired_routes(
    model: &Model,
    warnings: &BTreeMap<String, Vec<String>>,
    kind: Kind,
) -> BTreeMap<(String, String), Value> {
    use ambit_control::xds::translate::{GRPC_ROUTE_WARNING_PREFIX, ROUTE_WARNING_PREFIX};
    let mut out = BTreeMap::new();
    for object in model.of_kind(kind) {
        let (metadata, parent_refs, prefix) = match object {
            Object::HttpRoute(r) => (&r.metadata, &r.spec.parent_refs, ROUTE_WARNING_PREFIX),
            Object::GrpcRoute(r) => (&r.metadata, &r.spec.parent_refs, GRPC_ROUTE_WARNING_PREFIX),
            _ => continue,
        };
        let ns = metadata.namespace().to_owned();
        let name = metadata.name.to_string();
        let empty = Vec::new();
        let w = warnings
            .get(&format!("{prefix}{ns}/{name}"))
            .unwrap_or(&empty);
        let unsupported: Vec<&String> = w
            .iter()
            .filter(|m| m.contains("is not supported yet; the rule answers"))
            .collect();
        let backends: Vec<&String> = w.iter().filter(|m| m.contains(": backend ")).collect();
        let resolved = if backends.is_empty() {
            condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "every backend resolved".into(),
            )
        } else {
            let reason = if backends.iter().any(|m| m.contains("ReferenceGrant")) {
                "RefNotPermitted"
            } else if backends.iter().any(|m| m.contains("only Service")) {
                "InvalidKind"
            } else {
                "BackendNotFound"
            };
            condition("ResolvedRefs", false, reason, join(&backends))
        };
        let parents: Vec<Value> = parent_refs
            .iter()
            .map(|p| {
                let kind = p.kind.clone().unwrap_or_else(|| "Gateway".into());
                let parent_ns = p.namespace.as_ref().map_or(ns.clone(), |n| n.to_string());
                let mut parent = json!({
                    "group": p.group.clone().unwrap_or_else(|| "gateway.networking.k8s.io".into()),
                    "kind": kind,
                    "name": p.name.to_string(),
                });
                if p.namespace.is_some() {
                    parent["namespace"] = json!(parent_ns);
                }
                if let Some(port) = &p.port {
                    parent["port"] = json!(port.0);
                }
                if let Some(section) = &p.section_name {
                    parent["sectionName"] = json!(section);
                }
                let refused = format!("NOT ENFORCED for {kind} {parent_ns}/{}", p.name);
                let not_accepted: Vec<&String> =
                    w.iter().filter(|m| m.starts_with(&refused)).collect();
                let accepted = if let Some(first) = not_accepted.first() {
                    let reason = if first.contains("no such Service") {
                        "NoMatchingParent"
                    } else {
                        "UnsupportedValue"
                    };
                    condition("Accepted", false, reason, join(&not_accepted))
                } else if !unsupported.is_empty() {
                    condition("Accepted", false, "UnsupportedValue", join(&unsupported))
                } else {
                    condition(
                        "Accepted",
                        true,
                        "Accepted",
                        "routed by the waypoint serving the parent".into(),
                    )
                };
                json!({
                    "parentRef": parent,
                    "controllerName": CONTROLLER,
                    "conditions": [accepted, resolved.clone()],
                })
            })
            .collect();
        out.insert((ns, name), Value::Array(parents));
    }
    out
}

fn condition(kind: &str, ok: bool, reason: &str, message: String) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
    })
}

fn join(messages: &[&String]) -> String {
    messages
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Writes policy status while this replica leads: on every new snapshot, a change of
/// leadership, and every minute (a status someone else overwrote is written again).
pub async fn run(
    client: kube::Client,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    model: watch::Receiver<Arc<Model>>,
    source: watch::Receiver<Arc<SourceStatus>>,
    mut leading: watch::Receiver<bool>,
) {
    let mut written: BTreeMap<(String, String), PolicyCondition> = BTreeMap::new();
    let mut routes_written: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut grpc_written: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut resource: Option<ApiResource> = None;
    let mut route_resource: Option<ApiResource> = None;
    let mut grpc_resource: Option<ApiResource> = None;
    let mut since_full = tokio::time::Instant::now();
    loop {
        if *leading.borrow_and_update() {
            if resource.is_none() {
                resource = find_resource(&client, "security.istio.io", "AuthorizationPolicy").await;
            }
            if route_resource.is_none() {
                route_resource =
                    find_resource(&client, "gateway.networking.k8s.io", "HTTPRoute").await;
            }
            if grpc_resource.is_none() {
                grpc_resource =
                    find_resource(&client, "gateway.networking.k8s.io", "GRPCRoute").await;
            }
            if since_full.elapsed() >= Duration::from_secs(60) {
                written.clear();
                routes_written.clear();
                grpc_written.clear();
                since_full = tokio::time::Instant::now();
            }
            let snapshot = snapshots.borrow_and_update().clone();
            if let Some(r) = &resource {
                let translated = |key: &str| {
                    use ambit_control::xds::translate::ResourceType;
                    snapshot
                        .resources(ResourceType::Authorization)
                        .contains_key(key)
                        || snapshot
                            .resources(ResourceType::WaypointPolicy)
                            .contains_key(key)
                };
                let want = desired(
                    &model.borrow(),
                    &snapshot.warnings,
                    &translated,
                    &source.borrow(),
                );
                write(&client, r, &want, &mut written).await;
            }
            if let Some(r) = &route_resource {
                let want = desired_routes(&model.borrow(), &snapshot.warnings, Kind::HTTPRoute);
                write_routes(&client, r, &want, &mut routes_written).await;
            }
            if let Some(r) = &grpc_resource {
                let want = desired_routes(&model.borrow(), &snapshot.warnings, Kind::GRPCRoute);
                write_routes(&client, r, &want, &mut grpc_written).await;
            }
        } else {
            written.clear();
            routes_written.clear();
            grpc_written.clear();
        }
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        // Fold a burst of changes.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn find_resource(client: &kube::Client, group: &str, kind: &str) -> Option<ApiResource> {
    let discovery = Discovery::new(client.clone())
        .filter(&[group])
        .run()
        .await
        .ok()?;
    discovery.get(group)?.recommended_kind(kind).map(|(r, _)| r)
}

/// Merge-patches an object's status: through the status subresource, or the object
/// itself for a CRD without one (it keeps status in the object).
async fn merge_status(
    api: &Api<DynamicObject>,
    name: &str,
    body: &Value,
) -> Result<DynamicObject, kube::Error> {
    let result = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(body))
        .await;
    match result {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            api.patch(name, &PatchParams::default(), &Patch::Merge(body))
                .await
        }
        other => other,
    }
}

/// Merge-patches `status.parents` of the routes whose wanted status changed.
async fn write_routes(
    client: &kube::Client,
    resource: &ApiResource,
    want: &BTreeMap<(String, String), Value>,
    written: &mut BTreeMap<(String, String), Value>,
) {
    written.retain(|k, _| want.contains_key(k));
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    for (key, parents) in want {
        if written.get(key) == Some(parents) {
            continue;
        }
        let mut timed = parents.clone();
        for p in timed.as_array_mut().into_iter().flatten() {
            for c in p["conditions"].as_array_mut().into_iter().flatten() {
                c["lastTransitionTime"] = json!(now);
            }
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.0, resource);
        let body = json!({"status": {"parents": timed}});
        match merge_status(&api, &key.1, &body).await {
            Ok(_) => {
                written.insert(key.clone(), parents.clone());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(route = %format!("{}/{}", key.0, key.1), error = %e, "cannot write the route's status; retrying");
            }
        }
    }
}

async fn write(
    client: &kube::Client,
    resource: &ApiResource,
    want: &BTreeMap<(String, String), PolicyCondition>,
    written: &mut BTreeMap<(String, String), PolicyCondition>,
) {
    written.retain(|k, _| want.contains_key(k));
    for (key, condition) in want {
        if written.get(key) == Some(condition) {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.0, resource);
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let body = json!({"status": {"conditions": [{
            "type": condition.kind,
            "status": if condition.accepted { "True" } else { "False" },
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": now,
        }]}});
        match merge_status(&api, &key.1, &body).await {
            Ok(_) => {
                written.insert(key.clone(), condition.clone());
            }
            // Deleted meanwhile: the next model drops it.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(policy = %format!("{}/{}", key.0, key.1), error = %e, "cannot write the policy's status; retrying");
            }
        }
    }
}

/// The condition as it appears in `status.conditions` (for tests and the CLI).
pub fn condition_of(object: &Value, kind: &str) -> Option<(String, String, String)> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_control::model::Model;

    fn model(yaml: &str) -> Model {
        let objects = ambit_control::model::parse::parse_manifest(yaml).unwrap();
        Model::from_objects(1, objects)
    }

    #[test]
    fn accepted_unsupported_and_waypoint_conditions() {
        let m = model(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {action: ALLOW, rules: [{}]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: shop}\nspec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: c, namespace: shop}\nspec: {targetRefs: [{kind: Service, group: \"\", name: web}], action: ALLOW, rules: [{}]}\n",
        );
        let warnings: BTreeMap<String, Vec<String>> = [(
            "shop/b".to_owned(),
            vec!["methods need a waypoint".to_owned()],
        )]
        .into();
        // Not translated yet (no resource, no warnings): no condition, not Accepted.
        let d = desired(&m, &warnings, &|_| false, &SourceStatus::default());
        assert!(!d.contains_key(&("shop".to_owned(), "a".to_owned())));
        assert!(
            d.contains_key(&("shop".to_owned(), "b".to_owned())),
            "warned: translated"
        );
        let d = desired(&m, &warnings, &|_| true, &SourceStatus::default());
        let a = &d[&("shop".to_owned(), "a".to_owned())];
        assert_eq!(
            (a.kind, a.accepted, a.reason),
            ("ZtunnelAccepted", true, "Accepted")
        );
        let b = &d[&("shop".to_owned(), "b".to_owned())];
        assert_eq!((b.accepted, b.reason), (false, "UnsupportedValue"));
        assert!(
            b.message.starts_with("methods need a waypoint. "),
            "{}",
            b.message
        );
        let c = &d[&("shop".to_owned(), "c".to_owned())];
        assert_eq!((c.kind, c.accepted), ("WaypointAccepted", true));
    }

    #[test]
    fn a_route_on_a_service_with_a_waypoint_is_accepted_and_resolved() {
        let m = model(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec: {selector: {app: web}, clusterIP: 198.19.0.5, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}, {name: nope, port: 80}]}]
",
        );
        let mut t = ambit_control::xds::translate::Translator::new(Default::default());
        t.full(&m);
        let d = desired_routes(&m, t.warnings(), Kind::HTTPRoute);
        let parents = &d[&("shop".to_owned(), "r".to_owned())];
        let c = &parents[0]["conditions"];
        assert_eq!(c[0]["status"], "True", "{c}");
        assert_eq!(c[1]["reason"], "BackendNotFound", "{c}");
        assert!(
            c[1]["message"]
                .as_str()
                .unwrap()
                .contains("no Service shop/nope"),
            "{c}"
        );
    }
}
