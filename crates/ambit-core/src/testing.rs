//! Builders for unit tests of the crates that read discovery state (feature `testing`).

use std::sync::Arc;

use crate::discovery::*;

pub fn s(v: &str) -> Str {
    v.into()
}

pub fn workload(
    name: &str,
    ip: &str,
    node: &str,
    zone: &str,
    tunnel: TunnelProtocol,
    services: &[(&str, u16, u16)],
) -> Workload {
    Workload {
        uid: s(name),
        name: s(name),
        workload_name: s(name),
        node: s(node),
        addresses: vec![ip.parse().expect("a test address")].into(),
        tunnel,
        status: Health::Healthy,
        native_tunnel: false,
        locality: Some(Arc::new(Locality {
            region: s("r"),
            zone: s(zone),
            subzone: s(""),
        })),
        waypoint: None,
        profile: Arc::new(WorkloadProfile {
            namespace: s("demo"),
            network: s(""),
            trust_domain: s("cluster.local"),
            service_account: s("sa"),
            canonical_name: s(name),
            canonical_revision: s("v1"),
            cluster_id: s("Kubernetes"),
            workload_type: WorkloadType::Pod,
            network_mode: NetworkMode::Standard,
            services: services
                .iter()
                .map(|(k, sp, tp)| {
                    (
                        s(k),
                        vec![PortMapping {
                            service_port: *sp,
                            target_port: *tp,
                        }]
                        .into(),
                    )
                })
                .collect(),
            authorization_policies: Box::new([]),
        }),
    }
}
