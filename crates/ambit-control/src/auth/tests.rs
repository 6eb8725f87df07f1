use super::*;
use crate::model::parse::parse_manifest;

fn signer() -> (TokenSigner, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (TokenSigner::load_or_create(dir.path()).unwrap(), dir)
}

#[test]
fn mint_and_verify() {
    let (signer, _dir) = signer();
    let token = signer.mint("node-a", Duration::from_secs(3600)).unwrap();
    let claims = signer.verifier().verify(&token, unix_now()).unwrap();
    assert_eq!(claims.node, "node-a");
    assert_eq!(claims.sub, "node:node-a");
    assert_eq!(claims.exp - claims.iat, 3600);
}

#[test]
fn key_is_private_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let (signer, dir) = signer();
    let mode = std::fs::metadata(dir.path().join(TOKEN_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = TokenSigner::load_or_create(dir.path()).unwrap();
    let token = again.mint("n", Duration::from_secs(60)).unwrap();
    signer.verifier().verify(&token, unix_now()).unwrap();
}

#[test]
fn expired_and_future_tokens_are_refused() {
    let (signer, _dir) = signer();
    let token = signer.mint("n", Duration::from_secs(60)).unwrap();
    let v = signer.verifier();
    let now = unix_now();
    assert!(matches!(
        v.verify(&token, now + 61),
        Err(AuthError::Expired(_))
    ));
    assert!(matches!(
        v.verify(&token, now - 120),
        Err(AuthError::NotYetValid)
    ));
}

#[test]
fn another_key_or_an_edit_is_refused() {
    let (a, _d1) = signer();
    let (b, _d2) = signer();
    let token = a.mint("n", Duration::from_secs(60)).unwrap();
    assert_eq!(
        b.verifier().verify(&token, unix_now()),
        Err(AuthError::BadSignature)
    );

    // Change the node claim, keep the signature.
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    claims["node"] = "other".into();
    claims["sub"] = "node:other".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    );
    assert_eq!(
        a.verifier().verify(&forged, unix_now()),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn the_none_algorithm_is_refused() {
    let (a, _d) = signer();
    let token = a.mint("n", Duration::from_secs(60)).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let forged = format!("{header}.{}.", parts[1]);
    assert!(matches!(
        a.verifier().verify(&forged, unix_now()),
        Err(AuthError::Malformed(_))
    ));
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    let (a, _d) = signer();
    let v = a.verifier();
    for t in [
        "",
        ".",
        "..",
        "a.b.c",
        "a.b.c.d",
        "€.€.€",
        &"x".repeat(MAX_TOKEN_BYTES + 1),
    ] {
        assert!(v.verify(t, unix_now()).is_err(), "{t:?}");
    }
}

#[test]
fn minting_checks_its_arguments() {
    let (a, _d) = signer();
    assert!(a.mint("Bad_Node", Duration::from_secs(60)).is_err());
    assert!(a.mint("n", Duration::ZERO).is_err());
    assert!(a.mint("n", MAX_TOKEN_TTL + Duration::from_secs(1)).is_err());
}

#[test]
fn a_corrupt_key_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(TOKEN_KEY_FILE), "garbage").unwrap();
    let err = TokenSigner::load_or_create(dir.path()).unwrap_err();
    assert!(err.to_string().contains(TOKEN_KEY_FILE), "{err}");
}

fn model() -> Model {
    let objects = parse_manifest(
        "
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: sleep}
status: {podIP: 198.18.0.5}
",
    )
    .unwrap();
    Model::from_objects(1, objects)
}

fn node(name: &str) -> Caller {
    Caller {
        node: Some(name.into()),
        identity: None,
        method: "test",
    }
}

#[test]
fn a_node_may_obtain_identities_of_its_pods_only() {
    let m = model();
    let td = "cluster.local";
    let want = "spiffe://cluster.local/ns/demo/sa/sleep";
    assert_eq!(
        authorize_identity(&node("node-a"), Some(want), &m, td)
            .unwrap()
            .to_string(),
        want
    );
    assert!(matches!(
        authorize_identity(&node("node-b"), Some(want), &m, td),
        Err(Refusal::Denied(_))
    ));
    assert!(matches!(
        authorize_identity(
            &node("node-a"),
            Some("spiffe://cluster.local/ns/demo/sa/other"),
            &m,
            td
        ),
        Err(Refusal::Denied(_))
    ));
    assert!(matches!(
        authorize_identity(
            &node("node-a"),
            Some("spiffe://other.td/ns/demo/sa/sleep"),
            &m,
            td
        ),
        Err(Refusal::Denied(_))
    ));
    assert!(matches!(
        authorize_identity(&node("node-a"), Some("not-a-spiffe-id"), &m, td),
        Err(Refusal::Invalid(_))
    ));
    // A node credential has no identity of its own.
    assert!(matches!(
        authorize_identity(&node("node-a"), None, &m, td),
        Err(Refusal::Denied(_))
    ));
}

#[test]
fn a_workload_credential_gets_its_own_identity_only() {
    let m = model();
    let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
    let caller = Caller {
        node: None,
        identity: Some(id.clone()),
        method: "test",
    };
    assert_eq!(
        authorize_identity(&caller, None, &m, "cluster.local").unwrap(),
        id
    );
    // Naming its own identity (as every certificate client does) is no impersonation.
    assert_eq!(
        authorize_identity(&caller, Some(&id.to_string()), &m, "cluster.local").unwrap(),
        id
    );
    // Any other is.
    assert!(matches!(
        authorize_identity(
            &caller,
            Some("spiffe://cluster.local/ns/demo/sa/echo"),
            &m,
            "cluster.local"
        ),
        Err(Refusal::Denied(_))
    ));
}
