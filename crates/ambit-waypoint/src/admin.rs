//! The waypoint's admin (`/config_dump`), metrics (`/metrics`) and readiness
//! (`/healthz/ready`) pages.

use std::sync::Arc;

use ambit_admin::{Handler, Page};
use ambit_core::discovery::GatewayDestination;
use http::StatusCode;
use serde::Serialize;

use crate::Shared;
use crate::metrics::Metrics;

/// Why the waypoint is not ready; empty when it is.
pub(crate) fn not_ready(shared: &Shared) -> Vec<&'static str> {
    let mut why = Vec::new();
    if !shared.synced.borrow().synced {
        why.push("discovery has not synced");
    }
    if shared.cert.current().is_none() {
        why.push("no certificate yet");
    }
    why
}

pub(crate) fn readiness_handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |path: &str| {
        if path != "/healthz/ready" {
            return None;
        }
        let why = not_ready(&shared);
        Some(if why.is_empty() {
            Page::text(StatusCode::OK, "ready\n")
        } else {
            Page::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join("; ")),
            )
        })
    })
}

pub(crate) fn metrics_handler(metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |path: &str| match path {
        "/metrics" | "/stats/prometheus" => Some(Page {
            headers: Vec::new(),
            status: StatusCode::OK,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: metrics.encode(),
        }),
        _ => None,
    })
}

#[derive(Serialize)]
struct Dump {
    identity: String,
    ready: bool,
    not_ready: Vec<&'static str>,
    discovery: ambit_xds::XdsState,
    /// What this waypoint serves: services (by hostname) and workloads bound to it.
    services: Vec<Bound>,
    workloads: Vec<Bound>,
    pooled_upstreams: usize,
}

#[derive(Serialize)]
struct Bound {
    name: String,
    addresses: Vec<String>,
}

pub(crate) fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |path: &str| {
        if path != "/config_dump" {
            return None;
        }
        let state = shared.store.load();
        let c = &shared.config;
        let mine = |g: &ambit_core::discovery::GatewayAddress| match &g.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                namespace.as_ref() == c.namespace
                    && hostname.starts_with(&format!("{}.{}.", c.name, c.namespace))
            }
            GatewayDestination::Address(_) => false,
        };
        let services = state
            .services()
            .filter(|s| s.waypoint.as_ref().is_some_and(mine))
            .map(|s| Bound {
                name: s.hostname.to_string(),
                addresses: s
                    .vips
                    .iter()
                    .flat_map(|v| {
                        s.ports
                            .iter()
                            .map(move |p| format!("{}:{}", v.address, p.service_port))
                    })
                    .collect(),
            })
            .collect();
        let workloads = state
            .workloads()
            .filter(|w| w.waypoint.as_deref().is_some_and(mine))
            .map(|w| Bound {
                name: format!("{}/{}", w.profile.namespace, w.name),
                addresses: w.addresses.iter().map(ToString::to_string).collect(),
            })
            .collect();
        let why = not_ready(&shared);
        Some(Page::json(&Dump {
            identity: shared.identity.to_string(),
            ready: why.is_empty(),
            not_ready: why,
            discovery: shared.synced.borrow().clone(),
            services,
            workloads,
            pooled_upstreams: shared.upstreams.len(),
        }))
    })
}
