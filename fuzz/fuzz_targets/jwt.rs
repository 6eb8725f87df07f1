//! Arbitrary bytes as a JSON Web Token and a key set, split by the first byte: the key
//! set is parsed as a waypoint parses one, the token decoded and verified against it,
//! and the token also looked for in request headers and a query string. Never a panic;
//! random bytes never verify.
#![no_main]

use std::time::Duration;

use ambit_core::jwt::{Jwks, JwtRule, Location, Token, authenticate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (split as usize * 4).min(rest.len());
    let (keys, token) = rest.split_at(at);
    let keys = String::from_utf8_lossy(keys);
    let token = String::from_utf8_lossy(token);
    let parsed = Jwks::parse(&keys);
    if let Ok(t) = Token::parse(&token) {
        let _ = t.issuer();
        if let Ok(k) = &parsed {
            // Arbitrary input is never a valid signature by a key it does not hold.
            let verified = t.verify(k, &["a".to_owned()], Duration::from_secs(1_800_000_000));
            assert!(verified.is_err() || !k.is_empty());
        }
    }
    let rule = JwtRule {
        issuer: "i".into(),
        audiences: Vec::new(),
        keys: parsed.map_err(|e| e.to_string()),
        locations: Location::defaults(),
        forward_original_token: false,
        claim_headers: Vec::new(),
        payload_header: None,
    };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let _ = authenticate(&[&rule], &headers, Some(&token), Duration::from_secs(0));
});
