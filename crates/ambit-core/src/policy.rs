//! Authorization policies and their evaluation ([`evaluate`]): one engine for the node
//! proxy and the waypoint, so both decide the same way. The node proxy receives Istio's
//! `istio.security.Authorization`, already reduced by the control plane to what can be
//! decided from a connection (identities, namespaces, addresses, ports); the waypoint
//! receives the policies bound to it by `targetRefs` with their request fields too
//! (hosts, methods, paths, headers, remote addresses) and evaluates each request. Istio's
//! semantics:
//!
//! - a policy matches if any rule matches; a rule if every clause matches; a clause if
//!   any of its matches matches; a match if every non-empty field holds;
//! - DENY policies first: one that matches denies; then ALLOW policies: if any applies to
//!   the workload, the connection must match one; with neither, the connection is
//!   allowed;
//! - AUDIT policies and dry-run policies never change the decision: a matching AUDIT
//!   policy is reported, and the decision the connection would get if the dry-run
//!   policies were enforced is reported next to the real one;
//! - a connection without a peer identity (plaintext) has no principal and no namespace:
//!   positive lists on them fail, negative lists on them hold (so `notPrincipals: ["*"]`
//!   matches exactly the plaintext connections);
//! - request fields on a connection without a request (at L4: a node proxy, or opaque TCP
//!   through a waypoint) cannot be checked, and are decided the way Istio rewrites such
//!   rules, so both fail closed: in an ALLOW they fail (the rule matches nothing), in a
//!   DENY or AUDIT they hold (the rule matches on its other conditions). The control plane
//!   never sends them to a node proxy.

use std::net::IpAddr;

use serde::Serialize;

use crate::discovery::Str;

/// One policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Authorization {
    pub name: Str,
    pub namespace: Str,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// Evaluated and reported, never enforced (`istio.io/dry-run: "true"`).
    pub dry_run: bool,
    /// The policy matches a connection if any rule matches.
    pub rules: Vec<Rule>,
    /// Set when discovery sent this policy and this node proxy could not accept it (the
    /// reason): what it says is unknown, so it denies every connection it applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Str>,
    /// Set when this policy is not for a node proxy to enforce (why): it is shown, and
    /// never evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenforced: Option<Str>,
    /// What a waypoint policy is bound to (`targetRefs`); empty for node-proxy policies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<PolicyTarget>,
    /// Action CUSTOM: the external authorizer matching requests are handed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<std::sync::Arc<ExtAuthz>>,
}

/// An external authorizer (Istio's `envoyExtAuthzGrpc`/`envoyExtAuthzHttp` extension
/// providers), as a CUSTOM policy names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtAuthz {
    pub provider: Str,
    /// Why the provider cannot be used: the requests the policy matches are denied.
    pub error: Option<Str>,
    pub grpc: bool,
    /// `<namespace>/<hostname>` of the authorizer's Service.
    pub service: Str,
    pub port: u16,
    pub timeout: std::time::Duration,
    pub fail_open: bool,
    /// Answered when the authorizer fails and `fail_open` is not set.
    pub status_on_error: u16,
    pub path_prefix: Str,
    /// Lower case.
    pub include_request_headers: Vec<Str>,
    pub include_additional_headers: Vec<(Str, Str)>,
    pub headers_to_upstream_on_allow: Vec<Str>,
    pub headers_to_downstream_on_deny: Vec<Str>,
    pub headers_to_downstream_on_allow: Vec<Str>,
}

/// A `targetRefs` entry of a waypoint policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyTarget {
    /// `Gateway` or `Service`.
    pub kind: Str,
    pub namespace: Str,
    pub name: Str,
}

impl Authorization {
    /// The discovery resource name: `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Stands in for a policy that could not be accepted: it applies where the policy
    /// would (`scope`, as far as it could be read) and denies everything there.
    pub fn refused(namespace: Str, name: Str, scope: PolicyScope, reason: Str) -> Self {
        Self {
            name,
            namespace,
            scope,
            action: PolicyAction::Deny,
            dry_run: false,
            rules: Vec::new(),
            refused: Some(reason),
            unenforced: None,
            targets: Vec::new(),
            custom: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
    /// Reported when it matches; never changes a decision.
    Audit,
    /// Matching requests are decided by an external authorizer ([`ExtAuthz`]), before
    /// DENY and ALLOW; [`evaluate`] leaves them to the caller.
    Custom,
}

/// Matches when every clause matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches when any of its matches matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Every non-empty field must hold: a positive list by any entry, a negative list by
/// none of its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    pub service_accounts: Vec<ServiceAccount>,
    pub not_service_accounts: Vec<ServiceAccount>,
    /// Request fields (waypoint policies only). Hosts match case-insensitively, with or
    /// without the port; paths without the query string.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub headers: Vec<HeaderMatch>,
    /// The original client (`remote.ip`, `remoteIpBlocks`).
    pub remote_ips: Vec<IpNet>,
    pub not_remote_ips: Vec<IpNet>,
    /// `requestPrincipals` (`<iss>/<sub>` of a valid token) and their negation; a
    /// request without a valid token has no principal.
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    /// `when: request.auth.*` conditions on the valid token's claims.
    pub claims: Vec<ClaimMatch>,
}

/// `when: request.auth.claims[a][b]` (and `request.auth.audiences`, `.presenter`, the
/// claims `aud` and `azp`): some value of the claim must match one of `values` (when
/// given) and none may match `not_values`. A list claim offers each of its entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimMatch {
    /// Nested claim names, outermost first.
    pub path: Vec<Str>,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

/// `when: request.headers[<name>]`: the header's value must match one of `values`
/// (when given) and none of `not_values`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// Lower case.
    pub name: Str,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

/// A request's headers as policies read them.
pub trait RequestHeaders {
    /// Every value of header `name` (lower case) joined with `,` (as one header would
    /// carry them), bytes that are not UTF-8 replaced; `None` when absent. A header sent
    /// empty is present with the value `""`.
    fn header(&self, name: &str) -> Option<String>;
}

/// A request as policies see it (at a waypoint).
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The `:authority` or `Host`, as sent.
    pub host: &'a str,
    /// The path with its query string, as sent.
    pub path: &'a str,
    pub headers: &'a dyn RequestHeaders,
    /// The original client's address.
    pub remote_ip: IpAddr,
    /// What a valid token established (RequestAuthentication); `None` without one.
    pub auth: Option<&'a crate::jwt::Authenticated>,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("host", &self.host)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A peer identity's namespace and service account, matched exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceAccount {
    pub namespace: Str,
    pub name: Str,
}

/// A string match as Istio writes them: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(Str),
    Prefix(Str),
    Suffix(Str),
    Presence,
}

impl StringMatch {
    /// Reads Istio's wildcard syntax.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.into())
        } else if let Some(x) = s.strip_prefix('*') {
            StringMatch::Suffix(x.into())
        } else {
            StringMatch::Exact(s.into())
        }
    }

    fn lowercase(&self) -> StringMatch {
        match self {
            StringMatch::Exact(v) => StringMatch::Exact(v.to_ascii_lowercase().into()),
            StringMatch::Prefix(v) => StringMatch::Prefix(v.to_ascii_lowercase().into()),
            StringMatch::Suffix(v) => StringMatch::Suffix(v.to_ascii_lowercase().into()),
            StringMatch::Presence => StringMatch::Presence,
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e.as_ref(),
            StringMatch::Prefix(p) => value.starts_with(p.as_ref()),
            StringMatch::Suffix(s) => value.ends_with(s.as_ref()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// A block, if the prefix fits the address family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A connection as policies see it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub source_ip: IpAddr,
    /// The peer's SPIFFE ID without its scheme (`<trust domain>/ns/<ns>/sa/<sa>`), as
    /// Istio's principals are written; `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The same identity written under the mesh's other accepted trust domains (its
    /// aliases), so a principal written with any of them matches it, as in Istio; empty
    /// without aliases.
    pub source_principal_aliases: &'a [String],
    /// The namespace of the peer's identity; `None` for plaintext.
    pub source_namespace: Option<&'a str>,
    /// The service account of the peer's identity; `None` for plaintext.
    pub source_service_account: Option<&'a str>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The request, at a waypoint; `None` at L4.
    pub request: Option<Request<'a>>,
}

impl Match {
    /// Whether the match holds, request fields read as an ALLOW reads them.
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.matches_as(c, false)
    }

    /// `unknown_holds`: what request fields give without a request (see the module).
    fn matches_as(&self, c: &Connection<'_>, unknown_holds: bool) -> bool {
        strings_hold(&self.namespaces, &self.not_namespaces, c.source_namespace)
            && principals_hold(&self.principals, &self.not_principals, c)
            && nets_hold(&self.source_ips, &self.not_source_ips, c.source_ip)
            && nets_hold(
                &self.destination_ips,
                &self.not_destination_ips,
                c.destination_ip,
            )
            && (self.destination_ports.is_empty()
                || self.destination_ports.contains(&c.destination_port))
            && !self.not_destination_ports.contains(&c.destination_port)
            && accounts_hold(&self.service_accounts, &self.not_service_accounts, c)
            && match c.request.as_ref() {
                Some(r) => self.request_holds(r),
                None => !self.has_request_fields() || unknown_holds,
            }
    }

    /// Whether the match uses fields only a request has.
    pub fn has_request_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.headers.is_empty()
            && self.remote_ips.is_empty()
            && self.not_remote_ips.is_empty()
            && self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.claims.is_empty())
    }

    fn request_holds(&self, r: &Request<'_>) -> bool {
        let path = r.path.split_once('?').map_or(r.path, |(p, _)| p);
        strings_hold(&self.methods, &self.not_methods, Some(r.method))
            && strings_hold(&self.paths, &self.not_paths, Some(path))
            && hosts_hold(&self.hosts, &self.not_hosts, Some(r.host))
            && nets_hold(&self.remote_ips, &self.not_remote_ips, r.remote_ip)
            && strings_hold(
                &self.request_principals,
                &self.not_request_principals,
                r.auth.map(|a| a.principal.as_str()),
            )
            && self.claims.iter().all(|c| {
                let values = r.auth.map(|a| a.claim(&c.path)).unwrap_or_default();
                let any =
                    |list: &[StringMatch]| values.iter().any(|v| list.iter().any(|m| m.matches(v)));
                (c.values.is_empty() || any(&c.values)) && !any(&c.not_values)
            })
            && self.headers.iter().all(|h| {
                let value = r.headers.header(&h.name);
                // `*` asks whether the header is there at all, even empty.
                let any = |list: &[StringMatch]| {
                    value.as_deref().is_some_and(|v| {
                        list.iter()
                            .any(|m| *m == StringMatch::Presence || m.matches(v))
                    })
                };
                (h.values.is_empty() || any(&h.values)) && !any(&h.not_values)
            })
    }
}

/// Hosts match case-insensitively, the host with its port or without it.
fn hosts_hold(yes: &[StringMatch], no: &[StringMatch], host: Option<&str>) -> bool {
    let Some(host) = host.map(str::to_ascii_lowercase) else {
        return strings_hold(yes, no, None);
    };
    // `host:port` or `[v6]:port`; a bare IPv6 address has colons but no port.
    let bare = match host.rsplit_once(':') {
        Some((h, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            Some(h)
        }
        _ => None,
    };
    let any = |list: &[StringMatch]| {
        list.iter().any(|m| {
            let m = m.lowercase();
            m.matches(&host) || bare.is_some_and(|b| m.matches(b))
        })
    };
    (yes.is_empty() || any(yes)) && !any(no)
}

fn accounts_hold(yes: &[ServiceAccount], no: &[ServiceAccount], c: &Connection<'_>) -> bool {
    let peer = c.source_namespace.zip(c.source_service_account);
    let any = |list: &[ServiceAccount]| {
        peer.is_some_and(|(ns, sa)| {
            list.iter()
                .any(|a| a.namespace.as_ref() == ns && a.name.as_ref() == sa)
        })
    };
    (yes.is_empty() || any(yes)) && !any(no)
}

/// Like [`strings_hold`], over every form of the peer's principal.
fn principals_hold(yes: &[StringMatch], no: &[StringMatch], c: &Connection<'_>) -> bool {
    let Some(principal) = c.source_principal else {
        return strings_hold(yes, no, None);
    };
    let forms =
        || std::iter::once(principal).chain(c.source_principal_aliases.iter().map(String::as_str));
    let any = |list: &[StringMatch]| forms().any(|v| list.iter().any(|m| m.matches(v)));
    (yes.is_empty() || any(yes)) && !any(no)
}

fn strings_hold(yes: &[StringMatch], no: &[StringMatch], value: Option<&str>) -> bool {
    let any = |list: &[StringMatch]| value.is_some_and(|v| list.iter().any(|m| m.matches(v)));
    (yes.is_empty() || any(yes)) && !any(no)
}

fn nets_hold(yes: &[IpNet], no: &[IpNet], ip: IpAddr) -> bool {
    (yes.is_empty() || yes.iter().any(|n| n.contains(ip))) && !no.iter().any(|n| n.contains(ip))
}

impl Rule {
    /// Whether every clause matches, request fields read as an ALLOW reads them.
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.matches_as(c, false)
    }

    fn matches_as(&self, c: &Connection<'_>, unknown_holds: bool) -> bool {
        self.clauses.iter().all(|clause| {
            clause
                .matches
                .iter()
                .any(|m| m.matches_as(c, unknown_holds))
        })
    }
}

impl Authorization {
    /// Whether any rule matches (a policy without rules matches nothing). Without a
    /// request, request fields fail in an ALLOW and hold in a DENY or AUDIT (see the
    /// module): a connection is never allowed, nor spared a denial, on a field nobody
    /// could check.
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        let unknown_holds = self.action != PolicyAction::Allow;
        self.rules.iter().any(|r| r.matches_as(c, unknown_holds))
    }
}

/// What decided a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider<'p> {
    /// No DENY matched and no ALLOW policy applies to the workload.
    NoPolicy,
    /// This policy matched: a DENY (denied) or an ALLOW (allowed).
    Policy(&'p Authorization),
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatched,
    /// The destination is not a workload discovery knows (yet): its policies are
    /// unknown, so the connection is refused (fail closed).
    UnknownWorkload,
    /// The destination names this policy, and this node proxy does not hold it (not
    /// received yet, or removed before the workload stopped naming it).
    MissingPolicy(&'p str),
    /// This policy applies and this node proxy refused it (see
    /// [`Authorization::refused`]).
    Refused(&'p Authorization),
}

/// One decision and what made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'p> {
    pub allowed: bool,
    pub by: Decider<'p>,
}

impl std::fmt::Display for Verdict<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = if self.allowed { "allowed" } else { "denied" };
        match self.by {
            Decider::NoPolicy => write!(f, "{word}: no policy applies"),
            Decider::Policy(p) => write!(f, "{word} by {}/{}", p.namespace, p.name),
            Decider::NoAllowMatched => write!(f, "{word}: no ALLOW policy matched"),
            Decider::UnknownWorkload => {
                write!(f, "{word}: the destination is not known to discovery yet")
            }
            Decider::MissingPolicy(key) => {
                write!(
                    f,
                    "{word}: policy {key} applies and is not known to this node proxy"
                )
            }
            Decider::Refused(p) => write!(
                f,
                "{word}: policy {}/{} applies and this node proxy could not accept it ({})",
                p.namespace,
                p.name,
                p.refused.as_deref().unwrap_or("")
            ),
        }
    }
}

/// Everything the policies of a workload say about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation<'p> {
    /// The enforced decision.
    pub verdict: Verdict<'p>,
    /// The decision if the dry-run policies were enforced too (only when some apply).
    pub dry_run: Option<Verdict<'p>>,
    /// The first AUDIT policy that matched.
    pub audit: Option<&'p Authorization>,
}

#[derive(Default)]
struct Tally<'p> {
    deny: Option<&'p Authorization>,
    allow_applies: bool,
    allow: Option<&'p Authorization>,
}

impl<'p> Tally<'p> {
    fn add(&mut self, p: &'p Authorization, c: &Connection<'_>, matched: &mut Option<bool>) {
        let mut hit = || *matched.get_or_insert_with(|| p.matches(c));
        match p.action {
            PolicyAction::Deny => {
                if self.deny.is_none() && hit() {
                    self.deny = Some(p);
                }
            }
            PolicyAction::Allow => {
                self.allow_applies = true;
                if self.allow.is_none() && hit() {
                    self.allow = Some(p);
                }
            }
            PolicyAction::Audit | PolicyAction::Custom => {}
        }
    }

    fn verdict(&self) -> Verdict<'p> {
        if let Some(p) = self.deny {
            Verdict {
                allowed: false,
                by: Decider::Policy(p),
            }
        } else if let Some(p) = self.allow {
            Verdict {
                allowed: true,
                by: Decider::Policy(p),
            }
        } else if self.allow_applies {
            Verdict {
                allowed: false,
                by: Decider::NoAllowMatched,
            }
        } else {
            Verdict {
                allowed: true,
                by: Decider::NoPolicy,
            }
        }
    }
}

impl<'p> Evaluation<'p> {
    /// A refusal for a reason other than a policy's rules.
    pub fn refusal(by: Decider<'p>) -> Self {
        Self {
            verdict: Verdict { allowed: false, by },
            dry_run: None,
            audit: None,
        }
    }
}

impl Evaluation<'static> {
    /// A refusal because the destination's policies are unknown.
    pub fn unknown_workload() -> Self {
        Self::refusal(Decider::UnknownWorkload)
    }
}

/// Decides a connection given every policy that applies to its destination workload
/// (see [`crate::state::State::policies_for`]). One pass; each policy's rules are
/// evaluated at most once.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    c: &Connection<'_>,
) -> Evaluation<'p> {
    let mut enforced = Tally::default();
    let mut shadow = Tally::default();
    let mut any_dry_run = false;
    let mut audit = None;
    for p in policies {
        if p.refused.is_some() {
            // What the policy says is unknown: whatever it allows, it may deny this.
            return Evaluation::refusal(Decider::Refused(p));
        }
        if p.unenforced.is_some() {
            continue;
        }
        let mut matched = None;
        // Decided by its authorizer, by the caller (see [`custom_for`]).
        if p.action == PolicyAction::Custom {
            continue;
        }
        if p.action == PolicyAction::Audit {
            if audit.is_none() && p.matches(c) {
                audit = Some(p);
            }
            continue;
        }
        if p.dry_run {
            any_dry_run = true;
        } else {
            enforced.add(p, c, &mut matched);
        }
        shadow.add(p, c, &mut matched);
    }
    Evaluation {
        verdict: enforced.verdict(),
        dry_run: any_dry_run.then(|| shadow.verdict()),
        audit,
    }
}

/// The first enforced CUSTOM policy among `policies` that matches the request: its
/// authorizer must allow it before DENY and ALLOW policies are read. A request field a
/// CUSTOM policy cannot check holds, as in a DENY: the authorizer is asked rather than
/// skipped.
pub fn custom_for<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    c: &Connection<'_>,
) -> Option<&'p Authorization> {
    policies.into_iter().find(|p| {
        p.action == PolicyAction::Custom
            && p.refused.is_none()
            && p.unenforced.is_none()
            && p.matches(c)
    })
}

/// The decisions an evaluation counts, by policy: (`<namespace>/<name>`, or
/// `no-allow-matched` when ALLOW policies applied and none matched; and `allow`, `deny`,
/// `dry_run_deny` for what a dry-run policy would have denied, or `audit`). Nothing when
/// no policy applied. Shared by the node proxy's and the waypoint's decision counters.
pub fn each_counted_decision(e: &Evaluation<'_>, mut count: impl FnMut(String, &'static str)) {
    let allowed = e.verdict.allowed;
    match e.verdict.by {
        Decider::Policy(p) => count(p.key(), if allowed { "allow" } else { "deny" }),
        Decider::Refused(p) => count(p.key(), "deny"),
        Decider::MissingPolicy(k) => count(k.to_owned(), "deny"),
        Decider::NoAllowMatched => count("no-allow-matched".to_owned(), "deny"),
        _ => {}
    }
    if let Some(v) = &e.dry_run
        && !v.allowed
        && let Decider::Policy(p) = v.by
    {
        count(p.key(), "dry_run_deny");
    }
    if let Some(p) = e.audit {
        count(p.key(), "audit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matches() {
        assert!(StringMatch::parse("a").matches("a"));
        assert!(!StringMatch::parse("a").matches("ab"));
        assert!(StringMatch::parse("cluster.local/*").matches("cluster.local/ns/x/sa/y"));
        assert!(StringMatch::parse("*/sa/sleep").matches("cluster.local/ns/x/sa/sleep"));
        assert!(StringMatch::parse("*").matches("x"));
        assert!(!StringMatch::parse("*").matches(""));
    }

    fn sm(v: &[&str]) -> Vec<StringMatch> {
        v.iter().map(|s| StringMatch::parse(s)).collect()
    }

    fn sa(namespace: &str, name: &str) -> ServiceAccount {
        ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn net(v: &str) -> IpNet {
        let (a, p) = v.split_once('/').unwrap();
        IpNet::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
    }

    fn policy(name: &str, action: PolicyAction, rules: Vec<Rule>) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "demo".into(),
            scope: PolicyScope::Namespace,
            action,
            dry_run: false,
            rules,
            refused: None,
            unenforced: None,
            targets: Vec::new(),
            custom: None,
        }
    }

    fn one(m: Match) -> Vec<Rule> {
        vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }]
    }

    const SLEEP: &str = "cluster.local/ns/demo/sa/sleep";

    fn mtls(principal: &'static str, ns: &'static str) -> Connection<'static> {
        Connection {
            source_ip: "198.18.1.10".parse().unwrap(),
            source_principal: Some(principal),
            source_principal_aliases: &[],
            source_namespace: Some(ns),
            source_service_account: principal.rsplit("/sa/").next(),
            destination_ip: "198.18.2.10".parse().unwrap(),
            destination_port: 8080,
            request: None,
        }
    }

    fn plaintext() -> Connection<'static> {
        Connection {
            source_principal: None,
            source_namespace: None,
            source_service_account: None,
            ..mtls(SLEEP, "demo")
        }
    }

    /// Every field of a match, positive and negative, against one mTLS connection from
    /// `sleep` in `demo` (198.18.1.10 -> 198.18.2.10:8080) and one plaintext connection.
    #[test]
    fn match_fields() {
        #[rustfmt::skip]
        let table: Vec<(&str, Match, bool, bool)> = vec![
            // (what, match, mTLS connection matches, plaintext matches)
            ("empty match", Match::default(), true, true),
            ("namespace exact", Match { namespaces: sm(&["demo"]), ..Default::default() }, true, false),
            ("namespace other", Match { namespaces: sm(&["prod"]), ..Default::default() }, false, false),
            ("namespace prefix", Match { namespaces: sm(&["de*"]), ..Default::default() }, true, false),
            ("namespace suffix", Match { namespaces: sm(&["*mo"]), ..Default::default() }, true, false),
            ("namespace presence", Match { namespaces: sm(&["*"]), ..Default::default() }, true, false),
            ("notNamespaces hit", Match { not_namespaces: sm(&["demo"]), ..Default::default() }, false, true),
            ("notNamespaces miss", Match { not_namespaces: sm(&["prod"]), ..Default::default() }, true, true),
            ("principal exact", Match { principals: sm(&[SLEEP]), ..Default::default() }, true, false),
            ("principal one of two", Match { principals: sm(&["x", SLEEP]), ..Default::default() }, true, false),
            ("principal prefix", Match { principals: sm(&["cluster.local/ns/demo/*"]), ..Default::default() }, true, false),
            ("principal suffix", Match { principals: sm(&["*/sa/sleep"]), ..Default::default() }, true, false),
            ("principal suffix other", Match { principals: sm(&["*/sa/other"]), ..Default::default() }, false, false),
            ("principal presence", Match { principals: sm(&["*"]), ..Default::default() }, true, false),
            ("notPrincipals presence (plaintext only)", Match { not_principals: sm(&["*"]), ..Default::default() }, false, true),
            ("notPrincipals exact", Match { not_principals: sm(&[SLEEP]), ..Default::default() }, false, true),
            ("source ip in block", Match { source_ips: vec![net("198.18.1.0/24")], ..Default::default() }, true, true),
            ("source ip exact /32", Match { source_ips: vec![net("198.18.1.10/32")], ..Default::default() }, true, true),
            ("source ip outside", Match { source_ips: vec![net("198.18.2.0/24")], ..Default::default() }, false, false),
            ("notIpBlocks hit", Match { not_source_ips: vec![net("198.18.0.0/15")], ..Default::default() }, false, false),
            ("notIpBlocks miss", Match { not_source_ips: vec![net("198.18.3.0/24")], ..Default::default() }, true, true),
            ("destination ip", Match { destination_ips: vec![net("198.18.2.10/32")], ..Default::default() }, true, true),
            ("destination ip other", Match { destination_ips: vec![net("198.18.2.11/32")], ..Default::default() }, false, false),
            ("not destination ip", Match { not_destination_ips: vec![net("198.18.2.0/24")], ..Default::default() }, false, false),
            ("port", Match { destination_ports: vec![80, 8080], ..Default::default() }, true, true),
            ("port other", Match { destination_ports: vec![80], ..Default::default() }, false, false),
            ("notPorts hit", Match { not_destination_ports: vec![8080], ..Default::default() }, false, false),
            ("notPorts miss", Match { not_destination_ports: vec![9090], ..Default::default() }, true, true),
            ("fields are AND-ed", Match { namespaces: sm(&["demo"]), destination_ports: vec![80], ..Default::default() }, false, false),
            ("negative with positive", Match { principals: sm(&["*"]), not_principals: sm(&["*/sa/other"]), ..Default::default() }, true, false),
            ("service account", Match { service_accounts: vec![sa("demo", "sleep")], ..Default::default() }, true, false),
            ("service account one of two", Match { service_accounts: vec![sa("demo", "x"), sa("demo", "sleep")], ..Default::default() }, true, false),
            ("service account other namespace", Match { service_accounts: vec![sa("prod", "sleep")], ..Default::default() }, false, false),
            ("service account is exact", Match { service_accounts: vec![sa("demo", "slee")], ..Default::default() }, false, false),
            ("notServiceAccounts hit", Match { not_service_accounts: vec![sa("demo", "sleep")], ..Default::default() }, false, true),
            ("notServiceAccounts miss", Match { not_service_accounts: vec![sa("demo", "other")], ..Default::default() }, true, true),
        ];
        for (what, m, want_mtls, want_plain) in table {
            assert_eq!(m.matches(&mtls(SLEEP, "demo")), want_mtls, "{what} (mTLS)");
            assert_eq!(m.matches(&plaintext()), want_plain, "{what} (plaintext)");
        }
    }

    #[test]
    fn rules_clauses_and_matches_combine_as_istio_says() {
        let ns = |v: &str| Match {
            namespaces: sm(&[v]),
            ..Default::default()
        };
        let port = |p: u16| Match {
            destination_ports: vec![p],
            ..Default::default()
        };
        let c = mtls(SLEEP, "demo");
        // Matches within a clause are OR-ed.
        let rule = Rule {
            clauses: vec![Clause {
                matches: vec![ns("prod"), ns("demo")],
            }],
        };
        assert!(rule.matches(&c));
        // Clauses are AND-ed.
        let rule = Rule {
            clauses: vec![
                Clause {
                    matches: vec![ns("demo")],
                },
                Clause {
                    matches: vec![port(80)],
                },
            ],
        };
        assert!(!rule.matches(&c));
        // A rule without clauses matches everything; a policy without rules, nothing.
        assert!(Rule::default().matches(&c));
        assert!(!policy("p", PolicyAction::Deny, vec![]).matches(&c));
        // Rules are OR-ed.
        let p = policy(
            "p",
            PolicyAction::Deny,
            vec![
                Rule {
                    clauses: vec![Clause {
                        matches: vec![port(80)],
                    }],
                },
                Rule::default(),
            ],
        );
        assert!(p.matches(&c));
    }

    #[test]
    fn deny_first_then_allow_list() {
        use PolicyAction::*;
        let c = mtls(SLEEP, "demo");
        let other = mtls("cluster.local/ns/demo/sa/other", "demo");
        let deny_other = policy(
            "deny-other",
            Deny,
            one(Match {
                principals: sm(&["*/sa/other"]),
                ..Default::default()
            }),
        );
        let allow_demo = policy(
            "allow-demo",
            Allow,
            one(Match {
                namespaces: sm(&["demo"]),
                ..Default::default()
            }),
        );
        let allow_prod = policy(
            "allow-prod",
            Allow,
            one(Match {
                namespaces: sm(&["prod"]),
                ..Default::default()
            }),
        );
        let allow_all = policy("allow-all", Allow, vec![Rule::default()]);
        let allow_nothing = policy("allow-nothing", Allow, vec![]);

        let none: [&Authorization; 0] = [];
        let e = evaluate(none, &c);
        assert_eq!(e.verdict.by, Decider::NoPolicy);
        assert!(e.verdict.allowed && e.dry_run.is_none() && e.audit.is_none());

        // DENY wins over a matching ALLOW, whatever the order.
        let e = evaluate([&allow_all, &deny_other], &other);
        assert!(!e.verdict.allowed);
        assert_eq!(e.verdict.by, Decider::Policy(&deny_other));
        assert_eq!(e.verdict.to_string(), "denied by demo/deny-other");
        assert!(evaluate([&allow_all, &deny_other], &c).verdict.allowed);

        // With ALLOW policies, a connection must match one.
        let e = evaluate([&allow_prod], &c);
        assert_eq!(
            e.verdict,
            Verdict {
                allowed: false,
                by: Decider::NoAllowMatched
            }
        );
        let e = evaluate([&allow_prod, &allow_demo], &c);
        assert_eq!(e.verdict.by, Decider::Policy(&allow_demo));
        assert!(e.verdict.allowed);
        // An ALLOW policy without rules allows nothing.
        assert!(!evaluate([&allow_nothing], &c).verdict.allowed);
        // A DENY that does not match leaves the decision to the rest.
        assert!(evaluate([&deny_other], &c).verdict.allowed);
    }

    #[test]
    fn audit_and_dry_run_never_change_the_decision() {
        use PolicyAction::*;
        let c = mtls(SLEEP, "demo");
        let mut dry_deny = policy("dry-deny", Deny, vec![Rule::default()]);
        dry_deny.dry_run = true;
        let mut dry_allow_prod = policy(
            "dry-allow-prod",
            Allow,
            one(Match {
                namespaces: sm(&["prod"]),
                ..Default::default()
            }),
        );
        dry_allow_prod.dry_run = true;
        let audit = policy("audit-all", Audit, vec![Rule::default()]);
        let audit_none = policy("audit-none", Audit, vec![]);

        let e = evaluate([&dry_deny, &audit_none, &audit], &c);
        assert!(e.verdict.allowed);
        assert_eq!(e.verdict.by, Decider::NoPolicy);
        assert_eq!(
            e.dry_run,
            Some(Verdict {
                allowed: false,
                by: Decider::Policy(&dry_deny)
            })
        );
        assert_eq!(e.audit, Some(&audit));

        // A dry-run ALLOW would turn on the allow-list; the real decision ignores it.
        let e = evaluate([&dry_allow_prod], &c);
        assert!(e.verdict.allowed);
        assert_eq!(
            e.dry_run,
            Some(Verdict {
                allowed: false,
                by: Decider::NoAllowMatched
            })
        );
        // Audit policies alone are not an allow-list.
        assert!(evaluate([&audit_none], &c).verdict.allowed);
    }

    #[test]
    fn nets() {
        let n = IpNet::new("198.18.0.0".parse().unwrap(), 15).unwrap();
        assert!(n.contains("198.19.1.1".parse().unwrap()));
        assert!(!n.contains("198.20.0.0".parse().unwrap()));
        assert!(IpNet::new("1.2.3.4".parse().unwrap(), 33).is_none());
        let all = IpNet::new("::".parse().unwrap(), 0).unwrap();
        assert!(all.contains("fd00::1".parse().unwrap()));
        assert!(!all.contains("1.2.3.4".parse().unwrap()));
    }

    struct Hdrs(Vec<(&'static str, &'static str)>);

    impl RequestHeaders for Hdrs {
        fn header(&self, name: &str) -> Option<String> {
            let values: Vec<&str> = self
                .0
                .iter()
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| *v)
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        }
    }

    /// Request fields, against a request and against a bare connection (L4), read as an
    /// ALLOW reads them: without a request every request field fails.
    #[test]
    fn request_fields() {
        let headers = Hdrs(vec![("x-user", "alice"), ("x-env", "prod-1")]);
        let request = Request {
            method: "GET",
            host: "Web.Demo:8080",
            path: "/api/items?limit=5",
            headers: &headers,
            remote_ip: "203.0.113.7".parse().unwrap(),
            auth: None,
        };
        let with = Connection {
            request: Some(request),
            ..mtls(SLEEP, "demo")
        };
        let without = mtls(SLEEP, "demo");
        let header = |name: &str, values: &[&str], not: &[&str]| HeaderMatch {
            name: name.into(),
            values: sm(values),
            not_values: sm(not),
        };
        #[rustfmt::skip]
        let table: Vec<(&str, Match, bool, bool)> = vec![
            ("method", Match { methods: sm(&["GET"]), ..Match::default() }, true, false),
            ("other method", Match { methods: sm(&["POST"]), ..Match::default() }, false, false),
            ("not method", Match { not_methods: sm(&["GET"]), ..Match::default() }, false, false),
            ("path ignores the query", Match { paths: sm(&["/api/items"]), ..Match::default() }, true, false),
            ("path prefix", Match { paths: sm(&["/api/*"]), ..Match::default() }, true, false),
            ("not path", Match { not_paths: sm(&["/admin*"]), ..Match::default() }, true, false),
            ("host, any case, port dropped", Match { hosts: sm(&["web.demo"]), ..Match::default() }, true, false),
            ("host with its port", Match { hosts: sm(&["web.demo:8080"]), ..Match::default() }, true, false),
            ("host suffix", Match { hosts: sm(&["*.demo"]), ..Match::default() }, true, false),
            ("other host", Match { hosts: sm(&["api.demo"]), ..Match::default() }, false, false),
            ("not host", Match { not_hosts: sm(&["WEB.demo"]), ..Match::default() }, false, false),
            ("header", Match { headers: vec![header("x-user", &["alice"], &[])], ..Match::default() }, true, false),
            ("header prefix", Match { headers: vec![header("x-env", &["prod-*"], &[])], ..Match::default() }, true, false),
            ("missing header", Match { headers: vec![header("x-none", &["*"], &[])], ..Match::default() }, false, false),
            ("not header value", Match { headers: vec![header("x-user", &[], &["alice"])], ..Match::default() }, false, false),
            ("remote ip", Match { remote_ips: vec![net("203.0.113.0/24")], ..Match::default() }, true, false),
            ("not remote ip", Match { not_remote_ips: vec![net("203.0.113.0/24")], ..Match::default() }, false, false),
            ("l4 and l7 together", Match { methods: sm(&["GET"]), principals: sm(&[SLEEP]), ..Match::default() }, true, false),
        ];
        for (what, m, with_request, at_l4) in table {
            assert_eq!(m.matches(&with), with_request, "{what} (request)");
            assert_eq!(m.matches(&without), at_l4, "{what} (L4)");
        }
    }

    /// Request principals and token claims: a request with a valid token against one
    /// without (Istio: `notRequestPrincipals: ["*"]` is "no valid token").
    #[test]
    fn request_principals_and_claims() {
        let claims = serde_json::json!({"iss": "https://idp", "sub": "alice", "aud": ["api", "web"],
            "azp": "portal", "groups": ["eng", "ops"], "org": {"team": "mesh"}});
        let auth = crate::jwt::Authenticated {
            principal: "https://idp/alice".into(),
            issuer: "https://idp".into(),
            subject: "alice".into(),
            audiences: vec!["api".into(), "web".into()],
            presenter: Some("portal".into()),
            claims: claims.as_object().unwrap().clone(),
            payload_b64: String::new(),
        };
        let headers = Hdrs(vec![]);
        let request = |auth| Request {
            method: "GET",
            host: "web",
            path: "/",
            headers: &headers,
            remote_ip: "198.18.1.10".parse().unwrap(),
            auth,
        };
        let with = Connection {
            request: Some(request(Some(&auth))),
            ..mtls(SLEEP, "demo")
        };
        let without = Connection {
            request: Some(request(None)),
            ..mtls(SLEEP, "demo")
        };
        let claim = |path: &[&str], values: &[&str], not: &[&str]| ClaimMatch {
            path: path.iter().map(|p| Str::from(*p)).collect(),
            values: sm(values),
            not_values: sm(not),
        };
        #[rustfmt::skip]
        let table: Vec<(&str, Match, bool, bool)> = vec![
            ("any principal", Match { request_principals: sm(&["*"]), ..Match::default() }, true, false),
            ("exact principal", Match { request_principals: sm(&["https://idp/alice"]), ..Match::default() }, true, false),
            ("issuer prefix", Match { request_principals: sm(&["https://idp/*"]), ..Match::default() }, true, false),
            ("other principal", Match { request_principals: sm(&["https://idp/bob"]), ..Match::default() }, false, false),
            ("no principal", Match { not_request_principals: sm(&["*"]), ..Match::default() }, false, true),
            ("not this principal", Match { not_request_principals: sm(&["*/alice"]), ..Match::default() }, false, true),
            ("list claim entry", Match { claims: vec![claim(&["groups"], &["ops"], &[])], ..Match::default() }, true, false),
            ("list claim miss", Match { claims: vec![claim(&["groups"], &["admin"], &[])], ..Match::default() }, false, false),
            ("nested claim", Match { claims: vec![claim(&["org", "team"], &["mesh"], &[])], ..Match::default() }, true, false),
            ("audience", Match { claims: vec![claim(&["aud"], &["web"], &[])], ..Match::default() }, true, false),
            ("presenter", Match { claims: vec![claim(&["azp"], &["portal"], &[])], ..Match::default() }, true, false),
            ("not claim value", Match { claims: vec![claim(&["groups"], &[], &["eng"])], ..Match::default() }, false, true),
        ];
        for (what, m, with_token, without_token) in table {
            assert_eq!(m.matches(&with), with_token, "{what} (token)");
            assert_eq!(m.matches(&without), without_token, "{what} (no token)");
        }
    }

    fn one_match(action: PolicyAction, m: Match) -> Authorization {
        policy(
            "p",
            action,
            vec![Rule {
                clauses: vec![Clause { matches: vec![m] }],
            }],
        )
    }

    /// Without a request (opaque TCP through a waypoint), a DENY on request fields denies
    /// and an ALLOW on them does not allow: nothing gets through on an unchecked field.
    #[test]
    fn request_fields_without_a_request_fail_closed_both_ways() {
        let c = mtls(SLEEP, "demo");
        let deny_admin = one_match(
            PolicyAction::Deny,
            Match {
                paths: sm(&["/admin*"]),
                ..Match::default()
            },
        );
        assert!(deny_admin.matches(&c), "a DENY on paths holds at L4");
        let allow_get = one_match(
            PolicyAction::Allow,
            Match {
                methods: sm(&["GET"]),
                ..Match::default()
            },
        );
        assert!(!allow_get.matches(&c), "an ALLOW on methods fails at L4");
        let e = evaluate([&deny_admin], &c);
        assert!(!e.verdict.allowed);
        // With a request, the DENY reads the path.
        let headers = Hdrs(vec![]);
        let with = |path: &'static str| Connection {
            request: Some(Request {
                method: "GET",
                host: "web",
                path,
                headers: &headers,
                remote_ip: "198.18.1.10".parse().unwrap(),
                auth: None,
            }),
            ..mtls(SLEEP, "demo")
        };
        assert!(deny_admin.matches(&with("/admin/users")));
        assert!(!deny_admin.matches(&with("/public")));
    }

    /// Header conditions read every value of the header, and `*` means present (even
    /// empty).
    #[test]
    fn header_values_are_joined_and_presence_includes_empty() {
        let headers = Hdrs(vec![("x-role", "a"), ("x-role", "admin"), ("x-debug", "")]);
        let c = Connection {
            request: Some(Request {
                method: "GET",
                host: "web",
                path: "/",
                headers: &headers,
                remote_ip: "198.18.1.10".parse().unwrap(),
                auth: None,
            }),
            ..mtls(SLEEP, "demo")
        };
        let header = |name: &str, values: &[&str]| Match {
            headers: vec![HeaderMatch {
                name: name.into(),
                values: sm(values),
                not_values: Vec::new(),
            }],
            ..Match::default()
        };
        assert!(
            header("x-role", &["*admin"]).matches(&c),
            "the second value counts"
        );
        assert!(
            header("x-debug", &["*"]).matches(&c),
            "an empty header is present"
        );
        assert!(!header("x-none", &["*"]).matches(&c));
    }
}
