//! A discovery relay between a node proxy and the control plane that withholds one
//! resource type: it forwards every request upstream and every response downstream,
//! except responses of the withheld type, which it acknowledges upstream itself. The node
//! proxy then holds a half-synced view (for example workloads without their policies),
//! the state a slow or partial sync leaves it in.
//!
//! It serves TLS with a certificate from the mesh CA for `localhost`, as the control
//! plane does, and passes each stream's credentials through unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_control::server::{issue_serving_cert, tls_incoming};
use ambit_core::SpiffeId;
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_tls::spiffe::TrustBundle;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// A running relay; stops when dropped.
pub struct XdsFilter {
    pub addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

impl XdsFilter {
    /// Relays to the control plane at `upstream`, withholding `withheld` (a type URL).
    /// `state_dir` is the control plane's state folder (its CA signs the relay's
    /// certificate).
    pub async fn start(
        upstream: SocketAddr,
        state_dir: &std::path::Path,
        roots: TrustBundle,
        withheld: &str,
    ) -> XdsFilter {
        let pki = ambit_tls::testing::TestPki::load(&state_dir.join("ca"));
        let id = SpiffeId::new("cluster.local", "istio-system", "relay").unwrap();
        let cert = issue_serving_cert(
            &pki.ca,
            &id,
            &["localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        let tls = ambit_tls::config::server_config_without_client_auth(Arc::new(
            ambit_tls::testing::FixedCert(cert),
        ))
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let channel = ambit_tls::client::control_plane_channel(
            &upstream.to_string(),
            &roots,
            Some("localhost"),
            Duration::from_secs(5),
        )
        .unwrap();
        let service = Relay {
            channel,
            withheld: withheld.to_owned(),
        };
        let incoming = tls_incoming(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            stop_rx.clone(),
        );
        let mut shutdown = stop_rx;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown.changed().await;
                }),
        );
        XdsFilter { addr, _stop: stop }
    }
}

struct Relay {
    channel: tonic::transport::Channel,
    withheld: String,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Relay {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let auth = request.metadata().get("authorization").cloned();
        let mut from_node = request.into_inner();
        let (up_tx, up_rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        let mut up = Request::new(ReceiverStream::new(up_rx));
        if let Some(a) = auth {
            up.metadata_mut().insert("authorization", a);
        }
        let mut from_cp = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .delta_aggregated_resources(up)
            .await?
            .into_inner();
        let (down_tx, down_rx) = mpsc::channel(64);
        let requests = up_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = from_node.message().await {
                if requests.send(r).await.is_err() {
                    return;
                }
            }
        });
        let withheld = self.withheld.clone();
        tokio::spawn(async move {
            loop {
                let r = match from_cp.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = down_tx.send(Err(status)).await;
                        return;
                    }
                };
                if r.type_url == withheld {
                    let ack = DeltaDiscoveryRequest {
                        type_url: r.type_url,
                        response_nonce: r.nonce,
                        ..Default::default()
                    };
                    if up_tx.send(ack).await.is_err() {
                        return;
                    }
                    continue;
                }
                if down_tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(down_rx)))
    }
}
