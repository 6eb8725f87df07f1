use std::os::unix::fs::PermissionsExt;

use rcgen::{CertifiedIssuer, KeyPair};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;
use crate::csr::{build_csr, generate_key};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn csr() -> String {
    build_csr(&generate_key().unwrap(), &id("sleep")).unwrap()
}

#[test]
fn creates_a_root_once_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("ca");
    let first = CertificateAuthority::load_or_create(&state, CaOptions::default()).unwrap();
    assert_eq!(first.kind(), CaKind::SelfSigned);
    let mode = fs::metadata(state.join(ROOT_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key file mode");
    let dir_mode = fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700, "state folder mode");

    let second = CertificateAuthority::load_or_create(&state, CaOptions::default()).unwrap();
    assert_eq!(first.roots(), second.roots(), "same root after restart");

    // A leaf from the reloaded CA verifies against the root from the first start.
    let issued = second
        .sign_csr(csr().as_bytes(), &id("sleep"), None)
        .unwrap();
    x509::verify_leaf(&issued.leaf, &[], first.roots(), SystemTime::now()).unwrap();
}

#[test]
fn root_is_a_p256_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    let info = x509::inspect(&ca.roots()[0]).unwrap();
    assert!(info.is_ca && info.can_sign_certs);
    let key = fs::read_to_string(dir.path().join(ROOT_KEY_FILE)).unwrap();
    let key = KeyPair::from_pem(&key).unwrap();
    assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
}

#[test]
fn half_a_root_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::HalfRoot {
                missing: ROOT_KEY_FILE,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupt_key_material_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    let key_path = dir.path().join(ROOT_KEY_FILE);

    fs::write(&key_path, "not a key").unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if path == &key_path),
        "{err}"
    );
    assert!(err.to_string().contains("root-key.pem"), "{err}");

    // A valid key that is not the root's key.
    fs::write(&key_path, generate_key().unwrap().serialize_pem()).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

    // A truncated certificate.
    let cert_path = dir.path().join(ROOT_CERT_FILE);
    let pem = fs::read_to_string(&cert_path).unwrap();
    fs::write(&cert_path, &pem[..pem.len() / 2]).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if path == &cert_path),
        "{err}"
    );
}

#[test]
fn leaf_has_exactly_what_the_mesh_needs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    // A CSR asking for extra names and a CA bit: all of it is ignored.
    let key = generate_key().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();

    let issued = ca
        .sign_csr(
            csr.as_bytes(),
            &id("sleep"),
            Some(Duration::from_secs(3600)),
        )
        .unwrap();
    assert_eq!(issued.chain_pem.len(), 2, "leaf and root");
    assert_eq!(issued.chain_pem[1], ca.roots_pem());

    let (_, cert) = X509Certificate::from_der(&issued.leaf).unwrap();
    assert!(!cert.is_ca());
    let mut sans = Vec::new();
    let mut eku = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert!(ext.critical, "SAN is critical when the subject is empty");
                for name in &san.general_names {
                    sans.push(match name {
                        GeneralName::URI(u) => format!("uri:{u}"),
                        other => format!("{other:?}"),
                    });
                }
            }
            ParsedExtension::ExtendedKeyUsage(e) => eku = Some((e.server_auth, e.client_auth)),
            _ => {}
        }
    }
    assert_eq!(sans, ["uri:spiffe://cluster.local/ns/default/sa/sleep"]);
    assert_eq!(eku, Some((true, true)));
    assert_eq!(cert.subject().iter_attributes().count(), 0, "empty subject");
    // The leaf is over the CSR's key.
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    let life = issued.not_after.duration_since(issued.not_before).unwrap();
    assert!(
        life <= Duration::from_secs(3600) + CLOCK_SKEW_ALLOWANCE,
        "{life:?}"
    );
    x509::verify_leaf(&issued.leaf, &[], ca.roots(), SystemTime::now()).unwrap();
}

#[test]
fn lifetime_is_capped_and_defaulted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(
        dir.path(),
        CaOptions {
            default_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(3600),
            ..CaOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ca.ttl_for(None), Duration::from_secs(600));
    assert_eq!(ca.ttl_for(Some(Duration::ZERO)), Duration::from_secs(600));
    assert_eq!(
        ca.ttl_for(Some(Duration::from_secs(60))),
        Duration::from_secs(60)
    );
    assert_eq!(
        ca.ttl_for(Some(Duration::from_secs(86400 * 365))),
        Duration::from_secs(3600)
    );
    let issued = ca
        .sign_csr(
            csr().as_bytes(),
            &id("sleep"),
            Some(Duration::from_secs(86400 * 365)),
        )
        .unwrap();
    let ahead = issued.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(ahead <= Duration::from_secs(3600), "{ahead:?}");
}

#[test]
fn serials_differ() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    let a = ca.sign_csr(csr().as_bytes(), &id("sleep"), None).unwrap();
    let b = ca.sign_csr(csr().as_bytes(), &id("sleep"), None).unwrap();
    assert_ne!(a.serial, b.serial);
    assert_eq!(a.serial.len(), 32, "128-bit serial: {}", a.serial);
}

#[test]
fn refuses_another_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    let foreign = SpiffeId::new("other.domain", "default", "sleep").unwrap();
    let err = ca.sign_csr(csr().as_bytes(), &foreign, None).unwrap_err();
    assert!(matches!(err, SignError::TrustDomain { .. }), "{err}");
}

/// Writes a plug-in CA folder: root -> intermediate, Istio's file layout.
struct PluginFiles {
    dir: tempfile::TempDir,
    root_der: CertificateDer<'static>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(86400 * 30)).into();
    params
}

fn plugin_files(chain_includes_root: bool) -> PluginFiles {
    let dir = tempfile::tempdir().unwrap();
    let root_key = generate_key().unwrap();
    let root = CertifiedIssuer::self_signed(ca_params("Operator Root"), root_key).unwrap();
    let int_key = generate_key().unwrap();
    let int_cert = ca_params("Operator Intermediate")
        .signed_by(&int_key, &root)
        .unwrap();
    fs::write(dir.path().join(PLUGIN_CA_CERT), int_cert.pem()).unwrap();
    fs::write(dir.path().join(PLUGIN_CA_KEY), int_key.serialize_pem()).unwrap();
    let chain = if chain_includes_root {
        format!("{}{}", int_cert.pem(), root.pem())
    } else {
        int_cert.pem()
    };
    fs::write(dir.path().join(PLUGIN_CERT_CHAIN), chain).unwrap();
    fs::write(dir.path().join(PLUGIN_ROOT_CERT), root.pem()).unwrap();
    PluginFiles {
        dir,
        root_der: root.der().clone(),
    }
}

#[test]
fn plugin_intermediate_chains_verify_to_the_supplied_root() {
    for chain_includes_root in [true, false] {
        let files = plugin_files(chain_includes_root);
        let ca = CertificateAuthority::load_plugin(files.dir.path(), CaOptions::default()).unwrap();
        assert_eq!(ca.kind(), CaKind::Plugin);
        assert_eq!(ca.roots(), std::slice::from_ref(&files.root_der));
        let issued = ca.sign_csr(csr().as_bytes(), &id("sleep"), None).unwrap();
        // leaf, intermediate, root: no duplicates whatever cert-chain.pem held.
        assert_eq!(
            issued.chain_pem.len(),
            3,
            "chain_includes_root={chain_includes_root}"
        );
        let certs: Vec<CertificateDer<'static>> = issued
            .chain_pem
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
            .collect();
        assert_eq!(certs[2], files.root_der);
        x509::verify_leaf(
            &certs[0],
            &certs[1..2],
            std::slice::from_ref(&files.root_der),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(ca.intermediates(), certs[1..2]);
    }
}

#[test]
fn plugin_with_mismatched_key_is_refused() {
    let files = plugin_files(true);
    fs::write(
        files.dir.path().join(PLUGIN_CA_KEY),
        generate_key().unwrap().serialize_pem(),
    )
    .unwrap();
    let err =
        CertificateAuthority::load_plugin(files.dir.path(), CaOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
}

#[test]
fn plugin_with_a_foreign_root_is_refused() {
    let files = plugin_files(false);
    let other = plugin_files(false);
    fs::copy(
        other.dir.path().join(PLUGIN_ROOT_CERT),
        files.dir.path().join(PLUGIN_ROOT_CERT),
    )
    .unwrap();
    let err =
        CertificateAuthority::load_plugin(files.dir.path(), CaOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::ChainBroken { .. }), "{err}");
}

#[test]
fn plugin_with_a_leaf_as_ca_cert_is_refused() {
    let files = plugin_files(false);
    // Replace ca-cert with a non-CA certificate over the same key.
    let key = KeyPair::from_pem(&fs::read_to_string(files.dir.path().join(PLUGIN_CA_KEY)).unwrap())
        .unwrap();
    let mut params = ca_params("not a ca");
    params.is_ca = IsCa::ExplicitNoCa;
    let cert = params.self_signed(&key).unwrap();
    fs::write(files.dir.path().join(PLUGIN_CA_CERT), cert.pem()).unwrap();
    let err =
        CertificateAuthority::load_plugin(files.dir.path(), CaOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::NotCa { .. }), "{err}");
}

#[test]
fn plugin_with_a_missing_file_names_it() {
    let files = plugin_files(false);
    fs::remove_file(files.dir.path().join(PLUGIN_CERT_CHAIN)).unwrap();
    let err =
        CertificateAuthority::load_plugin(files.dir.path(), CaOptions::default()).unwrap_err();
    assert!(err.to_string().contains(PLUGIN_CERT_CHAIN), "{err}");
}

#[test]
fn debug_output_has_no_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), CaOptions::default()).unwrap();
    let text = format!("{ca:?}");
    assert!(!text.contains("PRIVATE"), "{text}");
}
