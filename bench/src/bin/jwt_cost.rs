//! What checking a JSON Web Token costs the waypoint per request: the whole
//! `ambit_core::jwt::authenticate` (find the token, decode it, pick the rule by issuer,
//! verify the signature, check time and audience) for EdDSA and ES256 tokens, for a
//! token the waypoint verified before (its cache), and for a request without a token.
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin jwt-cost
//! ```

#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ambit_core::crypto::rand::SystemRandom;
use ambit_core::crypto::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use ambit_core::jwt::{Jwks, JwtRule, Location, TokenCache, authenticate, authenticate_cached};
use base64::Engine;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn claims(now: u64) -> String {
    serde_json::json!({"iss": "https://idp", "sub": "alice", "aud": "api", "exp": now + 3600,
        "groups": ["eng", "ops"]})
    .to_string()
}

fn rule(jwks: String) -> JwtRule {
    JwtRule {
        issuer: "https://idp".into(),
        audiences: vec!["api".into()],
        keys: Jwks::parse(&jwks).map_err(|e| e.to_string()),
        locations: Location::defaults(),
        forward_original_token: false,
        claim_headers: Vec::new(),
        payload_header: None,
    }
}

fn time(
    label: &str,
    rule: &JwtRule,
    token: Option<&str>,
    n: u32,
    cache: Option<&TokenCache>,
) -> (String, Duration) {
    let mut headers = http::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("a header value"),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let rules = [rule];
    // Warm up, and check it verifies (or passes without a token).
    let ok = authenticate(&rules, &headers, None, now).expect("a valid token");
    assert_eq!(ok.is_some(), token.is_some());
    let start = Instant::now();
    for _ in 0..n {
        match cache {
            Some(c) => black_box(
                authenticate_cached(black_box(&rules), black_box(&headers), None, now, c, 1).ok(),
            ),
            None => black_box(authenticate(black_box(&rules), black_box(&headers), None, now).ok()),
        };
    }
    (label.to_owned(), start.elapsed() / n)
}

fn main() {
    let rng = SystemRandom::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let payload = b64(claims(now).as_bytes());

    let ed = Ed25519KeyPair::from_pkcs8(
        Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("a key")
            .as_ref(),
    )
    .expect("a key");
    let ed_jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "e",
        "x": b64(ed.public_key().as_ref())}]})
    .to_string();
    let signed = format!("{}.{payload}", b64(br#"{"alg":"EdDSA","kid":"e"}"#));
    let ed_token = format!("{signed}.{}", b64(ed.sign(signed.as_bytes()).as_ref()));

    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let ec = ambit_core::crypto::ecdsa_key_pair_from_pkcs8(
        alg,
        EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .expect("a key")
            .as_ref(),
    )
    .expect("a key");
    let point = ec.public_key().as_ref();
    let ec_jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "p",
        "x": b64(&point[1..33]), "y": b64(&point[33..])}]})
    .to_string();
    let signed = format!("{}.{payload}", b64(br#"{"alg":"ES256","kid":"p"}"#));
    let ec_token = format!(
        "{signed}.{}",
        b64(ec
            .sign(&rng, signed.as_bytes())
            .expect("a signature")
            .as_ref())
    );

    let n = 20_000;
    let ed_rule = rule(ed_jwks);
    let ec_rule = rule(ec_jwks);
    let rows = [
        time("no token (passes unauthenticated)", &ed_rule, None, n, None),
        time(
            "EdDSA (Ed25519) token, verified",
            &ed_rule,
            Some(&ed_token),
            n,
            None,
        ),
        time(
            "ES256 (P-256) token, verified",
            &ec_rule,
            Some(&ec_token),
            n,
            None,
        ),
        time(
            "EdDSA token seen before (from the verified-token cache)",
            &ed_rule,
            Some(&ed_token),
            n,
            Some(&TokenCache::default()),
        ),
    ];
    println!("| Request | Cost per request |\n|---|---|");
    for (label, d) in rows {
        println!("| {label} | {:.1} µs |", d.as_secs_f64() * 1e6);
    }
}
