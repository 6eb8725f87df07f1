//! Gateway API HTTPRoutes for waypoints (the mesh profile, GAMMA): a route whose parent
//! is a Service applies to requests for that Service at the waypoint serving it; a
//! producer route (in the Service's namespace) to every caller, a consumer route (in
//! another namespace) to callers from its own namespace, before producer routes.
//!
//! The control plane resolves what it can, so every waypoint reads a route the same way
//! and every mistake is reported here (warnings, shown by `ambit control validate`,
//! `/debug/config` and the route's status): parents and backends become service keys,
//! durations milliseconds, and a part Ambit cannot do is made to fail visibly (a rule
//! with a filter it does not implement, or a backend that does not resolve, answers its
//! share of requests 500, as Envoy does for an invalid backend) rather than behave
//! differently from what was written.

use ambit_proto::waypoint as pb;

use super::{TranslateOptions, WaypointFor, service_hostname, waypoint};
use crate::model::{HttpRoute, Kind, Model, Object};

use super::waypoint_policy::{WAYPOINT_CLASS, gateway_of};

/// The route for the waypoints, or none when no parent is served by one; with warnings.
pub fn translate(
    model: &Model,
    r: &HttpRoute,
    o: &TranslateOptions,
) -> (Option<pb::Route>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = r.metadata.namespace();
    let names = hostnames(&r.spec.hostnames);
    let (parents, waypoints) = parents_of(model, ns, &r.spec.parent_refs, &names, o, &mut warnings);
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let (rule, w) = translate_rule(
            model,
            Referrer {
                ns,
                kind: "HTTPRoute",
            },
            i,
            rule,
            o,
        );
        warnings.extend(w);
        rules.push(rule);
    }
    finish(
        r.metadata.name.as_str().to_owned(),
        (ns, r.metadata.created()),
        hostnames(&r.spec.hostnames),
        (parents, waypoints),
        rules,
        false,
        warnings,
    )
}

/// The route resource, or none when no parent is served by a waypoint.
fn finish(
    name: String,
    (ns, created): (&str, i64),
    hostnames: Vec<String>,
    (parents, waypoints): (Vec<pb::RouteParent>, Vec<String>),
    rules: Vec<pb::RouteRule>,
    ordered: bool,
    warnings: Vec<String>,
) -> (Option<pb::Route>, Vec<String>) {
    if parents.is_empty() {
        return (None, warnings);
    }
    let route = pb::Route {
        name,
        namespace: ns.to_owned(),
        parents,
        hostnames,
        rules,
        waypoints,
        created,
        ordered,
    };
    (Some(route), warnings)
}

fn hostnames(h: &[crate::model::fields::NonEmpty]) -> Vec<String> {
    h.iter().map(|h| h.as_str().to_lowercase()).collect()
}

/// The prefix of a GRPCRoute's resource name (`<ns>/grpc:<name>`), so it never shares
/// one with an HTTPRoute of the same name (route names cannot hold a colon).
pub const GRPC_NAME_PREFIX: &str = "grpc:";

/// A GRPCRoute as the same route resource: each method match becomes the HTTP path gRPC
/// uses (`/<service>/<method>`: service and method exact, an exact path; service alone,
/// a prefix; method alone or a regular expression, a path expression). gRPC precedence
/// (GEP-1016: the longest service, then the longest method, then the most headers)
/// follows from the HTTP order: exact paths, then the longest prefix, then headers.
pub fn translate_grpc(
    model: &Model,
    r: &crate::model::GrpcRoute,
    o: &TranslateOptions,
) -> (Option<pb::Route>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = r.metadata.namespace();
    let names = hostnames(&r.spec.hostnames);
    let (parents, waypoints) = parents_of(model, ns, &r.spec.parent_refs, &names, o, &mut warnings);
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let label = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
        let mut matches = Vec::new();
        for m in &rule.matches {
            match grpc_path(m.method.as_ref()) {
                Ok(path) => matches.push(crate::model::HttpRouteMatch {
                    path: Some(path),
                    headers: m.headers.clone(),
                    query_params: Vec::new(),
                    method: None,
                }),
                Err(e) => {
                    warnings.push(format!(
                        "{label}: a match is ignored (it matches nothing): {e}"
                    ));
                    matches.push(crate::model::HttpRouteMatch {
                        path: Some(crate::model::HttpPathMatch {
                            kind: Some("Exact".into()),
                            value: Some("/-".into()),
                        }),
                        ..Default::default()
                    });
                }
            }
        }
        if rule.session_persistence.is_some() {
            warnings.push(format!(
                "{label}: sessionPersistence is not supported yet; ignored"
            ));
        }
        let as_http = crate::model::HttpRouteRule {
            name: rule.name.clone(),
            matches,
            filters: rule.filters.clone(),
            backend_refs: rule.backend_refs.clone(),
            timeouts: None,
            retry: None,
            session_persistence: None,
        };
        let (rule, w) = translate_rule(
            model,
            Referrer {
                ns,
                kind: "GRPCRoute",
            },
            i,
            &as_http,
            o,
        );
        warnings.extend(w);
        rules.push(rule);
    }
    finish(
        format!("{GRPC_NAME_PREFIX}{}", r.metadata.name.as_str()),
        (ns, r.metadata.created()),
        hostnames(&r.spec.hostnames),
        (parents, waypoints),
        rules,
        false,
        warnings,
    )
}

/// The prefix of a VirtualService's resource name (`<ns>/vs:<name>`).
pub const VS_NAME_PREFIX: &str = "vs:";

/// The Service a VirtualService host names (`reviews`, `reviews.shop`,
/// `reviews.shop.svc.cluster.local`), looked up from namespace `ns`.
pub(super) fn service_for_host<'a>(
    model: &'a Model,
    ns: &str,
    host: &str,
    o: &TranslateOptions,
) -> Option<&'a crate::model::Service> {
    let suffix = format!(".svc.{}", o.domain_suffix);
    let short = host.strip_suffix(&suffix).unwrap_or(host);
    let (name, namespace) = match short.split_once('.') {
        Some((n, rest)) if !rest.contains('.') => (n, rest),
        Some(_) => return None,
        None => (short, ns),
    };
    match model.lookup(Kind::Service, namespace, name) {
        Some(Object::Service(s)) => Some(s),
        _ => None,
    }
}

/// An Istio StringMatch (`exact`, `prefix`, `regex`) as a value match.
fn vs_string(v: &serde_json::Value) -> Result<(bool, String), String> {
    if let Some(e) = v.get("exact").and_then(|x| x.as_str()) {
        return Ok((false, e.to_owned()));
    }
    if let Some(p) = v.get("prefix").and_then(|x| x.as_str()) {
        return Ok((true, format!("{}.*", regex::escape(p))));
    }
    if let Some(r) = v.get("regex").and_then(|x| x.as_str()) {
        check_regex(r)?;
        return Ok((true, r.to_owned()));
    }
    Err(format!("{v} is not an exact, prefix or regex match"))
}

/// A VirtualService for waypoints: its `http` routes in order (the first that matches
/// is taken, as in Istio) as the same route resource, with Istio's `timeout`, `retries`
/// and `fault`. A service also routed by an HTTPRoute or GRPCRoute keeps those: mixing
/// both on one host is refused, as Istio's ambient mode does.
pub fn translate_vs(
    model: &Model,
    vs: &crate::model::VirtualService,
    o: &TranslateOptions,
) -> (Option<pb::Route>, Vec<String>) {
    let mut warnings = Vec::new();
    let ns = vs.metadata.namespace();
    if vs.spec.gateways.iter().any(|g| g != "mesh") {
        warnings.push(
            "NOT ENFORCED: Ambit serves `gateways: [mesh]` only (no ingress gateways)".to_owned(),
        );
        return (None, warnings);
    }
    if !vs.spec.tcp.is_empty() || !vs.spec.tls.is_empty() {
        warnings
            .push("tcp and tls routes are not supported; only http routes are applied".to_owned());
    }
    let mut parents = Vec::new();
    let mut waypoints = Vec::new();
    for host in &vs.spec.hosts {
        let Some(svc) = service_for_host(model, ns, host, o) else {
            warnings.push(format!("NOT ENFORCED for host {host}: no such Service"));
            continue;
        };
        let svc_ns = svc.metadata.namespace();
        let routed_by_gateway_api = model
            .of_kind(Kind::HTTPRoute)
            .chain(model.of_kind(Kind::GRPCRoute))
            .any(|r| {
                let refs = match r {
                    Object::HttpRoute(r) => &r.spec.parent_refs,
                    Object::GrpcRoute(r) => &r.spec.parent_refs,
                    _ => return false,
                };
                let route_ns = r.metadata().namespace();
                refs.iter().any(|p| {
                    p.kind.as_deref() == Some("Service")
                        && p.name.as_str() == svc.metadata.name.as_str()
                        && p.namespace.as_ref().map_or(route_ns, |n| n.as_str()) == svc_ns
                })
            });
        if routed_by_gateway_api {
            warnings.push(format!(
                "NOT ENFORCED for host {host}: an HTTPRoute or GRPCRoute also routes Service {svc_ns}/{}; use one or the other",
                svc.metadata.name
            ));
            continue;
        }
        let bound = waypoint(model, &svc.metadata, WaypointFor::Service, o);
        let Some(w) = bound.as_ref().and_then(|g| gateway_of(g, o)) else {
            warnings.push(format!(
                "NOT ENFORCED for host {host}: Service {svc_ns}/{} is not bound to a waypoint (label it istio.io/use-waypoint=<waypoint>)",
                svc.metadata.name
            ));
            continue;
        };
        waypoints.push(w);
        parents.push(pb::RouteParent {
            service: format!("{svc_ns}/{}", service_hostname(svc, o)),
            port: 0,
            consumer: svc_ns != ns,
        });
    }
    let mut rules = Vec::new();
    for (i, http) in vs.spec.http.iter().enumerate() {
        let label = http
            .get("name")
            .and_then(|n| n.as_str())
            .map_or_else(|| format!("http[{i}]"), str::to_owned);
        let (rule, w) = translate_vs_http(model, ns, &label, http, o);
        warnings.extend(w);
        rules.push(rule);
    }
    waypoints.sort();
    waypoints.dedup();
    finish(
        format!("{VS_NAME_PREFIX}{}", vs.metadata.name.as_str()),
        (ns, vs.metadata.created()),
        Vec::new(),
        (parents, waypoints),
        rules,
        true,
        warnings,
    )
}

/// Fields of an `http` route Ambit applies; any other makes the rule answer 500.
const VS_HTTP_FIELDS: &[&str] = &["name", "match", "route", "timeout", "retries", "fault"];

fn translate_vs_http(
    model: &Model,
    ns: &str,
    label: &str,
    http: &serde_json::Value,
    o: &TranslateOptions,
) -> (pb::RouteRule, Vec<String>) {
    let mut warnings = Vec::new();
    let mut out = pb::RouteRule {
        name: http
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_owned(),
        ..Default::default()
    };
    let unsupported: Vec<&String> = http
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
        .filter(|k| !VS_HTTP_FIELDS.contains(&k.as_str()))
        .collect();
    for m in http
        .get("match")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        match vs_match(m) {
            Ok(m) => out.matches.push(m),
            Err(e) => {
                warnings.push(format!(
                    "{label}: a match is ignored (it matches nothing): {e}"
                ));
                out.matches.push(never());
            }
        }
    }
    if let Some(t) = http.get("timeout") {
        match t.as_str().map(istio_duration) {
            Some(Ok(ms)) => out.request_timeout_ms = ms,
            _ => warnings.push(format!(
                "{label}: timeout {t} is not a duration; not applied"
            )),
        }
    }
    if let Some(r) = http.get("retries") {
        let attempts = r
            .get("attempts")
            .and_then(|a| a.as_u64())
            .unwrap_or(2)
            .min(MAX_RETRIES);
        let mut codes = Vec::new();
        for on in r
            .get("retryOn")
            .and_then(|x| x.as_str())
            .unwrap_or("gateway-error,connect-failure,refused-stream")
            .split(',')
        {
            match on.trim() {
                "5xx" => codes.extend(500..=599),
                "gateway-error" => codes.extend([502, 503, 504]),
                "retriable-4xx" => codes.push(409),
                "connect-failure" | "refused-stream" | "reset" | "" => {}
                other => warnings.push(format!(
                    "{label}: retryOn {other} is not supported; ignored"
                )),
            }
        }
        codes.sort_unstable();
        codes.dedup();
        if r.get("perTryTimeout").is_some() {
            warnings.push(format!("{label}: retries.perTryTimeout is not supported; the route's timeout bounds every try"));
        }
        out.retry = Some(pb::Retry {
            codes,
            attempts: attempts as u32,
            backoff_ms: 25,
        });
    }
    if let Some(f) = http.get("fault") {
        match vs_fault(f) {
            Ok(f) => out.fault = Some(f),
            Err(e) => {
                warnings.push(format!(
                    "{label}: fault: {e}; the rule answers its requests 500 until it is fixed"
                ));
                return (out, warnings);
            }
        }
    }
    if !unsupported.is_empty() {
        warnings.push(format!(
            "{label}: {} not supported yet; the rule answers its requests 500 until it is fixed",
            unsupported
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return (out, warnings);
    }
    let destinations: Vec<&serde_json::Value> = http
        .get("route")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .collect();
    let single = destinations.len() == 1;
    for d in destinations {
        let mut backend = pb::RouteBackend {
            weight: d
                .get("weight")
                .and_then(|w| w.as_u64())
                .map_or(if single { 100 } else { 0 }, |w| {
                    w.min(u64::from(u32::MAX)) as u32
                }),
            ..Default::default()
        };
        let dest = d.get("destination").cloned().unwrap_or_default();
        let host = dest
            .get("host")
            .and_then(|h| h.as_str())
            .unwrap_or_default();
        if let Some(subset) = dest.get("subset") {
            match subset.as_str().filter(|s| !s.is_empty()) {
                // Resolved at the waypoint, against the host's DestinationRule.
                Some(s) => backend.subset = s.to_owned(),
                None => warnings.push(format!(
                    "{label}: destination {host}: subset must be a name"
                )),
            }
        }
        {
            match service_for_host(model, ns, host, o) {
                Some(svc) => {
                    let port = dest
                        .get("port")
                        .and_then(|p| p.get("number"))
                        .and_then(|n| n.as_u64())
                        .and_then(|n| u32::try_from(n).ok())
                        .or_else(|| (svc.spec.ports.len() == 1).then(|| u32::from(svc.spec.ports[0].port.0)));
                    match port {
                        Some(p) => {
                            backend.service = format!("{}/{}", svc.metadata.namespace(), service_hostname(svc, o));
                            backend.port = p;
                        }
                        None => warnings.push(format!("{label}: destination {host}: the Service has several ports; name one (port.number); its share of requests is answered 500")),
                    }
                }
                None => warnings.push(format!("{label}: destination {host}: no such Service; its share of requests is answered 500")),
            }
        }
        out.backends.push(backend);
    }
    (out, warnings)
}

fn vs_match(m: &serde_json::Value) -> Result<pb::RouteMatch, String> {
    let mut out = pb::RouteMatch {
        path: Some(pb::PathMatch {
            kind: pb::path_match::Kind::StringPrefix as i32,
            value: "/".into(),
        }),
        ..Default::default()
    };
    if let Some(uri) = m.get("uri") {
        out.path = Some(if let Some(e) = uri.get("exact").and_then(|x| x.as_str()) {
            pb::PathMatch {
                kind: pb::path_match::Kind::Exact as i32,
                value: e.to_owned(),
            }
        } else if let Some(p) = uri.get("prefix").and_then(|x| x.as_str()) {
            pb::PathMatch {
                kind: pb::path_match::Kind::StringPrefix as i32,
                value: p.to_owned(),
            }
        } else if let Some(r) = uri.get("regex").and_then(|x| x.as_str()) {
            check_regex(r)?;
            pb::PathMatch {
                kind: pb::path_match::Kind::Regex as i32,
                value: r.to_owned(),
            }
        } else {
            return Err(format!("uri {uri} is not an exact, prefix or regex match"));
        });
    }
    for (field, lower, into) in [("headers", true, 0), ("queryParams", false, 1)] {
        if let Some(map) = m.get(field).and_then(|h| h.as_object()) {
            for (name, v) in map {
                let (regex, value) = vs_string(v)?;
                let vm = pb::ValueMatch {
                    name: if lower {
                        name.to_lowercase()
                    } else {
                        name.clone()
                    },
                    regex,
                    value,
                };
                if into == 0 {
                    out.headers.push(vm);
                } else {
                    out.query.push(vm);
                }
            }
        }
    }
    if let Some(method) = m.get("method") {
        match vs_string(method)? {
            (false, e) => out.method = e.to_uppercase(),
            (true, _) => return Err("a method match must be exact".into()),
        }
    }
    for k in m.as_object().into_iter().flat_map(|m| m.keys()) {
        if !matches!(
            k.as_str(),
            "name" | "uri" | "headers" | "queryParams" | "method"
        ) {
            return Err(format!("match field {k} is not supported"));
        }
    }
    Ok(out)
}

/// Istio's `percentage.value` (0-100, fractions allowed) per million.
fn per_million(v: Option<&serde_json::Value>) -> Result<u32, String> {
    let pct = match v.and_then(|p| p.get("value")) {
        None => 100.0,
        Some(x) => x.as_f64().ok_or("percentage.value must be a number")?,
    };
    if !(0.0..=100.0).contains(&pct) {
        return Err(format!("percentage {pct} is not between 0 and 100"));
    }
    Ok((pct * 10_000.0).round() as u32)
}

fn vs_fault(f: &serde_json::Value) -> Result<pb::Fault, String> {
    let mut out = pb::Fault::default();
    if let Some(d) = f.get("delay") {
        let fixed = d
            .get("fixedDelay")
            .and_then(|x| x.as_str())
            .ok_or("delay needs fixedDelay")?;
        out.delay_ms = istio_duration(fixed)?;
        out.delay_per_million = per_million(d.get("percentage"))?;
    }
    if let Some(a) = f.get("abort") {
        out.abort_per_million = per_million(a.get("percentage"))?;
        if let Some(s) = a.get("httpStatus").and_then(|s| s.as_u64()) {
            if !(200..=599).contains(&s) {
                return Err(format!("abort httpStatus {s}"));
            }
            out.abort_http_status = s as u32;
        } else if let Some(g) = a.get("grpcStatus") {
            let code = match g.as_str() {
                Some(name) => grpc_code(name).ok_or(format!("unknown gRPC status {name}"))?,
                None => g
                    .as_u64()
                    .filter(|c| *c <= 16)
                    .ok_or("abort grpcStatus 0-16 or its name")? as u32,
            };
            out.abort_is_grpc = true;
            out.abort_grpc_status = code;
        } else {
            return Err("abort needs httpStatus or grpcStatus".into());
        }
    }
    Ok(out)
}

fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

/// Istio durations (protobuf Duration as a string: `5s`, `0.5s`, `100ms`, `1m`) to
/// milliseconds.
fn istio_duration(s: &str) -> Result<u64, String> {
    if let Ok(ms) = parse_duration(s) {
        return Ok(ms);
    }
    let secs = s
        .strip_suffix('s')
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n >= 0.0 && *n < 1e9)
        .ok_or_else(|| format!("{s:?} is not a duration (examples: 5s, 0.5s, 100ms)"))?;
    Ok((secs * 1000.0).round() as u64)
}

/// The HTTP path match of a gRPC method match.
fn grpc_path(
    m: Option<&crate::model::GrpcMethodMatch>,
) -> Result<crate::model::HttpPathMatch, String> {
    let path = |kind: &str, value: String| crate::model::HttpPathMatch {
        kind: Some(kind.into()),
        value: Some(value),
    };
    let Some(m) = m else {
        return Ok(path("PathPrefix", "/".into()));
    };
    let service = m.service.as_deref().filter(|s| !s.is_empty());
    let method = m.method.as_deref().filter(|s| !s.is_empty());
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            for part in service.iter().chain(method.iter()) {
                if part.contains('/') {
                    return Err(format!("{part:?} cannot hold a /"));
                }
            }
            Ok(match (service, method) {
                (Some(s), Some(m)) => path("Exact", format!("/{s}/{m}")),
                (Some(s), None) => path("PathPrefix", format!("/{s}")),
                (None, Some(m)) => {
                    path("RegularExpression", format!("/[^/]+/{}", regex::escape(m)))
                }
                (None, None) => path("PathPrefix", "/".into()),
            })
        }
        "RegularExpression" => Ok(path(
            "RegularExpression",
            format!(
                "/(?:{})/(?:{})",
                service.unwrap_or("[^/]+"),
                method.unwrap_or("[^/]+")
            ),
        )),
        other => Err(format!(
            "method match type {other:?} (known: Exact, RegularExpression)"
        )),
    }
}

/// The parents a route names that Ambit can serve (Services bound to a waypoint), and
/// those waypoints; a warning for each other parent.
fn parents_of(
    model: &Model,
    ns: &str,
    refs: &[crate::model::ParentReference],
    hostnames: &[String],
    o: &TranslateOptions,
    warnings: &mut Vec<String>,
) -> (Vec<pb::RouteParent>, Vec<String>) {
    let mut parents = Vec::new();
    let mut waypoints = Vec::new();
    for p in refs {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let parent_ns = p.namespace.as_ref().map_or(ns, |n| n.as_str());
        let name = p.name.as_str();
        match (group, kind) {
            ("" | "core", "Service") => {
                let Some(Object::Service(svc)) = model.lookup(Kind::Service, parent_ns, name) else {
                    warnings.push(format!(
                        "NOT ENFORCED for Service {parent_ns}/{name}: no such Service"
                    ));
                    continue;
                };
                let bound = waypoint(model, &svc.metadata, WaypointFor::Service, o);
                match bound.as_ref().and_then(|g| gateway_of(g, o)) {
                    Some(w) => waypoints.push(w),
                    None => {
                        warnings.push(format!(
                            "NOT ENFORCED for Service {parent_ns}/{name}: it is not bound to a waypoint (label it istio.io/use-waypoint=<waypoint>); routes need one"
                        ));
                        continue;
                    }
                }
                parents.push(pb::RouteParent {
                    service: format!("{parent_ns}/{}", service_hostname(svc, o)),
                    port: p.port.map_or(0, |p| u32::from(p.0)),
                    consumer: parent_ns != ns,
                });
            }
            ("gateway.networking.k8s.io", "Gateway") => {
                let gateway = match model.lookup(Kind::Gateway, parent_ns, name) {
                    Some(Object::Gateway(g))
                        if g.spec.gateway_class_name.as_str() == WAYPOINT_CLASS =>
                    {
                        g
                    }
                    _ => {
                        warnings.push(format!(
                            "NOT ENFORCED for Gateway {parent_ns}/{name}: not a waypoint (class {WAYPOINT_CLASS}); Ambit runs no ingress gateways"
                        ));
                        continue;
                    }
                };
                if let Err(why) = allowed_from(gateway, parent_ns, ns) {
                    warnings.push(format!("NOT ENFORCED for Gateway {parent_ns}/{name}: {why}"));
                    continue;
                }
                // The route applies, as a producer route, to every Service the waypoint
                // serves whose name its `hostnames` match (all of them without any).
                let key = format!("{parent_ns}/{name}");
                let before = parents.len();
                for o2 in model.of_kind(Kind::Service) {
                    let Object::Service(svc) = o2 else { continue };
                    let bound = waypoint(model, &svc.metadata, WaypointFor::Service, o);
                    if bound.as_ref().and_then(|g| gateway_of(g, o)).as_deref() != Some(key.as_str())
                    {
                        continue;
                    }
                    let fqdn = service_hostname(svc, o);
                    let short = format!("{}.{}", svc.metadata.name.as_str(), svc.metadata.namespace());
                    let named = hostnames.is_empty()
                        || hostnames
                            .iter()
                            .any(|h| host_matches(h, &fqdn) || host_matches(h, &short));
                    if !named {
                        continue;
                    }
                    parents.push(pb::RouteParent {
                        service: format!("{}/{fqdn}", svc.metadata.namespace()),
                        port: p.port.map_or(0, |p| u32::from(p.0)),
                        consumer: false,
                    });
                }
                if parents.len() == before {
                    warnings.push(format!(
                        "NOT ENFORCED for Gateway {parent_ns}/{name}: no Service bound to this waypoint matches the route's hostnames ({})",
                        if hostnames.is_empty() { "none".to_owned() } else { hostnames.join(", ") }
                    ));
                    continue;
                }
                waypoints.push(key);
            }
            _ => warnings.push(format!(
                "NOT ENFORCED for {group}/{kind} {parent_ns}/{name}: a route's parent must be a Service (or a waypoint Gateway)"
            )),
        }
    }
    waypoints.sort();
    waypoints.dedup();
    (parents, waypoints)
}

/// Whether a Gateway in `gateway_ns` takes routes from `route_ns` (its listeners'
/// `allowedRoutes.namespaces.from`: `Same`, the default, or `All`).
fn allowed_from(g: &crate::model::Gateway, gateway_ns: &str, route_ns: &str) -> Result<(), String> {
    let mut froms = g.spec.listeners.iter().map(|l| {
        l.allowed_routes
            .as_ref()
            .and_then(|a| a.pointer("/namespaces/from"))
            .and_then(|f| f.as_str())
            .unwrap_or("Same")
            .to_owned()
    });
    let all: Vec<String> = froms.by_ref().collect();
    if all.iter().any(|f| f == "All") || (route_ns == gateway_ns && all.iter().any(|f| f == "Same"))
    {
        return Ok(());
    }
    if all.iter().any(|f| f == "Selector") {
        return Err(
            "allowedRoutes.namespaces.from Selector is not supported; use Same or All".into(),
        );
    }
    Err(format!(
        "its listeners take routes from its own namespace only (allowedRoutes.namespaces.from: Same), and this route is in {route_ns}"
    ))
}

/// Gateway API hostname matching: exact, or `*.suffix` for any name under the suffix.
fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(&suffix),
        None => pattern == host,
    }
}

/// The route that refers to a backend: its namespace and kind (for ReferenceGrants).
#[derive(Debug, Clone, Copy)]
struct Referrer<'a> {
    ns: &'a str,
    kind: &'static str,
}

fn translate_rule(
    model: &Model,
    from: Referrer<'_>,
    index: usize,
    rule: &crate::model::HttpRouteRule,
    o: &TranslateOptions,
) -> (pb::RouteRule, Vec<String>) {
    let mut warnings = Vec::new();
    let label = rule
        .name
        .clone()
        .unwrap_or_else(|| format!("rules[{index}]"));
    let mut out = pb::RouteRule {
        name: rule.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    for m in &rule.matches {
        match translate_match(m) {
            Ok(m) => out.matches.push(m),
            Err(e) => {
                // A match that cannot be read must not widen the rule: it matches
                // nothing, and the rule keeps its other matches.
                warnings.push(format!(
                    "{label}: a match is ignored (it matches nothing): {e}"
                ));
                out.matches.push(never());
            }
        }
    }
    let mut broken = None;
    let prefix_matched = !rule.matches.is_empty()
        && rule.matches.iter().all(|m| {
            m.path
                .as_ref()
                .is_none_or(|p| p.kind.as_deref().unwrap_or("PathPrefix") == "PathPrefix")
        });
    for f in &rule.filters {
        match f.get("type").and_then(|t| t.as_str()) {
            Some("RequestRedirect") => {
                match redirect_filter(f.get("requestRedirect"), prefix_matched) {
                    Ok(r) => out.redirect = Some(r),
                    Err(e) => broken = Some(e),
                }
                continue;
            }
            Some("RequestMirror") => {
                match mirror_filter(model, from, f.get("requestMirror"), o) {
                    Ok(m) => out.mirrors.push(m),
                    Err(e) => warnings.push(format!("{label}: RequestMirror: {e}; not mirrored")),
                }
                continue;
            }
            Some("CORS") => {
                match cors_filter(f.get("cors")) {
                    Ok(c) => out.cors = Some(c),
                    Err(e) => broken = Some(e),
                }
                continue;
            }
            Some("URLRewrite") => {
                match rewrite_filter(f.get("urlRewrite"), prefix_matched) {
                    Ok(r) => out.rewrite = Some(r),
                    Err(e) => broken = Some(e),
                }
                continue;
            }
            _ => {}
        }
        match header_filter(f) {
            Ok(Some((response, modifier))) => {
                if response {
                    out.response_headers = Some(modifier);
                } else {
                    out.request_headers = Some(modifier);
                }
            }
            Ok(None) => {}
            Err(e) => broken = Some(e),
        }
    }
    if let Some(t) = &rule.timeouts {
        for (field, slot) in [
            ("request", &mut out.request_timeout_ms),
            ("backendRequest", &mut out.backend_timeout_ms),
        ] {
            if let Some(v) = t.get(field) {
                match v.as_str().map(parse_duration) {
                    Some(Ok(ms)) => *slot = ms,
                    Some(Err(e)) => {
                        warnings.push(format!("{label}: timeouts.{field}: {e}; not applied"))
                    }
                    None => warnings.push(format!(
                        "{label}: timeouts.{field} must be a duration string; not applied"
                    )),
                }
            }
        }
    }
    if let Some(r) = &rule.retry {
        match retry(r) {
            Ok(r) => out.retry = Some(r),
            Err(e) => warnings.push(format!("{label}: retry: {e}; requests are tried once")),
        }
    }
    if rule.session_persistence.is_some() {
        warnings.push(format!(
            "{label}: sessionPersistence is not supported yet; ignored"
        ));
    }
    if let Some(e) = broken {
        warnings.push(format!(
            "{label}: {e}; the rule answers its requests 500 until it is fixed"
        ));
        return (out, warnings);
    }
    for b in &rule.backend_refs {
        let weight = b.weight.unwrap_or(1);
        let resolved = resolve_backend(model, from, b, o);
        let mut backend = pb::RouteBackend {
            weight,
            ..Default::default()
        };
        match resolved {
            Ok((service, port)) => {
                backend.service = service;
                backend.port = port;
            }
            Err(e) => warnings.push(format!(
                "{label}: backend {}: {e}; its share of requests is answered 500",
                b.name
            )),
        }
        for f in &b.filters {
            match header_filter(f) {
                Ok(Some((true, m))) => backend.response_headers = Some(m),
                Ok(Some((false, m))) => backend.request_headers = Some(m),
                Ok(None) => {}
                Err(e) => {
                    warnings.push(format!(
                        "{label}: backend {}: {e}; its share of requests is answered 500",
                        b.name
                    ));
                    backend.service.clear();
                }
            }
        }
        out.backends.push(backend);
    }
    (out, warnings)
}

/// A match that matches no request (a method no request has).
fn never() -> pb::RouteMatch {
    pb::RouteMatch {
        method: "-".into(),
        ..Default::default()
    }
}

fn translate_match(m: &crate::model::HttpRouteMatch) -> Result<pb::RouteMatch, String> {
    let path = match &m.path {
        None => pb::PathMatch {
            kind: pb::path_match::Kind::Prefix as i32,
            value: "/".into(),
        },
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let kind = match p.kind.as_deref().unwrap_or("PathPrefix") {
                "PathPrefix" => pb::path_match::Kind::Prefix,
                "Exact" => pb::path_match::Kind::Exact,
                "RegularExpression" => pb::path_match::Kind::Regex,
                other => {
                    return Err(format!(
                        "path type {other:?} (known: Exact, PathPrefix, RegularExpression)"
                    ));
                }
            };
            if kind == pb::path_match::Kind::Regex {
                check_regex(&value)?;
            } else if !value.starts_with('/') {
                return Err(format!("path {value:?} must start with /"));
            }
            pb::PathMatch {
                kind: kind as i32,
                value,
            }
        }
    };
    let values = |list: &[crate::model::HttpHeaderMatch],
                  lower: bool|
     -> Result<Vec<pb::ValueMatch>, String> {
        list.iter()
            .map(|h| {
                let regex = match h.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => false,
                    "RegularExpression" => true,
                    other => {
                        return Err(format!(
                            "match type {other:?} (known: Exact, RegularExpression)"
                        ));
                    }
                };
                if regex {
                    check_regex(&h.value)?;
                }
                let name = h.name.as_str().to_owned();
                Ok(pb::ValueMatch {
                    name: if lower { name.to_lowercase() } else { name },
                    regex,
                    value: h.value.clone(),
                })
            })
            .collect()
    };
    Ok(pb::RouteMatch {
        path: Some(path),
        headers: values(&m.headers, true)?,
        query: values(&m.query_params, false)?,
        method: m.method.clone().unwrap_or_default().to_uppercase(),
    })
}

fn check_regex(r: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{r})$"))
        .map(|_| ())
        .map_err(|e| format!("regular expression {r:?}: {e}"))
}

/// The most retries a rule may ask for.
pub const MAX_RETRIES: u64 = 10;

/// `retry` (GEP-1731): `codes` (400-599), `attempts` (retries, default 1, at most 10),
/// `backoff` (a duration).
fn retry(v: &serde_json::Value) -> Result<pb::Retry, String> {
    let mut out = pb::Retry {
        attempts: 1,
        ..Default::default()
    };
    if let Some(codes) = v.get("codes") {
        for c in codes.as_array().ok_or("codes must be a list")? {
            match c.as_u64() {
                Some(c @ 400..=599) => out.codes.push(c as u32),
                _ => return Err(format!("code {c} is not an HTTP error status (400-599)")),
            }
        }
    }
    if let Some(a) = v.get("attempts") {
        match a.as_u64() {
            Some(a) if a <= MAX_RETRIES => out.attempts = a as u32,
            _ => return Err(format!("attempts {a}: 0 to {MAX_RETRIES}")),
        }
    }
    if let Some(b) = v.get("backoff") {
        out.backoff_ms = parse_duration(b.as_str().ok_or("backoff must be a duration string")?)?;
    }
    Ok(out)
}

/// A RequestMirror: its backend (a Service of the route's namespace) and its share
/// (`percent`, or `fraction` numerator/denominator; all by default).
fn mirror_filter(
    model: &Model,
    from: Referrer<'_>,
    spec: Option<&serde_json::Value>,
    o: &TranslateOptions,
) -> Result<pb::Mirror, String> {
    let spec = spec.ok_or("no requestMirror")?;
    let b = spec.get("backendRef").ok_or("no backendRef")?;
    let backend: crate::model::HttpBackendRef =
        serde_json::from_value(b.clone()).map_err(|e| format!("backendRef: {e}"))?;
    let (service, port) = resolve_backend(model, from, &backend, o)?;
    let per_million = if let Some(p) = spec.get("percent") {
        match p.as_u64() {
            Some(p @ 0..=100) => (p * 10_000) as u32,
            _ => return Err(format!("percent {p} is not 0 to 100")),
        }
    } else if let Some(f) = spec.get("fraction") {
        let num = f
            .get("numerator")
            .and_then(|n| n.as_u64())
            .ok_or("fraction without numerator")?;
        let den = f.get("denominator").and_then(|n| n.as_u64()).unwrap_or(100);
        if den == 0 || num > den {
            return Err(format!("fraction {num}/{den}"));
        }
        (num * 1_000_000 / den) as u32
    } else {
        1_000_000
    };
    Ok(pb::Mirror {
        service,
        port,
        per_million,
    })
}

/// The CORS filter (GEP-1767): origins exact, `*`, or with a wildcard first label.
fn cors_filter(spec: Option<&serde_json::Value>) -> Result<pb::Cors, String> {
    let empty = serde_json::Value::Null;
    let spec = spec.unwrap_or(&empty);
    let list = |key: &str| -> Result<Vec<String>, String> {
        spec.get(key)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .map(|v| {
                v.as_str()
                    .filter(|s| http::HeaderValue::from_str(s).is_ok() && !s.contains(','))
                    .map(str::to_owned)
                    .ok_or_else(|| format!("CORS: {key}: {v} is not a single header value"))
            })
            .collect()
    };
    let origins = list("allowOrigins")?;
    for o in &origins {
        let ok = o == "*"
            || o.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https")
                    && !host.is_empty()
                    && (!host.contains('*') || (host.starts_with("*.") && !host[2..].contains('*')))
            });
        if !ok {
            return Err(format!(
                "CORS: origin {o:?} (examples: https://a.example, https://*.example, *)"
            ));
        }
    }
    let max_age = match spec.get("maxAge") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("CORS: maxAge {v} is not a number of seconds"))?,
    };
    Ok(pb::Cors {
        allow_origins: origins,
        allow_methods: list("allowMethods")?,
        allow_headers: list("allowHeaders")?,
        expose_headers: list("exposeHeaders")?,
        allow_credentials: spec
            .get("allowCredentials")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        max_age,
    })
}

/// A path modifier of a redirect or rewrite: `ReplaceFullPath` or `ReplacePrefixMatch`
/// (only on rules whose every match is a path prefix, as the specification requires).
fn path_modifier(
    v: Option<&serde_json::Value>,
    filter: &str,
    prefix_matched: bool,
) -> Result<Option<pb::PathRewrite>, String> {
    let Some(v) = v else { return Ok(None) };
    use pb::path_rewrite::Kind;
    let (kind, field) = match v.get("type").and_then(|t| t.as_str()) {
        Some("ReplaceFullPath") => (Kind::Full, "replaceFullPath"),
        Some("ReplacePrefixMatch") => (Kind::Prefix, "replacePrefixMatch"),
        other => {
            return Err(format!(
                "{filter}: path type {other:?} (known: ReplaceFullPath, ReplacePrefixMatch)"
            ));
        }
    };
    if kind == Kind::Prefix && !prefix_matched {
        return Err(format!(
            "{filter}: ReplacePrefixMatch needs every match of the rule to be a PathPrefix"
        ));
    }
    let value = v
        .get(field)
        .and_then(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    if !value.starts_with('/') || value.contains(['?', '#']) || value.chars().any(char::is_control)
    {
        return Err(format!(
            "{filter}: path {value:?} must start with / and hold no query"
        ));
    }
    Ok(Some(pb::PathRewrite {
        kind: kind as i32,
        value,
    }))
}

fn hostname_of(v: Option<&serde_json::Value>, filter: &str) -> Result<String, String> {
    let h = v.and_then(|h| h.as_str()).unwrap_or_default();
    if h.is_empty()
        || http::uri::Authority::try_from(h).is_ok_and(|a| a.port().is_none() && a.as_str() == h)
    {
        Ok(h.to_lowercase())
    } else {
        Err(format!("{filter}: {h:?} is not a hostname"))
    }
}

fn redirect_filter(
    spec: Option<&serde_json::Value>,
    prefix_matched: bool,
) -> Result<pb::Redirect, String> {
    let empty = serde_json::Value::Null;
    let spec = spec.unwrap_or(&empty);
    let scheme = spec
        .get("scheme")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_lowercase();
    if !matches!(scheme.as_str(), "" | "http" | "https") {
        return Err(format!(
            "RequestRedirect: scheme {scheme:?} (known: http, https)"
        ));
    }
    let status_code = match spec.get("statusCode").and_then(|v| v.as_u64()) {
        None => 302,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u32,
        Some(c) => {
            return Err(format!(
                "RequestRedirect: statusCode {c} (known: 301, 302, 303, 307, 308)"
            ));
        }
    };
    let port = match spec.get("port").and_then(|v| v.as_u64()) {
        None => 0,
        Some(p @ 1..=65535) => p as u32,
        Some(p) => return Err(format!("RequestRedirect: port {p} is out of range")),
    };
    Ok(pb::Redirect {
        scheme,
        hostname: hostname_of(spec.get("hostname"), "RequestRedirect")?,
        path: path_modifier(spec.get("path"), "RequestRedirect", prefix_matched)?,
        port,
        status_code,
    })
}

fn rewrite_filter(
    spec: Option<&serde_json::Value>,
    prefix_matched: bool,
) -> Result<pb::Rewrite, String> {
    let empty = serde_json::Value::Null;
    let spec = spec.unwrap_or(&empty);
    Ok(pb::Rewrite {
        hostname: hostname_of(spec.get("hostname"), "URLRewrite")?,
        path: path_modifier(spec.get("path"), "URLRewrite", prefix_matched)?,
    })
}

/// A RequestHeaderModifier (`false`) or ResponseHeaderModifier (`true`); `Err` for a
/// filter Ambit does not implement or cannot read.
fn header_filter(f: &serde_json::Value) -> Result<Option<(bool, pb::HeaderModifier)>, String> {
    let kind = f.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    let (response, field) = match kind {
        "RequestHeaderModifier" => (false, "requestHeaderModifier"),
        "ResponseHeaderModifier" => (true, "responseHeaderModifier"),
        other => return Err(format!("filter {other:?} is not supported yet")),
    };
    let spec = f.get(field).cloned().unwrap_or_default();
    let headers = |key: &str| -> Result<Vec<pb::Header>, String> {
        spec.get(key)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .map(|h| {
                let name = h.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                let value = h.get("value").and_then(|n| n.as_str()).unwrap_or_default();
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(format!("{kind}: {key}: {name:?} is not a header name"));
                }
                if http::HeaderValue::from_str(value).is_err() {
                    return Err(format!(
                        "{kind}: {key}: the value of {name} is not a header value"
                    ));
                }
                Ok(pb::Header {
                    name: name.to_lowercase(),
                    value: value.to_owned(),
                })
            })
            .collect()
    };
    let remove = spec
        .get("remove")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str())
        .map(str::to_lowercase)
        .collect();
    Ok(Some((
        response,
        pb::HeaderModifier {
            set: headers("set")?,
            add: headers("add")?,
            remove,
        },
    )))
}

fn resolve_backend(
    model: &Model,
    from: Referrer<'_>,
    b: &crate::model::HttpBackendRef,
    o: &TranslateOptions,
) -> Result<(String, u32), String> {
    let ns = from.ns;
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        return Err(format!(
            "kind {group}/{kind} is not supported (only Service)"
        ));
    }
    let backend_ns = b.namespace.as_ref().map_or(ns, |n| n.as_str());
    if backend_ns != ns && !granted(model, from, backend_ns, b.name.as_str()) {
        return Err(format!(
            "a backend in another namespace ({backend_ns}) needs a ReferenceGrant there allowing {} from {ns} to refer to Service {}",
            from.kind, b.name
        ));
    }
    let Some(port) = b.port else {
        return Err("a Service backend needs a port".into());
    };
    match model.lookup(Kind::Service, backend_ns, b.name.as_str()) {
        Some(Object::Service(svc)) => Ok((
            format!("{backend_ns}/{}", service_hostname(svc, o)),
            u32::from(port.0),
        )),
        _ => Err(format!("no Service {backend_ns}/{}", b.name)),
    }
}

/// Gateway API durations (GEP-2257): one to four `<number><unit>` parts, units h, m, s,
/// ms; to milliseconds. `0s` means none.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration (examples: 10s, 1m30s, 500ms)");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total = total.saturating_add(n.saturating_mul(unit));
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    Ok(total)
}

/// Whether a ReferenceGrant in `to_ns` lets routes of `from` refer to Service `name`
/// there (Gateway API: `from` group, kind and namespace; `to` group `""`, kind
/// Service, and the name when it gives one).
fn granted(model: &Model, from: Referrer<'_>, to_ns: &str, name: &str) -> bool {
    model.in_namespace(Kind::ReferenceGrant, to_ns).any(|o| {
        let Object::ReferenceGrant(g) = o else {
            return false;
        };
        g.spec.from.iter().any(|f| {
            f.group == "gateway.networking.k8s.io" && f.kind == from.kind && f.namespace == from.ns
        }) && g.spec.to.iter().any(|t| {
            matches!(t.group.as_str(), "" | "core")
                && t.kind == "Service"
                && t.name.as_deref().is_none_or(|n| n == name)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_gep_2257() {
        assert_eq!(parse_duration("10s"), Ok(10_000));
        assert_eq!(parse_duration("1m30s"), Ok(90_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("1h2m3s4ms"), Ok(3_723_004));
        assert_eq!(parse_duration("0s"), Ok(0));
        for bad in ["", "10", "s", "1.5s", "1d", "123456s", "1h1h1h1h1h", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
