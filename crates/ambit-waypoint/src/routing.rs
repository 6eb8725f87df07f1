//! Which backend a request goes to when HTTPRoutes apply to its service
//! ([`ambit_core::http_route`] has the matching and precedence).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::discovery::Service;
use ambit_core::http_route::{self, HeaderModifier, RequestFacts, Selected};
use ambit_core::route::Route;

use crate::Shared;
use crate::serve::{Client, Target};

/// What the routes say about one request.
#[derive(Debug)]
pub(crate) enum Choice {
    /// No route applies: to the service as addressed.
    AsAddressed,
    /// Routes apply and none matches: 404.
    NoMatch,
    /// The matched rule cannot send the request anywhere: 500, with why.
    Invalid {
        route: String,
        rule: String,
        why: String,
    },
    /// To a backend service.
    Backend(Box<Routed>),
    /// Answered with a redirect (RequestRedirect).
    Redirect {
        route: String,
        rule: String,
        status: u16,
        location: String,
    },
}

#[derive(Debug)]
pub(crate) struct Routed {
    pub route: String,
    pub rule: String,
    /// The backend as a target (its VIP and port), and where that leads.
    pub target: Target,
    pub path: Route,
    pub request_headers: Vec<HeaderModifier>,
    pub response_headers: Vec<HeaderModifier>,
    /// The shorter of the rule's request and backend timeouts.
    pub timeout: Option<Duration>,
    /// URLRewrite: the host and the path (with query) the backend is sent.
    pub host: Option<String>,
    pub path_and_query: Option<String>,
    pub retry: Option<ambit_core::http_route::Retry>,
    pub fault: Option<ambit_core::http_route::Fault>,
    pub cors: Option<ambit_core::http_route::Cors>,
    pub mirrors: Vec<ambit_core::http_route::Mirror>,
}

/// Decides the route of a request for `target` from `client`.
pub(crate) fn choose(
    shared: &Shared,
    client: &Client,
    target: &Target,
    host: &str,
    req: &RequestFacts<'_>,
) -> Choice {
    let state = shared.store.load();
    if let Some(refused) = state.refused_routes().next() {
        // Where requests should go is unknown while a route cannot be read: none is
        // sent anywhere the routes might not allow.
        return Choice::Invalid {
            route: refused.to_string(),
            rule: String::new(),
            why: format!(
                "the waypoint could not read route {refused}; it answers 500 until a readable version arrives"
            ),
        };
    }
    if let Some(refused) = state.refused_traffic().next() {
        // Which limits, breakers and balancing apply is unknown: nothing is sent on.
        return Choice::Invalid {
            route: String::new(),
            rule: String::new(),
            why: format!(
                "the waypoint could not read traffic policy {refused}; it answers 500 until a readable version arrives"
            ),
        };
    }
    let Some(service) = &target.service else {
        return Choice::AsAddressed;
    };
    let key = service.key();
    let Some(table) = state.route_table(&key) else {
        return Choice::AsAddressed;
    };
    let selected = table.select(
        &key,
        target.authority.port(),
        client.peer.identity.namespace(),
        req,
    );
    let (route, rule, matched_prefix) = match selected {
        Selected::NoRoutes => return Choice::AsAddressed,
        Selected::NoMatch => return Choice::NoMatch,
        Selected::Rule {
            route,
            rule,
            matched_prefix,
        } => (route, rule, matched_prefix),
    };
    let route_key = route.key.to_string();
    let rule_name = rule.name.clone();
    if let Some(r) = &rule.redirect {
        return Choice::Redirect {
            route: route_key,
            rule: rule_name,
            status: r.status,
            location: r.location(
                "http",
                host,
                target.authority.port(),
                req.path_and_query,
                matched_prefix,
            ),
        };
    }
    let (host, path_and_query) = match &rule.rewrite {
        Some(w) => (
            w.hostname.clone(),
            w.path
                .as_ref()
                .map(|p| p.apply(req.path_and_query, matched_prefix)),
        ),
        None => (None, None),
    };
    let invalid = |why: String| Choice::Invalid {
        route: route_key.clone(),
        rule: rule_name.clone(),
        why,
    };
    let Some(backend) = http_route::pick_backend(&rule.backends, fastrand::u32(..)) else {
        return invalid(
            "the rule has no backend with a weight (or a filter Ambit does not implement)".into(),
        );
    };
    let Some(backend_key) = &backend.service else {
        return invalid("the backend did not resolve (see the route's status)".into());
    };
    let Some(backend_service) = state.service(backend_key).cloned() else {
        return invalid(format!(
            "the backend service {backend_key} is not known to the waypoint"
        ));
    };
    let Some(vip) = vip(shared, &backend_service) else {
        return invalid(format!("the backend service {backend_key} has no address"));
    };
    let authority = SocketAddr::new(vip, backend.port);
    let backend_target = Target {
        authority,
        service: Some(backend_service),
        workload: None,
        subset: backend.subset.clone(),
    };
    let path = crate::serve::pick(
        shared,
        &backend_target,
        client.peer.local,
        &crate::serve::PickKey {
            headers: Some(req.headers),
            source: client.peer.addr.ip(),
        },
    );
    let timeout = match (rule.request_timeout, rule.backend_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Choice::Backend(Box::new(Routed {
        route: route_key,
        rule: rule_name,
        target: backend_target,
        path,
        request_headers: rule
            .request_headers
            .iter()
            .chain(&backend.request_headers)
            .cloned()
            .collect(),
        response_headers: backend
            .response_headers
            .iter()
            .chain(&rule.response_headers)
            .cloned()
            .collect(),
        timeout,
        host,
        path_and_query,
        retry: rule.retry.clone(),
        fault: rule.fault.clone(),
        cors: rule.cors.clone(),
        mirrors: rule.mirrors.clone(),
    }))
}

/// The service's VIP on the waypoint's network.
fn vip(shared: &Shared, service: &Arc<Service>) -> Option<std::net::IpAddr> {
    let network = &shared.config.network;
    service
        .vips
        .iter()
        .find(|v| v.network.as_ref() == network.as_str())
        .or_else(|| service.vips.first())
        .map(|v| v.address)
}

/// Where a mirrored copy goes: the mirror Service's VIP and port, and the endpoint
/// chosen there; `None` when the waypoint does not know the Service.
pub(crate) fn mirror_target(
    shared: &Shared,
    client: &Client,
    mirror: &ambit_core::http_route::Mirror,
) -> Option<Route> {
    service_target(shared, client, &mirror.service, mirror.port)
}

/// An endpoint of service `key` (`<namespace>/<hostname>`) on `port`, for a request the
/// waypoint makes itself (a mirror's copy, an authorization check).
pub(crate) fn service_target(
    shared: &Shared,
    client: &Client,
    key: &str,
    port: u16,
) -> Option<Route> {
    let state = shared.store.load();
    let service = state.service(key).cloned()?;
    let vip = vip(shared, &service)?;
    let target = Target {
        authority: SocketAddr::new(vip, port),
        service: Some(service),
        workload: None,
        subset: None,
    };
    Some(crate::serve::pick(
        shared,
        &target,
        client.peer.local,
        &crate::serve::PickKey {
            headers: None,
            source: client.peer.addr.ip(),
        },
    ))
}
