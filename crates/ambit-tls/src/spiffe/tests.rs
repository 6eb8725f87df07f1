use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::testing::TestPki;

struct Fixed(Arc<CertifiedKey>);

impl std::fmt::Debug for Fixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fixed")
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn mesh_td() -> Vec<String> {
    vec!["cluster.local".to_owned()]
}

/// Runs one handshake over an in-memory pipe; returns what each side saw.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> (Result<SpiffeId, String>, Result<(), String>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let server = async move {
        let mut tls = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let id = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    };
    let client = async move {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut tls = connector
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    tokio::join!(server, client)
}

#[tokio::test]
async fn both_sides_learn_the_right_identity() {
    let pki = TestPki::new();
    let (client_id, server_id) = (TestPki::id("a", "client"), TestPki::id("b", "server"));
    let server = hbone_server_config(
        Arc::new(Fixed(pki.issue(&server_id, Duration::from_secs(3600)))),
        &pki.bundle(),
        &mesh_td(),
    )
    .unwrap();
    let client = hbone_client_config(
        pki.issue(&client_id, Duration::from_secs(3600)),
        &pki.bundle(),
        vec![TestPki::id("x", "waypoint"), server_id],
    )
    .unwrap();
    let (s, c) = handshake(server, client).await;
    c.unwrap();
    assert_eq!(s.unwrap(), client_id);
}

#[tokio::test]
async fn an_unexpected_server_identity_is_refused() {
    let pki = TestPki::new();
    let server = hbone_server_config(
        Arc::new(Fixed(
            pki.issue(&TestPki::id("b", "impostor"), Duration::from_secs(3600)),
        )),
        &pki.bundle(),
        &mesh_td(),
    )
    .unwrap();
    let client = hbone_client_config(
        pki.issue(&TestPki::id("a", "client"), Duration::from_secs(3600)),
        &pki.bundle(),
        vec![TestPki::id("b", "server")],
    )
    .unwrap();
    let (s, c) = handshake(server, client).await;
    let err = c.unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/b/sa/impostor") && err.contains("ns/b/sa/server"),
        "{err}"
    );
    assert!(s.is_err());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = TestPki::new();
    let server_id = TestPki::id("b", "server");
    let server = hbone_server_config(
        Arc::new(Fixed(pki.issue(&server_id, Duration::from_secs(3600)))),
        &pki.bundle(),
        &mesh_td(),
    )
    .unwrap();
    // Trusts the server properly, but has no certificate of its own.
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: pki.bundle(),
        expected: vec![server_id],
        algorithms: provider.signature_verification_algorithms,
    });
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let (s, c) = handshake(server, client).await;
    let err = s.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert!(c.is_err());
}

#[tokio::test]
async fn certificates_from_a_foreign_root_are_refused_both_ways() {
    let (mesh, foreign) = (TestPki::new(), TestPki::new());
    let server_id = TestPki::id("b", "server");
    // A client from another mesh.
    let server = hbone_server_config(
        Arc::new(Fixed(mesh.issue(&server_id, Duration::from_secs(3600)))),
        &mesh.bundle(),
        &mesh_td(),
    )
    .unwrap();
    let client = hbone_client_config(
        foreign.issue(&TestPki::id("a", "client"), Duration::from_secs(3600)),
        &foreign.bundle(),
        vec![server_id.clone()],
    )
    .unwrap();
    let (s, c) = handshake(server, client).await;
    assert!(s.is_err() && c.is_err());
    // A server from another mesh, presenting the expected name.
    let server = hbone_server_config(
        Arc::new(Fixed(foreign.issue(&server_id, Duration::from_secs(3600)))),
        &foreign.bundle(),
        &mesh_td(),
    )
    .unwrap();
    let client = hbone_client_config(
        mesh.issue(&TestPki::id("a", "client"), Duration::from_secs(3600)),
        &mesh.bundle(),
        vec![server_id],
    )
    .unwrap();
    let (_, c) = handshake(server, client).await;
    let err = c.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn a_client_of_another_trust_domain_under_the_same_root_is_refused_at_the_handshake() {
    let pki = TestPki::new();
    let server_id = TestPki::id("b", "server");
    let intruder = SpiffeId::new("other.example", "a", "client").unwrap();
    let attempt = |accepted: Vec<String>| {
        let server = hbone_server_config(
            Arc::new(Fixed(pki.issue(&server_id, Duration::from_secs(3600)))),
            &pki.bundle(),
            &accepted,
        )
        .unwrap();
        let client = hbone_client_config(
            pki.issue(&intruder, Duration::from_secs(3600)),
            &pki.bundle(),
            vec![server_id.clone()],
        )
        .unwrap();
        handshake(server, client)
    };
    let (s, c) = attempt(mesh_td()).await;
    let err = s.unwrap_err();
    assert!(
        err.contains("other.example") && err.contains("does not accept"),
        "{err}"
    );
    assert!(c.is_err());
    // A configured alias is accepted.
    let (s, c) = attempt(vec!["cluster.local".into(), "other.example".into()]).await;
    c.unwrap();
    assert_eq!(s.unwrap(), intruder);
}

#[tokio::test]
async fn the_roots_can_be_rotated_without_new_configurations() {
    let (old, new) = (TestPki::new(), TestPki::new());
    let server_id = TestPki::id("b", "server");
    let bundle = old.bundle();
    // Built once, like a running pod's HBONE server and a pooled client.
    let server = hbone_server_config(
        Arc::new(Fixed(old.issue(&server_id, Duration::from_secs(3600)))),
        &bundle,
        &mesh_td(),
    )
    .unwrap();
    let client_of_new_root = || {
        hbone_client_config(
            new.issue(&TestPki::id("a", "client"), Duration::from_secs(3600)),
            &bundle,
            vec![server_id.clone()],
        )
        .unwrap()
    };
    let (s, _) = handshake(server.clone(), client_of_new_root()).await;
    assert!(s.is_err(), "a root not in the bundle yet");
    // The overlap: both roots trusted, by the same configuration.
    let mut both = old.roots();
    both.extend(new.roots());
    bundle.replace(&both).unwrap();
    let (s, c) = handshake(server.clone(), client_of_new_root()).await;
    c.unwrap();
    s.unwrap();
    // The old root retired: its certificates are refused again.
    bundle.replace(&new.roots()).unwrap();
    let (_, c) = handshake(server, client_of_new_root()).await;
    assert!(c.unwrap_err().contains("UnknownIssuer"));
    assert!(bundle.replace(&[]).is_err(), "an empty bundle is refused");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let pki = TestPki::new();
    let server_id = TestPki::id("b", "server");
    let expiring = pki.issue(&server_id, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let server = hbone_server_config(Arc::new(Fixed(expiring)), &pki.bundle(), &mesh_td()).unwrap();
    let client = hbone_client_config(
        pki.issue(&TestPki::id("a", "client"), Duration::from_secs(3600)),
        &pki.bundle(),
        vec![server_id],
    )
    .unwrap();
    let (_, c) = handshake(server, client).await;
    let err = c.unwrap_err();
    assert!(err.contains("xpired"), "{err}");
}

#[test]
fn spiffe_id_rules() {
    let pki = TestPki::new();
    let key = pki.issue(&TestPki::id("a", "b"), Duration::from_secs(60));
    assert_eq!(spiffe_id_of(&key.cert[0]).unwrap(), TestPki::id("a", "b"));
    // The CA certificate has no SPIFFE ID.
    assert_eq!(
        spiffe_id_of(&pki.roots()[0]),
        Err(PeerIdentityError::NoSpiffeId)
    );
    assert!(matches!(
        spiffe_id_of(&CertificateDer::from(vec![1, 2, 3])),
        Err(PeerIdentityError::Unreadable(_))
    ));
}
