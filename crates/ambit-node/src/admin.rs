//! The node proxy's admin port (localhost:15000 by default): `/config_dump` and friends.

use std::sync::Arc;

use ambit_admin::{Handler, Page};
use ambit_core::state::Store;
use ambit_tls::CertManager;
use http::StatusCode;
use serde::Serialize;
use tokio::sync::watch;

use crate::xds::XdsState;

/// What `/config_dump` returns.
#[derive(Debug, Serialize)]
pub struct ConfigDump {
    pub node: String,
    pub xds: XdsState,
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
        workloads,
        services,
        policies,
        certificates: certificates.map(CertManager::status).unwrap_or_default(),
    }
}

/// The admin pages.
pub fn handler(
    node: String,
    store: Arc<Store>,
    xds: watch::Receiver<XdsState>,
    certificates: Option<CertManager>,
) -> Handler {
    Arc::new(move |path: &str| {
        Some(match path {
            "/config_dump" => {
                let xds = xds.borrow().clone();
                Page::json(&config_dump(&node, &store, &xds, certificates.as_ref()))
            }
            "/debug/xds" => Page::json(&*xds.borrow()),
            "/" => Page::text(
                StatusCode::OK,
                "ambit node proxy admin: /config_dump /debug/xds\n",
            ),
            _ => return None,
        })
    })
}
