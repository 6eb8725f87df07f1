//! The control plane's gRPC port: TLS 1.3 with the control plane's own certificate,
//! HTTP/2, the certificate service (and, with discovery, the xDS service).
//!
//! TLS handshakes run in their own tasks with a deadline, so a slow or silent client
//! cannot hold up others; the number of connections being handshaken is capped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_tls::ca::ServerNames;
use ambit_tls::config::{ReloadableCert, certified_key};
use ambit_tls::{CertificateAuthority, SignError};
use rustls::pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// Lifetime of the control plane's serving certificate; renewed at half of it.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// A client must finish its TLS handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes in progress at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Issues the control plane's serving certificate: its SPIFFE identity plus DNS names and
/// IPs clients may use to reach it.
pub fn issue_serving_cert(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<Arc<rustls::sign::CertifiedKey>, SignError> {
    let key = ambit_tls::csr::generate_key().map_err(SignError::Sign)?;
    let issued = ca.issue(
        &key,
        &ServerNames {
            identity: Some(identity.clone()),
            dns: dns.to_vec(),
            ips: ips.to_vec(),
        },
        SERVING_CERT_TTL,
    )?;
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(ca.intermediates());
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    certified_key(chain, der).map_err(|e| SignError::Key(e.to_string()))
}

/// Renews the serving certificate at half its life until `stop` fires.
pub async fn renew_serving_cert(
    ca: Arc<CertificateAuthority>,
    identity: SpiffeId,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    cert: Arc<ReloadableCert>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SERVING_CERT_TTL / 2) => {}
            _ = stop.changed() => return,
        }
        match issue_serving_cert(&ca, &identity, &dns, &ips) {
            Ok(key) => {
                cert.set(key);
                tracing::info!("control plane serving certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the serving certificate; the current one stays")
            }
        }
    }
}

/// A client connection after its TLS handshake. It tells the gRPC server the TCP peer's
/// address, so every request handler can name its caller (`Request::remote_addr`).
pub struct ClientConn {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
}

impl tonic::transport::server::Connected for ClientConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

impl tokio::io::AsyncRead for ClientConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ClientConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The caller's address as the gRPC server knows it, for logs.
pub fn caller<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

/// Accepts TCP connections, runs TLS handshakes concurrently with a deadline, and yields
/// the established streams to the gRPC server.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<ClientConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.changed() => return,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(ClientConn { tls, peer, local })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The addresses to put into the serving certificate for a listen address.
pub fn serving_ips(listen: SocketAddr) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    ips
}
