//! AuthorizationPolicies bound by `targetRefs` (a waypoint's Gateway, a Service bound to
//! a waypoint, or, from the root namespace, the GatewayClass `istio-waypoint`: every
//! waypoint) as Ambit's waypoint policy resource (`ambit.waypoint.v1.Policy`):
//! every field the waypoint can check at L7, the connection fields in Istio's own match
//! message so the one engine reads them the same way at both layers.
//!
//! Request principals and `request.auth.*` read what a RequestAuthentication bound to the
//! same waypoint established (a request without a valid token has no principal and no
//! claims). What the waypoint cannot check follows Istio's fail-closed rule: an ALLOW
//! rule using it matches nothing, a DENY rule keeps its other conditions; a warning says
//! so. A target
//! that no waypoint serves (a Service not bound to one, a Gateway that is not an
//! `istio-waypoint`) leaves the policy unenforced there, and the warning starts with
//! `NOT ENFORCED` so it is counted and shown.

use ambit_proto::security as pb_sec;
use ambit_proto::waypoint as pb_wp;

use super::{
    DRY_RUN_ANNOTATION, TranslateOptions, WaypointFor, condition_match, operation_match,
    source_match, string_matches, waypoint,
};
use crate::model::resources::{Condition, Operation, Rule as ApRule, Source};
use crate::model::{
    AuthorizationAction, AuthorizationPolicy, ExtensionProviderSpec, Kind, MESH_CONFIG_MAP,
    MeshConfig, Model, Object,
};

/// The most targets one policy may name, as in Istio.
pub const MAX_TARGETS: usize = 16;

/// The gateway class of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// Whether `p` is for waypoints (it names targets).
pub fn is_waypoint_policy(p: &AuthorizationPolicy) -> bool {
    p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty()
}

/// The policy as a waypoint resource, with warnings; `None` when no target can be
/// served (every warning then says why).
pub fn translate(
    model: &Model,
    p: &AuthorizationPolicy,
    o: &TranslateOptions,
) -> (Option<pb_wp::Policy>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = p.metadata.namespace();
    let refs: Vec<_> = p
        .spec
        .target_ref
        .iter()
        .chain(&p.spec.target_refs)
        .collect();
    if refs.len() > MAX_TARGETS {
        warnings.push(format!(
            "NOT ENFORCED: {} targetRefs; at most {MAX_TARGETS} are allowed",
            refs.len()
        ));
        return (None, warnings);
    }
    let mut targets = Vec::new();
    let mut waypoints = Vec::new();
    for t in refs {
        let kind = t.kind.as_str();
        let name = t.name.as_str();
        if let Some(other) = t.namespace.as_ref().map(|n| n.as_str())
            && other != ns
        {
            warnings.push(format!(
                "NOT ENFORCED for {kind} {other}/{name}: a policy binds only to targets in its own namespace ({ns})"
            ));
            continue;
        }
        match kind {
            "Service" => {
                let bound = match model.lookup(Kind::Service, ns, name) {
                    Some(Object::Service(svc)) => {
                        waypoint(model, &svc.metadata, WaypointFor::Service, o)
                    }
                    _ => None,
                };
                let served = bound.is_some();
                if let Some(w) = bound.as_ref().and_then(|g| gateway_of(g, o)) {
                    waypoints.push(w);
                }
                if !served {
                    warnings.push(format!(
                        "NOT ENFORCED for Service {name}: it is not bound to a waypoint (label it istio.io/use-waypoint=<waypoint>)"
                    ));
                }
            }
            "Gateway" => {
                let waypoint_gateway = matches!(
                    model.lookup(Kind::Gateway, ns, name),
                    Some(Object::Gateway(g)) if g.spec.gateway_class_name.as_str() == WAYPOINT_CLASS
                );
                if waypoint_gateway {
                    waypoints.push(format!("{ns}/{name}"));
                } else {
                    warnings.push(format!(
                        "NOT ENFORCED for Gateway {name}: no Gateway of class {WAYPOINT_CLASS} by that name in {ns}"
                    ));
                }
            }
            // Every waypoint of the mesh, from the root namespace (as in Istio).
            "GatewayClass" if name == WAYPOINT_CLASS && ns == o.root_namespace => {
                for g in model.of_kind(Kind::Gateway) {
                    if let Object::Gateway(g) = g
                        && g.spec.gateway_class_name.as_str() == WAYPOINT_CLASS
                    {
                        waypoints.push(format!(
                            "{}/{}",
                            g.metadata.namespace(),
                            g.metadata.name.as_str()
                        ));
                    }
                }
                // Cluster-scoped: its target has no namespace.
                targets.push(pb_wp::Target {
                    kind: kind.to_owned(),
                    namespace: String::new(),
                    name: name.to_owned(),
                });
                continue;
            }
            "GatewayClass" => {
                warnings.push(format!(
                    "NOT ENFORCED for GatewayClass {name}: only the class {WAYPOINT_CLASS}, from the root namespace ({}), binds a policy to every waypoint",
                    o.root_namespace
                ));
                continue;
            }
            other => {
                warnings.push(format!(
                    "NOT ENFORCED for {other} {name}: a waypoint policy binds to a Gateway, a Service or the GatewayClass {WAYPOINT_CLASS}"
                ));
                continue;
            }
        }
        targets.push(pb_wp::Target {
            kind: kind.to_owned(),
            namespace: ns.to_owned(),
            name: name.to_owned(),
        });
    }
    if targets.is_empty() {
        return (None, warnings);
    }
    let action = match p.spec.action {
        None | Some(AuthorizationAction::Allow) => pb_wp::Action::Allow,
        Some(AuthorizationAction::Deny) => pb_wp::Action::Deny,
        Some(AuthorizationAction::Audit) => pb_wp::Action::Audit,
        Some(AuthorizationAction::Custom) => pb_wp::Action::Custom,
    };
    let ext_authz = (action == pb_wp::Action::Custom).then(|| {
        let name = p.spec.provider.as_ref().map_or("", |pr| pr.name.as_str());
        let e = ext_authz(model, name, o);
        if !e.error.is_empty() {
            warnings.push(format!(
                "provider {name:?} cannot be used ({}); the requests this policy matches are denied",
                e.error
            ));
        }
        if p.metadata.annotations.get(DRY_RUN_ANNOTATION) == Some("true") {
            warnings.push("dry-run is not supported for CUSTOM (as in Istio); the policy is enforced".to_owned());
        }
        e
    });
    let deny = action != pb_wp::Action::Allow;
    let mut rules = Vec::new();
    for (i, rule) in p.spec.rules.iter().enumerate() {
        let (translated, unsupported) = translate_rule(rule, ns);
        if unsupported.is_empty() {
            rules.push(translated);
        } else if deny {
            warnings.push(format!(
                "rule {i} uses {} which the waypoint cannot check yet; it matches on the rule's other conditions alone",
                unsupported.join(", ")
            ));
            rules.push(translated);
        } else {
            warnings.push(format!(
                "rule {i} uses {} which the waypoint cannot check yet; the rule matches nothing",
                unsupported.join(", ")
            ));
        }
    }
    let policy = pb_wp::Policy {
        name: p.metadata.name.as_str().to_owned(),
        namespace: ns.to_owned(),
        targets,
        action: action as i32,
        dry_run: action != pb_wp::Action::Custom
            && p.metadata.annotations.get(DRY_RUN_ANNOTATION) == Some("true"),
        rules,
        waypoints: {
            waypoints.sort();
            waypoints.dedup();
            waypoints
        },
        ext_authz,
    };
    (Some(policy), warnings)
}

/// `<namespace>/<name>` of the waypoint a `waypoint` field names (by its Service's
/// hostname, `<name>.<namespace>.svc.<domain suffix>`).
pub fn gateway_of(
    g: &ambit_proto::workload::GatewayAddress,
    o: &TranslateOptions,
) -> Option<String> {
    let Some(ambit_proto::workload::gateway_address::Destination::Hostname(h)) = &g.destination
    else {
        return None;
    };
    let name = h
        .hostname
        .strip_suffix(&format!(".{}.svc.{}", h.namespace, o.domain_suffix))?;
    Some(format!("{}/{name}", h.namespace))
}

/// One rule: a clause for `from`, one for `to`, one per `when` condition.
fn translate_rule(rule: &ApRule, policy_namespace: &str) -> (pb_wp::Rule, Vec<String>) {
    let mut unsupported = Vec::new();
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let matches = rule
            .from
            .iter()
            .map(|f| from_match(&f.source, policy_namespace, &mut unsupported))
            .collect();
        clauses.push(pb_wp::Clause { matches });
    }
    if !rule.to.is_empty() {
        let matches = rule
            .to
            .iter()
            .map(|t| to_match(&t.operation, &mut unsupported))
            .collect();
        clauses.push(pb_wp::Clause { matches });
    }
    for c in &rule.when {
        if let Some(m) = when_match(c, &mut unsupported) {
            clauses.push(pb_wp::Clause { matches: vec![m] });
        }
    }
    clauses.retain(|c| c.matches.iter().any(|m| m != &pb_wp::Match::default()));
    (pb_wp::Rule { clauses }, unsupported)
}

fn connection(m: pb_sec::Match) -> Option<pb_sec::Match> {
    (m != pb_sec::Match::default()).then_some(m)
}

fn from_match(s: &Source, ns: &str, unsupported: &mut Vec<String>) -> pb_wp::Match {
    // The connection fields as the node proxy reads them; remote addresses are the
    // waypoint's to check.
    let mut l4_unsupported = Vec::new();
    let l4 = source_match(s, ns, &mut l4_unsupported);
    unsupported.extend(l4_unsupported.into_iter().filter(|u| {
        !u.starts_with("source.remoteIpBlocks") && !u.starts_with("source.requestPrincipals")
    }));
    pb_wp::Match {
        connection: connection(l4),
        remote_ips: super::addresses(&s.remote_ip_blocks),
        not_remote_ips: super::addresses(&s.not_remote_ip_blocks),
        request_principals: string_matches(&s.request_principals),
        not_request_principals: string_matches(&s.not_request_principals),
        ..Default::default()
    }
}

fn to_match(op: &Operation, unsupported: &mut Vec<String>) -> pb_wp::Match {
    let mut l4_unsupported = Vec::new();
    let l4 = operation_match(op, &mut l4_unsupported);
    unsupported.extend(
        l4_unsupported
            .into_iter()
            .filter(|u| !u.starts_with("operation.")),
    );
    pb_wp::Match {
        connection: connection(l4),
        hosts: string_matches(&op.hosts),
        not_hosts: string_matches(&op.not_hosts),
        methods: string_matches(&op.methods),
        not_methods: string_matches(&op.not_methods),
        paths: string_matches(&op.paths),
        not_paths: string_matches(&op.not_paths),
        ..Default::default()
    }
}

fn when_match(c: &Condition, unsupported: &mut Vec<String>) -> Option<pb_wp::Match> {
    let key = c.key.as_str();
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            unsupported.push(format!("when {key}"));
            return None;
        }
        return Some(pb_wp::Match {
            headers: vec![pb_wp::HeaderMatch {
                name,
                values: string_matches(&c.values),
                not_values: string_matches(&c.not_values),
            }],
            ..Default::default()
        });
    }
    if key == "request.auth.principal" {
        return Some(pb_wp::Match {
            request_principals: string_matches(&c.values),
            not_request_principals: string_matches(&c.not_values),
            ..Default::default()
        });
    }
    let claim_path: Option<Vec<String>> = match key {
        "request.auth.audiences" => Some(vec!["aud".into()]),
        "request.auth.presenter" => Some(vec!["azp".into()]),
        _ => key
            .strip_prefix("request.auth.claims")
            .and_then(claim_names),
    };
    if let Some(path) = claim_path {
        return Some(pb_wp::Match {
            claims: vec![pb_wp::ClaimMatch {
                path,
                values: string_matches(&c.values),
                not_values: string_matches(&c.not_values),
            }],
            ..Default::default()
        });
    }
    if key.starts_with("request.auth.") {
        unsupported.push(format!("when {key}"));
        return None;
    }
    if key == "remote.ip" {
        let mut bad = Vec::new();
        let m = pb_wp::Match {
            remote_ips: super::ip_values(&c.values, &mut bad, key),
            not_remote_ips: super::ip_values(&c.not_values, &mut bad, key),
            ..Default::default()
        };
        unsupported.extend(bad);
        return Some(m);
    }
    let l4 = condition_match(c, unsupported)?;
    Some(pb_wp::Match {
        connection: connection(l4),
        ..Default::default()
    })
}

/// `[a][b]` as `["a", "b"]`; `None` unless it is one or more non-empty bracketed names.
fn claim_names(brackets: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut rest = brackets;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (name, after) = inner.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        names.push(name.to_owned());
        rest = after;
    }
    (!names.is_empty()).then_some(names)
}

/// Istio's mesh config: the `mesh` key of the `istio` ConfigMap in the root namespace
/// (none: an empty config).
pub fn mesh_config(model: &Model, o: &TranslateOptions) -> Result<MeshConfig, String> {
    let Some(Object::ConfigMap(cm)) =
        model.lookup(Kind::ConfigMap, &o.root_namespace, MESH_CONFIG_MAP)
    else {
        return Ok(MeshConfig::default());
    };
    let Some(text) = cm.data.get("mesh") else {
        return Ok(MeshConfig::default());
    };
    serde_saphyr::from_str(text).map_err(|e| {
        format!(
            "the mesh config (ConfigMap {}/{MESH_CONFIG_MAP}, key mesh) cannot be read: {e}",
            o.root_namespace
        )
    })
}

/// The authorizer named `name` in the mesh config, resolved to its Service; one that
/// cannot be used carries the reason in `error` (the waypoint then denies).
fn ext_authz(model: &Model, name: &str, o: &TranslateOptions) -> pb_wp::ExtAuthz {
    let mut out = pb_wp::ExtAuthz {
        provider: name.to_owned(),
        ..Default::default()
    };
    let resolved = (|| -> Result<(), String> {
        let config = mesh_config(model, o)?;
        let provider: &ExtensionProviderSpec = config
            .extension_providers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                format!(
                    "no extension provider {name:?} in the mesh config (ConfigMap {}/{MESH_CONFIG_MAP}, key mesh)",
                    o.root_namespace
                )
            })?;
        let (service, port, timeout, fail_open, status) = match (
            &provider.envoy_ext_authz_grpc,
            &provider.envoy_ext_authz_http,
        ) {
            (Some(g), None) => {
                out.grpc = true;
                (
                    &g.service,
                    g.port,
                    &g.timeout,
                    g.fail_open,
                    &g.status_on_error,
                )
            }
            (None, Some(h)) => {
                out.path_prefix = h.path_prefix.clone().unwrap_or_default();
                if !out.path_prefix.is_empty() && !out.path_prefix.starts_with('/') {
                    return Err(format!(
                        "pathPrefix {:?} must start with /",
                        out.path_prefix
                    ));
                }
                let lower = |v: &[String]| v.iter().map(|h| h.to_ascii_lowercase()).collect();
                out.include_request_headers = lower(&h.include_request_headers_in_check);
                out.include_request_headers.extend(
                    h.include_headers_in_check
                        .iter()
                        .map(|h| h.to_ascii_lowercase()),
                );
                out.include_additional_headers = h
                    .include_additional_headers_in_check
                    .iter()
                    .map(|(k, v)| pb_wp::ExtAuthzHeader {
                        name: k.to_ascii_lowercase(),
                        value: v.clone(),
                    })
                    .collect();
                out.headers_to_upstream_on_allow = lower(&h.headers_to_upstream_on_allow);
                out.headers_to_downstream_on_deny = lower(&h.headers_to_downstream_on_deny);
                out.headers_to_downstream_on_allow = lower(&h.headers_to_downstream_on_allow);
                (
                    &h.service,
                    h.port,
                    &h.timeout,
                    h.fail_open,
                    &h.status_on_error,
                )
            }
            _ => {
                return Err(format!(
                    "provider {name:?} is neither envoyExtAuthzGrpc nor envoyExtAuthzHttp (exactly one)"
                ));
            }
        };
        // `<hostname>` or `<namespace>/<hostname>`.
        let host = service.rsplit('/').next().unwrap_or(service);
        let svc = super::routes::service_for_host(model, &o.root_namespace, host, o)
            .ok_or_else(|| format!("no Service for the authorizer's host {service:?}"))?;
        out.service = format!(
            "{}/{}",
            svc.metadata.namespace(),
            super::service_hostname(svc, o)
        );
        if port == 0 || port > 65535 {
            return Err(format!("port {port} is out of range"));
        }
        out.port = port;
        out.timeout_ms = match timeout {
            Some(t) => super::routes::parse_duration(t)?.max(1),
            // Istio's default.
            None => 600_000,
        };
        out.fail_open = fail_open;
        out.status_on_error = match status {
            Some(s) => s
                .parse::<u32>()
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| format!("statusOnError {s:?} is not an HTTP status"))?,
            None => 0,
        };
        Ok(())
    })();
    if let Err(e) = resolved {
        out = pb_wp::ExtAuthz {
            provider: name.to_owned(),
            error: e,
            ..Default::default()
        };
    }
    out
}
