//! The telemetry reporter: every few seconds (as the control plane asks), a node proxy or
//! waypoint sends its metrics and the certificates it holds to the control plane's mesh
//! console (`ambit.telemetry.v1.Telemetry/Report`), on the same kind of channel and with
//! the same token as discovery. Reporting never affects the data path: a failure is
//! logged (once per kind of failure, then at debug) and the next report tries again.

use std::sync::Arc;
use std::time::Duration;

use ambit_proto::telemetry::telemetry_client::TelemetryClient;
use ambit_proto::telemetry::{CertificateInfo, TelemetryReport, TracedRequest};
use tokio::sync::watch;

use crate::client::XdsConfig;

/// What a reporter sends: its metrics text and certificates, read at each report.
pub struct Source {
    /// `node` or `waypoint`.
    pub component: &'static str,
    /// The node's name, or `<namespace>/<name>` of the waypoint.
    pub name: String,
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub certificates: Arc<dyn Fn() -> Vec<CertificateInfo> + Send + Sync>,
    /// Recent traced requests (waypoints); `None` for none.
    pub traces: Option<Arc<dyn Fn() -> Vec<TracedRequest> + Send + Sync>>,
}

/// The first report waits this long (the proxy has started and has something to say).
const FIRST: Duration = Duration::from_secs(1);
const DEFAULT_EVERY: Duration = Duration::from_secs(5);

/// Reports until `stop`.
pub async fn report(config: XdsConfig, source: Source, mut stop: watch::Receiver<bool>) {
    let channel = match ambit_tls::client::control_plane_channel(
        &config.address,
        &config.roots,
        config.server_name.as_deref(),
        Duration::from_secs(5),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "telemetry reports are off: the control plane's address cannot be used");
            return;
        }
    };
    let mut client = TelemetryClient::new(channel).max_encoding_message_size(8 * 1024 * 1024);
    let mut wait = FIRST;
    let mut last_failure: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let body = TelemetryReport {
            component: source.component.to_owned(),
            name: source.name.clone(),
            metrics: (source.metrics)(),
            certificates: (source.certificates)(),
            traces: source.traces.as_ref().map(|t| t()).unwrap_or_default(),
        };
        let mut request = tonic::Request::new(body);
        request.set_timeout(Duration::from_secs(5));
        if let Err(e) = config.token.authorize(&mut request).await {
            wait = DEFAULT_EVERY;
            note(&mut last_failure, format!("no token: {e}"));
            continue;
        }
        match client.report(request).await {
            Ok(ack) => {
                if last_failure.take().is_some() {
                    tracing::info!("telemetry reports reach the control plane again");
                }
                let asked = Duration::from_millis(ack.into_inner().next_in_ms);
                wait = if asked.is_zero() {
                    DEFAULT_EVERY
                } else {
                    asked.clamp(Duration::from_secs(1), Duration::from_secs(60))
                };
            }
            Err(status) => {
                wait = DEFAULT_EVERY;
                note(
                    &mut last_failure,
                    format!("{:?}: {}", status.code(), status.message()),
                );
            }
        }
    }
}

/// Logs a failure at warn the first time it happens, at debug while it repeats.
fn note(last: &mut Option<String>, failure: String) {
    if last.as_deref() == Some(failure.as_str()) {
        tracing::debug!(error = %failure, "telemetry report failed again");
    } else {
        tracing::warn!(error = %failure, "telemetry report to the control plane failed; the console will miss this proxy until it works");
        *last = Some(failure);
    }
}

/// The certificates a manager holds, for a report.
pub fn cert_infos(certs: &ambit_tls::CertManager) -> Vec<CertificateInfo> {
    certs
        .status()
        .into_iter()
        .filter_map(|c| {
            Some(CertificateInfo {
                identity: c.identity,
                serial: c.serial?,
                not_after: c.not_after.unwrap_or_default(),
            })
        })
        .collect()
}
