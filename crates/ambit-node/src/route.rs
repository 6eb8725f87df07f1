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

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_core::discovery::{
    Health, LoadBalancingMode, LocalityScope, Service, TunnelProtocol, Workload,
};
use ambit_core::state::State;

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
}

/// Decides where a connection from `source` to `original` goes.
pub fn route(
    state: &State,
    network: &str,
    source: Option<&Workload>,
    original: SocketAddr,
    hbone_port: u16,
) -> Route {
    if let Some(service) = state.service_by_vip(network, original.ip()) {
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
        let Some((workload, target_port)) = pick(service, source, &candidates) else {
            return Route::NoEndpoint {
                service: service.clone(),
            };
        };
        let target = SocketAddr::new(workload.addresses[0], target_port);
        return to_workload(workload.clone(), Some(service.clone()), target, hbone_port);
    }
    if let Some(workload) = state.workload_by_ip(network, original.ip()) {
        return to_workload(workload.clone(), None, original, hbone_port);
    }
    Route::Direct {
        workload: None,
        service: None,
        target: original,
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
        return Some(candidates[fastrand::usize(..candidates.len())]);
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
    Some(candidates[top[fastrand::usize(..top.len())]])
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ambit_core::discovery::*;

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
}
