//! Istio's CSR API (`istio.v1.auth.IstioCertificateService/CreateCertificate`) served by
//! the control plane.
//!
//! Each request goes through, in order: authentication of the bearer token
//! (UNAUTHENTICATED), the identity rule of [`crate::auth::authorize_identity`]
//! (PERMISSION_DENIED, or INVALID_ARGUMENT for a malformed identity), then the CSR checks
//! (INVALID_ARGUMENT). Every issuance and refusal is logged without secrets and counted.

use std::sync::Arc;
use std::time::Duration;

use ambit_proto::ca::istio_certificate_service_server::IstioCertificateService;
use ambit_proto::ca::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse};
use ambit_proto::prost_types::value::Kind as ValueKind;
use ambit_tls::{CertificateAuthority, SignError};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Refusal, authorize_identity, bearer_token};
use crate::metrics::Metrics;
use crate::model::Model;

/// The certificate service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    model: watch::Receiver<Arc<Model>>,
    metrics: Arc<Metrics>,
    log_limit: crate::loglimit::LogLimit,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        model: watch::Receiver<Arc<Model>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ca,
            authenticator,
            model,
            metrics,
            log_limit: Default::default(),
        }
    }

    fn refuse(
        &self,
        result: &'static str,
        status: Status,
        peer: &str,
        node: Option<&str>,
    ) -> Status {
        self.metrics.ca_request(result);
        if let Some(suppressed) = self.log_limit.admit() {
            tracing::warn!(
                peer,
                node = node.unwrap_or(""),
                code = ?status.code(),
                reason = status.message(),
                suppressed,
                "certificate request refused"
            );
        }
        status
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = crate::server::caller(&request);

        let caller = match bearer_token(&request) {
            Ok(token) => self.authenticator.authenticate(token).await,
            Err(e) => Err(e),
        };
        let caller = caller.map_err(|e| {
            self.refuse(
                "unauthenticated",
                Status::unauthenticated(e.to_string()),
                &peer,
                None,
            )
        })?;
        let node = caller.node.as_deref();

        let body = request.into_inner();
        let impersonate = match body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        {
            None => None,
            Some(value) => match &value.kind {
                Some(ValueKind::StringValue(s)) => Some(s.as_str()),
                _ => {
                    return Err(self.refuse(
                        "invalid_argument",
                        Status::invalid_argument("ImpersonatedIdentity must be a string"),
                        &peer,
                        node,
                    ));
                }
            },
        };
        let identity = {
            let model = self.model.borrow();
            authorize_identity(
                &caller,
                impersonate,
                &model,
                &self.ca.options().trust_domain,
            )
        };
        let identity = identity.map_err(|refusal| match refusal {
            Refusal::Denied(m) => self.refuse(
                "permission_denied",
                Status::permission_denied(m),
                &peer,
                node,
            ),
            Refusal::Invalid(m) => {
                self.refuse("invalid_argument", Status::invalid_argument(m), &peer, node)
            }
        })?;

        let requested = match body.validity_duration {
            d if d < 0 => {
                return Err(self.refuse(
                    "invalid_argument",
                    Status::invalid_argument("validity_duration must not be negative"),
                    &peer,
                    node,
                ));
            }
            0 => None,
            d => Some(Duration::from_secs(d as u64)),
        };
        let issued = self
            .ca
            .sign_csr(body.csr.as_bytes(), &identity, requested)
            .map_err(|e| match e {
                SignError::Csr(e) => self.refuse(
                    "invalid_argument",
                    Status::invalid_argument(e.to_string()),
                    &peer,
                    node,
                ),
                SignError::TrustDomain { .. } => self.refuse(
                    "permission_denied",
                    Status::permission_denied(e.to_string()),
                    &peer,
                    node,
                ),
                SignError::Sign(_) | SignError::Key(_) => {
                    self.refuse("internal", Status::internal(e.to_string()), &peer, node)
                }
            })?;
        self.metrics.ca_request("issued");
        tracing::info!(
            peer,
            node = node.unwrap_or(""),
            method = caller.method,
            identity = %identity,
            serial = %issued.serial,
            not_after = %humantime::format_rfc3339_seconds(issued.not_after),
            "certificate issued"
        );
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.chain_pem,
        }))
    }
}
