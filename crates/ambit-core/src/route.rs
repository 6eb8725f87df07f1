//! Where an outbound connection goes: decided from the node's state, per connection.
//!
//! - The original destination is a service VIP: pick a ready endpoint of the service
//!   (uniformly at random among the best by the service's locality preference), on the
//!   port that endpoint maps the service port to.
//! - It is a known workload: that workload, on the same port.
//! - Anything else: passed through unchanged.
//!
//! A chosen workload in the mesh (tunnel protocol HBONE) is reached over HBONE on its
//! port 15008; one outside it, directly.
//!
//! A service or workload bound to a waypoint (Istio's `waypoint` field) is reached
//! through it, as Istio's node proxy does: HBONE to a ready waypoint endpoint on its HBONE
//! port, with the original destination as the CONNECT authority. When the waypoint
//! cannot be found the connection is refused, never sent around it. The waypoint's own
//! connections are not sent back to it.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::discovery::{
    GatewayAddress, GatewayDestination, Health, LoadBalancingMode, LocalityScope, Service,
    TunnelProtocol, Workload,
};
use crate::state::State;

/// The decision for one outbound connection.
#[derive(Debug, Clone)]
pub enum Route {
    /// HBONE to `workload` at `hbone` (`<ip>:15008`), CONNECT authority `target`.
    Hbone {
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
        hbone: SocketAddr,
    },
    /// Plain TCP to `target`.
    Direct {
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
    },
    /// A service with no usable endpoint for this port.
    NoEndpoint { service: Arc<Service> },
    /// A route named a DestinationRule subset the service's rule does not define (a
    /// waypoint answers 500).
    NoSubset {
        service: Option<Arc<Service>>,
        subset: String,
    },
    /// The destination must be reached through a waypoint that has no ready endpoint.
    NoWaypoint {
        waypoint: String,
        service: Option<Arc<Service>>,
        workload: Option<Arc<Workload>>,
    },
}

/// Decides where a connection from `source` to `original` goes.
pub fn route(
    state: &State,
    network: &str,
    source: Option<&Workload>,
    original: SocketAddr,
    hbone_port: u16,
) -> Route {
    decide(state, network, source, original, hbone_port, true, None)
}

/// Requests in flight to a workload, as a waypoint counts them.
pub type Load<'a> = &'a dyn Fn(&Workload) -> usize;

/// How a waypoint chooses among the endpoints of a service (a DestinationRule's
/// `loadBalancer` and `outlierDetection`).
pub struct Balancer<'a> {
    /// Requests in flight per endpoint (least request).
    pub load: Load<'a>,
    pub balance: &'a crate::traffic::Balance,
    /// The request's key for consistent hashing; `None` (the header, cookie or address
    /// is missing): least request.
    pub hash: Option<u64>,
    /// Endpoints ejected by outlier detection: never chosen.
    pub excluded: &'a dyn Fn(&Workload) -> bool,
    /// The service's round-robin position.
    pub turn: &'a std::sync::atomic::AtomicUsize,
}

/// Where a waypoint sends a request (or connection) for `original` it accepted: like
/// [`route`], past any waypoint (a request crosses at most one), so the waypoint and
/// the node proxy pick endpoints the same way; among the endpoints the service's
/// locality preferences rank first, one chosen as `balancer` says (by default the less
/// loaded of two picked at random: least request, "power of two choices").
pub fn route_from_waypoint(
    state: &State,
    network: &str,
    source: Option<&Workload>,
    original: SocketAddr,
    hbone_port: u16,
    balancer: &Balancer<'_>,
) -> Route {
    decide(
        state,
        network,
        source,
        original,
        hbone_port,
        false,
        Some(balancer),
    )
}

fn decide(
    state: &State,
    network: &str,
    source: Option<&Workload>,
    original: SocketAddr,
    hbone_port: u16,
    use_waypoints: bool,
    balancer: Option<&Balancer<'_>>,
) -> Route {
    if let Some(service) = state.service_by_vip(network, original.ip()) {
        if use_waypoints
            && let Some(waypoint) = &service.waypoint
            && let Some(via) =
                through_waypoint(state, network, source, waypoint, original, hbone_port)
        {
            return via
                .unwrap_or_else(|| Route::NoWaypoint {
                    waypoint: describe_gateway(waypoint),
                    service: Some(service.clone()),
                    workload: None,
                })
                .with_service(service);
        }
        let port = original.port();
        let Some(service_port) = service.ports.iter().find(|p| p.service_port == port) else {
            return Route::NoEndpoint {
                service: service.clone(),
            };
        };
        let key = service.key();
        let include_unhealthy = service
            .load_balancing
            .as_ref()
            .is_some_and(|lb| lb.include_unhealthy);
        // Candidates: endpoints with an address on this network and a port for this
        // service port, healthy unless the service says otherwise.
        let candidates: Vec<(&Arc<Workload>, u16)> = state
            .endpoints(&key)
            .filter(|w| include_unhealthy || w.status == Health::Healthy)
            .filter(|w| !w.addresses.is_empty() && w.profile.network.as_ref() == network)
            .filter(|w| balancer.is_none_or(|b| !(b.excluded)(w)))
            .filter_map(|w| {
                let own = w
                    .profile
                    .services
                    .iter()
                    .find(|(k, _)| k.as_ref() == key)
                    .and_then(|(_, ports)| ports.iter().find(|p| p.service_port == port))
                    .map(|p| p.target_port)
                    .filter(|t| *t != 0);
                let target =
                    own.or((service_port.target_port != 0).then_some(service_port.target_port))?;
                Some((w, target))
            })
            .collect();
        let Some((workload, target_port)) = pick(service, source, &candidates, balancer) else {
            return Route::NoEndpoint {
                service: service.clone(),
            };
        };
        let target = SocketAddr::new(same_family(&workload.addresses, original.ip()), target_port);
        return to_workload(workload.clone(), Some(service.clone()), target, hbone_port);
    }
    if let Some(workload) = state.workload_by_ip(network, original.ip()) {
        if use_waypoints
            && let Some(waypoint) = &workload.waypoint
            && let Some(via) =
                through_waypoint(state, network, source, waypoint, original, hbone_port)
        {
            return via.unwrap_or_else(|| Route::NoWaypoint {
                waypoint: describe_gateway(waypoint),
                service: None,
                workload: Some(workload.clone()),
            });
        }
        return to_workload(workload.clone(), None, original, hbone_port);
    }
    Route::Direct {
        workload: None,
        service: None,
        target: original,
    }
}

/// HBONE to a ready endpoint of `waypoint`, carrying `original` as the authority:
/// `Some(Some(route))`; `Some(None)` when the waypoint has no usable endpoint; `None`
/// when the source is the waypoint itself (its traffic goes on to the destination).
fn through_waypoint(
    state: &State,
    network: &str,
    source: Option<&Workload>,
    waypoint: &GatewayAddress,
    original: SocketAddr,
    hbone_port: u16,
) -> Option<Option<Route>> {
    let endpoints: Vec<Arc<Workload>> = match &waypoint.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => {
            let Some(service) = state
                .services_by_hostname(hostname)
                .find(|s| s.namespace == *namespace)
            else {
                return Some(None);
            };
            let key = service.key();
            if source.is_some_and(|w| w.profile.services.iter().any(|(k, _)| k.as_ref() == key)) {
                return None;
            }
            state
                .endpoints(&key)
                .filter(|w| w.status == Health::Healthy)
                .filter(|w| !w.addresses.is_empty() && w.profile.network.as_ref() == network)
                .cloned()
                .collect()
        }
        GatewayDestination::Address(a) => {
            let Some(w) = state.workload_by_ip(&a.network, a.address) else {
                return Some(None);
            };
            if source.is_some_and(|s| s.uid == w.uid) {
                return None;
            }
            vec![w.clone()]
        }
    };
    if endpoints.is_empty() {
        return Some(None);
    }
    let chosen = endpoints[fastrand::usize(..endpoints.len())].clone();
    let port = if waypoint.hbone_port == 0 {
        hbone_port
    } else {
        waypoint.hbone_port
    };
    Some(Some(Route::Hbone {
        hbone: SocketAddr::new(same_family(&chosen.addresses, original.ip()), port),
        workload: chosen,
        service: None,
        target: original,
    }))
}

/// Of a workload's addresses, the first of `like`'s family (a dual-stack pod reached over
/// IPv6 when the client used IPv6), else the first.
fn same_family(addresses: &[std::net::IpAddr], like: std::net::IpAddr) -> std::net::IpAddr {
    addresses
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .unwrap_or(addresses[0])
}

/// `namespace/hostname` or the address of a waypoint, for logs.
fn describe_gateway(g: &GatewayAddress) -> String {
    match &g.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayDestination::Address(a) => a.address.to_string(),
    }
}

impl Route {
    /// The addressed service, for telemetry (a waypoint route is to the waypoint's
    /// workload, on behalf of this service).
    fn with_service(self, s: &Arc<Service>) -> Route {
        match self {
            Route::Hbone {
                workload,
                target,
                hbone,
                ..
            } => Route::Hbone {
                workload,
                service: Some(s.clone()),
                target,
                hbone,
            },
            other => other,
        }
    }
}

fn to_workload(
    workload: Arc<Workload>,
    service: Option<Arc<Service>>,
    target: SocketAddr,
    hbone_port: u16,
) -> Route {
    match workload.tunnel {
        TunnelProtocol::Hbone => Route::Hbone {
            hbone: SocketAddr::new(target.ip(), hbone_port),
            workload,
            service,
            target,
        },
        TunnelProtocol::None => Route::Direct {
            workload: Some(workload),
            service,
            target,
        },
    }
}

/// How many of the service's routing preferences `candidate` shares with `source`, in
/// order (stopping at the first that differs).
fn rank(scopes: &[LocalityScope], source: &Workload, candidate: &Workload) -> usize {
    let same = |scope: &LocalityScope| match scope {
        LocalityScope::Network => source.profile.network == candidate.profile.network,
        LocalityScope::Cluster => source.profile.cluster_id == candidate.profile.cluster_id,
        LocalityScope::Node => source.node == candidate.node,
        LocalityScope::Region => locality(source).0 == locality(candidate).0,
        LocalityScope::Zone => locality(source).1 == locality(candidate).1,
        LocalityScope::Subzone => locality(source).2 == locality(candidate).2,
    };
    scopes.iter().take_while(|s| same(s)).count()
}

fn locality(w: &Workload) -> (&str, &str, &str) {
    w.locality
        .as_ref()
        .map_or(("", "", ""), |l| (&l.region, &l.zone, &l.subzone))
}

/// Chooses an endpoint: among those matching the most routing preferences (all of them,
/// in strict mode), uniformly at random.
fn pick<'a>(
    service: &Service,
    source: Option<&Workload>,
    candidates: &[(&'a Arc<Workload>, u16)],
    balancer: Option<&Balancer<'_>>,
) -> Option<(&'a Arc<Workload>, u16)> {
    if candidates.is_empty() {
        return None;
    }
    let preference = service.load_balancing.as_ref().filter(|lb| {
        matches!(
            lb.mode,
            LoadBalancingMode::Failover | LoadBalancingMode::Strict
        ) && !lb.routing_preference.is_empty()
    });
    let (Some(lb), Some(source)) = (preference, source) else {
        let all: Vec<usize> = (0..candidates.len()).collect();
        return Some(candidates[choose(candidates, &all, balancer)]);
    };
    let ranks: Vec<usize> = candidates
        .iter()
        .map(|(w, _)| rank(&lb.routing_preference, source, w))
        .collect();
    let best = *ranks.iter().max()?;
    if lb.mode == LoadBalancingMode::Strict && best < lb.routing_preference.len() {
        return None;
    }
    let top: Vec<usize> = (0..candidates.len())
        .filter(|i| ranks[*i] == best)
        .collect();
    Some(candidates[choose(candidates, &top, balancer)])
}

/// One of `among` (indexes into `candidates`, not empty): at random; or as the
/// balancer says: round robin, at random, by consistent hash, or (least request) the
/// less loaded of two distinct ones drawn at random (ties: the first drawn).
fn choose(
    candidates: &[(&Arc<Workload>, u16)],
    among: &[usize],
    balancer: Option<&Balancer<'_>>,
) -> usize {
    use crate::traffic::Balance;
    let first = among[fastrand::usize(..among.len())];
    let Some(b) = balancer else {
        return first;
    };
    match (b.balance, b.hash) {
        (Balance::Random, _) => return first,
        (Balance::RoundRobin, _) => {
            let turn = b.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return among[turn % among.len()];
        }
        (Balance::Hash(_), Some(key)) => {
            let ids = among.iter().map(|i| (*i, candidates[*i].0.uid.as_ref()));
            return crate::traffic::rendezvous(key, ids).unwrap_or(first);
        }
        (Balance::Hash(_) | Balance::LeastRequest, _) => {}
    }
    let load = b.load;
    if among.len() < 2 {
        return first;
    }
    let mut second = among[fastrand::usize(..among.len() - 1)];
    if second == first {
        second = among[among.len() - 1];
    }
    if load(candidates[second].0) < load(candidates[first].0) {
        second
    } else {
        first
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::discovery::*;

    use super::*;

    use crate::testing::{s, workload};

    const KEY: &str = "demo/echo.demo.svc.cluster.local";

    fn service(lb: Option<LoadBalancing>) -> Service {
        Service {
            name: s("echo"),
            namespace: s("demo"),
            hostname: s("echo.demo.svc.cluster.local"),
            vips: vec![NetworkAddress {
                network: s(""),
                address: "198.19.0.10".parse().unwrap(),
            }],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 0,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: lb,
        }
    }

    fn addr(v: &str) -> SocketAddr {
        v.parse().unwrap()
    }

    #[test]
    fn a_vip_picks_an_endpoint_on_its_own_port() {
        let mut st = State::default();
        st.upsert_service(service(None));
        st.upsert_workload(workload(
            "e1",
            "198.18.2.10",
            "n2",
            "z1",
            TunnelProtocol::Hbone,
            &[(KEY, 80, 8080)],
        ));
        match route(&st, "", None, addr("198.19.0.10:80"), 15008) {
            Route::Hbone {
                target,
                hbone,
                service,
                ..
            } => {
                assert_eq!(target, addr("198.18.2.10:8080"));
                assert_eq!(hbone, addr("198.18.2.10:15008"));
                assert!(service.is_some());
            }
            other => panic!("{other:?}"),
        }
        // A port the service does not have.
        assert!(matches!(
            route(&st, "", None, addr("198.19.0.10:81"), 15008),
            Route::NoEndpoint { .. }
        ));
    }

    #[test]
    fn unhealthy_endpoints_are_skipped() {
        let mut st = State::default();
        st.upsert_service(service(None));
        let mut w = workload(
            "e1",
            "198.18.2.10",
            "n2",
            "z1",
            TunnelProtocol::Hbone,
            &[(KEY, 80, 8080)],
        );
        w.status = Health::Unhealthy;
        st.upsert_workload(w);
        assert!(matches!(
            route(&st, "", None, addr("198.19.0.10:80"), 15008),
            Route::NoEndpoint { .. }
        ));
    }

    #[test]
    fn workloads_and_unknown_addresses() {
        let mut st = State::default();
        st.upsert_workload(workload(
            "mesh",
            "198.18.2.10",
            "n2",
            "z1",
            TunnelProtocol::Hbone,
            &[],
        ));
        st.upsert_workload(workload(
            "plain",
            "198.18.2.20",
            "n2",
            "z1",
            TunnelProtocol::None,
            &[],
        ));
        assert!(
            matches!(route(&st, "", None, addr("198.18.2.10:9000"), 15008), Route::Hbone { target, .. } if target == addr("198.18.2.10:9000"))
        );
        assert!(matches!(
            route(&st, "", None, addr("198.18.2.20:9000"), 15008),
            Route::Direct {
                workload: Some(_),
                ..
            }
        ));
        assert!(matches!(
            route(&st, "", None, addr("198.18.9.9:9000"), 15008),
            Route::Direct { workload: None, .. }
        ));
    }

    #[test]
    fn locality_preference_fails_over() {
        let lb = LoadBalancing {
            routing_preference: vec![
                LocalityScope::Network,
                LocalityScope::Region,
                LocalityScope::Zone,
            ],
            mode: LoadBalancingMode::Failover,
            include_unhealthy: false,
        };
        let mut st = State::default();
        st.upsert_service(service(Some(lb.clone())));
        st.upsert_workload(workload(
            "near",
            "198.18.2.10",
            "n2",
            "z1",
            TunnelProtocol::Hbone,
            &[(KEY, 80, 8080)],
        ));
        st.upsert_workload(workload(
            "far",
            "198.18.3.10",
            "n3",
            "z2",
            TunnelProtocol::Hbone,
            &[(KEY, 80, 8080)],
        ));
        let client = workload(
            "client",
            "198.18.1.10",
            "n1",
            "z1",
            TunnelProtocol::Hbone,
            &[],
        );
        let mut seen = HashMap::new();
        for _ in 0..200 {
            if let Route::Hbone { workload, .. } =
                route(&st, "", Some(&client), addr("198.19.0.10:80"), 15008)
            {
                *seen.entry(workload.name.to_string()).or_insert(0) += 1;
            }
        }
        assert_eq!(
            seen.get("near"),
            Some(&200),
            "same zone preferred: {seen:?}"
        );

        // The near one goes away: fail over to the far one.
        st.remove_address("near");
        assert!(
            matches!(route(&st, "", Some(&client), addr("198.19.0.10:80"), 15008), Route::Hbone { workload, .. } if workload.name.as_ref() == "far")
        );

        // Strict: nothing in the same zone means no endpoint.
        let mut strict = lb;
        strict.mode = LoadBalancingMode::Strict;
        st.upsert_service(service(Some(strict)));
        assert!(matches!(
            route(&st, "", Some(&client), addr("198.19.0.10:80"), 15008),
            Route::NoEndpoint { .. }
        ));
    }

    #[test]
    fn without_preference_endpoints_share_the_load() {
        let mut st = State::default();
        st.upsert_service(service(None));
        for i in 0..4 {
            st.upsert_workload(workload(
                &format!("e{i}"),
                &format!("198.18.2.{}", 10 + i),
                "n2",
                "z1",
                TunnelProtocol::Hbone,
                &[(KEY, 80, 8080)],
            ));
        }
        let mut seen = HashMap::new();
        for _ in 0..400 {
            if let Route::Hbone { workload, .. } =
                route(&st, "", None, addr("198.19.0.10:80"), 15008)
            {
                *seen.entry(workload.name.to_string()).or_insert(0) += 1;
            }
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen.values().all(|n| *n > 40), "{seen:?}");
    }

    fn waypoint_at(name: &str) -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: s("demo"),
                hostname: format!("{name}.demo.svc.cluster.local").as_str().into(),
            },
            hbone_port: 15008,
        }
    }

    /// echo (VIP 198.19.0.10:80 -> echo-1:8080) bound to waypoint `wp`; `wp` has one
    /// pod when `running`.
    fn bound_mesh(running: bool) -> State {
        let mut st = State::default();
        let mut echo = service(None);
        echo.waypoint = Some(waypoint_at("wp"));
        st.upsert_service(echo);
        st.upsert_workload(workload(
            "echo-1",
            "198.18.2.10",
            "n2",
            "z",
            TunnelProtocol::Hbone,
            &[(KEY, 80, 8080)],
        ));
        let mut wp = service(None);
        wp.name = s("wp");
        wp.hostname = s("wp.demo.svc.cluster.local");
        wp.vips = vec![];
        wp.ports = vec![PortMapping {
            service_port: 15008,
            target_port: 15008,
        }];
        st.upsert_service(wp);
        if running {
            st.upsert_workload(workload(
                "wp-1",
                "198.18.3.10",
                "n3",
                "z",
                TunnelProtocol::Hbone,
                &[("demo/wp.demo.svc.cluster.local", 15008, 15008)],
            ));
        }
        st
    }

    #[test]
    fn a_service_bound_to_a_waypoint_is_reached_through_it() {
        let st = bound_mesh(true);
        let vip = addr("198.19.0.10:80");
        match route(&st, "", None, vip, 15008) {
            Route::Hbone {
                workload,
                service,
                target,
                hbone,
            } => {
                assert_eq!(workload.name.as_ref(), "wp-1");
                assert_eq!(hbone, addr("198.18.3.10:15008"));
                assert_eq!(target, vip, "the authority is the original destination");
                assert_eq!(service.unwrap().name.as_ref(), "echo");
            }
            other => panic!("{other:?}"),
        }
        // The pod IP is not bound (the waypoint takes services).
        assert!(matches!(
            route(&st, "", None, addr("198.18.2.10:8080"), 15008),
            Route::Hbone { workload, .. } if workload.name.as_ref() == "echo-1"
        ));
        // The waypoint's own traffic goes on to the service's endpoints.
        let wp = st.workload("wp-1").unwrap().clone();
        assert!(matches!(
            route(&st, "", Some(&wp), vip, 15008),
            Route::Hbone { workload, .. } if workload.name.as_ref() == "echo-1"
        ));
    }

    #[test]
    fn a_waypoint_that_is_not_running_refuses_instead_of_being_bypassed() {
        let st = bound_mesh(false);
        assert!(matches!(
            route(&st, "", None, addr("198.19.0.10:80"), 15008),
            Route::NoWaypoint { waypoint, .. } if waypoint == "demo/wp.demo.svc.cluster.local"
        ));
        // A waypoint whose Service does not even exist: the same.
        let mut st = bound_mesh(false);
        st.remove_address("demo/wp.demo.svc.cluster.local");
        assert!(matches!(
            route(&st, "", None, addr("198.19.0.10:80"), 15008),
            Route::NoWaypoint { .. }
        ));
        // A workload bound to one, by its pod IP.
        let mut st = State::default();
        let mut w = workload(
            "echo-1",
            "198.18.2.10",
            "n2",
            "z",
            TunnelProtocol::Hbone,
            &[],
        );
        w.waypoint = Some(Arc::new(waypoint_at("wp")));
        st.upsert_workload(w);
        assert!(matches!(
            route(&st, "", None, addr("198.18.2.10:8080"), 15008),
            Route::NoWaypoint {
                workload: Some(_),
                ..
            }
        ));
    }

    fn three_endpoints() -> State {
        let mut st = State::default();
        st.upsert_service(service(None));
        for (name, ip) in [
            ("busy", "198.18.2.10"),
            ("idle", "198.18.2.11"),
            ("third", "198.18.2.12"),
        ] {
            st.upsert_workload(workload(
                name,
                ip,
                "n2",
                "z1",
                TunnelProtocol::Hbone,
                &[(KEY, 80, 8080)],
            ));
        }
        st
    }

    fn via(st: &State, b: &Balancer<'_>) -> String {
        match route_from_waypoint(st, "", None, addr("198.19.0.10:80"), 15008, b) {
            Route::Hbone { workload, .. } => workload.name.to_string(),
            Route::NoEndpoint { .. } => "none".into(),
            other => panic!("{other:?}"),
        }
    }

    /// A waypoint sends a request to the less loaded of the endpoints it draws; with two,
    /// always the less loaded one, and both when they are equal.
    #[test]
    fn a_waypoint_balances_by_requests_in_flight() {
        let st = three_endpoints();
        let turn = std::sync::atomic::AtomicUsize::new(0);
        let third_out = |w: &Workload| w.name.as_ref() == "third";
        let load = |w: &Workload| if w.name.as_ref() == "busy" { 100 } else { 0 };
        let b = Balancer {
            load: &load,
            balance: &crate::traffic::Balance::LeastRequest,
            hash: None,
            excluded: &third_out,
            turn: &turn,
        };
        for _ in 0..50 {
            assert_eq!(via(&st, &b), "idle");
        }
        let even = |_: &Workload| 0;
        let b = Balancer { load: &even, ..b };
        let seen: std::collections::BTreeSet<String> = (0..200).map(|_| via(&st, &b)).collect();
        assert_eq!(
            seen.len(),
            2,
            "equal loads spread, the excluded never: {seen:?}"
        );
        let all_out = |_: &Workload| true;
        let b = Balancer {
            excluded: &all_out,
            ..b
        };
        assert_eq!(via(&st, &b), "none");
    }

    #[test]
    fn a_waypoint_balances_round_robin_random_or_by_hash() {
        use crate::traffic::{Balance, HashOn};
        let st = three_endpoints();
        let turn = std::sync::atomic::AtomicUsize::new(0);
        let none = |_: &Workload| false;
        let even = |_: &Workload| 0;
        let rr = Balancer {
            load: &even,
            balance: &Balance::RoundRobin,
            hash: None,
            excluded: &none,
            turn: &turn,
        };
        let names: Vec<String> = (0..6).map(|_| via(&st, &rr)).collect();
        assert_eq!(names[..3], names[3..], "a cycle: {names:?}");
        let distinct: std::collections::BTreeSet<_> = names[..3].iter().collect();
        assert_eq!(distinct.len(), 3, "{names:?}");
        let random = Balancer {
            balance: &Balance::Random,
            ..rr
        };
        let seen: std::collections::BTreeSet<String> =
            (0..300).map(|_| via(&st, &random)).collect();
        assert_eq!(seen.len(), 3);
        // The same key, the same endpoint; keys spread.
        let hashed = |key| Balancer {
            balance: &Balance::Hash(HashOn::SourceIp),
            hash: Some(key),
            ..random
        };
        let mut spread = std::collections::BTreeSet::new();
        for key in 0..60u64 {
            let first = via(&st, &hashed(key));
            for _ in 0..5 {
                assert_eq!(via(&st, &hashed(key)), first);
            }
            spread.insert(first);
        }
        assert_eq!(spread.len(), 3);
    }
}
