//! Traffic policies for waypoints: Istio's DestinationRule `trafficPolicy` and Ambit's
//! LocalRateLimit, resolved to the services (and waypoints) they apply to.
//!
//! A setting Ambit applies is translated; one it does not is named in a warning (shown
//! by `ambit control validate`, `/debug/config` and the log), never dropped without a
//! word. A value that cannot be read refuses the whole resource: a half-applied circuit
//! breaker or rate limit would be worse than a visible refusal.

use ambit_proto::waypoint as pb;

use super::routes::{parse_duration, service_for_host};
use super::waypoint_policy::{WAYPOINT_CLASS, gateway_of};
use super::{TranslateOptions, WaypointFor, service_hostname, waypoint};
use crate::model::{
    DestinationRule, Kind, LocalRateLimit, Model, Object, RequestAuthentication, TokenBucketSpec,
};

/// Resource names: `<namespace>/dr:<name>` and `<namespace>/rl:<name>`.
pub const DR_NAME_PREFIX: &str = "dr:";
pub const RL_NAME_PREFIX: &str = "rl:";
pub const RA_NAME_PREFIX: &str = "ra:";

/// The DestinationRule as a waypoint resource, or none (every warning says why).
pub fn translate_dr(
    model: &Model,
    dr: &DestinationRule,
    o: &TranslateOptions,
) -> (Option<pb::TrafficPolicy>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = dr.metadata.namespace();
    let host = dr.spec.host.as_str();
    if dr.spec.workload_selector.is_some() {
        warnings.push(
            "NOT ENFORCED: workloadSelector applies a DestinationRule to sidecars; a waypoint applies it by host"
                .to_owned(),
        );
        return (None, warnings);
    }
    let Some(svc) = service_for_host(model, ns, host, o) else {
        warnings.push(format!(
            "NOT ENFORCED: host {host:?} is not a Service Ambit knows (wildcards and ServiceEntry hosts are not supported)"
        ));
        return (None, warnings);
    };
    let svc_ns = svc.metadata.namespace();
    let svc_key = format!("{svc_ns}/{}", service_hostname(svc, o));
    // One DestinationRule per host: the oldest applies, as Istio keeps the first.
    let mine = (dr.metadata.created(), ns, dr.metadata.name.as_str());
    for other in model.of_kind(Kind::DestinationRule) {
        if let Object::DestinationRule(d) = other {
            let theirs = (
                d.metadata.created(),
                d.metadata.namespace(),
                d.metadata.name.as_str(),
            );
            if theirs < mine
                && d.spec.workload_selector.is_none()
                && readable(d)
                && service_for_host(model, d.metadata.namespace(), &d.spec.host, o)
                    .is_some_and(|s| std::ptr::eq(s, svc))
            {
                warnings.push(format!(
                    "NOT ENFORCED: DestinationRule {}/{} is older and applies to the same host",
                    theirs.1, theirs.2
                ));
                return (None, warnings);
            }
        }
    }
    // Every waypoint gets it: the one serving the host, and any whose routes send
    // requests there.
    let mut waypoints: Vec<String> = model
        .of_kind(Kind::Gateway)
        .filter_map(|g| match g {
            Object::Gateway(g) if g.spec.gateway_class_name.as_str() == WAYPOINT_CLASS => Some(
                format!("{}/{}", g.metadata.namespace(), g.metadata.name.as_str()),
            ),
            _ => None,
        })
        .collect();
    waypoints.sort();
    if waypoints.is_empty() {
        warnings.push(format!(
            "NOT ENFORCED: there is no waypoint (Gateway of class {WAYPOINT_CLASS}); traffic policies apply at waypoints"
        ));
        return (None, warnings);
    }
    let bound = waypoint(model, &svc.metadata, WaypointFor::Service, o);
    if bound.as_ref().and_then(|g| gateway_of(g, o)).is_none() {
        warnings.push(format!(
            "Service {svc_ns}/{} is not bound to a waypoint: these settings apply only to requests a waypoint's route sends to it",
            svc.metadata.name
        ));
    }
    let empty = serde_json::Value::Null;
    let policy = dr.spec.traffic_policy.as_ref().unwrap_or(&empty);
    let mut out = pb::TrafficPolicy {
        name: format!("{DR_NAME_PREFIX}{}", dr.metadata.name.as_str()),
        namespace: ns.to_owned(),
        services: vec![svc_key],
        gateways: Vec::new(),
        waypoints,
        created: dr.metadata.created(),
        ..Default::default()
    };
    match settings(policy, "trafficPolicy", &mut warnings) {
        Ok(s) => out.backend = Some(s),
        Err(e) => {
            warnings.push(format!("NOT ENFORCED: {e}"));
            return (None, warnings);
        }
    }
    match subsets(model, svc, dr, o, &mut warnings) {
        Ok(list) => out.subsets = list,
        Err(e) => {
            warnings.push(format!("NOT ENFORCED: {e}"));
            return (None, warnings);
        }
    }
    if let Some(ports) = policy.get("portLevelSettings") {
        let Some(list) = ports.as_array() else {
            warnings.push("NOT ENFORCED: trafficPolicy.portLevelSettings must be a list".into());
            return (None, warnings);
        };
        for (i, p) in list.iter().enumerate() {
            let at = format!("trafficPolicy.portLevelSettings[{i}]");
            let number = p
                .get("port")
                .and_then(|p| p.get("number"))
                .and_then(serde_json::Value::as_u64)
                .filter(|n| (1..=65535).contains(n));
            let Some(number) = number else {
                warnings.push(format!(
                    "NOT ENFORCED: {at}.port.number must be a port (1-65535)"
                ));
                return (None, warnings);
            };
            match settings(p, &at, &mut warnings) {
                Ok(s) => out.ports.push(pb::PortBackendSettings {
                    port: number as u32,
                    settings: Some(s),
                }),
                Err(e) => {
                    warnings.push(format!("NOT ENFORCED: {e}"));
                    return (None, warnings);
                }
            }
        }
    }
    (Some(out), warnings)
}

/// Whether a DestinationRule's settings can be read (so it applies where it is older).
fn readable(dr: &DestinationRule) -> bool {
    let empty = serde_json::Value::Null;
    let policy = dr.spec.traffic_policy.as_ref().unwrap_or(&empty);
    let mut ignored = Vec::new();
    settings(policy, "", &mut ignored).is_ok()
        && match policy.get("portLevelSettings") {
            None => true,
            Some(p) => p
                .as_array()
                .is_some_and(|list| list.iter().all(|p| settings(p, "", &mut ignored).is_ok())),
        }
}

fn known_fields(v: &serde_json::Value, at: &str, known: &[&str], warnings: &mut Vec<String>) {
    if let Some(map) = v.as_object() {
        for k in map.keys() {
            if !known.contains(&k.as_str()) {
                warnings.push(format!("{at}.{k} is not supported; ignored"));
            }
        }
    }
}

fn count(v: &serde_json::Value, field: &str, at: &str) -> Result<u32, String> {
    match v.get(field) {
        None => Ok(0),
        Some(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{at}.{field} must be a whole number, not {n}")),
    }
}

fn duration(v: &serde_json::Value, field: &str, at: &str) -> Result<u64, String> {
    match v.get(field) {
        None => Ok(0),
        Some(d) => d
            .as_str()
            .ok_or_else(|| format!("{at}.{field} must be a duration like 10s"))
            .and_then(|s| parse_duration(s).map_err(|e| format!("{at}.{field}: {e}"))),
    }
}

/// One `trafficPolicy` (or port's settings).
fn settings(
    p: &serde_json::Value,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<pb::BackendSettings, String> {
    use pb::backend_settings::Balance;
    let mut out = pb::BackendSettings::default();
    known_fields(
        p,
        at,
        &[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "portLevelSettings",
            "port",
            "tls",
        ],
        warnings,
    );
    if let Some(tls) = p.get("tls") {
        let mode = tls.get("mode").and_then(|m| m.as_str()).unwrap_or("");
        if mode != "ISTIO_MUTUAL" {
            warnings.push(format!(
                "{at}.tls is not applied: the waypoint always reaches mesh endpoints with the mesh's mutual TLS"
            ));
        }
    }
    if let Some(lb) = p.get("loadBalancer") {
        let at = format!("{at}.loadBalancer");
        known_fields(lb, &at, &["simple", "consistentHash"], warnings);
        if let Some(simple) = lb.get("simple") {
            out.balance = match simple.as_str() {
                Some("LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED") => Balance::LeastRequest,
                Some("ROUND_ROBIN") => Balance::RoundRobin,
                Some("RANDOM") => Balance::Random,
                _ => {
                    return Err(format!(
                        "{at}.simple {simple} is not one of LEAST_REQUEST, ROUND_ROBIN, RANDOM"
                    ));
                }
            } as i32;
        }
        if let Some(h) = lb.get("consistentHash") {
            let at = format!("{at}.consistentHash");
            known_fields(
                h,
                &at,
                &[
                    "httpHeaderName",
                    "httpCookie",
                    "useSourceIp",
                    "ringHash",
                    "maglev",
                    "minimumRingSize",
                ],
                warnings,
            );
            if let Some(name) = h.get("httpHeaderName").and_then(|n| n.as_str()) {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(format!("{at}.httpHeaderName {name:?} is not a header name"));
                }
                out.balance = Balance::HashHeader as i32;
                out.hash_key = name.to_ascii_lowercase();
            } else if let Some(c) = h.get("httpCookie") {
                let Some(name) = c.get("name").and_then(|n| n.as_str()).filter(|n| {
                    !n.is_empty()
                        && n.bytes()
                            .all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b))
                }) else {
                    return Err(format!("{at}.httpCookie.name must be a cookie name"));
                };
                if c.get("ttl").is_some() {
                    warnings.push(format!(
                        "{at}.httpCookie.ttl: the waypoint does not set the cookie; requests without it are balanced as LEAST_REQUEST"
                    ));
                }
                out.balance = Balance::HashCookie as i32;
                out.hash_key = name.to_owned();
            } else if h.get("useSourceIp").and_then(|b| b.as_bool()) == Some(true) {
                out.balance = Balance::HashSourceIp as i32;
            } else {
                return Err(format!(
                    "{at} needs httpHeaderName, httpCookie or useSourceIp: true"
                ));
            }
        }
    }
    if let Some(pool) = p.get("connectionPool") {
        let at = format!("{at}.connectionPool");
        known_fields(pool, &at, &["tcp", "http"], warnings);
        if let Some(tcp) = pool.get("tcp") {
            let at = format!("{at}.tcp");
            known_fields(
                tcp,
                &at,
                &["maxConnections", "connectTimeout", "idleTimeout"],
                warnings,
            );
            out.max_connections = count(tcp, "maxConnections", &at)?;
            out.connect_timeout_ms = duration(tcp, "connectTimeout", &at)?;
            out.idle_timeout_ms = duration(tcp, "idleTimeout", &at)?;
        }
        if let Some(h) = pool.get("http") {
            let at = format!("{at}.http");
            known_fields(
                h,
                &at,
                &[
                    "http1MaxPendingRequests",
                    "http2MaxRequests",
                    "maxRequestsPerConnection",
                    "idleTimeout",
                ],
                warnings,
            );
            out.max_pending = count(h, "http1MaxPendingRequests", &at)?;
            out.max_requests = count(h, "http2MaxRequests", &at)?;
            out.max_requests_per_connection = count(h, "maxRequestsPerConnection", &at)?;
            let idle = duration(h, "idleTimeout", &at)?;
            if idle > 0 {
                out.idle_timeout_ms = idle;
            }
        }
    }
    if let Some(od) = p.get("outlierDetection") {
        let at = format!("{at}.outlierDetection");
        known_fields(
            od,
            &at,
            &[
                "consecutive5xxErrors",
                "consecutiveGatewayErrors",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
                "minHealthPercent",
            ],
            warnings,
        );
        let defaults = ambit_core::traffic::Outlier::default();
        let millis = |field: &str, default: std::time::Duration| -> Result<u64, String> {
            Ok(match duration(od, field, &at)? {
                0 => default.as_millis() as u64,
                ms => ms,
            })
        };
        let percent = match od.get("maxEjectionPercent") {
            None => defaults.max_ejection_percent,
            Some(_) => count(od, "maxEjectionPercent", &at)?.min(100),
        };
        if od
            .get("minHealthPercent")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|n| n > 0)
        {
            warnings.push(format!(
                "{at}.minHealthPercent: ejection is never suspended (as with 0)"
            ));
        }
        out.outlier = Some(pb::OutlierDetection {
            consecutive_5xx: match od.get("consecutive5xxErrors") {
                None => defaults.consecutive_5xx,
                Some(_) => count(od, "consecutive5xxErrors", &at)?,
            },
            consecutive_gateway: count(od, "consecutiveGatewayErrors", &at)?,
            interval_ms: millis("interval", defaults.interval)?,
            base_ejection_ms: millis("baseEjectionTime", defaults.base_ejection)?,
            max_ejection_percent: percent,
        });
    }
    Ok(out)
}

/// The LocalRateLimit as a waypoint resource, or none (every warning says why).
pub fn translate_rl(
    model: &Model,
    rl: &LocalRateLimit,
    o: &TranslateOptions,
) -> (Option<pb::TrafficPolicy>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = rl.metadata.namespace();
    let mut out = pb::TrafficPolicy {
        name: format!("{RL_NAME_PREFIX}{}", rl.metadata.name.as_str()),
        namespace: ns.to_owned(),
        created: rl.metadata.created(),
        ..Default::default()
    };
    let bucket = |b: &TokenBucketSpec, at: &str| -> Result<pb::TokenBucket, String> {
        let fill =
            parse_duration(&b.fill_interval).map_err(|e| format!("{at}.fillInterval: {e}"))?;
        if fill == 0 {
            return Err(format!("{at}.fillInterval must be more than 0"));
        }
        if b.max_tokens == 0 {
            return Err(format!("{at}.maxTokens must be at least 1"));
        }
        Ok(pb::TokenBucket {
            max_tokens: b.max_tokens,
            tokens_per_fill: b.tokens_per_fill.unwrap_or(b.max_tokens).max(1),
            fill_interval_ms: fill,
        })
    };
    let mut limit = pb::RateLimit::default();
    if let Some(b) = &rl.spec.token_bucket {
        match bucket(b, "spec.tokenBucket") {
            Ok(b) => limit.bucket = Some(b),
            Err(e) => {
                warnings.push(format!("NOT ENFORCED: {e}"));
                return (None, warnings);
            }
        }
    }
    for (i, d) in rl.spec.descriptors.iter().enumerate() {
        let at = format!("spec.descriptors[{i}]");
        let header = d.header.as_deref().map(str::to_ascii_lowercase);
        let problem = match (&header, d.source_principal) {
            (Some(_), true) | (None, false) => Some(format!(
                "{at} needs exactly one of header and sourcePrincipal"
            )),
            (Some(h), false) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                Some(format!("{at}.header {h:?} is not a header name"))
            }
            _ => None,
        };
        let b = bucket(&d.token_bucket, &format!("{at}.tokenBucket"));
        match (problem, b) {
            (None, Ok(b)) => limit.descriptors.push(pb::RateLimitDescriptor {
                header: header.unwrap_or_default(),
                source_principal: d.source_principal,
                value: d.value.clone(),
                bucket: Some(b),
            }),
            (Some(e), _) | (None, Err(e)) => {
                warnings.push(format!("NOT ENFORCED: {e}"));
                return (None, warnings);
            }
        }
    }
    if limit.bucket.is_none() && limit.descriptors.is_empty() {
        warnings.push("NOT ENFORCED: neither tokenBucket nor descriptors is set".to_owned());
        return (None, warnings);
    }
    out.rate_limit = Some(limit);
    let refs = rl.spec.target_refs.iter().map(|t| {
        (
            t.group.as_deref().unwrap_or(""),
            t.kind.as_str(),
            t.name.as_str(),
        )
    });
    resolve_targets(
        model,
        ns,
        refs,
        "LocalRateLimit",
        o,
        &mut out,
        &mut warnings,
    );
    out.waypoints.sort();
    out.waypoints.dedup();
    if out.waypoints.is_empty() {
        if rl.spec.target_refs.is_empty() {
            warnings.push("NOT ENFORCED: targetRefs is empty".to_owned());
        }
        return (None, warnings);
    }
    (Some(out), warnings)
}

/// Resolves `targetRefs` (group, kind, name) of a policy in `ns` to the services and
/// waypoint Gateways of `out`, and the waypoints it is sent to; each target that no
/// waypoint serves is named in a `NOT ENFORCED` warning.
fn resolve_targets<'a>(
    model: &Model,
    ns: &str,
    refs: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
    what: &str,
    o: &TranslateOptions,
    out: &mut pb::TrafficPolicy,
    warnings: &mut Vec<String>,
) {
    for (group, kind, name) in refs {
        match (group, kind) {
            ("" | "core", "Service") => {
                let Some(Object::Service(svc)) = model.lookup(Kind::Service, ns, name) else {
                    warnings.push(format!("NOT ENFORCED for Service {name}: no such Service in {ns}"));
                    continue;
                };
                let bound = waypoint(model, &svc.metadata, WaypointFor::Service, o);
                let Some(w) = bound.as_ref().and_then(|g| gateway_of(g, o)) else {
                    warnings.push(format!(
                        "NOT ENFORCED for Service {name}: it is not bound to a waypoint (label it istio.io/use-waypoint=<waypoint>)"
                    ));
                    continue;
                };
                out.services
                    .push(format!("{ns}/{}", service_hostname(svc, o)));
                out.waypoints.push(w);
            }
            ("gateway.networking.k8s.io", "Gateway") => {
                let waypoint_gateway = matches!(
                    model.lookup(Kind::Gateway, ns, name),
                    Some(Object::Gateway(g)) if g.spec.gateway_class_name.as_str() == WAYPOINT_CLASS
                );
                if !waypoint_gateway {
                    warnings.push(format!(
                        "NOT ENFORCED for Gateway {name}: no Gateway of class {WAYPOINT_CLASS} by that name in {ns}"
                    ));
                    continue;
                }
                out.gateways.push(format!("{ns}/{name}"));
                out.waypoints.push(format!("{ns}/{name}"));
            }
            (group, kind) => warnings.push(format!(
                "NOT ENFORCED for {kind} {name} (group {group:?}): a {what} targets a Service or a waypoint Gateway (group gateway.networking.k8s.io)"
            )),
        }
    }
}

/// A RequestAuthentication as a waypoint resource, or none (every warning says why).
/// Key sets are inlined: `jwks` as written, `jwksUri` as the control plane fetched it;
/// a rule whose keys cannot be had is still sent, carrying the reason, so the waypoint
/// refuses that issuer's tokens rather than accept them unchecked.
pub fn translate_ra(
    model: &Model,
    ra: &RequestAuthentication,
    o: &TranslateOptions,
) -> (Option<pb::TrafficPolicy>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = ra.metadata.namespace();
    let mut out = pb::TrafficPolicy {
        name: format!("{RA_NAME_PREFIX}{}", ra.metadata.name.as_str()),
        namespace: ns.to_owned(),
        created: ra.metadata.created(),
        ..Default::default()
    };
    if ra.spec.selector.is_some() && ra.spec.target_ref.is_none() && ra.spec.target_refs.is_empty()
    {
        warnings.push("NOT ENFORCED: a selector binds a RequestAuthentication to sidecars; in ambient mode the waypoint checks tokens, so name the Service or the waypoint Gateway in targetRefs".to_owned());
        return (None, warnings);
    }
    let header = |h: &str, at: &str| -> Result<String, String> {
        let lower = h.to_ascii_lowercase();
        http::HeaderName::from_bytes(lower.as_bytes())
            .map(|_| lower.clone())
            .map_err(|_| format!("{at}: {h:?} is not a header name"))
    };
    let mut rules = Vec::new();
    for (i, r) in ra.spec.jwt_rules.iter().enumerate() {
        let at = format!("spec.jwtRules[{i}]");
        let rule = (|| -> Result<pb::JwtRule, String> {
            if r.issuer.is_empty() {
                return Err(format!("{at}.issuer is empty"));
            }
            let (jwks, jwks_error) = match (&r.jwks, &r.jwks_uri) {
                (Some(inline), _) => match ambit_core::jwt::Jwks::parse(inline) {
                    Ok(_) => (inline.clone(), String::new()),
                    Err(e) => {
                        warnings.push(format!(
                            "{at}.jwks cannot be used ({e}); tokens of issuer {} are refused",
                            r.issuer
                        ));
                        (String::new(), e.to_string())
                    }
                },
                (None, Some(uri)) => match o.jwks.lookup(uri) {
                    Ok(set) => (set, String::new()),
                    Err(why) => {
                        warnings.push(format!("{at}.jwksUri: {why}; tokens of issuer {} are refused until the keys arrive", r.issuer));
                        (String::new(), why)
                    }
                },
                (None, None) => {
                    return Err(format!(
                        "{at} has neither jwks nor jwksUri (Ambit does not discover keys through OpenID Connect)"
                    ));
                }
            };
            let mut from_headers = Vec::new();
            for (j, h) in r.from_headers.iter().enumerate() {
                from_headers.push(pb::JwtHeader {
                    name: header(&h.name, &format!("{at}.fromHeaders[{j}]"))?,
                    prefix: h.prefix.clone(),
                });
            }
            let mut claims = Vec::new();
            for (j, c) in r.output_claim_to_headers.iter().enumerate() {
                if c.claim.is_empty() {
                    return Err(format!("{at}.outputClaimToHeaders[{j}].claim is empty"));
                }
                claims.push(pb::ClaimToHeader {
                    header: header(&c.header, &format!("{at}.outputClaimToHeaders[{j}]"))?,
                    claim: c.claim.clone(),
                });
            }
            let payload = match &r.output_payload_to_header {
                Some(h) => header(h, &format!("{at}.outputPayloadToHeader"))?,
                None => String::new(),
            };
            if r.timeout.is_some() {
                warnings.push(format!("{at}.timeout is not applied; the control plane fetches keys with its own limit of {:?}", crate::jwks::FETCH_TIMEOUT));
            }
            Ok(pb::JwtRule {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                jwks,
                jwks_error,
                from_headers,
                from_params: r.from_params.clone(),
                from_cookies: r.from_cookies.clone(),
                forward_original_token: r.forward_original_token,
                output_claim_to_headers: claims,
                output_payload_to_header: payload,
            })
        })();
        match rule {
            Ok(rule) => rules.push(rule),
            Err(e) => {
                warnings.push(format!("NOT ENFORCED: {e}"));
                return (None, warnings);
            }
        }
    }
    if rules.is_empty() {
        warnings.push("NOT ENFORCED: jwtRules is empty".to_owned());
        return (None, warnings);
    }
    out.authentication = Some(pb::JwtAuthentication { rules });
    let refs = ra
        .spec
        .target_ref
        .iter()
        .chain(&ra.spec.target_refs)
        .map(|t| (t.group.as_str(), t.kind.as_str(), t.name.as_str()));
    resolve_targets(
        model,
        ns,
        refs,
        "RequestAuthentication",
        o,
        &mut out,
        &mut warnings,
    );
    for t in ra.spec.target_ref.iter().chain(&ra.spec.target_refs) {
        if let Some(other) = t.namespace.as_ref().map(|n| n.as_str())
            && other != ns
        {
            warnings.push(format!("targetRef {} {} names namespace {other}; a policy binds only to targets in its own namespace ({ns})", t.kind.as_str(), t.name.as_str()));
        }
    }
    out.services.sort();
    out.services.dedup();
    out.gateways.sort();
    out.gateways.dedup();
    out.waypoints.sort();
    out.waypoints.dedup();
    if out.waypoints.is_empty() {
        if ra.spec.target_ref.is_none() && ra.spec.target_refs.is_empty() {
            warnings.push("NOT ENFORCED: targetRefs is empty".to_owned());
        }
        return (None, warnings);
    }
    (Some(out), warnings)
}

/// A DestinationRule's `subsets`: each named group of the host's pods (the Service's
/// selector and the subset's `labels`), as workload uids, with its own settings.
fn subsets(
    model: &Model,
    svc: &crate::model::Service,
    dr: &DestinationRule,
    o: &TranslateOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<pb::Subset>, String> {
    let mut out: Vec<pb::Subset> = Vec::new();
    let selector = svc.spec.selector.as_ref();
    for (i, sub) in dr.spec.subsets.iter().enumerate() {
        let at = format!("subsets[{i}]");
        let name = sub
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{at} has no name"))?;
        if out.iter().any(|s| s.name == name) {
            return Err(format!("{at}: subset {name:?} is defined twice"));
        }
        let mut labels = crate::model::fields::Labels::default();
        if let Some(l) = sub.get("labels") {
            let map = l
                .as_object()
                .ok_or_else(|| format!("{at}.labels must be a map"))?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("{at}.labels.{k} must be a string"))?;
                labels
                    .insert(k, v)
                    .map_err(|e| format!("{at}.labels.{k}: {e}"))?;
            }
        }
        for key in sub.as_object().into_iter().flat_map(|m| m.keys()) {
            if !matches!(key.as_str(), "name" | "labels" | "trafficPolicy") {
                warnings.push(format!("{at}.{key} is not applied"));
            }
        }
        let settings = match sub.get("trafficPolicy") {
            Some(p) => Some(settings(p, &format!("{at}.trafficPolicy"), warnings)?),
            None => None,
        };
        let mut workloads: Vec<String> = Vec::new();
        if let Some(selector) = selector.filter(|s| !s.is_empty()) {
            for pod in model
                .in_namespace(Kind::Pod, svc.metadata.namespace())
                .filter_map(|p| match p {
                    Object::Pod(p) => Some(p),
                    _ => None,
                })
            {
                if pod.metadata.labels.matches(selector) && pod.metadata.labels.matches(&labels) {
                    workloads.push(format!(
                        "{}//Pod/{}/{}",
                        o.cluster_id,
                        pod.metadata.namespace(),
                        pod.metadata.name.as_str()
                    ));
                }
            }
        } else {
            warnings.push(format!(
                "{at}: the Service has no selector, so the subset selects no endpoint (requests to it are answered 503 UH)"
            ));
        }
        workloads.sort();
        out.push(pb::Subset {
            name: name.to_owned(),
            workloads,
            settings,
        });
    }
    Ok(out)
}
