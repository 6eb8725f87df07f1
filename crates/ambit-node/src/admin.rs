//! The node proxy's admin port (localhost:15000 by default): `/config_dump` and friends.

use std::sync::Arc;

use ambit_admin::{Handler, Page};
use ambit_core::state::Store;
use ambit_tls::CertManager;
use http::StatusCode;
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::pods::{PodStatus, Pods};
use crate::zds::ZdsState;
use ambit_xds::XdsState;

/// What `/config_dump` returns.
#[derive(Debug, Serialize)]
pub struct ConfigDump {
    pub node: String,
    pub xds: XdsState,
    /// Pods this node proxy serves.
    pub pods: Vec<PodStatus>,
    pub workloads: Vec<Arc<ambit_core::discovery::Workload>>,
    pub services: Vec<ServiceDump>,
    pub policies: Vec<Arc<ambit_core::policy::Authorization>>,
    pub certificates: Vec<ambit_tls::manager::CertStatus>,
}

/// A service with the workloads that back it.
#[derive(Debug, Serialize)]
pub struct ServiceDump {
    #[serde(flatten)]
    pub service: Arc<ambit_core::discovery::Service>,
    pub endpoints: Vec<String>,
}

/// Builds the dump from the current state.
pub fn config_dump(
    node: &str,
    store: &Store,
    xds: &XdsState,
    certificates: Option<&CertManager>,
    pods: Option<&Pods>,
) -> ConfigDump {
    let state = store.load();
    let mut workloads: Vec<_> = state.workloads().cloned().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<ServiceDump> = state
        .services()
        .map(|s| {
            let mut endpoints: Vec<String> = state
                .endpoints(&s.key())
                .map(|w| w.uid.to_string())
                .collect();
            endpoints.sort();
            ServiceDump {
                service: s.clone(),
                endpoints,
            }
        })
        .collect();
    services.sort_by_key(|s| s.service.key());
    let mut policies: Vec<_> = state.policies().cloned().collect();
    policies.sort_by_key(|p| p.key());
    ConfigDump {
        node: node.to_owned(),
        xds: xds.clone(),
        pods: pods.map(Pods::status).unwrap_or_default(),
        workloads,
        services,
        policies,
        certificates: certificates.map(CertManager::status).unwrap_or_default(),
    }
}

/// What the admin pages read.
pub struct Sources {
    pub node: String,
    pub store: Arc<Store>,
    pub xds: watch::Receiver<XdsState>,
    pub certificates: Option<CertManager>,
    pub pods: Arc<Pods>,
    pub zds: Option<watch::Receiver<ZdsState>>,
}

/// The admin pages.
pub fn handler(s: Sources) -> Handler {
    Arc::new(move |path: &str| {
        Some(match path {
            "/config_dump" => {
                let xds = s.xds.borrow().clone();
                Page::json(&config_dump(
                    &s.node,
                    &s.store,
                    &xds,
                    s.certificates.as_ref(),
                    Some(&s.pods),
                ))
            }
            "/debug/xds" => Page::json(&*s.xds.borrow()),
            "/debug/pods" => Page::json(&s.pods.status()),
            "/debug/zds" => match &s.zds {
                Some(z) => Page::json(&*z.borrow()),
                None => Page::text(StatusCode::OK, "no node agent configured (--pod only)\n"),
            },
            "/" => Page::text(
                StatusCode::OK,
                "ambit node proxy admin: /config_dump /debug/xds /debug/pods /debug/zds\n",
            ),
            _ => return None,
        })
    })
}

/// The metrics port.
pub fn metrics_handler(metrics: Arc<Metrics>) -> Handler {
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

/// The readiness port: ready once discovery has synced, the node agent's snapshot (if a
/// node agent is configured) has been applied, and every served pod has its
/// certificate.
pub fn readiness_handler(
    xds: watch::Receiver<XdsState>,
    zds: Option<watch::Receiver<ZdsState>>,
    pods: Arc<Pods>,
) -> Handler {
    Arc::new(move |path: &str| {
        if path != "/healthz/ready" {
            return None;
        }
        let synced = xds.borrow().synced;
        let snapshot = zds.as_ref().is_none_or(|z| z.borrow().snapshot_applied);
        let certified = pods.all_certified();
        Some(if synced && snapshot && certified {
            Page::text(StatusCode::OK, "ready\n")
        } else {
            let mut why = Vec::new();
            if !synced {
                why.push("discovery has not synced");
            }
            if !snapshot {
                why.push("no snapshot from the node agent yet");
            }
            if !certified {
                why.push("a pod is waiting for its certificate");
            }
            Page::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join("; ")),
            )
        })
    })
}
