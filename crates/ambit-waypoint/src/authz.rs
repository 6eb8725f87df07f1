//! L7 authorization at the waypoint: the AuthorizationPolicies bound to it by
//! `targetRefs` (the GatewayClass `istio-waypoint`, its Gateway, and the Service a
//! request is addressed to), evaluated per
//! request by the same engine the node proxy uses per connection
//! ([`ambit_core::policy::evaluate`]). Selector policies are the node proxies' (the
//! destination's node proxy still enforces them, with the waypoint as the source).
//!
//! Fail closed: a policy that discovery sent and this waypoint could not read denies
//! every request until a readable version arrives (the waypoint is sent only policies
//! that apply to it, so it may apply to any request).

use std::net::SocketAddr;

use ambit_core::policy::{Connection, Decider, Evaluation, Request, RequestHeaders, evaluate};
use ambit_core::state::State;
use http::HeaderMap;

use crate::serve::{Client, Target};

/// The gateway class of waypoints: a policy bound to it (from the root namespace)
/// applies at every waypoint.
const WAYPOINT_CLASS: &str = "istio-waypoint";

/// A request's headers for the policies.
pub struct Headers<'a>(pub &'a HeaderMap);

impl RequestHeaders for Headers<'_> {
    fn header(&self, name: &str) -> Option<String> {
        let mut values = self.0.get_all(name).iter().peekable();
        values.peek()?;
        let joined: Vec<String> = values
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        Some(joined.join(","))
    }
}

/// The verdict's words for logs: what decided, and whether dry-run or AUDIT policies
/// said something.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
    pub dry_run: Option<String>,
    pub audit: Option<String>,
    /// A CUSTOM policy matched: its authorizer must allow the request first (the policy's
    /// `<namespace>/<name>` and authorizer).
    pub custom: Option<(String, std::sync::Arc<ambit_core::policy::ExtAuthz>)>,
    /// What to count, by policy (see [`ambit_core::policy::each_counted_decision`]).
    pub counted: Vec<(String, &'static str)>,
}

/// The facts of a request the policies read.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// What the request's valid token established, if it carried one.
    pub auth: Option<&'a ambit_core::jwt::Authenticated>,
}

/// Decides a request (or, with `request: None`, an opaque TCP connection) through the
/// waypoint named `gateway` (`<namespace>`, `<name>`); `trust_domains` are the mesh's
/// (its own first, then its aliases), so a principal written under any of them matches.
pub fn decide(
    state: &State,
    gateway: (&str, &str),
    trust_domains: &[String],
    client: &Client,
    target: &Target,
    request: Option<RequestFacts<'_>>,
) -> Decision {
    let (gw_ns, gw_name) = gateway;
    let service = target.service.as_deref();
    // The control plane sends a waypoint only the policies that apply to it, so one it
    // could not read may apply to any request here (a GatewayClass policy, to all).
    if let Some(key) = state.refused_targeted().next() {
        return Decision {
            allowed: false,
            reason: format!(
                "denied: policy {key} applies to this waypoint and it could not accept it"
            ),
            dry_run: None,
            audit: None,
            custom: None,
            counted: vec![(key.to_string(), "deny")],
        };
    }
    let policies: Vec<_> = state
        .policies_targeting("GatewayClass", "", WAYPOINT_CLASS)
        .chain(state.policies_targeting("Gateway", gw_ns, gw_name))
        .chain(
            service
                .into_iter()
                .flat_map(|s| state.policies_targeting("Service", &s.namespace, &s.name)),
        )
        .collect();
    let id = &client.peer.identity;
    let principal_in = |td: &str| format!("{td}/ns/{}/sa/{}", id.namespace(), id.service_account());
    let principal = principal_in(id.trust_domain());
    // The same identity under the mesh's other accepted trust domains.
    let aliases: Vec<String> = if trust_domains.iter().any(|td| td == id.trust_domain()) {
        trust_domains
            .iter()
            .filter(|td| td.as_str() != id.trust_domain())
            .map(|td| principal_in(td))
            .collect()
    } else {
        Vec::new()
    };
    let headers;
    let request = match &request {
        Some(r) => {
            headers = Headers(r.headers);
            Some(Request {
                method: r.method,
                host: r.host,
                path: r.path,
                headers: &headers,
                remote_ip: client.peer.addr.ip(),
                auth: r.auth,
            })
        }
        None => None,
    };
    let authority: SocketAddr = target.authority;
    let conn = Connection {
        source_ip: client.peer.addr.ip(),
        source_principal: Some(&principal),
        source_principal_aliases: &aliases,
        source_namespace: Some(id.namespace()),
        source_service_account: Some(id.service_account()),
        destination_ip: authority.ip(),
        destination_port: authority.port(),
        request,
    };
    let e = evaluate(policies.iter().map(|p| &***p), &conn);
    let mut d = describe(&e);
    d.custom = ambit_core::policy::custom_for(policies.iter().map(|p| &***p), &conn)
        .and_then(|p| Some((p.key(), p.custom.clone()?)));
    d
}

fn describe(e: &Evaluation<'_>) -> Decision {
    let words = |v: &ambit_core::policy::Verdict<'_>| match v.by {
        Decider::Policy(p) => format!(
            "{} by {}/{}",
            if v.allowed { "allowed" } else { "denied" },
            p.namespace,
            p.name
        ),
        _ => v.to_string(),
    };
    let mut counted = Vec::new();
    ambit_core::policy::each_counted_decision(e, |policy, decision| {
        counted.push((policy, decision));
    });
    Decision {
        allowed: e.verdict.allowed,
        reason: words(&e.verdict),
        dry_run: e.dry_run.as_ref().map(words),
        audit: e.audit.map(|p| format!("{}/{}", p.namespace, p.name)),
        custom: None,
        counted,
    }
}
