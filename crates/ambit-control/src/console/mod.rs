//! The mesh console: a read-only web UI and JSON API served by the control plane on its
//! own port, built from what the control plane already has (the model, the translated
//! resources and their findings) and what node proxies and waypoints report to it every
//! few seconds over `ambit.telemetry.v1.Telemetry/Report` (their metrics and the
//! certificates they hold). No Prometheus is needed; the metrics stay scrapeable.
//!
//! - [`Console::ingest`] keeps, per reporter, the last two reports' counters by edge
//!   (source workload -> destination workload and service, by reporting side), so rates
//!   are differences over the reporting interval.
//! - [`Console::graph`], [`Console::workload`], [`Console::policies`],
//!   [`Console::waypoints`], [`Console::search`] are the JSON views.
//! - [`server`] serves them and the page (`ui/`), with a bearer token when the console is
//!   bound beyond loopback.

pub mod promtext;
pub mod server;
pub mod telemetry;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::model::{Kind, Model, Object};
use crate::xds::snapshot::Snapshot;
use crate::xds::translate::{TranslateOptions, WaypointFor};

/// A reporter silent this long is dropped from the views.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// How often reporters are asked to report.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// The most reporters kept (one per node and waypoint replica).
pub const MAX_REPORTERS: usize = 10_000;
/// The most edges kept from one report.
pub const MAX_EDGES_PER_REPORT: usize = 50_000;
/// The most traced requests kept from one report (the newest).
pub const MAX_TRACES: usize = 100;

/// The families a report is read for.
const FAMILIES: [&str; 8] = [
    "ambit_node_policy_decisions_total",
    "ambit_waypoint_policy_decisions_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
];

/// Source and destination of traffic, and the side that counted it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EdgeKey {
    source: String,
    destination: String,
    service: String,
    /// `source`, `destination` or `waypoint`.
    side: String,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    opened: f64,
    opened_mtls: f64,
    opened_plain: f64,
    denied: f64,
    bytes: f64,
    requests: f64,
    errors: f64,
    /// Cumulative request duration buckets (upper bound in ms -> count).
    buckets: Vec<(f64, f64)>,
    source_principal: String,
    destination_principal: String,
}

struct Reporter {
    component: String,
    name: String,
    at: Instant,
    edges: HashMap<EdgeKey, Counters>,
    previous: Option<(Instant, HashMap<EdgeKey, Counters>)>,
    certificates: Vec<ambit_proto::telemetry::CertificateInfo>,
    /// Decisions by policy (`<ns>/<name>`) and kind (allow, deny, dry_run_deny, audit).
    decisions: HashMap<String, BTreeMap<String, f64>>,
    /// A waypoint's recent traced requests.
    traces: Vec<ambit_proto::telemetry::TracedRequest>,
}

/// The console's state: reports, and the control plane's own model and snapshot.
pub struct Console {
    reporters: Mutex<HashMap<String, Reporter>>,
    model: watch::Receiver<Arc<Model>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    options: TranslateOptions,
    /// A trace viewer's address for a trace id (`{trace_id}` in it is replaced).
    trace_url: Option<String>,
}

/// `<namespace>/<name>` of a workload as the metrics name it (`unknown` parts kept).
fn workload_id(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Console {
    pub fn new(
        model: watch::Receiver<Arc<Model>>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        options: TranslateOptions,
    ) -> Self {
        Self {
            reporters: Mutex::default(),
            model,
            snapshots,
            options,
            trace_url: None,
        }
    }

    /// Links trace ids to a trace viewer: `template` with `{trace_id}` replaced.
    pub fn with_trace_url(mut self, template: Option<String>) -> Self {
        self.trace_url = template;
        self
    }

    /// Reads one report. Errors say what was wrong with it; the previous report stays.
    pub fn ingest(
        &self,
        report: ambit_proto::telemetry::TelemetryReport,
    ) -> Result<(), promtext::ParseError> {
        let samples = promtext::parse(&report.metrics, |n| FAMILIES.contains(&n))?;
        let mut edges: HashMap<EdgeKey, Counters> = HashMap::new();
        let mut decisions: HashMap<String, BTreeMap<String, f64>> = HashMap::new();
        for s in &samples {
            if edges.len() >= MAX_EDGES_PER_REPORT || decisions.len() >= MAX_EDGES_PER_REPORT {
                break;
            }
            // The node proxies' L4 decisions and the waypoints' L7 ones, by policy.
            if s.name == "ambit_node_policy_decisions_total"
                || s.name == "ambit_waypoint_policy_decisions_total"
            {
                *decisions
                    .entry(s.label("policy").to_owned())
                    .or_default()
                    .entry(s.label("decision").to_owned())
                    .or_default() += if s.value.is_finite() { s.value } else { 0.0 };
                continue;
            }
            let key = EdgeKey {
                source: workload_id(
                    s.label("source_workload_namespace"),
                    s.label("source_workload"),
                ),
                destination: workload_id(
                    s.label("destination_workload_namespace"),
                    s.label("destination_workload"),
                ),
                service: s.label("destination_service").to_owned(),
                side: s.label("reporter").to_owned(),
            };
            let c = edges.entry(key).or_default();
            if c.source_principal.is_empty() {
                c.source_principal = s.label("source_principal").to_owned();
                c.destination_principal = s.label("destination_principal").to_owned();
            }
            let v = if s.value.is_finite() { s.value } else { 0.0 };
            match s.name.as_str() {
                "istio_tcp_connections_opened_total" => {
                    c.opened += v;
                    if s.label("connection_security_policy") == "mutual_tls" {
                        c.opened_mtls += v;
                    } else {
                        c.opened_plain += v;
                    }
                }
                "istio_tcp_connections_closed_total" if s.label("response_flags") == "DENY" => {
                    c.denied += v;
                }
                "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => c.bytes += v,
                "istio_requests_total" => {
                    c.requests += v;
                    if s.label("response_code").starts_with('5') {
                        c.errors += v;
                    }
                }
                "istio_request_duration_milliseconds_bucket" => {
                    let le = match s.label("le") {
                        "+Inf" => f64::INFINITY,
                        l => l.parse().unwrap_or(f64::INFINITY),
                    };
                    match c.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, n)) => *n += v,
                        None => c.buckets.push((le, v)),
                    }
                }
                _ => {}
            }
        }
        for c in edges.values_mut() {
            c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let key = format!("{}/{}", report.component, report.name);
        let now = Instant::now();
        let mut reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
        reporters.retain(|_, r| now.duration_since(r.at) < STALE_AFTER);
        if !reporters.contains_key(&key) && reporters.len() >= MAX_REPORTERS {
            return Ok(());
        }
        let previous = reporters.remove(&key).map(|r| (r.at, r.edges));
        reporters.insert(
            key,
            Reporter {
                component: report.component,
                name: report.name,
                at: now,
                edges,
                previous,
                certificates: report.certificates,
                decisions,
                traces: report.traces.into_iter().rev().take(MAX_TRACES).collect(),
            },
        );
        Ok(())
    }

    /// The reporters heard from, for the views.
    fn reporters(&self) -> Vec<Value> {
        let now = Instant::now();
        let reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Value> = reporters
            .values()
            .filter(|r| now.duration_since(r.at) < STALE_AFTER)
            .map(|r| {
                json!({"component": r.component, "name": r.name,
                       "seconds_ago": now.duration_since(r.at).as_secs()})
            })
            .collect();
        out.sort_by_key(|v| v.to_string());
        out
    }

    /// Edges: counters summed by side over reporters, then the side that counted most.
    fn edges(&self) -> Vec<Edge> {
        let now = Instant::now();
        let reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_side: BTreeMap<EdgeKey, (Counters, Counters, f64)> = BTreeMap::new();
        for r in reporters.values() {
            if now.duration_since(r.at) >= STALE_AFTER {
                continue;
            }
            for (k, c) in &r.edges {
                let (total, rate, _) = by_side.entry(k.clone()).or_default();
                add(total, c, 1.0);
                if let Some((at, prev)) = &r.previous {
                    let dt = r.at.duration_since(*at).as_secs_f64();
                    if dt > 0.0 {
                        let before = prev.get(k).cloned().unwrap_or_default();
                        add(rate, &delta(c, &before), 1.0 / dt);
                    }
                }
            }
        }
        let mut edges: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
        for (k, (total, rate, _)) in by_side {
            let e = edges
                .entry((k.source.clone(), k.destination.clone(), k.service.clone()))
                .or_insert_with(|| Edge {
                    source: k.source.clone(),
                    destination: k.destination.clone(),
                    service: k.service.clone(),
                    ..Default::default()
                });
            e.merge(&total, &rate);
        }
        edges.into_values().collect()
    }

    /// The service graph: workloads and services as nodes, traffic as edges.
    pub fn graph(&self) -> Value {
        let model = self.model.borrow().clone();
        let edges = self.edges();
        let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
        for pod in model.pods() {
            let ns = pod.metadata.namespace();
            let name = pod.metadata.name.as_str();
            nodes.insert(
                workload_id(ns, name),
                json!({"id": workload_id(ns, name), "kind": "workload", "namespace": ns,
                       "name": name, "identity": self.identity(ns, pod.service_account()),
                       "enrolled": crate::xds::translate::is_enrolled(&model, pod)}),
            );
        }
        for e in &edges {
            for id in [&e.source, &e.destination] {
                if !nodes.contains_key(id.as_str()) {
                    let (ns, name) = id.split_once('/').unwrap_or(("", id));
                    nodes.insert(
                        id.clone(),
                        json!({"id": id, "kind": "external", "namespace": ns, "name": name}),
                    );
                }
            }
        }
        json!({
            "nodes": nodes.into_values().collect::<Vec<_>>(),
            "edges": edges,
            "reporters": self.reporters(),
        })
    }

    fn identity(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.options.trust_domain)
    }

    /// One workload: identity, node, addresses, services, waypoint, the policies that
    /// apply, its traffic and the certificate its node proxy holds for it.
    pub fn workload(&self, ns: &str, name: &str) -> Option<Value> {
        let model = self.model.borrow().clone();
        let Some(Object::Pod(pod)) = model.lookup(Kind::Pod, ns, name) else {
            return None;
        };
        let identity = self.identity(ns, pod.service_account());
        let services: Vec<String> = model
            .in_namespace(Kind::Service, ns)
            .filter_map(|o| match o {
                Object::Service(s) => Some(s),
                _ => None,
            })
            .filter(|s| {
                s.spec
                    .selector
                    .as_ref()
                    .is_some_and(|sel| !sel.is_empty() && pod.metadata.labels.matches(sel))
            })
            .map(|s| s.metadata.name.as_str().to_owned())
            .collect();
        let waypoint = crate::xds::translate::waypoint(
            &model,
            &pod.metadata,
            WaypointFor::Workload,
            &self.options,
        )
        .and_then(|g| crate::xds::translate::waypoint_policy::gateway_of(&g, &self.options));
        let policies: Vec<Value> = self
            .policy_list(&model)
            .into_iter()
            .filter(|p| applies_to(p, ns, pod, &services, &self.options.root_namespace))
            .collect();
        let id = workload_id(ns, name);
        let edges: Vec<Edge> = self
            .edges()
            .into_iter()
            .filter(|e| e.source == id || e.destination == id)
            .collect();
        let certificate = {
            let reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
            reporters
                .values()
                .flat_map(|r| &r.certificates)
                .find(|c| c.identity == identity)
                .map(|c| json!({"serial": c.serial, "not_after": c.not_after}))
        };
        // Traced requests to its services or from it, newest first.
        let hostnames: Vec<String> = services
            .iter()
            .map(|s| format!("{s}.{ns}.svc.{}", self.options.domain_suffix))
            .collect();
        let traces: Vec<Value> = {
            let reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
            let mut all: Vec<&ambit_proto::telemetry::TracedRequest> = reporters
                .values()
                .flat_map(|r| &r.traces)
                .filter(|t| hostnames.contains(&t.service) || t.source == identity)
                .collect();
            all.sort_by(|a, b| b.at.cmp(&a.at));
            // The same request seen by several proxies (node proxies and a waypoint) is
            // listed once.
            let mut seen = std::collections::HashSet::new();
            all.into_iter()
                .filter(|t| seen.insert((&t.trace_id, &t.path, &t.service)))
                .take(MAX_TRACES)
                .map(|t| {
                    json!({"trace_id": t.trace_id, "source": t.source, "service": t.service,
                           "method": t.method, "path": t.path, "status": t.status,
                           "duration_ms": t.duration_ms, "at": t.at,
                           "url": self.trace_url.as_ref().map(|u| u.replace("{trace_id}", &t.trace_id))})
                })
                .collect()
        };
        Some(json!({
            "namespace": ns, "name": name, "identity": identity,
            "node": pod.node(), "ips": pod.ips(), "service_account": pod.service_account(),
            "enrolled": crate::xds::translate::is_enrolled(&model, pod),
            "services": services, "waypoint": waypoint, "policies": policies,
            "traffic": edges, "certificate": certificate, "traces": traces,
        }))
    }

    /// Decisions by policy and kind, summed over every reporter: the node proxies' (L4)
    /// and the waypoints' (L7).
    pub(crate) fn decisions(&self) -> HashMap<String, BTreeMap<String, f64>> {
        let mut decided: HashMap<String, BTreeMap<String, f64>> = HashMap::new();
        let reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
        for r in reporters.values() {
            for (policy, kinds) in &r.decisions {
                let into = decided.entry(policy.clone()).or_default();
                for (k, v) in kinds {
                    *into.entry(k.clone()).or_default() += v;
                }
            }
        }
        decided
    }

    fn policy_list(&self, model: &Model) -> Vec<Value> {
        let snapshot = self.snapshots.borrow().clone();
        let decided = self.decisions();
        let mut out = Vec::new();
        for o in model
            .of_kind(Kind::AuthorizationPolicy)
            .chain(model.of_kind(Kind::PeerAuthentication))
            .chain(model.of_kind(Kind::RequestAuthentication))
        {
            let meta = o.metadata();
            let ns = meta.namespace();
            let name = meta.name.as_str();
            let (kind, action, selector, targets) = match o {
                Object::AuthorizationPolicy(p) => (
                    "AuthorizationPolicy",
                    format!(
                        "{:?}",
                        p.spec
                            .action
                            .unwrap_or(crate::model::AuthorizationAction::Allow)
                    )
                    .to_uppercase(),
                    p.spec
                        .selector
                        .as_ref()
                        .map(|s| selector_text(&s.match_labels)),
                    targets_text(p.spec.target_ref.as_ref(), &p.spec.target_refs),
                ),
                Object::PeerAuthentication(p) => (
                    "PeerAuthentication",
                    p.spec
                        .mtls
                        .as_ref()
                        .and_then(|m| m.mode)
                        .map_or("UNSET".to_owned(), |m| format!("{m:?}").to_uppercase()),
                    p.spec
                        .selector
                        .as_ref()
                        .map(|s| selector_text(&s.match_labels)),
                    Vec::new(),
                ),
                Object::RequestAuthentication(p) => (
                    "RequestAuthentication",
                    "JWT".to_owned(),
                    p.spec
                        .selector
                        .as_ref()
                        .map(|s| selector_text(&s.match_labels)),
                    targets_text(p.spec.target_ref.as_ref(), &p.spec.target_refs),
                ),
                _ => continue,
            };
            let scope = if !targets.is_empty() {
                format!("targets: {}", targets.join(", "))
            } else if let Some(sel) = &selector {
                format!("pods in {ns} labelled {sel}")
            } else if ns == self.options.root_namespace {
                "every workload of the mesh".to_owned()
            } else {
                format!("every workload in {ns}")
            };
            let key = format!("{ns}/{name}");
            let findings = snapshot
                .warnings
                .get(&key)
                .or_else(|| snapshot.warnings.get(&format!("{kind} {key}")))
                .cloned()
                .unwrap_or_default();
            let counts = decided.get(&key).cloned().unwrap_or_default();
            out.push(json!({
                "kind": kind, "namespace": ns, "name": name, "action": action,
                "decisions": counts,
                "selects": scope, "targets": targets,
                "selector": selector,
                "enforced": !findings.iter().any(|f| f.starts_with("NOT ENFORCED")),
                "findings": findings,
                "dry_run": meta.annotations.get("istio.io/dry-run") == Some("true"),
            }));
        }
        out
    }

    /// Every AuthorizationPolicy, PeerAuthentication and RequestAuthentication: what it
    /// selects, whether it is enforced and what the control plane found.
    pub fn policies(&self) -> Value {
        let model = self.model.borrow().clone();
        json!({"policies": self.policy_list(&model)})
    }

    /// Every waypoint: the services bound to it, its routes and whether it reports.
    pub fn waypoints(&self) -> Value {
        use ambit_proto::prost::Message;
        let model = self.model.borrow().clone();
        let snapshot = self.snapshots.borrow().clone();
        let reporting: Vec<String> = {
            let reporters = self.reporters.lock().unwrap_or_else(|p| p.into_inner());
            reporters
                .values()
                .filter(|r| r.component == "waypoint")
                .map(|r| r.name.clone())
                .collect()
        };
        let mut out = Vec::new();
        for o in model.of_kind(Kind::Gateway) {
            let Object::Gateway(g) = o else { continue };
            if g.spec.gateway_class_name.as_str()
                != crate::xds::translate::waypoint_policy::WAYPOINT_CLASS
            {
                continue;
            }
            let key = format!("{}/{}", g.metadata.namespace(), g.metadata.name.as_str());
            let services: Vec<String> = model
                .of_kind(Kind::Service)
                .filter_map(|o| match o {
                    Object::Service(s) => Some(s),
                    _ => None,
                })
                .filter(|s| {
                    crate::xds::translate::waypoint(
                        &model,
                        &s.metadata,
                        WaypointFor::Service,
                        &self.options,
                    )
                    .and_then(|w| {
                        crate::xds::translate::waypoint_policy::gateway_of(&w, &self.options)
                    })
                    .as_deref()
                        == Some(key.as_str())
                })
                .map(|s| format!("{}/{}", s.metadata.namespace(), s.metadata.name.as_str()))
                .collect();
            let routes: Vec<Value> = snapshot
                .resources(crate::xds::translate::ResourceType::WaypointRoute)
                .values()
                .filter_map(|enc| ambit_proto::waypoint::Route::decode(&*enc.body).ok())
                .filter(|r| r.waypoints.contains(&key))
                .map(|r| {
                    let backends: Vec<String> = r
                        .rules
                        .iter()
                        .flat_map(|rule| &rule.backends)
                        .map(|b| {
                            if b.service.is_empty() {
                                "(unresolved)".to_owned()
                            } else {
                                format!("{} w{}", b.service, b.weight)
                            }
                        })
                        .collect();
                    json!({"name": format!("{}/{}", r.namespace, r.name),
                           "rules": r.rules.len(), "backends": backends})
                })
                .collect();
            out.push(json!({
                "name": key, "services": services, "routes": routes,
                "reporting": reporting.iter().filter(|n| **n == key).count(),
            }));
        }
        json!({"waypoints": out})
    }

    /// Workloads, services, policies and waypoints whose name holds `q` (any case).
    pub fn search(&self, q: &str) -> Value {
        let q = q.to_lowercase();
        let model = self.model.borrow().clone();
        let mut hits = Vec::new();
        if q.is_empty() {
            return json!({"results": hits});
        }
        for o in model.objects() {
            let kind = match o.kind() {
                Kind::Pod => "workload",
                Kind::Service => "service",
                Kind::AuthorizationPolicy
                | Kind::PeerAuthentication
                | Kind::RequestAuthentication => "policy",
                Kind::Gateway => "waypoint",
                _ => continue,
            };
            let m = o.metadata();
            let full = format!("{}/{}", m.namespace(), m.name.as_str());
            if full.to_lowercase().contains(&q) {
                hits.push(json!({"kind": kind, "name": full}));
                if hits.len() >= 100 {
                    break;
                }
            }
        }
        json!({"results": hits})
    }
}

/// Whether a policy (a [`Console::policy_list`] entry) applies to `pod`.
fn applies_to(
    p: &Value,
    ns: &str,
    pod: &crate::model::Pod,
    services: &[String],
    root: &str,
) -> bool {
    let pns = p["namespace"].as_str().unwrap_or_default();
    if let Some(targets) = p["targets"].as_array()
        && !targets.is_empty()
    {
        return pns == ns
            && targets.iter().filter_map(|t| t.as_str()).any(|t| {
                t.strip_prefix("Service ")
                    .is_some_and(|s| services.iter().any(|x| x == s))
            });
    }
    if pns != ns && pns != root {
        return false;
    }
    match p["selector"].as_str() {
        None => true,
        Some(_) => {
            // The selector as written: `k=v,k=v`.
            let sel = p["selector"].as_str().unwrap_or_default();
            pns == ns
                && sel.split(',').filter(|kv| !kv.is_empty()).all(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    pod.metadata.labels.get(k) == Some(v)
                })
        }
    }
}

/// `targetRef` and `targetRefs` as `Kind name` each.
fn targets_text(
    one: Option<&crate::model::PolicyTargetReference>,
    many: &[crate::model::PolicyTargetReference],
) -> Vec<String> {
    one.into_iter()
        .chain(many)
        .map(|t| format!("{} {}", t.kind.as_str(), t.name.as_str()))
        .collect()
}

/// A selector as `k=v,k=v`.
fn selector_text(l: &crate::model::fields::Labels) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn add(into: &mut Counters, c: &Counters, scale: f64) {
    into.opened += c.opened * scale;
    into.opened_mtls += c.opened_mtls * scale;
    into.opened_plain += c.opened_plain * scale;
    into.denied += c.denied * scale;
    into.bytes += c.bytes * scale;
    into.requests += c.requests * scale;
    into.errors += c.errors * scale;
    for (le, n) in &c.buckets {
        match into.buckets.iter_mut().find(|(b, _)| b == le) {
            Some((_, m)) => *m += n * scale,
            None => into.buckets.push((*le, n * scale)),
        }
    }
    into.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if into.source_principal.is_empty() {
        into.source_principal = c.source_principal.clone();
        into.destination_principal = c.destination_principal.clone();
    }
}

/// `now - before`, never negative (a reporter restarted: its counters began again).
fn delta(now: &Counters, before: &Counters) -> Counters {
    let d = |a: f64, b: f64| if a >= b { a - b } else { a };
    Counters {
        opened: d(now.opened, before.opened),
        opened_mtls: d(now.opened_mtls, before.opened_mtls),
        opened_plain: d(now.opened_plain, before.opened_plain),
        denied: d(now.denied, before.denied),
        bytes: d(now.bytes, before.bytes),
        requests: d(now.requests, before.requests),
        errors: d(now.errors, before.errors),
        buckets: now
            .buckets
            .iter()
            .map(|(le, n)| {
                let b = before
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, m)| *m);
                (*le, d(*n, b))
            })
            .collect(),
        source_principal: now.source_principal.clone(),
        destination_principal: now.destination_principal.clone(),
    }
}

/// The quantile `q` of cumulative buckets, interpolated within the bucket it falls in
/// (as Prometheus' `histogram_quantile`); `None` without requests.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, count) in buckets {
        if *count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (*le, *count);
    }
    Some(lower.0)
}

/// One edge of the graph, as the API gives it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub service: String,
    /// `mutual_tls`, `plaintext` or `denied` (any connection refused by policy).
    pub security: &'static str,
    pub source_principal: String,
    pub destination_principal: String,
    pub connections_total: f64,
    pub connections_per_s: f64,
    pub denied_total: f64,
    pub bytes_total: f64,
    pub bytes_per_s: f64,
    pub requests_total: f64,
    pub requests_per_s: f64,
    /// 5xx share of requests (over the last interval when known, else in all).
    pub error_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Edge {
    /// Takes the larger of what this edge holds and what one side counted (both sides
    /// of one connection count it).
    fn merge(&mut self, total: &Counters, rate: &Counters) {
        let max = |a: &mut f64, b: f64| *a = a.max(b);
        max(&mut self.connections_total, total.opened);
        max(&mut self.connections_per_s, rate.opened);
        max(&mut self.denied_total, total.denied);
        max(&mut self.bytes_total, total.bytes);
        max(&mut self.bytes_per_s, rate.bytes);
        if total.requests > self.requests_total {
            self.requests_total = total.requests;
            self.requests_per_s = rate.requests;
            let (req, err) = if rate.requests > 0.0 {
                (rate.requests, rate.errors)
            } else {
                (total.requests, total.errors)
            };
            self.error_rate = (req > 0.0).then(|| err / req);
            let buckets = if rate.requests > 0.0 {
                &rate.buckets
            } else {
                &total.buckets
            };
            self.p50_ms = quantile(buckets, 0.5);
            self.p99_ms = quantile(buckets, 0.99);
        }
        if self.source_principal.is_empty() && total.source_principal != "unknown" {
            self.source_principal = total.source_principal.clone();
        }
        if self.destination_principal.is_empty() && total.destination_principal != "unknown" {
            self.destination_principal = total.destination_principal.clone();
        }
        self.security = if self.denied_total > 0.0 {
            "denied"
        } else if total.opened_plain > 0.0 && self.security != "mutual_tls" {
            "plaintext"
        } else if total.opened_mtls > 0.0 || total.requests > 0.0 {
            "mutual_tls"
        } else if self.security.is_empty() {
            "plaintext"
        } else {
            self.security
        };
    }
}

#[cfg(test)]
mod tests;
