//! The certificate service over real TLS and gRPC, against a control plane running in
//! this process on loopback.

#![allow(clippy::unwrap_used)] // test helpers: a failure should stop the test

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambit_control::auth::TokenSigner;
use ambit_control::{Config, ControlPlane};
use ambit_core::SpiffeId;
use ambit_tls::client::{CaClient, TokenSource};
use ambit_tls::csr::{build_csr, generate_key};
use ambit_tls::manager::{CertManager, ManagerOptions};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::Code;

const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: sleep}
status: {podIP: 198.18.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo}
spec: {nodeName: node-b, serviceAccountName: echo}
status: {podIP: 198.18.0.6}
";

struct Env {
    cp: ControlPlane,
    dir: tempfile::TempDir,
    roots: Vec<CertificateDer<'static>>,
    signer: TokenSigner,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("pods.yaml"), PODS).unwrap();
        let mut config = Config::new(&manifests, dir.path().join("state"));
        config.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.monitoring_addr = "127.0.0.1:0".parse().unwrap();
        let cp = ControlPlane::start(config).await.unwrap();
        let roots = CertificateDer::pem_slice_iter(cp.roots_pem().as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let signer = TokenSigner::load_or_create(&dir.path().join("state")).unwrap();
        Env {
            cp,
            dir,
            roots,
            signer,
        }
    }

    fn client(&self, token: TokenSource) -> CaClient {
        CaClient::new(
            &self.cp.grpc_addr().to_string(),
            &ambit_tls::spiffe::TrustBundle::new(&self.roots).unwrap(),
            Some("localhost"),
            token,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn node(&self, node: &str) -> CaClient {
        self.client(TokenSource::Static(
            self.signer.mint(node, Duration::from_secs(600)).unwrap(),
        ))
    }

    fn manifests(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    async fn metrics(&self) -> String {
        http_get(self.cp.monitoring_addr(), "/metrics").await
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn sleep_id() -> SpiffeId {
    id("spiffe://cluster.local/ns/demo/sa/sleep")
}

fn csr() -> String {
    build_csr(&generate_key().unwrap(), &sleep_id()).unwrap()
}

fn pem_certs(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_node_gets_a_valid_chain_for_a_pod_on_it() {
    let env = Env::start().await;
    let chain = env
        .node("node-a")
        .create_certificate_raw(&csr(), Duration::from_secs(3600), Some(&sleep_id()))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf then root");
    let certs = pem_certs(&chain);
    assert_eq!(certs[1], env.roots[0], "the root is last");
    ambit_tls::x509::verify_leaf(&certs[0], &[], &env.roots, SystemTime::now()).unwrap();
    let info = ambit_tls::x509::inspect(&certs[0]).unwrap();
    assert_eq!(info.uris, [sleep_id().to_string()]);
    let life = info.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life <= Duration::from_secs(3600), "{life:?}");

    let metrics = env.metrics().await;
    assert!(
        metrics.contains("ambit_ca_requests_total{result=\"issued\"} 1"),
        "{metrics}"
    );
    env.cp.shutdown().await;
}

#[tokio::test]
async fn refusals_carry_the_right_code() {
    let env = Env::start().await;
    let ttl = Duration::from_secs(3600);
    let code = |r: Result<Vec<String>, tonic::Status>| match r {
        Ok(_) => panic!("expected a refusal"),
        Err(s) => (s.code(), s.message().to_owned()),
    };

    // No token, a garbage token, a token from another control plane, an expired token.
    let (c, m) = code(
        env.client(TokenSource::None)
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::Unauthenticated, "{m}");
    assert!(m.contains("Bearer"), "{m}");
    let (c, _) = code(
        env.client(TokenSource::Static("x.y.z".into()))
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    let other = tempfile::tempdir().unwrap();
    let foreign = TokenSigner::load_or_create(other.path())
        .unwrap()
        .mint("node-a", Duration::from_secs(60))
        .unwrap();
    let (c, _) = code(
        env.client(TokenSource::Static(foreign))
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    let short = env.signer.mint("node-a", Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (c, m) = code(
        env.client(TokenSource::Static(short))
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    assert!(m.contains("expired"), "{m}");

    // Identity not on the caller's node; no impersonation; another trust domain.
    let node_b = env.node("node-b");
    let (c, m) = code(
        node_b
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("node-b"), "{m}");
    let (c, _) = code(
        env.node("node-a")
            .create_certificate_raw(&csr(), ttl, None)
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    let (c, _) = code(
        env.node("node-a")
            .create_certificate_raw(&csr(), ttl, Some(&id("spiffe://other.td/ns/demo/sa/sleep")))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);

    // Malformed CSR, bad signature, wrong key type.
    let node_a = env.node("node-a");
    let (c, _) = code(
        node_a
            .create_certificate_raw("not a csr", ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    let good = csr();
    let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let n = der.len();
    der[n - 1] ^= 1;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let (c, m) = code(
        node_a
            .create_certificate_raw(&tampered, ttl, Some(&sleep_id()))
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("signature"), "{m}");
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let (c, m) = code(
        node_a
            .create_certificate_raw(
                &build_csr(&p384, &sleep_id()).unwrap(),
                ttl,
                Some(&sleep_id()),
            )
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("P-256"), "{m}");

    let metrics = env.metrics().await;
    for (result, n) in [
        ("unauthenticated", 4),
        ("permission_denied", 3),
        ("invalid_argument", 3),
        ("issued", 0),
    ] {
        let line = format!("ambit_ca_requests_total{{result=\"{result}\"}} {n}");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    env.cp.shutdown().await;
}

#[tokio::test]
async fn a_manifest_edit_changes_who_may_obtain_an_identity_within_a_second() {
    let env = Env::start().await;
    let (a, b) = (env.node("node-a"), env.node("node-b"));
    let ttl = Duration::from_secs(600);
    a.create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
        .await
        .unwrap();
    assert!(
        b.create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await
            .is_err()
    );

    // The sleep pod moves from node-a to node-b.
    std::fs::write(
        env.manifests().join("pods.yaml"),
        PODS.replacen("node-a", "node-b", 1),
    )
    .unwrap();
    let start = Instant::now();
    loop {
        let b_ok = b
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await
            .is_ok();
        let a_ok = a
            .create_certificate_raw(&csr(), ttl, Some(&sleep_id()))
            .await
            .is_ok();
        if b_ok && !a_ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "not in effect after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.cp.shutdown().await;
}

#[tokio::test]
async fn the_certificate_manager_works_against_the_real_service() {
    let env = Env::start().await;
    let manager = CertManager::new(
        Arc::new(env.node("node-a")),
        ManagerOptions {
            trust_bundle: Some(ambit_tls::spiffe::TrustBundle::new(&env.roots).unwrap()),
            ..ManagerOptions::default()
        },
    );
    let cert = manager.fetch(&sleep_id()).await.unwrap();
    assert_eq!(cert.identity, sleep_id());
    assert_eq!(cert.roots, env.roots);
    // Asking for an identity the node does not run fails with the server's reason.
    let err = manager
        .fetch(&id("spiffe://cluster.local/ns/demo/sa/echo"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("PermissionDenied") || err.to_string().contains("permission"),
        "{err}"
    );
    env.cp.shutdown().await;
}

#[tokio::test]
async fn the_monitoring_port_serves_readiness_and_debug_pages() {
    let env = Env::start().await;
    let ready = http_get(env.cp.monitoring_addr(), "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let config = http_get(env.cp.monitoring_addr(), "/debug/config").await;
    assert!(config.contains("\"Pod\": 2"), "{config}");
    let ca = http_get(env.cp.monitoring_addr(), "/debug/ca").await;
    assert!(ca.contains("SelfSigned") && !ca.contains("PRIVATE"), "{ca}");
    let missing = http_get(env.cp.monitoring_addr(), "/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("ambit_config_objects{kind=\"Pod\"} 2"),
        "{metrics}"
    );
    env.cp.shutdown().await;
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let env = Env::start().await;
    // Speak HTTP/2 prior knowledge without TLS: the server answers with a TLS alert or
    // closes, and never serves the request.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(env.cp.grpc_addr())
        .await
        .unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/2"), "{buf:?}");
    assert!(buf.len() < 16, "only an alert at most: {buf:?}");
    env.cp.shutdown().await;
}
