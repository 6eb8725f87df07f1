//! Discovery resources (protobuf) into the core model, validated: a resource that
//! cannot be used is rejected with a reason, never half-applied.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ambit_core::discovery::*;
use ambit_core::identity::is_trust_domain;
use ambit_core::policy::*;
use ambit_proto::prost::Message;
use ambit_proto::security as pb_sec;
use ambit_proto::waypoint as pb_wp;
use ambit_proto::workload as pb;

/// Shares what repeats between objects: strings (namespaces, nodes, service accounts,
/// ...), workload profiles (identical for a deployment's replicas) and localities.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Str>,
    profiles: HashSet<Arc<WorkloadProfile>>,
    localities: HashSet<Arc<Locality>>,
    pruned_at: usize,
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Str {
        if let Some(v) = self.strings.get(s) {
            return v.clone();
        }
        let v: Str = Arc::from(s);
        self.strings.insert(v.clone());
        v
    }

    fn profile(&mut self, p: WorkloadProfile) -> Arc<WorkloadProfile> {
        if let Some(v) = self.profiles.get(&p) {
            return v.clone();
        }
        let v = Arc::new(p);
        self.profiles.insert(v.clone());
        v
    }

    fn locality(&mut self, l: Locality) -> Arc<Locality> {
        if let Some(v) = self.localities.get(&l) {
            return v.clone();
        }
        let v = Arc::new(l);
        self.localities.insert(v.clone());
        v
    }

    /// Drops entries nothing else holds any more (called after each batch).
    pub fn prune(&mut self) {
        let size = self.strings.len() + self.profiles.len() + self.localities.len();
        if size > 2 * self.pruned_at.max(1024) {
            // Profiles and localities first: they hold strings.
            self.profiles.retain(|p| Arc::strong_count(p) > 1);
            self.localities.retain(|l| Arc::strong_count(l) > 1);
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.pruned_at = self.strings.len() + self.profiles.len() + self.localities.len();
        }
    }
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        n => Err(format!("an address of {n} bytes (expected 4 or 16)")),
    }
}

fn port(p: u32, what: &str) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{what} {p} is not a port"))
}

fn ports(list: &[pb::Port]) -> Result<Vec<PortMapping>, String> {
    list.iter()
        .map(|p| {
            Ok(PortMapping {
                service_port: port(p.service_port, "service port")?,
                target_port: port(p.target_port, "target port")?,
            })
        })
        .collect()
}

fn network_address(a: &pb::NetworkAddress, i: &mut Interner) -> Result<NetworkAddress, String> {
    Ok(NetworkAddress {
        network: i.get(&a.network),
        address: ip(&a.address)?,
    })
}

fn gateway(g: &pb::GatewayAddress, i: &mut Interner) -> Result<GatewayAddress, String> {
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: i.get(&h.namespace),
            hostname: i.get(&h.hostname),
        },
        Some(pb::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(network_address(a, i)?)
        }
        None => return Err("a gateway without a destination".into()),
    };
    Ok(GatewayAddress {
        destination,
        hbone_port: port(g.hbone_mtls_port, "gateway port")?,
    })
}

/// A `Workload` resource named `name`.
pub fn workload(name: &Str, w: pb::Workload, i: &mut Interner) -> Result<Workload, String> {
    if !w.uid.is_empty() && w.uid != name.as_ref() {
        return Err(format!(
            "the workload's uid {:?} is not its resource name",
            w.uid
        ));
    }
    if w.addresses.is_empty() && w.hostname.is_empty() {
        return Err("a workload needs an address or a hostname".into());
    }
    let addresses = w
        .addresses
        .iter()
        .map(|a| ip(a))
        .collect::<Result<Vec<_>, _>>()?;
    let trust_domain = if w.trust_domain.is_empty() {
        ambit_core::DEFAULT_TRUST_DOMAIN
    } else {
        &w.trust_domain
    };
    if !is_trust_domain(trust_domain) {
        return Err(format!("invalid trust domain {trust_domain:?}"));
    }
    let service_account = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    let tunnel = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
    };
    let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
        Ok(pb::WorkloadType::Deployment) => WorkloadType::Deployment,
        Ok(pb::WorkloadType::Cronjob) => WorkloadType::CronJob,
        Ok(pb::WorkloadType::Pod) => WorkloadType::Pod,
        Ok(pb::WorkloadType::Job) => WorkloadType::Job,
        Err(_) => return Err(format!("unknown workload type {}", w.workload_type)),
    };
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(format!("service key {key:?} is not <namespace>/<hostname>"));
        }
        services.push((i.get(key), ports(&list.ports)?.into_boxed_slice()));
    }
    services.sort_by(|a, b| a.0.cmp(&b.0));
    let profile = WorkloadProfile {
        namespace: i.get(&w.namespace),
        network: i.get(&w.network),
        trust_domain: i.get(trust_domain),
        service_account: i.get(service_account),
        canonical_name: i.get(&w.canonical_name),
        canonical_revision: i.get(&w.canonical_revision),
        cluster_id: i.get(&w.cluster_id),
        workload_type,
        network_mode: if w.network_mode == pb::NetworkMode::HostNetwork as i32 {
            NetworkMode::HostNetwork
        } else {
            NetworkMode::Standard
        },
        services: services.into_boxed_slice(),
        authorization_policies: w.authorization_policies.iter().map(|p| i.get(p)).collect(),
        l7_metrics: w
            .extensions
            .iter()
            .any(|e| e.name == ambit_core::discovery::L7_METRICS_EXTENSION),
    };
    let uid: Str = name.clone();
    let pod_name: Str = w.name.as_str().into();
    // Usually the same as the pod name: share it.
    let workload_name = if w.workload_name == w.name || w.workload_name.is_empty() {
        pod_name.clone()
    } else {
        w.workload_name.as_str().into()
    };
    Ok(Workload {
        uid,
        name: pod_name,
        workload_name,
        node: i.get(&w.node),
        addresses: addresses.into_boxed_slice(),
        tunnel,
        status: if w.status == pb::WorkloadStatus::Unhealthy as i32 {
            Health::Unhealthy
        } else {
            Health::Healthy
        },
        native_tunnel: w.native_tunnel,
        locality: w.locality.map(|l| {
            let l = Locality {
                region: i.get(&l.region),
                zone: i.get(&l.zone),
                subzone: i.get(&l.subzone),
            };
            i.locality(l)
        }),
        waypoint: w
            .waypoint
            .as_ref()
            .map(|g| gateway(g, i).map(Arc::new))
            .transpose()?,
        profile: i.profile(profile),
    })
}

/// A `Service` resource named `name` (`<namespace>/<hostname>`).
pub fn service(name: &str, s: pb::Service, i: &mut Interner) -> Result<Service, String> {
    if s.hostname.is_empty() || s.namespace.is_empty() {
        return Err("a service needs a namespace and a hostname".into());
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    if key != name {
        return Err(format!(
            "the service's key {key:?} is not its resource name"
        ));
    }
    let load_balancing = s.load_balancing.map(|lb| {
        use pb::load_balancing::{HealthPolicy, Mode, Scope};
        let routing_preference = lb
            .routing_preference
            .iter()
            .filter_map(|s| match Scope::try_from(*s) {
                Ok(Scope::Region) => Some(LocalityScope::Region),
                Ok(Scope::Zone) => Some(LocalityScope::Zone),
                Ok(Scope::Subzone) => Some(LocalityScope::Subzone),
                Ok(Scope::Node) => Some(LocalityScope::Node),
                Ok(Scope::Cluster) => Some(LocalityScope::Cluster),
                Ok(Scope::Network) => Some(LocalityScope::Network),
                _ => None,
            })
            .collect();
        LoadBalancing {
            routing_preference,
            mode: match Mode::try_from(lb.mode) {
                Ok(Mode::Strict) => LoadBalancingMode::Strict,
                Ok(Mode::Failover) => LoadBalancingMode::Failover,
                Ok(Mode::Passthrough) => LoadBalancingMode::Passthrough,
                _ => LoadBalancingMode::Unspecified,
            },
            include_unhealthy: lb.health_policy == HealthPolicy::AllowAll as i32,
        }
    });
    Ok(Service {
        name: i.get(&s.name),
        namespace: i.get(&s.namespace),
        hostname: i.get(&s.hostname),
        vips: s
            .addresses
            .iter()
            .map(|a| network_address(a, i))
            .collect::<Result<_, _>>()?,
        ports: ports(&s.ports)?,
        subject_alt_names: s.subject_alt_names.iter().map(|n| i.get(n)).collect(),
        waypoint: s.waypoint.as_ref().map(|g| gateway(g, i)).transpose()?,
        load_balancing,
    })
}

fn strings(list: &[pb_sec::StringMatch]) -> Result<Vec<StringMatch>, String> {
    use pb_sec::string_match::MatchType;
    list.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.as_str().into())),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.as_str().into())),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.as_str().into())),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            None => Err("a string match without a type".to_owned()),
        })
        .collect()
}

fn nets(list: &[pb_sec::Address]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|a| {
            let addr = ip(&a.address)?;
            let prefix = u8::try_from(a.length).ok();
            prefix
                .and_then(|p| IpNet::new(addr, p))
                .ok_or_else(|| format!("prefix length {} does not fit {addr}", a.length))
        })
        .collect()
}

fn accounts(
    list: &[pb_sec::ServiceAccountMatch],
    i: &mut Interner,
) -> Result<Vec<ServiceAccount>, String> {
    list.iter()
        .map(|a| {
            if a.namespace.is_empty() || a.service_account.is_empty() {
                return Err("a service account match without a namespace or a name".to_owned());
            }
            Ok(ServiceAccount {
                namespace: i.get(&a.namespace),
                name: i.get(&a.service_account),
            })
        })
        .collect()
}

fn port_list(list: &[u32]) -> Result<Vec<u16>, String> {
    list.iter().map(|p| port(*p, "port")).collect()
}

/// An `Authorization` resource named `name` (`<namespace>/<name>`).
pub fn authorization(
    name: &str,
    a: pb_sec::Authorization,
    i: &mut Interner,
) -> Result<Authorization, String> {
    let key = format!("{}/{}", a.namespace, a.name);
    if key != name {
        return Err(format!("the policy's key {key:?} is not its resource name"));
    }
    let scope = match pb_sec::Scope::try_from(a.scope) {
        Ok(pb_sec::Scope::Global) => PolicyScope::Global,
        Ok(pb_sec::Scope::Namespace) => PolicyScope::Namespace,
        Ok(pb_sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", a.scope)),
    };
    let action = match pb_sec::Action::try_from(a.action) {
        Ok(pb_sec::Action::Allow) => PolicyAction::Allow,
        Ok(pb_sec::Action::Deny) => PolicyAction::Deny,
        // An action this proxy does not know must not be guessed at (fail closed).
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let audit_rules;
    let mut unenforced = None;
    let (action, dry_run, rules) = match a.extensions.as_slice() {
        [] => (action, a.dry_run, &a.rules),
        [ext] if ext.name == pb_sec::AUDIT_EXTENSION => {
            // Published so that a proxy ignoring the extension enforces nothing: a rule,
            // an ALLOW or a dry-run flag here would be acted on by such a proxy, so it is
            // a bad resource.
            if action != PolicyAction::Deny || !a.rules.is_empty() || a.dry_run {
                return Err("an AUDIT policy must be published as a DENY without rules".to_owned());
            }
            let config = ext
                .config
                .as_ref()
                .filter(|c| c.type_url == pb_sec::AUTHORIZATION_TYPE_URL)
                .ok_or("the audit extension's config is not an Authorization")?;
            audit_rules = pb_sec::Authorization::decode(config.value.as_slice())
                .map_err(|e| format!("undecodable audit extension: {e}"))?
                .rules;
            (PolicyAction::Audit, false, &audit_rules)
        }
        [ext] if ext.name == pb_sec::UNENFORCED_EXTENSION => {
            if action != PolicyAction::Deny || !a.rules.is_empty() || a.dry_run {
                return Err(
                    "an unenforced policy must be published as a DENY without rules".to_owned(),
                );
            }
            let reason = ext
                .config
                .as_ref()
                .filter(|c| c.type_url == pb_sec::STRING_VALUE_TYPE_URL)
                .and_then(|c| String::decode(c.value.as_slice()).ok())
                .ok_or("the unenforced extension's config is not a StringValue")?;
            unenforced = Some(i.get(&reason));
            (PolicyAction::Deny, false, &a.rules)
        }
        // An extension may restrict what the policy matches: one this proxy does not
        // understand cannot be applied faithfully, so the policy is refused (and a
        // workload that references it is denied) rather than enforced without it.
        exts => {
            let names: Vec<&str> = exts.iter().map(|e| e.name.as_str()).collect();
            return Err(format!(
                "extensions this node proxy does not understand: {}",
                names.join(", ")
            ));
        }
    };
    let mut rules_out = Vec::with_capacity(rules.len());
    for r in rules {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for c in &r.clauses {
            let mut matches = Vec::with_capacity(c.matches.len());
            for m in &c.matches {
                matches.push(connection_match(m, i)?);
            }
            clauses.push(Clause { matches });
        }
        rules_out.push(Rule { clauses });
    }
    Ok(Authorization {
        name: a.name.as_str().into(),
        namespace: i.get(&a.namespace),
        scope,
        action,
        dry_run,
        rules: rules_out,
        refused: None,
        unenforced,
        targets: Vec::new(),
        custom: None,
    })
}

/// The connection (L4) fields of a match.
fn connection_match(m: &pb_sec::Match, i: &mut Interner) -> Result<Match, String> {
    Ok(Match {
        namespaces: strings(&m.namespaces)?,
        not_namespaces: strings(&m.not_namespaces)?,
        principals: strings(&m.principals)?,
        not_principals: strings(&m.not_principals)?,
        source_ips: nets(&m.source_ips)?,
        not_source_ips: nets(&m.not_source_ips)?,
        destination_ips: nets(&m.destination_ips)?,
        not_destination_ips: nets(&m.not_destination_ips)?,
        destination_ports: port_list(&m.destination_ports)?,
        not_destination_ports: port_list(&m.not_destination_ports)?,
        service_accounts: accounts(&m.service_accounts, i)?,
        not_service_accounts: accounts(&m.not_service_accounts, i)?,
        ..Match::default()
    })
}

/// The most targets a policy may name, as in Istio.
pub const MAX_TARGETS: usize = 16;

/// A waypoint policy (`ambit.waypoint.v1.Policy`) as the shared policy type, its
/// `targets` set and its request fields read; refused (`Err`) when anything in it cannot
/// be read faithfully (an unknown action or target kind, a bad address or header name).
pub fn waypoint_policy(
    key: &str,
    p: pb_wp::Policy,
    i: &mut Interner,
) -> Result<Authorization, String> {
    if format!("{}/{}", p.namespace, p.name) != key {
        return Err(format!("the policy's key {key:?} is not its resource name"));
    }
    let action = match pb_wp::Action::try_from(p.action) {
        Ok(pb_wp::Action::Allow) => PolicyAction::Allow,
        Ok(pb_wp::Action::Deny) => PolicyAction::Deny,
        Ok(pb_wp::Action::Audit) => PolicyAction::Audit,
        Ok(pb_wp::Action::Custom) => PolicyAction::Custom,
        Err(_) => return Err(format!("unknown action {}", p.action)),
    };
    let custom = match (action, p.ext_authz.clone()) {
        (PolicyAction::Custom, Some(e)) => Some(std::sync::Arc::new(ext_authz(e)?)),
        (PolicyAction::Custom, None) => {
            return Err("a CUSTOM policy without its authorizer".into());
        }
        _ => None,
    };
    if p.targets.is_empty() || p.targets.len() > MAX_TARGETS {
        return Err(format!(
            "a waypoint policy names 1 to {MAX_TARGETS} targets, this one {}",
            p.targets.len()
        ));
    }
    let mut targets = Vec::with_capacity(p.targets.len());
    for t in &p.targets {
        if !matches!(t.kind.as_str(), "Gateway" | "Service" | "GatewayClass") {
            return Err(format!(
                "target kind {:?} is not Gateway, Service or GatewayClass",
                t.kind
            ));
        }
        targets.push(ambit_core::policy::PolicyTarget {
            kind: i.get(&t.kind),
            namespace: i.get(&t.namespace),
            name: t.name.as_str().into(),
        });
    }
    let mut rules = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for c in &r.clauses {
            let mut matches = Vec::with_capacity(c.matches.len());
            for m in &c.matches {
                let mut out = match &m.connection {
                    Some(l4) => connection_match(l4, i)?,
                    None => Match::default(),
                };
                out.hosts = strings(&m.hosts)?;
                out.not_hosts = strings(&m.not_hosts)?;
                out.methods = strings(&m.methods)?;
                out.not_methods = strings(&m.not_methods)?;
                out.paths = strings(&m.paths)?;
                out.not_paths = strings(&m.not_paths)?;
                out.remote_ips = nets(&m.remote_ips)?;
                out.not_remote_ips = nets(&m.not_remote_ips)?;
                out.request_principals = strings(&m.request_principals)?;
                out.not_request_principals = strings(&m.not_request_principals)?;
                for c in &m.claims {
                    if c.path.is_empty() || c.path.iter().any(String::is_empty) {
                        return Err("a claim condition without a claim name".into());
                    }
                    out.claims.push(ambit_core::policy::ClaimMatch {
                        path: c.path.iter().map(|p| p.as_str().into()).collect(),
                        values: strings(&c.values)?,
                        not_values: strings(&c.not_values)?,
                    });
                }
                for h in &m.headers {
                    let valid = !h.name.is_empty()
                        && h.name.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                        });
                    if !valid {
                        return Err(format!(
                            "header name {:?} is not a lower-case token",
                            h.name
                        ));
                    }
                    out.headers.push(ambit_core::policy::HeaderMatch {
                        name: h.name.as_str().into(),
                        values: strings(&h.values)?,
                        not_values: strings(&h.not_values)?,
                    });
                }
                matches.push(out);
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Authorization {
        name: p.name.as_str().into(),
        namespace: i.get(&p.namespace),
        scope: PolicyScope::Namespace,
        action,
        dry_run: p.dry_run,
        rules,
        refused: None,
        unenforced: None,
        targets,
        custom,
    })
}

/// A CUSTOM policy's authorizer. One whose `error` is set is kept as it is: the
/// waypoint denies what the policy matches.
fn ext_authz(e: pb_wp::ExtAuthz) -> Result<ambit_core::policy::ExtAuthz, String> {
    let lower = |list: &[String], what: &str| -> Result<Vec<Str>, String> {
        if list.len() > MAX_ROUTE_ITEMS {
            return Err(format!("more than {MAX_ROUTE_ITEMS} {what}"));
        }
        list.iter()
            .map(|h| {
                http::HeaderName::from_bytes(h.as_bytes())
                    .map(|n| Str::from(n.as_str()))
                    .map_err(|_| format!("{what}: {h:?} is not a header name"))
            })
            .collect()
    };
    let error = (!e.error.is_empty()).then(|| Str::from(e.error.as_str()));
    if error.is_none() {
        if e.service
            .split_once('/')
            .is_none_or(|(ns, h)| ns.is_empty() || h.is_empty())
        {
            return Err(format!(
                "authorizer service {:?} is not <namespace>/<hostname>",
                e.service
            ));
        }
        if e.port == 0 || e.port > u32::from(u16::MAX) {
            return Err(format!("authorizer port {} is out of range", e.port));
        }
    }
    let status_on_error = match e.status_on_error {
        0 => 403,
        s @ 200..=599 => s as u16,
        s => return Err(format!("status_on_error {s} is not an HTTP status")),
    };
    let additional = e
        .include_additional_headers
        .iter()
        .map(|h| {
            http::HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("{:?} is not a header name", h.name))?;
            http::HeaderValue::from_str(&h.value)
                .map_err(|_| format!("header {:?} has a value that is not allowed", h.name))?;
            Ok((
                Str::from(h.name.to_ascii_lowercase().as_str()),
                Str::from(h.value.as_str()),
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if !e.path_prefix.is_empty() && !e.path_prefix.starts_with('/') {
        return Err(format!(
            "path prefix {:?} does not start with /",
            e.path_prefix
        ));
    }
    Ok(ambit_core::policy::ExtAuthz {
        provider: e.provider.as_str().into(),
        error,
        grpc: e.grpc,
        service: e.service.as_str().into(),
        port: u16::try_from(e.port).unwrap_or(0),
        timeout: std::time::Duration::from_millis(e.timeout_ms.clamp(1, 600_000)),
        fail_open: e.fail_open,
        status_on_error,
        path_prefix: e.path_prefix.as_str().into(),
        include_request_headers: lower(&e.include_request_headers, "includeRequestHeadersInCheck")?,
        include_additional_headers: additional,
        headers_to_upstream_on_allow: lower(
            &e.headers_to_upstream_on_allow,
            "headersToUpstreamOnAllow",
        )?,
        headers_to_downstream_on_deny: lower(
            &e.headers_to_downstream_on_deny,
            "headersToDownstreamOnDeny",
        )?,
        headers_to_downstream_on_allow: lower(
            &e.headers_to_downstream_on_allow,
            "headersToDownstreamOnAllow",
        )?,
    })
}

/// The most rules, matches, backends or header changes a route may carry: a bound on
/// what one resource costs a waypoint.
pub const MAX_ROUTE_ITEMS: usize = 256;

/// A waypoint route (`ambit.waypoint.v1.Route`) as the core type; refused (`Err`) when
/// any part cannot be read faithfully (a bad expression, header, or an unknown kind).
pub fn waypoint_route(
    key: &str,
    r: pb_wp::Route,
) -> Result<ambit_core::http_route::HttpRoute, String> {
    use ambit_core::http_route as hr;
    if format!("{}/{}", r.namespace, r.name) != key {
        return Err(format!("the route's key {key:?} is not its resource name"));
    }
    let too_many = |what: &str, n: usize| -> Result<(), String> {
        if n > MAX_ROUTE_ITEMS {
            Err(format!("{n} {what}; at most {MAX_ROUTE_ITEMS}"))
        } else {
            Ok(())
        }
    };
    too_many("parents", r.parents.len())?;
    too_many("rules", r.rules.len())?;
    let port = |p: u32, what: &str| {
        u16::try_from(p).map_err(|_| format!("{what} port {p} is out of range"))
    };
    let parents = r
        .parents
        .into_iter()
        .map(|p| {
            Ok(hr::Parent {
                service: p.service.as_str().into(),
                port: port(p.port, "parent")?,
                consumer: p.consumer,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let modifier =
        |m: Option<pb_wp::HeaderModifier>| -> Result<Option<hr::HeaderModifier>, String> {
            let Some(m) = m else { return Ok(None) };
            too_many("header changes", m.set.len() + m.add.len() + m.remove.len())?;
            let pair = |h: pb_wp::Header| -> Result<(http::HeaderName, http::HeaderValue), String> {
                let name = http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("{:?} is not a header name", h.name))?;
                let value = http::HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("the value of {} is not a header value", h.name))?;
                Ok((name, value))
            };
            Ok(Some(hr::HeaderModifier {
                set: m.set.into_iter().map(pair).collect::<Result<_, _>>()?,
                add: m.add.into_iter().map(pair).collect::<Result<_, _>>()?,
                remove: m
                    .remove
                    .into_iter()
                    .map(|n| {
                        http::HeaderName::from_bytes(n.as_bytes())
                            .map_err(|_| format!("{n:?} is not a header name"))
                    })
                    .collect::<Result<_, _>>()?,
            }))
        };
    let value = |v: pb_wp::ValueMatch| -> Result<hr::ValueMatch, String> {
        Ok(hr::ValueMatch {
            value: if v.regex {
                hr::Value::Regex(
                    hr::full_match(&v.value)
                        .map_err(|e| format!("expression {:?}: {e}", v.value))?,
                )
            } else {
                hr::Value::Exact(v.value)
            },
            name: v.name,
        })
    };
    let ms = |n: u64| (n > 0).then(|| std::time::Duration::from_millis(n));
    let mut rules = Vec::with_capacity(r.rules.len());
    for rule in r.rules {
        too_many("matches", rule.matches.len())?;
        too_many("backends", rule.backends.len())?;
        let mut matches = Vec::with_capacity(rule.matches.len());
        for m in rule.matches {
            let p = m.path.unwrap_or_default();
            let path = match pb_wp::path_match::Kind::try_from(p.kind) {
                Ok(pb_wp::path_match::Kind::Prefix) => {
                    let v = p.value.trim_end_matches('/');
                    hr::PathMatch::Prefix(if v.is_empty() {
                        "/".into()
                    } else {
                        v.to_owned()
                    })
                }
                Ok(pb_wp::path_match::Kind::Exact) => hr::PathMatch::Exact(p.value),
                Ok(pb_wp::path_match::Kind::StringPrefix) => hr::PathMatch::StringPrefix(p.value),
                Ok(pb_wp::path_match::Kind::Regex) => hr::PathMatch::Regex(
                    hr::full_match(&p.value)
                        .map_err(|e| format!("expression {:?}: {e}", p.value))?,
                ),
                Err(_) => return Err(format!("unknown path match kind {}", p.kind)),
            };
            too_many("header matches", m.headers.len())?;
            too_many("query matches", m.query.len())?;
            matches.push(hr::Match {
                path,
                headers: m.headers.into_iter().map(value).collect::<Result<_, _>>()?,
                query: m.query.into_iter().map(value).collect::<Result<_, _>>()?,
                method: (!m.method.is_empty()).then_some(m.method),
            });
        }
        let mut backends = Vec::with_capacity(rule.backends.len());
        for b in rule.backends {
            backends.push(hr::Backend {
                service: (!b.service.is_empty()).then(|| b.service.as_str().into()),
                port: port(b.port, "backend")?,
                weight: b.weight,
                request_headers: modifier(b.request_headers)?,
                response_headers: modifier(b.response_headers)?,
                subset: (!b.subset.is_empty()).then(|| b.subset.as_str().into()),
            });
        }
        let path_rewrite =
            |p: Option<pb_wp::PathRewrite>| -> Result<Option<hr::PathRewrite>, String> {
                let Some(p) = p else { return Ok(None) };
                if !p.value.starts_with('/') || p.value.contains(['?', '#']) {
                    return Err(format!(
                        "path {:?} must start with / and hold no query",
                        p.value
                    ));
                }
                match pb_wp::path_rewrite::Kind::try_from(p.kind) {
                    Ok(pb_wp::path_rewrite::Kind::Full) => Ok(Some(hr::PathRewrite::Full(p.value))),
                    Ok(pb_wp::path_rewrite::Kind::Prefix) => {
                        Ok(Some(hr::PathRewrite::Prefix(p.value)))
                    }
                    Err(_) => Err(format!("unknown path rewrite kind {}", p.kind)),
                }
            };
        let hostname = |h: String| -> Result<Option<String>, String> {
            if h.is_empty() {
                return Ok(None);
            }
            http::HeaderValue::from_str(&h).map_err(|_| format!("{h:?} is not a hostname"))?;
            Ok(Some(h))
        };
        let redirect = match rule.redirect {
            None => None,
            Some(r) => {
                if !matches!(r.status_code, 301 | 302 | 303 | 307 | 308) {
                    return Err(format!("redirect status {}", r.status_code));
                }
                Some(hr::Redirect {
                    scheme: match r.scheme.as_str() {
                        "" => None,
                        "http" | "https" => Some(r.scheme),
                        other => return Err(format!("redirect scheme {other:?}")),
                    },
                    hostname: hostname(r.hostname)?,
                    path: path_rewrite(r.path)?,
                    port: match r.port {
                        0 => None,
                        p => Some(port(p, "redirect")?),
                    },
                    status: r.status_code as u16,
                })
            }
        };
        let rewrite = match rule.rewrite {
            None => None,
            Some(r) => Some(hr::Rewrite {
                hostname: hostname(r.hostname)?,
                path: path_rewrite(r.path)?,
            }),
        };
        let retry = match rule.retry {
            None => None,
            Some(r) => {
                if r.attempts > 10 {
                    return Err(format!("{} retries; at most 10", r.attempts));
                }
                too_many("retry codes", r.codes.len())?;
                Some(hr::Retry {
                    codes: r
                        .codes
                        .into_iter()
                        .map(|c| match c {
                            400..=599 => Ok(c as u16),
                            _ => Err(format!("retry code {c}")),
                        })
                        .collect::<Result<_, _>>()?,
                    attempts: r.attempts,
                    backoff: std::time::Duration::from_millis(r.backoff_ms.min(10_000)),
                })
            }
        };
        let fault = match rule.fault {
            None => None,
            Some(f) => {
                let share = |n: u32| {
                    if n > 1_000_000 {
                        Err(format!("a fault share of {n} per million"))
                    } else {
                        Ok(n)
                    }
                };
                let delay = (f.delay_ms > 0)
                    .then(|| {
                        share(f.delay_per_million).map(|s| {
                            (
                                std::time::Duration::from_millis(f.delay_ms.min(3_600_000)),
                                s,
                            )
                        })
                    })
                    .transpose()?;
                let abort = if f.abort_is_grpc {
                    if f.abort_grpc_status > 16 {
                        return Err(format!("gRPC status {}", f.abort_grpc_status));
                    }
                    Some((
                        hr::Abort::Grpc(f.abort_grpc_status),
                        share(f.abort_per_million)?,
                    ))
                } else if f.abort_http_status != 0 {
                    if !(200..=599).contains(&f.abort_http_status) {
                        return Err(format!("abort status {}", f.abort_http_status));
                    }
                    Some((
                        hr::Abort::Http(f.abort_http_status as u16),
                        share(f.abort_per_million)?,
                    ))
                } else {
                    None
                };
                Some(hr::Fault { delay, abort })
            }
        };
        let cors = match rule.cors {
            None => None,
            Some(c) => {
                too_many(
                    "CORS entries",
                    c.allow_origins.len()
                        + c.allow_methods.len()
                        + c.allow_headers.len()
                        + c.expose_headers.len(),
                )?;
                for v in c
                    .allow_origins
                    .iter()
                    .chain(&c.allow_methods)
                    .chain(&c.allow_headers)
                    .chain(&c.expose_headers)
                {
                    http::HeaderValue::from_str(v)
                        .map_err(|_| format!("CORS: {v:?} is not a header value"))?;
                }
                Some(hr::Cors {
                    allow_origins: c.allow_origins,
                    allow_methods: c.allow_methods,
                    allow_headers: c.allow_headers,
                    expose_headers: c.expose_headers,
                    allow_credentials: c.allow_credentials,
                    max_age: c.max_age,
                })
            }
        };
        too_many("mirrors", rule.mirrors.len())?;
        let mirrors = rule
            .mirrors
            .into_iter()
            .map(|m| {
                if m.per_million > 1_000_000 || m.service.is_empty() {
                    return Err(format!("mirror to {:?}", m.service));
                }
                Ok(hr::Mirror {
                    service: m.service.as_str().into(),
                    port: port(m.port, "mirror")?,
                    per_million: m.per_million,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        rules.push(hr::Rule {
            name: rule.name,
            matches,
            backends,
            request_headers: modifier(rule.request_headers)?,
            response_headers: modifier(rule.response_headers)?,
            request_timeout: ms(rule.request_timeout_ms),
            backend_timeout: ms(rule.backend_timeout_ms),
            redirect,
            rewrite,
            retry,
            fault,
            cors,
            mirrors,
        });
    }
    Ok(hr::HttpRoute {
        key: key.into(),
        namespace: r.namespace.as_str().into(),
        parents,
        rules,
        ordered: r.ordered,
        created: r.created,
    })
}

/// A waypoint traffic policy (`ambit.waypoint.v1.TrafficPolicy`) as the core type;
/// refused (`Err`) when any part cannot be read faithfully.
pub fn waypoint_traffic(
    key: &str,
    t: pb_wp::TrafficPolicy,
) -> Result<ambit_core::traffic::TrafficPolicy, String> {
    use ambit_core::traffic as tr;
    use std::time::Duration;
    if format!("{}/{}", t.namespace, t.name) != key {
        return Err(format!(
            "the traffic policy's key {key:?} is not its resource name"
        ));
    }
    if t.services.len() + t.gateways.len() > MAX_ROUTE_ITEMS
        || t.ports.len() > MAX_ROUTE_ITEMS
        || t.rate_limit
            .as_ref()
            .is_some_and(|r| r.descriptors.len() > MAX_ROUTE_ITEMS)
    {
        return Err(format!("more than {MAX_ROUTE_ITEMS} items in one list"));
    }
    let limit = |n: u32| (n > 0).then_some(n);
    let millis = |n: u64| (n > 0).then(|| Duration::from_millis(n));
    let settings = |s: pb_wp::BackendSettings| -> Result<tr::Settings, String> {
        use pb_wp::backend_settings::Balance as B;
        let balance = match B::try_from(s.balance) {
            Ok(B::LeastRequest) => tr::Balance::LeastRequest,
            Ok(B::RoundRobin) => tr::Balance::RoundRobin,
            Ok(B::Random) => tr::Balance::Random,
            Ok(B::HashHeader) => {
                if http::HeaderName::from_bytes(s.hash_key.as_bytes()).is_err() {
                    return Err(format!("{:?} is not a header name", s.hash_key));
                }
                tr::Balance::Hash(tr::HashOn::Header(s.hash_key.to_ascii_lowercase()))
            }
            Ok(B::HashCookie) if !s.hash_key.is_empty() => {
                tr::Balance::Hash(tr::HashOn::Cookie(s.hash_key.clone()))
            }
            Ok(B::HashSourceIp) => tr::Balance::Hash(tr::HashOn::SourceIp),
            _ => return Err(format!("unknown load balancing {}", s.balance)),
        };
        let outlier = s.outlier.map(|o| tr::Outlier {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway,
            interval: Duration::from_millis(o.interval_ms.max(1)),
            base_ejection: Duration::from_millis(o.base_ejection_ms.max(1)),
            max_ejection_percent: o.max_ejection_percent.min(100),
        });
        Ok(tr::Settings {
            balance,
            pool: tr::Pool {
                max_connections: limit(s.max_connections),
                max_pending: limit(s.max_pending),
                max_requests: limit(s.max_requests),
                max_requests_per_connection: limit(s.max_requests_per_connection),
                idle_timeout: millis(s.idle_timeout_ms),
                connect_timeout: millis(s.connect_timeout_ms),
            },
            outlier,
        })
    };
    let backend = match t.backend {
        Some(b) => Some(tr::BackendPolicy {
            default: settings(b)?,
            ports: t
                .ports
                .into_iter()
                .map(|p| {
                    let port = u16::try_from(p.port)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("port {} is out of range", p.port))?;
                    Ok((port, settings(p.settings.unwrap_or_default())?))
                })
                .collect::<Result<Vec<_>, String>>()?,
            subsets: {
                if t.subsets.len() > MAX_ROUTE_ITEMS {
                    return Err(format!("more than {MAX_ROUTE_ITEMS} subsets"));
                }
                let mut out = Vec::with_capacity(t.subsets.len());
                for sub in t.subsets {
                    if sub.name.is_empty() {
                        return Err("a subset without a name".into());
                    }
                    let mut workloads: Vec<Str> = sub
                        .workloads
                        .iter()
                        .map(|w| Str::from(w.as_str()))
                        .collect();
                    workloads.sort();
                    workloads.dedup();
                    out.push(tr::Subset {
                        name: sub.name.as_str().into(),
                        workloads,
                        settings: sub.settings.map(settings).transpose()?,
                    });
                }
                out
            },
        }),
        None if !t.ports.is_empty() => {
            return Err("port settings without default settings".into());
        }
        None => None,
    };
    let bucket = |b: Option<pb_wp::TokenBucket>| -> Result<tr::BucketSpec, String> {
        let b = b.ok_or("a descriptor without a token bucket")?;
        if b.max_tokens == 0 || b.tokens_per_fill == 0 || b.fill_interval_ms == 0 {
            return Err("a token bucket with no tokens or no fill interval".into());
        }
        Ok(tr::BucketSpec {
            max_tokens: b.max_tokens,
            tokens_per_fill: b.tokens_per_fill,
            fill_interval: Duration::from_millis(b.fill_interval_ms),
        })
    };
    let rate_limit = match t.rate_limit {
        Some(r) => Some(tr::RateLimit {
            bucket: r.bucket.map(|b| bucket(Some(b))).transpose()?,
            descriptors: r
                .descriptors
                .into_iter()
                .map(|d| {
                    let key = match (d.header.is_empty(), d.source_principal) {
                        (false, false) => {
                            if http::HeaderName::from_bytes(d.header.as_bytes()).is_err() {
                                return Err(format!("{:?} is not a header name", d.header));
                            }
                            tr::DescriptorKey::Header(d.header.to_ascii_lowercase())
                        }
                        (true, true) => tr::DescriptorKey::SourcePrincipal,
                        _ => return Err("a descriptor needs one key".into()),
                    };
                    Ok(tr::Descriptor {
                        key,
                        value: d.value,
                        bucket: bucket(d.bucket)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?,
        }),
        None => None,
    };
    let authentication = match t.authentication {
        Some(a) => Some(jwt_rules(a)?),
        None => None,
    };
    if backend.is_none() && rate_limit.is_none() && authentication.is_none() {
        return Err("neither backend settings, a rate limit nor an authentication".into());
    }
    Ok(tr::TrafficPolicy {
        key: key.into(),
        services: t.services.iter().map(|s| Str::from(s.as_str())).collect(),
        gateways: t.gateways.iter().map(|s| Str::from(s.as_str())).collect(),
        created: t.created,
        backend,
        rate_limit,
        authentication,
    })
}

/// A RequestAuthentication's rules. The key set is parsed here, once; one that cannot
/// be read leaves its issuer's tokens refused (as one the control plane could not fetch).
fn jwt_rules(a: pb_wp::JwtAuthentication) -> Result<Vec<ambit_core::jwt::JwtRule>, String> {
    use ambit_core::jwt::{Jwks, JwtRule, Location};
    if a.rules.is_empty() || a.rules.len() > MAX_ROUTE_ITEMS {
        return Err(format!(
            "an authentication has 1 to {MAX_ROUTE_ITEMS} rules, this one {}",
            a.rules.len()
        ));
    }
    let header = |name: &str| {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))
    };
    a.rules
        .into_iter()
        .map(|r| {
            if r.issuer.is_empty() {
                return Err("a JWT rule without an issuer".to_owned());
            }
            let mut locations = Vec::new();
            for h in &r.from_headers {
                locations.push(Location::Header {
                    name: header(&h.name)?,
                    prefix: h.prefix.clone(),
                });
            }
            locations.extend(r.from_params.iter().cloned().map(Location::Param));
            locations.extend(r.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations = Location::defaults();
            }
            let keys = if !r.jwks_error.is_empty() {
                Err(r.jwks_error.clone())
            } else {
                Jwks::parse(&r.jwks).map_err(|e| e.to_string())
            };
            let claim_headers = r
                .output_claim_to_headers
                .iter()
                .map(|c| {
                    if c.claim.is_empty() {
                        return Err(format!("header {:?} names no claim", c.header));
                    }
                    Ok((
                        header(&c.header)?,
                        c.claim.split('.').map(str::to_owned).collect(),
                    ))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let payload_header = match r.output_payload_to_header.as_str() {
                "" => None,
                h => Some(header(h)?),
            };
            Ok(JwtRule {
                issuer: r.issuer,
                audiences: r.audiences,
                keys,
                locations,
                forward_original_token: r.forward_original_token,
                claim_headers,
                payload_header,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> pb::Workload {
        pb::Workload {
            uid: "c//Pod/ns/p".into(),
            name: "p".into(),
            namespace: "ns".into(),
            addresses: vec![vec![198, 18, 0, 1]],
            tunnel_protocol: 1,
            ..Default::default()
        }
    }

    #[test]
    fn workloads_are_validated() {
        let mut i = Interner::default();
        let ok = workload(&"c//Pod/ns/p".into(), w(), &mut i).unwrap();
        assert_eq!(
            ok.profile.trust_domain.as_ref(),
            "cluster.local",
            "elided trust domain"
        );
        assert_eq!(
            ok.profile.service_account.as_ref(),
            "default",
            "elided service account"
        );
        assert_eq!(ok.tunnel, TunnelProtocol::Hbone);

        let mut bad = w();
        bad.addresses = vec![vec![1, 2, 3]];
        assert!(
            workload(&"c//Pod/ns/p".into(), bad, &mut i)
                .unwrap_err()
                .contains("3 bytes")
        );
        assert!(
            workload(&"other".into(), w(), &mut i)
                .unwrap_err()
                .contains("resource name")
        );
        let mut bad = w();
        bad.tunnel_protocol = 7;
        assert!(workload(&"c//Pod/ns/p".into(), bad, &mut i).is_err());
        let mut bad = w();
        bad.services.insert(
            "ns/h".into(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 70000,
                    target_port: 1,
                }],
            },
        );
        assert!(
            workload(&"c//Pod/ns/p".into(), bad, &mut i)
                .unwrap_err()
                .contains("70000")
        );
    }

    #[test]
    fn replicas_share_their_profile() {
        let mut i = Interner::default();
        let a = workload(&"c//Pod/ns/p".into(), w(), &mut i).unwrap();
        let mut w2 = w();
        w2.uid = "c//Pod/ns/q".into();
        w2.addresses = vec![vec![198, 18, 0, 2]];
        let b = workload(&"c//Pod/ns/q".into(), w2, &mut i).unwrap();
        assert!(Arc::ptr_eq(&a.profile, &b.profile));
        // A different service account is a different profile, sharing its strings.
        let mut w3 = w();
        w3.uid = "c//Pod/ns/r".into();
        w3.service_account = "other".into();
        let c = workload(&"c//Pod/ns/r".into(), w3, &mut i).unwrap();
        assert!(!Arc::ptr_eq(&a.profile, &c.profile));
        assert!(Arc::ptr_eq(&a.profile.namespace, &c.profile.namespace));
    }

    #[test]
    fn dry_run_and_audit_policies_are_read_as_published() {
        let mut i = Interner::default();
        let rule = pb_sec::Rule { clauses: vec![] };
        let deny = pb_sec::Action::Deny as i32;
        let allow = pb_sec::Action::Allow as i32;
        // Dry-run in Istio's form: the real action and rules, flagged.
        for (action, want) in [(allow, PolicyAction::Allow), (deny, PolicyAction::Deny)] {
            let a = pb_sec::Authorization {
                name: "p".into(),
                namespace: "ns".into(),
                action,
                rules: vec![rule.clone()],
                dry_run: true,
                ..Default::default()
            };
            let p = authorization("ns/p", a, &mut i).unwrap();
            assert_eq!((p.action, p.dry_run, p.rules.len()), (want, true, 1));
        }
        // AUDIT: a DENY without rules, the rules in the extension.
        let audit = |action: i32, rules: Vec<pb_sec::Rule>, dry_run: bool, name: &str| {
            pb_sec::Authorization {
                name: "p".into(),
                namespace: "ns".into(),
                action,
                rules,
                dry_run,
                extensions: vec![pb_sec::Extension {
                    name: name.into(),
                    config: Some(ambit_proto::prost_types::Any {
                        type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
                        value: pb_sec::Authorization {
                            rules: vec![rule.clone()],
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    }),
                }],
                ..Default::default()
            }
        };
        let p = authorization(
            "ns/p",
            audit(deny, vec![], false, pb_sec::AUDIT_EXTENSION),
            &mut i,
        )
        .unwrap();
        assert_eq!(
            (p.action, p.dry_run, p.rules.len()),
            (PolicyAction::Audit, false, 1)
        );
        // Anything a proxy ignoring the extension would enforce is refused, and so is an
        // extension this proxy does not know.
        for (bad, why) in [
            (
                audit(allow, vec![], false, pb_sec::AUDIT_EXTENSION),
                "ALLOW",
            ),
            (
                audit(deny, vec![rule.clone()], false, pb_sec::AUDIT_EXTENSION),
                "rules",
            ),
            (
                audit(deny, vec![], true, pb_sec::AUDIT_EXTENSION),
                "dry run",
            ),
            (audit(deny, vec![], false, "example.com/other"), "unknown"),
        ] {
            assert!(authorization("ns/p", bad, &mut i).is_err(), "{why}");
        }
        // Not enforced: kept to be shown, with its reason.
        let unenforced = pb_sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: deny,
            extensions: vec![pb_sec::Extension {
                name: pb_sec::UNENFORCED_EXTENSION.into(),
                config: Some(ambit_proto::prost_types::Any {
                    type_url: pb_sec::STRING_VALUE_TYPE_URL.into(),
                    value: "needs a waypoint".to_owned().encode_to_vec(),
                }),
            }],
            ..Default::default()
        };
        let p = authorization("ns/p", unenforced.clone(), &mut i).unwrap();
        assert_eq!(p.unenforced.as_deref(), Some("needs a waypoint"));
        let mut with_rules = unenforced;
        with_rules.rules.push(rule.clone());
        assert!(authorization("ns/p", with_rules, &mut i).is_err());
    }

    #[test]
    fn unknown_policy_actions_are_refused() {
        let mut i = Interner::default();
        let a = pb_sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: 9,
            ..Default::default()
        };
        assert!(
            authorization("ns/p", a, &mut i)
                .unwrap_err()
                .contains("action")
        );
    }
}
