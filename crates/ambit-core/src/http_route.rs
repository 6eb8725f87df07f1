//! HTTP routes at the waypoint (Gateway API HTTPRoute, mesh profile): which rule a
//! request matches, by the specification's precedence, and which backend it goes to.
//!
//! A route applies to the services it names as parents. For a caller in namespace N,
//! consumer routes of N (routes in N whose parent Service is elsewhere) are used when
//! there are any for the service; otherwise the producer routes (in the Service's own
//! namespace). Among all rules of the routes used, the request takes the one whose
//! matching clause ranks first: an exact path before any prefix; a longer prefix before
//! a shorter one; a method match before none; more header matches before fewer; more
//! query matches before fewer; then the older route (by `metadata.creationTimestamp`,
//! which files usually leave out), then the route's name (`<namespace>/<name>`,
//! alphabetically) and the rule's order in the route. A request no rule matches is
//! answered 404.
//!
//! Paths are compared without the query string. A prefix matches whole segments:
//! `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. Regular expressions
//! (RE2-like syntax, the `regex` crate's) must match the whole value. Header names are
//! case-insensitive; a repeated header matches when any of its values does. A repeated
//! query parameter is read at its first occurrence, as the specification says.

use std::time::Duration;

use http::HeaderMap;

use crate::discovery::Str;

/// One HTTPRoute as a waypoint uses it.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// `<namespace>/<name>`.
    pub key: Str,
    pub namespace: Str,
    pub parents: Vec<Parent>,
    pub rules: Vec<Rule>,
    /// The first rule that matches is taken, in order (Istio's VirtualService), instead
    /// of the Gateway API's precedence.
    pub ordered: bool,
    /// Seconds since the epoch of its creation (0: unknown): between two routes ranking
    /// the same, the older wins, then the one first by `<namespace>/<name>`.
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// `<namespace>/<hostname>` of the Service.
    pub service: Str,
    /// 0: every port.
    pub port: u16,
    pub consumer: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub name: String,
    /// Empty: every request.
    pub matches: Vec<Match>,
    /// Empty: every request is answered 500.
    pub backends: Vec<Backend>,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    /// RequestRedirect: answered with a redirect, sent nowhere.
    pub redirect: Option<Redirect>,
    /// URLRewrite: host and path as the backend sees them.
    pub rewrite: Option<Rewrite>,
    pub retry: Option<Retry>,
    pub fault: Option<Fault>,
    pub cors: Option<Cors>,
    pub mirrors: Vec<Mirror>,
}

/// A RequestMirror: a copy of a share of requests sent to another Service, its answer
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `<namespace>/<hostname>`.
    pub service: Str,
    pub port: u16,
    pub per_million: u32,
}

/// The CORS filter (Gateway API GEP-1767).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cors {
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    pub max_age: u32,
}

impl Cors {
    /// Whether `origin` (a request's `Origin`) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|o| {
            if o == "*" {
                return true;
            }
            if o.eq_ignore_ascii_case(origin) {
                return true;
            }
            // `https://*.example`: one or more labels in front of `.example`.
            let (Some((scheme, pattern)), Some((oscheme, host))) =
                (o.split_once("://"), origin.split_once("://"))
            else {
                return false;
            };
            let Some(suffix) = pattern.strip_prefix('*') else {
                return false;
            };
            scheme.eq_ignore_ascii_case(oscheme)
                && host.len() > suffix.len()
                && host
                    .to_ascii_lowercase()
                    .ends_with(&suffix.to_ascii_lowercase())
        })
    }

    /// The `Access-Control-Allow-Origin` for an allowed `origin`: the origin itself,
    /// unless any origin is allowed and credentials are not (then `*`).
    pub fn allow_origin_value<'a>(&self, origin: &'a str) -> &'a str {
        if !self.allow_credentials && self.allow_origins.iter().any(|o| o == "*") {
            "*"
        } else {
            origin
        }
    }
}

/// Fault injection: a share of requests delayed, a share answered with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    /// The status and share (per million); gRPC aborts answer the gRPC way.
    pub abort: Option<(Abort, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

impl Fault {
    /// Whether a request with `roll` (uniform in `0..1_000_000`) falls in a share.
    pub fn hits(per_million: u32, roll: u32) -> bool {
        roll < per_million
    }
}

/// When a request is tried again (only requests without a body: nothing to replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Response codes that are retried.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Before the first retry; doubled after each, at most 10 s.
    pub backoff: Duration,
}

impl Retry {
    /// The wait before retry number `n` (1-based).
    pub fn wait(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(10);
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(10))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `None`: the request's.
    pub scheme: Option<String>,
    /// `None`: the request's host.
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
    /// `None`: the scheme's port when `scheme` is set, else the request's.
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    /// Replaces the prefix the request matched.
    Prefix(String),
}

impl PathRewrite {
    /// The new path and query for `path_and_query`, which matched `matched_prefix`
    /// (without a trailing slash; `/` for every path). The query is kept.
    pub fn apply(&self, path_and_query: &str, matched_prefix: Option<&str>) -> String {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let new = match self {
            PathRewrite::Full(p) => p.clone(),
            PathRewrite::Prefix(replacement) => {
                let prefix = matched_prefix.unwrap_or("/");
                let rest = if prefix == "/" {
                    path
                } else {
                    path.strip_prefix(prefix).unwrap_or(path)
                };
                let base = replacement.trim_end_matches('/');
                let joined = if base.is_empty() {
                    if rest.is_empty() {
                        "/".to_owned()
                    } else {
                        rest.to_owned()
                    }
                } else if rest.is_empty() {
                    base.to_owned()
                } else if rest.starts_with('/') {
                    format!("{base}{rest}")
                } else {
                    format!("{base}/{rest}")
                };
                if joined.starts_with('/') {
                    joined
                } else {
                    format!("/{joined}")
                }
            }
        };
        match query {
            Some(q) => format!("{new}?{q}"),
            None => new,
        }
    }
}

/// A `Host` without its port (`[::1]:80` -> `[::1]`, `web:8080` -> `web`).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => h,
        _ => host,
    }
}

impl Redirect {
    /// The `Location` for a request with `scheme`, `host` (its `Host`, maybe with a port),
    /// `port` (where it was sent) and `path_and_query`, whose rule matched
    /// `matched_prefix`. A scheme's default port is left out.
    pub fn location(
        &self,
        scheme: &str,
        host: &str,
        port: u16,
        path_and_query: &str,
        matched_prefix: Option<&str>,
    ) -> String {
        let out_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let request_host = strip_port(host);
        let out_host = self.hostname.as_deref().unwrap_or(request_host);
        let default = |s: &str| if s == "https" { 443 } else { 80 };
        let out_port = match (self.port, &self.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) => default(s),
            (None, None) => port,
        };
        let path = match &self.path {
            Some(p) => p.apply(path_and_query, matched_prefix),
            None => path_and_query.to_owned(),
        };
        if out_port == default(out_scheme) {
            format!("{out_scheme}://{out_host}{path}")
        } else {
            format!("{out_scheme}://{out_host}:{out_port}{path}")
        }
    }
}

#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
    /// Upper case.
    pub method: Option<String>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Without a trailing slash (`/` stays `/`).
    Prefix(String),
    /// A plain string prefix (Istio's `uri.prefix`): `/api` also matches `/apis`.
    StringPrefix(String),
    Exact(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct ValueMatch {
    pub name: String,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Exact(String),
    Regex(regex::Regex),
}

impl Value {
    fn matches(&self, v: &str) -> bool {
        match self {
            Value::Exact(e) => e == v,
            Value::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backend {
    /// `<namespace>/<hostname>`; `None` when the reference did not resolve.
    pub service: Option<Str>,
    pub port: u16,
    pub weight: u32,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    /// A DestinationRule subset of the service.
    pub subset: Option<Str>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderModifier {
    /// Applies the filter: `set` replaces, `add` appends, `remove` drops.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Compiles a Gateway API regular expression to match whole values.
pub fn full_match(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
}

/// What is known of a request when its route is chosen.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Path and query, as received (normalized).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
}

/// The routing decision for one request.
#[derive(Debug, Clone, Copy)]
pub enum Selected<'a> {
    /// No route applies to the service: the request goes to it as addressed.
    NoRoutes,
    /// Routes apply but no rule matches: 404.
    NoMatch,
    Rule {
        route: &'a HttpRoute,
        rule: &'a Rule,
        /// The path prefix of the clause that matched (`/` for a rule without matches),
        /// for `ReplacePrefixMatch`.
        matched_prefix: Option<&'a str>,
    },
}

/// How a matching clause ranks (greater first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    exact: bool,
    prefix_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

fn path_of(path_and_query: &str) -> &str {
    path_and_query
        .split_once('?')
        .map_or(path_and_query, |(p, _)| p)
}

fn query_value<'a>(path_and_query: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path_and_query.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl Match {
    /// The rank of this clause if it matches the request.
    fn rank(&self, req: &RequestFacts<'_>) -> Option<Rank> {
        let path = path_of(req.path_and_query);
        let (exact, prefix_len) = match &self.path {
            PathMatch::Exact(p) => (p == path).then_some((true, p.len()))?,
            PathMatch::Prefix(p) => prefix_matches(p, path).then_some((false, p.len()))?,
            PathMatch::StringPrefix(p) => {
                path.starts_with(p.as_str()).then_some((false, p.len()))?
            }
            PathMatch::Regex(r) => r.is_match(path).then_some((false, 0))?,
        };
        if let Some(m) = &self.method
            && m != req.method
        {
            return None;
        }
        for h in &self.headers {
            let mut values = req.headers.get_all(h.name.as_str()).iter();
            if !values.any(|v| v.to_str().is_ok_and(|v| h.value.matches(v))) {
                return None;
            }
        }
        for q in &self.query {
            if !query_value(req.path_and_query, &q.name).is_some_and(|v| q.value.matches(v)) {
                return None;
            }
        }
        Some(Rank {
            exact,
            prefix_len,
            method: self.method.is_some(),
            headers: self.headers.len(),
            query: self.query.len(),
        })
    }
}

impl Rule {
    fn rank(&self, req: &RequestFacts<'_>) -> Option<(Rank, Option<&str>)> {
        if self.matches.is_empty() {
            // No matches: a prefix match on `/`.
            let rank = Rank {
                exact: false,
                prefix_len: 1,
                method: false,
                headers: 0,
                query: 0,
            };
            return Some((rank, Some("/")));
        }
        self.matches
            .iter()
            .filter_map(|m| {
                let prefix = match &m.path {
                    PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => Some(p.as_str()),
                    _ => None,
                };
                m.rank(req).map(|r| (r, prefix))
            })
            .max_by_key(|(r, _)| *r)
    }
}

impl HttpRoute {
    fn parent_for(&self, service: &str, port: u16) -> Option<&Parent> {
        self.parents
            .iter()
            .find(|p| p.service.as_ref() == service && (p.port == 0 || p.port == port))
    }
}

/// Picks the rule for a request to `service` on `port` from a caller in
/// `client_namespace`, among `routes` (in any order).
pub fn select<'a>(
    routes: impl IntoIterator<Item = &'a HttpRoute>,
    service: &str,
    port: u16,
    client_namespace: &str,
    req: &RequestFacts<'_>,
) -> Selected<'a> {
    let mut producer: Vec<&HttpRoute> = Vec::new();
    let mut consumer: Vec<&HttpRoute> = Vec::new();
    for r in routes {
        match r.parent_for(service, port) {
            Some(p) if p.consumer && r.namespace.as_ref() == client_namespace => consumer.push(r),
            Some(p) if p.consumer => {}
            Some(_) => producer.push(r),
            None => {}
        }
    }
    let mut used = if consumer.is_empty() {
        producer
    } else {
        consumer
    };
    if used.is_empty() {
        return Selected::NoRoutes;
    }
    used.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
    if used.iter().any(|r| r.ordered) {
        return select_ordered(used, req);
    }
    let mut best: Option<(Rank, &HttpRoute, &Rule, Option<&str>)> = None;
    for route in used {
        for rule in &route.rules {
            if let Some((rank, prefix)) = rule.rank(req)
                && best.as_ref().is_none_or(|(b, _, _, _)| rank > *b)
            {
                best = Some((rank, route, rule, prefix));
            }
        }
    }
    match best {
        Some((_, route, rule, matched_prefix)) => Selected::Rule {
            route,
            rule,
            matched_prefix,
        },
        None => Selected::NoMatch,
    }
}

/// One Service's routes, indexed for choosing a request's rule without looking at every
/// rule: clauses by exact path and by path prefix (a request's path gives the few keys
/// that can match it), the rest (regular expressions, plain string prefixes) in a short
/// list. Built once per change of the Service's routes; [`RouteTable::select`] chooses
/// exactly as [`select`] does.
#[derive(Debug)]
pub struct RouteTable {
    /// Oldest first, then by `<namespace>/<name>`.
    routes: Vec<std::sync::Arc<HttpRoute>>,
    /// Any route is ordered (a VirtualService): rules are tried in order instead.
    ordered: bool,
    /// Routes with a consumer parent (looked at to decide which routes a caller uses).
    consumers: Vec<u32>,
    clauses: Vec<Clause>,
    exact: std::collections::HashMap<Box<str>, Vec<u32>>,
    prefix: std::collections::HashMap<Box<str>, Vec<u32>>,
    other: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Clause {
    route: u32,
    rule: u32,
    /// The match within the rule; `None` for a rule without matches.
    clause: Option<u32>,
}

impl RouteTable {
    /// Indexes `routes` (all naming one Service as a parent).
    pub fn new(mut routes: Vec<std::sync::Arc<HttpRoute>>) -> Self {
        routes.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
        let mut t = RouteTable {
            ordered: routes.iter().any(|r| r.ordered),
            consumers: Vec::new(),
            clauses: Vec::new(),
            exact: Default::default(),
            prefix: Default::default(),
            other: Vec::new(),
            routes: Vec::new(),
        };
        for (ri, route) in routes.iter().enumerate() {
            let ri = ri as u32;
            if route.parents.iter().any(|p| p.consumer) {
                t.consumers.push(ri);
            }
            for (ki, rule) in route.rules.iter().enumerate() {
                let ki = ki as u32;
                if rule.matches.is_empty() {
                    let id = t.clauses.len() as u32;
                    t.clauses.push(Clause {
                        route: ri,
                        rule: ki,
                        clause: None,
                    });
                    t.prefix.entry("/".into()).or_default().push(id);
                }
                for (ci, m) in rule.matches.iter().enumerate() {
                    let id = t.clauses.len() as u32;
                    t.clauses.push(Clause {
                        route: ri,
                        rule: ki,
                        clause: Some(ci as u32),
                    });
                    match &m.path {
                        PathMatch::Exact(p) => {
                            t.exact.entry(p.as_str().into()).or_default().push(id)
                        }
                        PathMatch::Prefix(p) => {
                            t.prefix.entry(p.as_str().into()).or_default().push(id)
                        }
                        PathMatch::StringPrefix(_) | PathMatch::Regex(_) => t.other.push(id),
                    }
                }
            }
        }
        t.routes = routes;
        t
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Picks the rule for a request to `service` on `port` from a caller in
    /// `client_namespace`, as [`select`] does.
    pub fn select(
        &self,
        service: &str,
        port: u16,
        client_namespace: &str,
        req: &RequestFacts<'_>,
    ) -> Selected<'_> {
        // Consumer routes of the caller's namespace, when there are any, else producers.
        let consumer_mode = self.consumers.iter().any(|ri| {
            let r = &self.routes[*ri as usize];
            r.namespace.as_ref() == client_namespace
                && r.parent_for(service, port).is_some_and(|p| p.consumer)
        });
        let used = |r: &HttpRoute| match r.parent_for(service, port) {
            Some(p) if p.consumer => consumer_mode && r.namespace.as_ref() == client_namespace,
            Some(_) => !consumer_mode,
            None => false,
        };
        if !self.routes.iter().any(|r| used(r)) {
            return Selected::NoRoutes;
        }
        if self.ordered && self.routes.iter().any(|r| r.ordered && used(r)) {
            let used: Vec<&HttpRoute> = self
                .routes
                .iter()
                .map(|r| r.as_ref())
                .filter(|r| used(r))
                .collect();
            return select_ordered(used, req);
        }
        let path = path_of(req.path_and_query);
        let bytes = path.as_bytes();
        // The prefixes that can match `path`: `/`, and `path` cut before each `/` and
        // at its end.
        let cuts = (1..=bytes.len()).filter(|i| *i == bytes.len() || bytes[*i] == b'/');
        let prefix_keys =
            std::iter::once("/").chain(cuts.map(|i| &path[..i]).filter(|k| *k != "/"));
        let candidates = self
            .exact
            .get(path)
            .into_iter()
            .flatten()
            .chain(prefix_keys.flat_map(|k| self.prefix.get(k).into_iter().flatten()))
            .chain(&self.other);
        // Greatest rank; on a tie the earlier route and rule, then (as `max_by_key`
        // within a rule) the later clause.
        type Best<'t> = (Rank, std::cmp::Reverse<(u32, u32)>, u32, Option<&'t str>);
        let mut best: Option<Best<'_>> = None;
        for id in candidates {
            let c = self.clauses[*id as usize];
            let route = &self.routes[c.route as usize];
            if !used(route) {
                continue;
            }
            let rule = &route.rules[c.rule as usize];
            let (rank, prefix) = match c.clause {
                None => (
                    Rank {
                        exact: false,
                        prefix_len: 1,
                        method: false,
                        headers: 0,
                        query: 0,
                    },
                    Some("/"),
                ),
                Some(ci) => {
                    let m = &rule.matches[ci as usize];
                    let Some(rank) = m.rank(req) else {
                        continue;
                    };
                    let prefix = match &m.path {
                        PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => Some(p.as_str()),
                        _ => None,
                    };
                    (rank, prefix)
                }
            };
            let key = (
                rank,
                std::cmp::Reverse((c.route, c.rule)),
                c.clause.unwrap_or(0),
                prefix,
            );
            if best
                .as_ref()
                .is_none_or(|b| (key.0, key.1, key.2) > (b.0, b.1, b.2))
            {
                best = Some(key);
            }
        }
        let Some((_, std::cmp::Reverse((ri, ki)), _, matched_prefix)) = best else {
            return Selected::NoMatch;
        };
        let route = &self.routes[ri as usize];
        Selected::Rule {
            route,
            rule: &route.rules[ki as usize],
            matched_prefix,
        }
    }
}

/// In order: the first rule whose any clause matches (routes already in order).
fn select_ordered<'a>(used: Vec<&'a HttpRoute>, req: &RequestFacts<'_>) -> Selected<'a> {
    for route in used {
        for rule in &route.rules {
            if let Some((_, matched_prefix)) = rule.rank(req) {
                return Selected::Rule {
                    route,
                    rule,
                    matched_prefix,
                };
            }
        }
    }
    Selected::NoMatch
}

/// Picks a backend by weight with `roll` (uniform in `0..u32::MAX`); `None` when every
/// weight is 0.
pub fn pick_backend(backends: &[Backend], roll: u32) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = u64::from(roll) * total / (u64::from(u32::MAX) + 1);
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return Some(b);
        }
        point -= w;
    }
    backends.iter().rev().find(|b| b.weight > 0)
}

/// Every `name=value` pair of a request's `Cookie` headers, in order (values as sent).
pub fn cookies(headers: &http::HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, matches: Vec<Match>) -> Rule {
        Rule {
            name: name.into(),
            matches,
            ..Rule::default()
        }
    }

    fn route(key: &str, ns: &str, consumer: bool, rules: Vec<Rule>) -> HttpRoute {
        HttpRoute {
            key: key.into(),
            namespace: ns.into(),
            parents: vec![Parent {
                service: "shop/web.shop.svc.cluster.local".into(),
                port: 0,
                consumer,
            }],
            rules,
            ordered: false,
            created: 0,
        }
    }

    fn chosen(
        routes: &[HttpRoute],
        ns: &str,
        method: &str,
        pq: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let req = RequestFacts {
            method,
            path_and_query: pq,
            headers: &h,
        };
        match select(routes, "shop/web.shop.svc.cluster.local", 80, ns, &req) {
            Selected::NoRoutes => "none".into(),
            Selected::NoMatch => "404".into(),
            Selected::Rule { route, rule, .. } => format!("{}:{}", route.key, rule.name),
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn precedence_follows_the_specification() {
        let exact = Match {
            path: PathMatch::Exact("/api/v1".into()),
            headers: vec![],
            query: vec![],
            method: None,
        };
        let long = Match {
            path: PathMatch::Prefix("/api/v1".into()),
            ..exact.clone()
        };
        let short = Match {
            path: PathMatch::Prefix("/api".into()),
            ..exact.clone()
        };
        let get = Match {
            method: Some("GET".into()),
            ..short.clone()
        };
        let header = Match {
            headers: vec![ValueMatch {
                name: "x-canary".into(),
                value: Value::Exact("1".into()),
            }],
            ..short.clone()
        };
        let two_headers = Match {
            headers: vec![
                ValueMatch {
                    name: "x-canary".into(),
                    value: Value::Exact("1".into()),
                },
                ValueMatch {
                    name: "x-user".into(),
                    value: Value::Regex(full_match("a.*").unwrap()),
                },
            ],
            ..short.clone()
        };
        let query = Match {
            query: vec![ValueMatch {
                name: "v".into(),
                value: Value::Exact("2".into()),
            }],
            ..short.clone()
        };
        let routes = vec![
            route(
                "shop/b",
                "shop",
                false,
                vec![rule("short", vec![short.clone()]), rule("get", vec![get])],
            ),
            route(
                "shop/a",
                "shop",
                false,
                vec![
                    rule("exact", vec![exact]),
                    rule("long", vec![long]),
                    rule("header", vec![header]),
                    rule("two", vec![two_headers]),
                    rule("query", vec![query]),
                ],
            ),
            route("shop/c", "shop", false, vec![rule("short-c", vec![short])]),
        ];
        assert_eq!(
            chosen(&routes, "any", "POST", "/api/v1", &[]),
            "shop/a:exact"
        );
        assert_eq!(
            chosen(&routes, "any", "POST", "/api/v1/x", &[]),
            "shop/a:long"
        );
        assert_eq!(chosen(&routes, "any", "GET", "/api/x", &[]), "shop/b:get");
        assert_eq!(
            chosen(&routes, "any", "POST", "/api/x", &[("x-canary", "1")]),
            "shop/a:header"
        );
        assert_eq!(
            chosen(
                &routes,
                "any",
                "POST",
                "/api/x",
                &[("X-Canary", "1"), ("x-user", "alice")]
            ),
            "shop/a:two"
        );
        assert_eq!(
            chosen(&routes, "any", "POST", "/api/x?a=1&v=2&v=3", &[]),
            "shop/a:query"
        );
        assert_eq!(
            chosen(&routes, "any", "POST", "/api/x?v=3&v=2", &[]),
            "shop/b:short",
            "the first v only"
        );
        // A tie: the route first by name, then the rule first in it.
        assert_eq!(
            chosen(&routes, "any", "POST", "/api/x", &[]),
            "shop/b:short"
        );
        assert_eq!(chosen(&routes, "any", "POST", "/other", &[]), "404");
        // The regex must match the whole value.
        assert_eq!(
            chosen(
                &routes,
                "any",
                "POST",
                "/api/x",
                &[("x-canary", "1"), ("x-user", "bob-a")]
            ),
            "shop/a:header"
        );
    }

    #[test]
    fn consumer_routes_come_first_for_their_namespace_only() {
        let routes = vec![
            route("shop/producer", "shop", false, vec![rule("p", vec![])]),
            route("front/consumer", "front", true, vec![rule("c", vec![])]),
        ];
        assert_eq!(
            chosen(&routes, "front", "GET", "/", &[]),
            "front/consumer:c"
        );
        assert_eq!(chosen(&routes, "other", "GET", "/", &[]), "shop/producer:p");
        assert_eq!(chosen(&[], "other", "GET", "/", &[]), "none");
    }

    #[test]
    fn between_equal_rules_the_older_route_wins_then_the_name() {
        let mut older = route("shop/zeta", "shop", false, vec![rule("z", vec![])]);
        older.created = 1_700_000_000;
        let mut newer = route("shop/alpha", "shop", false, vec![rule("a", vec![])]);
        newer.created = 1_800_000_000;
        assert_eq!(
            chosen(&[newer.clone(), older.clone()], "x", "GET", "/", &[]),
            "shop/zeta:z"
        );
        newer.created = older.created;
        assert_eq!(
            chosen(&[older, newer], "x", "GET", "/", &[]),
            "shop/alpha:a"
        );
    }

    /// The index chooses exactly as the plain scan does, over random tables and
    /// requests (paths, prefixes with and without trailing slashes, regexes, methods,
    /// headers, consumer and producer routes, ports, ties).
    #[test]
    fn the_route_table_chooses_as_the_plain_scan_does() {
        let mut rng = fastrand::Rng::with_seed(7);
        let segs = ["", "a", "b", "ab", "a/b", "a/", "b/c"];
        let path = |rng: &mut fastrand::Rng| {
            let n = rng.usize(0..3);
            let mut p = String::from("/");
            for i in 0..n {
                if i > 0 {
                    p.push('/');
                }
                p.push_str(segs[rng.usize(..segs.len())]);
            }
            p
        };
        for round in 0..300 {
            let mut routes = Vec::new();
            for r in 0..rng.usize(1..6) {
                let mut rules = Vec::new();
                for k in 0..rng.usize(1..4) {
                    let mut matches = Vec::new();
                    for _ in 0..rng.usize(0..3) {
                        let p = path(&mut rng);
                        matches.push(Match {
                            path: match rng.u8(0..4) {
                                0 => PathMatch::Exact(p),
                                1 => PathMatch::Prefix(p),
                                2 => PathMatch::StringPrefix(p),
                                _ => PathMatch::Regex(
                                    regex::Regex::new(&format!("^{}.*$", regex::escape(&p)))
                                        .unwrap(),
                                ),
                            },
                            headers: if rng.bool() {
                                vec![ValueMatch {
                                    name: "x-h".into(),
                                    value: Value::Exact("1".into()),
                                }]
                            } else {
                                vec![]
                            },
                            query: vec![],
                            method: rng.bool().then(|| "GET".to_owned()),
                        });
                    }
                    rules.push(rule(&format!("k{k}"), matches));
                }
                let ns = if rng.bool() { "shop" } else { "front" };
                let mut route = route(&format!("{ns}/r{r}"), ns, ns == "front", rules);
                route.created = i64::from(rng.u8(0..3));
                route.parents[0].port = if rng.bool() {
                    0
                } else {
                    80 + u16::from(rng.u8(0..2))
                };
                routes.push(route);
            }
            let table = RouteTable::new(routes.iter().cloned().map(std::sync::Arc::new).collect());
            for _ in 0..40 {
                let pq = format!("{}{}", path(&mut rng), if rng.bool() { "?q=1" } else { "" });
                let mut h = HeaderMap::new();
                if rng.bool() {
                    h.insert("x-h", "1".parse().unwrap());
                }
                let method = if rng.bool() { "GET" } else { "POST" };
                let req = RequestFacts {
                    method,
                    path_and_query: &pq,
                    headers: &h,
                };
                let ns = if rng.bool() { "front" } else { "other" };
                let port = 80 + u16::from(rng.u8(0..2));
                let show = |s: Selected<'_>| match s {
                    Selected::NoRoutes => "none".to_owned(),
                    Selected::NoMatch => "404".to_owned(),
                    Selected::Rule {
                        route,
                        rule,
                        matched_prefix,
                    } => format!("{}:{}:{matched_prefix:?}", route.key, rule.name),
                };
                let service = "shop/web.shop.svc.cluster.local";
                let plain = show(select(&routes, service, port, ns, &req));
                let indexed = show(table.select(service, port, ns, &req));
                assert_eq!(
                    indexed, plain,
                    "round {round}: {method} {pq} from {ns} port {port}"
                );
            }
        }
    }

    #[test]
    fn backends_are_picked_by_weight() {
        let b = |w: u32| Backend {
            service: Some("shop/x".into()),
            port: 80,
            weight: w,
            request_headers: None,
            response_headers: None,
            subset: None,
        };
        let list = vec![b(90), b(10)];
        let mut counts = [0u32; 2];
        for i in 0..1000u32 {
            let roll = ((u64::from(2 * i + 1) << 32) / 2000) as u32;
            let picked = pick_backend(&list, roll).unwrap();
            let idx = list.iter().position(|x| std::ptr::eq(x, picked)).unwrap();
            counts[idx] += 1;
        }
        assert_eq!(counts, [900, 100]);
        assert!(pick_backend(&[b(0), b(0)], 5).is_none());
        let only = vec![b(0), b(3)];
        assert!(std::ptr::eq(
            pick_backend(&only, u32::MAX).unwrap(),
            &only[1]
        ));
    }

    #[test]
    fn header_modifiers_set_add_and_remove() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        let m = HeaderModifier {
            set: vec![(http::HeaderName::from_static("x-a"), "2".parse().unwrap())],
            add: vec![(http::HeaderName::from_static("x-b"), "3".parse().unwrap())],
            remove: vec![http::HeaderName::from_static("x-gone")],
        };
        m.apply(&mut h);
        assert_eq!(h["x-a"], "2");
        assert_eq!(h["x-b"], "3");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn prefix_rewrites_replace_the_matched_segments() {
        let p = |v: &str| PathRewrite::Prefix(v.into());
        assert_eq!(
            p("/xyz").apply("/foo/bar?a=1", Some("/foo")),
            "/xyz/bar?a=1"
        );
        assert_eq!(p("/xyz").apply("/foo", Some("/foo")), "/xyz");
        assert_eq!(p("/xyz/").apply("/foo/bar", Some("/foo")), "/xyz/bar");
        assert_eq!(p("/").apply("/foo/bar", Some("/foo")), "/bar");
        assert_eq!(p("/").apply("/foo", Some("/foo")), "/");
        assert_eq!(p("/v2").apply("/any", Some("/")), "/v2/any");
        assert_eq!(
            PathRewrite::Full("/new".into()).apply("/old/x?q", Some("/old")),
            "/new?q"
        );
    }

    #[test]
    fn redirects_keep_what_they_do_not_change_and_elide_default_ports() {
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(str::to_owned),
            hostname: host.map(str::to_owned),
            path: None,
            port,
            status: 302,
        };
        assert_eq!(
            r(Some("https"), None, None).location("http", "web.shop:8080", 8080, "/a?b", None),
            "https://web.shop/a?b"
        );
        assert_eq!(
            r(None, Some("new.example"), None).location("http", "web.shop:8080", 8080, "/a", None),
            "http://new.example:8080/a"
        );
        assert_eq!(
            r(None, None, Some(80)).location("http", "web.shop:8080", 8080, "/a", None),
            "http://web.shop/a"
        );
        assert_eq!(
            r(Some("https"), None, Some(8443)).location("http", "web.shop", 80, "/", None),
            "https://web.shop:8443/"
        );
        let with_path = Redirect {
            path: Some(PathRewrite::Prefix("/v2".into())),
            ..r(None, None, None)
        };
        assert_eq!(
            with_path.location("http", "web.shop", 80, "/v1/items", Some("/v1")),
            "http://web.shop/v2/items"
        );
    }

    #[test]
    fn retry_waits_double_and_are_capped() {
        let r = Retry {
            codes: vec![503],
            attempts: 3,
            backoff: Duration::from_millis(100),
        };
        assert_eq!(r.wait(1), Duration::from_millis(100));
        assert_eq!(r.wait(2), Duration::from_millis(200));
        assert_eq!(r.wait(3), Duration::from_millis(400));
        assert_eq!(r.wait(30), Duration::from_secs(10));
    }

    #[test]
    fn ordered_routes_take_the_first_matching_rule_and_plain_prefixes() {
        let m = |p: PathMatch| Match {
            path: p,
            headers: vec![],
            query: vec![],
            method: None,
        };
        let mut r = route(
            "shop/vs:web",
            "shop",
            false,
            vec![
                rule("first", vec![m(PathMatch::StringPrefix("/api".into()))]),
                rule("exact", vec![m(PathMatch::Exact("/apis/x".into()))]),
            ],
        );
        r.ordered = true;
        let routes = vec![r];
        // In order: the plain prefix `/api` matches `/apis/x` before the exact rule.
        assert_eq!(
            chosen(&routes, "any", "GET", "/apis/x", &[]),
            "shop/vs:web:first"
        );
        assert_eq!(chosen(&routes, "any", "GET", "/other", &[]), "404");
    }

    #[test]
    fn cors_origins_match_exactly_by_wildcard_label_or_all() {
        let c = Cors {
            allow_origins: vec![
                "https://app.example".into(),
                "https://*.shop.example".into(),
            ],
            ..Cors::default()
        };
        assert!(c.allows("https://app.example"));
        assert!(c.allows("https://a.shop.example"));
        assert!(c.allows("https://a.b.shop.example"));
        assert!(!c.allows("https://shop.example"));
        assert!(!c.allows("http://a.shop.example"), "the scheme counts");
        assert!(!c.allows("https://evil.example"));
        assert!(!c.allows("https://app.example.evil"));
        assert_eq!(
            c.allow_origin_value("https://app.example"),
            "https://app.example"
        );
        let any = Cors {
            allow_origins: vec!["*".into()],
            ..Cors::default()
        };
        assert!(any.allows("https://x.y"));
        assert_eq!(any.allow_origin_value("https://x.y"), "*");
        let with_credentials = Cors {
            allow_credentials: true,
            ..any
        };
        assert_eq!(
            with_credentials.allow_origin_value("https://x.y"),
            "https://x.y"
        );
    }
}
