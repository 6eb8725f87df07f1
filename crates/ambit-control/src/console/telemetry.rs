//! `ambit.telemetry.v1.Telemetry/Report`: node proxies and waypoints send their metrics
//! and certificates here for the console. Callers authenticate as for discovery, and
//! report only under their own name: a node's token for that node; a waypoint's
//! identity for a waypoint of its namespace (a node token may report a waypoint that
//! runs on its node, as in the one-machine mesh).

use std::sync::Arc;

use ambit_proto::telemetry::telemetry_server::Telemetry;
use ambit_proto::telemetry::{TelemetryAck, TelemetryReport};
use tonic::{Request, Response, Status};

use super::{Console, REPORT_EVERY};
use crate::auth::{Authenticator, bearer_token};

/// The largest report accepted (a node with thousands of edges stays well under it).
pub const MAX_REPORT_BYTES: usize = 8 * 1024 * 1024;

pub struct TelemetryService {
    console: Arc<Console>,
    authenticator: Arc<dyn Authenticator>,
}

impl TelemetryService {
    pub fn new(console: Arc<Console>, authenticator: Arc<dyn Authenticator>) -> Self {
        Self {
            console,
            authenticator,
        }
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn report(
        &self,
        request: Request<TelemetryReport>,
    ) -> Result<Response<TelemetryAck>, Status> {
        let token = bearer_token(&request).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let caller = self
            .authenticator
            .authenticate(token)
            .await
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let report = request.into_inner();
        let allowed = match report.component.as_str() {
            "node" => caller.node.as_deref() == Some(report.name.as_str()),
            "waypoint" => {
                let ns = report.name.split_once('/').map(|(ns, _)| ns);
                caller.node.is_some()
                    || caller
                        .identity
                        .as_ref()
                        .is_some_and(|id| Some(id.namespace()) == ns)
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "component {other:?} is neither node nor waypoint"
                )));
            }
        };
        if !allowed {
            return Err(Status::permission_denied(format!(
                "this credential may not report as {} {}",
                report.component, report.name
            )));
        }
        self.console
            .ingest(report)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(TelemetryAck {
            next_in_ms: REPORT_EVERY.as_millis() as u64,
        }))
    }
}
