//! The gRPC client of Istio's CSR API (`istio.v1.auth.IstioCertificateService`), the
//! [`CertificateProvider`] a node proxy's certificate manager uses.
//!
//! It connects over TLS 1.3 to the control plane, trusting only the mesh root, and
//! authenticates every call with `authorization: Bearer <token>`. A node proxy asks for a
//! workload's identity by putting it in the request metadata as `ImpersonatedIdentity`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_proto::ca::{
    IMPERSONATED_IDENTITY, IstioCertificateRequest,
    istio_certificate_service_client::IstioCertificateServiceClient,
};
use ambit_proto::prost_types::{Struct, Value, value::Kind};
use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::bundle::TrustBundle;
use crate::config::client_config_with_bundle;
use crate::manager::{CertificateProvider, FetchError};

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A fixed token.
    Static(String),
    /// A file read on every request, so a rotated token is picked up without restart.
    File(PathBuf),
    /// No `authorization` metadata at all (to check that a server refuses such calls).
    None,
}

impl TokenSource {
    /// The current token (`None`: send no `authorization` metadata). A file is read off
    /// the async threads (the blocking pool).
    pub async fn token(&self) -> Result<Option<String>, FetchError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| {
                    FetchError::Local(format!("cannot read token file {}: {e}", path.display()))
                }),
        }
    }
}

impl TokenSource {
    /// Puts `authorization: Bearer <token>` on a request.
    pub async fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), tonic::Status> {
        let token = self
            .token()
            .await
            .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                tonic::Status::unauthenticated("the token holds characters not allowed in a header")
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(())
    }
}

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid CA address {0:?}: use host:port")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] crate::config::ConfigError),
}

/// A client of the control plane's certificate service.
#[derive(Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    token: TokenSource,
    timeout: Duration,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient").finish_non_exhaustive()
    }
}

/// A gRPC channel to the control plane at `address` (`host:port`), over TLS 1.3 trusting
/// only the bundle's anchors (as they are at each handshake), checking the server certificate against `server_name` (default: the host
/// part of `address`). Connects lazily and reconnects on demand; HTTP/2 keep-alive PINGs
/// detect a dead connection under a long-lived stream.
pub fn control_plane_channel(
    address: &str,
    roots: &TrustBundle,
    server_name: Option<&str>,
    connect_timeout: Duration,
) -> Result<Channel, ClientError> {
    let uri: Uri = format!("http://{address}")
        .parse()
        .map_err(|_| ClientError::Address(address.to_owned()))?;
    let host = uri
        .host()
        .ok_or_else(|| ClientError::Address(address.to_owned()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if uri.port_u16().is_none() {
        return Err(ClientError::Address(address.to_owned()));
    }
    let name = ServerName::try_from(server_name.unwrap_or(&host).to_owned())
        .map_err(|_| ClientError::Address(address.to_owned()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config_with_bundle(roots)?));
    let endpoint = Endpoint::from(uri)
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        let name = name.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

impl CaClient {
    /// A client for the CA at `address` (`host:port`), trusting the bundle, checking the
    /// server certificate against `server_name` (default: the host part of `address`).
    /// Connects lazily: the first request opens the connection, so the control plane may
    /// start later than the caller. Each request must finish within `timeout`.
    pub fn new(
        address: &str,
        roots: &TrustBundle,
        server_name: Option<&str>,
        token: TokenSource,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let channel = control_plane_channel(address, roots, server_name, timeout)?;
        Ok(Self {
            client: IstioCertificateServiceClient::new(channel),
            token,
            timeout,
        })
    }

    /// Sends one CSR; `impersonate` asks for that identity (node proxies always set it).
    pub async fn create_certificate_raw(
        &self,
        csr_pem: &str,
        ttl: Duration,
        impersonate: Option<&SpiffeId>,
    ) -> Result<Vec<String>, tonic::Status> {
        let mut metadata = Struct::default();
        if let Some(id) = impersonate {
            metadata.fields.insert(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            );
        }
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: ttl.as_secs().min(i64::MAX as u64) as i64,
            metadata: Some(metadata),
        });
        request.set_timeout(self.timeout);
        self.token.authorize(&mut request).await?;
        let response = self.client.clone().create_certificate(request).await?;
        Ok(response.into_inner().cert_chain)
    }
}

#[async_trait]
impl CertificateProvider for CaClient {
    async fn create_certificate(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, FetchError> {
        self.create_certificate_raw(csr_pem, ttl, Some(identity))
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                    FetchError::Unavailable(format!("{}: {}", status.code(), status.message()))
                }
                code => FetchError::Refused(format!("{code}: {}", status.message())),
            })
    }
}
