//! JSON Web Tokens as RequestAuthentication checks them at the waypoint (RFC 7519,
//! signatures per RFC 7515/7518, keys as a JSON Web Key Set per RFC 7517).
//!
//! - [`Jwks::parse`] reads a key set once (when the policy arrives), keeping only keys it
//!   can use for signatures: RSA (RS256/384/512, PS256/384/512, at least 2048 bits), EC
//!   P-256/P-384 (ES256/ES384) and Ed25519 (EdDSA). A set with no usable key is an error.
//! - [`Token::parse`] splits and decodes a compact token without trusting anything in it.
//! - [`Token::verify`] checks the signature against the set, then the time window (with
//!   clock skew) and the audience, and yields the [`Authenticated`] facts policies read.
//!
//! Nothing here panics on input: every byte of a token comes from the network. A token
//! is bounded by [`MAX_TOKEN_BYTES`]; `alg: none` and HMAC algorithms are refused (a
//! shared secret has no place in a key set published to proxies).

use std::time::Duration;

use crate::crypto::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

/// The longest token accepted (Envoy's header limits are of the same order).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The most keys kept from one set.
pub const MAX_KEYS: usize = 64;

/// How far a token's `exp`/`nbf` may be off the waypoint's clock (Envoy's default).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Base64url, with or without padding (key sets written by hand often carry it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key set or a token was refused. The words are the ones a 401 carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwks is not valid: {0}")]
    BadKeySet(String),
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt is too long")]
    TooLong,
    #[error("Jwt header or payload is not a base64url JSON object")]
    BadEncoding,
    #[error("Jwt algorithm {0:?} is not supported")]
    Algorithm(String),
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwt has no issuer")]
    NoIssuer,
    #[error("Jwks has no key for this Jwt")]
    NoKey,
    #[error("Jwt verification fails")]
    BadSignature,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    Audience,
    #[error("Jwt keys are not available: {0}")]
    KeysUnavailable(String),
}

/// A signature algorithm Ambit verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Algorithm::Rs256,
            "RS384" => Algorithm::Rs384,
            "RS512" => Algorithm::Rs512,
            "PS256" => Algorithm::Ps256,
            "PS384" => Algorithm::Ps384,
            "PS512" => Algorithm::Ps512,
            "ES256" => Algorithm::Es256,
            "ES384" => Algorithm::Es384,
            "EdDSA" => Algorithm::EdDsa,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point (`04 || x || y`).
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// One usable key of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, when it names one: only that algorithm may use it.
    alg: Option<Algorithm>,
    material: Material,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        use Algorithm::*;
        matches!(
            (&self.material, alg),
            (
                Material::Rsa { .. },
                Rs256 | Rs384 | Rs512 | Ps256 | Ps384 | Ps512
            ) | (Material::P256(_), Es256)
                | (Material::P384(_), Es384)
                | (Material::Ed25519(_), EdDsa)
        )
    }

    fn verify(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> bool {
        use Algorithm::*;
        match &self.material {
            Material::Rsa { n, e } => {
                let params: &signature::RsaParameters = match alg {
                    Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok()
            }
            Material::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            Material::P384(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            Material::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
        }
    }
}

/// A JSON Web Key Set, reduced to the keys that can verify a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Key>,
}

impl Jwks {
    /// Reads a key set (`{"keys": [...]}`, or one bare key). Keys of other types or uses
    /// are skipped; a set left with none is an error, as is a malformed usable key.
    pub fn parse(json: &str) -> Result<Jwks, JwtError> {
        let bad = |why: String| JwtError::BadKeySet(why);
        let doc: Value = serde_json::from_str(json).map_err(|e| bad(format!("not JSON ({e})")))?;
        let entries: Vec<&Value> = match doc.get("keys") {
            Some(Value::Array(keys)) => keys.iter().collect(),
            Some(_) => return Err(bad("\"keys\" is not a list".into())),
            None if doc.get("kty").is_some() => vec![&doc],
            None => return Err(bad("no \"keys\" list".into())),
        };
        let mut keys = Vec::new();
        for (i, k) in entries.into_iter().enumerate() {
            if keys.len() == MAX_KEYS {
                return Err(bad(format!("more than {MAX_KEYS} keys")));
            }
            let text = |name: &str| k.get(name).and_then(Value::as_str);
            if text("use").is_some_and(|u| u != "sig") {
                continue;
            }
            let bytes = |name: &str| -> Result<Vec<u8>, JwtError> {
                let v = text(name).ok_or_else(|| bad(format!("key {i} has no {name:?}")))?;
                B64.decode(v)
                    .map_err(|_| bad(format!("key {i}: {name:?} is not base64url")))
            };
            let material = match text("kty") {
                Some("RSA") => {
                    let n = bytes("n")?;
                    let e = bytes("e")?;
                    let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                    if bits < 2048 {
                        return Err(bad(format!(
                            "key {i}: an RSA key of {bits} bits; at least 2048 are required"
                        )));
                    }
                    Material::Rsa { n, e }
                }
                Some("EC") => {
                    let (x, y) = (bytes("x")?, bytes("y")?);
                    let size = match text("crv") {
                        Some("P-256") => 32,
                        Some("P-384") => 48,
                        other => {
                            return Err(bad(format!("key {i}: curve {other:?} is not supported")));
                        }
                    };
                    if x.len() != size || y.len() != size {
                        return Err(bad(format!("key {i}: coordinates of the wrong length")));
                    }
                    let mut point = Vec::with_capacity(1 + 2 * size);
                    point.push(4);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    if size == 32 {
                        Material::P256(point)
                    } else {
                        Material::P384(point)
                    }
                }
                Some("OKP") => {
                    if text("crv") != Some("Ed25519") {
                        return Err(bad(format!(
                            "key {i}: only the OKP curve Ed25519 is supported"
                        )));
                    }
                    let x = bytes("x")?;
                    if x.len() != 32 {
                        return Err(bad(format!("key {i}: an Ed25519 key is 32 bytes")));
                    }
                    Material::Ed25519(x)
                }
                // Symmetric or unknown key types verify nothing here.
                _ => continue,
            };
            let alg = match text("alg") {
                None => None,
                Some(a) => match Algorithm::parse(a) {
                    Some(a) => Some(a),
                    None => continue,
                },
            };
            let key = Key {
                kid: text("kid").map(str::to_owned),
                alg,
                material,
            };
            if !Algorithm::ALL.iter().any(|a| key.fits(*a)) {
                continue;
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(bad(
                "no RSA, EC (P-256, P-384) or Ed25519 signing key".into()
            ));
        }
        Ok(Jwks { keys })
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Algorithm {
    const ALL: [Algorithm; 9] = [
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
    ];
}

/// A decoded, not yet trusted token.
#[derive(Debug, Clone)]
pub struct Token<'a> {
    /// `<header>.<payload>`: what the signature covers.
    signed: &'a str,
    /// The payload segment as sent (for `outputPayloadToHeader`).
    payload_b64: &'a str,
    alg: Algorithm,
    kid: Option<String>,
    claims: Map<String, Value>,
    signature: Vec<u8>,
}

impl<'a> Token<'a> {
    /// Splits and decodes a compact JWS. Only its structure is checked.
    pub fn parse(token: &'a str) -> Result<Token<'a>, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(JwtError::Malformed);
        }
        let object = |seg: &str| -> Result<Map<String, Value>, JwtError> {
            let raw = B64.decode(seg).map_err(|_| JwtError::BadEncoding)?;
            match serde_json::from_slice(&raw) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(JwtError::BadEncoding),
            }
        };
        let header = object(h)?;
        let claims = object(p)?;
        let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let alg =
            Algorithm::parse(alg_name).ok_or_else(|| JwtError::Algorithm(alg_name.to_owned()))?;
        // A critical extension Ambit does not know must not be ignored (RFC 7515 4.1.11).
        if header.contains_key("crit") {
            return Err(JwtError::Algorithm(format!("{alg_name} with crit")));
        }
        let signature = B64.decode(s).map_err(|_| JwtError::BadEncoding)?;
        Ok(Token {
            signed: &token[..h.len() + 1 + p.len()],
            payload_b64: p,
            alg,
            kid: header.get("kid").and_then(Value::as_str).map(str::to_owned),
            claims,
            signature,
        })
    }

    /// The `iss` claim, to find the rule that checks this token.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Checks the signature with `keys`, the time window at `now` (seconds since the
    /// epoch), and, when `audiences` is not empty, that the token is for one of them.
    pub fn verify(
        self,
        keys: &Jwks,
        audiences: &[String],
        now: Duration,
    ) -> Result<Authenticated, JwtError> {
        let candidates =
            keys.keys
                .iter()
                .filter(|k| k.fits(self.alg))
                .filter(|k| match (&self.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                });
        let mut any = false;
        let mut good = false;
        for k in candidates {
            any = true;
            if k.verify(self.alg, self.signed.as_bytes(), &self.signature) {
                good = true;
                break;
            }
        }
        if !any {
            return Err(JwtError::NoKey);
        }
        if !good {
            return Err(JwtError::BadSignature);
        }
        let number = |name: &str| -> Result<Option<f64>, JwtError> {
            match self.claims.get(name) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or(JwtError::BadEncoding),
            }
        };
        let now = now.as_secs_f64();
        let skew = CLOCK_SKEW.as_secs_f64();
        if let Some(exp) = number("exp")?
            && now > exp + skew
        {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = number("nbf")?
            && now + skew < nbf
        {
            return Err(JwtError::NotYetValid);
        }
        let issuer = self.issuer().ok_or(JwtError::NoIssuer)?.to_owned();
        let token_audiences: Vec<String> = match self.claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(_) => return Err(JwtError::BadEncoding),
        };
        if !audiences.is_empty() && !token_audiences.iter().any(|a| audiences.contains(a)) {
            return Err(JwtError::Audience);
        }
        let subject = self
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        Ok(Authenticated {
            principal: format!("{issuer}/{subject}"),
            issuer,
            subject,
            audiences: token_audiences,
            presenter: self
                .claims
                .get("azp")
                .and_then(Value::as_str)
                .map(str::to_owned),
            payload_b64: self.payload_b64.to_owned(),
            claims: self.claims,
        })
    }
}

/// What a valid token establishes about a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `<iss>/<sub>`: what `requestPrincipals` match.
    pub principal: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    pub claims: Map<String, Value>,
    /// The payload segment as sent.
    pub payload_b64: String,
}

impl Authenticated {
    /// The values of the claim at `path` (nested objects by name), as strings: a string,
    /// each string of a list, a number or a boolean written out. Empty when absent.
    pub fn claim(&self, path: &[impl AsRef<str>]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut v = self.claims.get(first.as_ref());
        for p in rest {
            v = v.and_then(|v| v.get(p.as_ref()));
        }
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match v {
            Some(Value::Array(list)) => list.iter().filter_map(scalar).collect(),
            Some(v) => scalar(v).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header (lower case), its value after `prefix` (compared without case).
    Header {
        name: http::HeaderName,
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    Cookie(String),
}

impl Location {
    /// `Authorization: Bearer <token>` and `?access_token=<token>`, where a rule names
    /// no location (as in Istio).
    pub fn defaults() -> Vec<Location> {
        vec![
            Location::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ]
    }

    /// The token this location holds in a request, if any.
    fn find<'h>(&self, headers: &'h http::HeaderMap, query: Option<&'h str>) -> Option<&'h str> {
        match self {
            Location::Header { name, prefix } => headers.get_all(name).iter().find_map(|v| {
                let v = v.to_str().ok()?.trim();
                let head = v.get(..prefix.len())?;
                head.eq_ignore_ascii_case(prefix)
                    .then(|| v[prefix.len()..].trim())
                    .filter(|t| !t.is_empty())
            }),
            Location::Param(name) => query?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name && !v.is_empty()).then_some(v)
            }),
            Location::Cookie(name) => crate::http_route::cookies(headers)
                .find_map(|(k, v)| (k == name && !v.is_empty()).then_some(v)),
        }
    }
}

/// One `jwtRules` entry as the waypoint applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// The keys, or why there are none (tokens of this issuer are then refused).
    pub keys: Result<Jwks, String>,
    pub locations: Vec<Location>,
    pub forward_original_token: bool,
    /// `outputClaimToHeaders`: header, and the claim's path.
    pub claim_headers: Vec<(http::HeaderName, Vec<String>)>,
    pub payload_header: Option<http::HeaderName>,
}

/// The outcome of authenticating a request with a valid token.
#[derive(Debug, Clone)]
pub struct Authentication<'r> {
    pub authenticated: Authenticated,
    pub rule: &'r JwtRule,
    pub location: &'r Location,
}

/// Authenticates a request by `rules` (every RequestAuthentication that applies, their
/// rules together): `Ok(None)` without a token; `Err` when a token is there and is not
/// valid by the rule for its issuer (or no rule names its issuer, or it sits where that
/// rule does not look); `now` is the time since the epoch. Every token found is checked.
pub fn authenticate<'r>(
    rules: &[&'r JwtRule],
    headers: &http::HeaderMap,
    query: Option<&str>,
    now: Duration,
) -> Result<Option<Authentication<'r>>, JwtError> {
    authenticate_with(rules, headers, query, now, None)
}

/// [`authenticate`], remembering verified tokens in `cache` for the rules of `epoch`
/// (a number that changes whenever the rules may have).
pub fn authenticate_cached<'r>(
    rules: &[&'r JwtRule],
    headers: &http::HeaderMap,
    query: Option<&str>,
    now: Duration,
    cache: &TokenCache,
    epoch: u64,
) -> Result<Option<Authentication<'r>>, JwtError> {
    authenticate_with(rules, headers, query, now, Some((cache, epoch)))
}

fn authenticate_with<'r>(
    rules: &[&'r JwtRule],
    headers: &http::HeaderMap,
    query: Option<&str>,
    now: Duration,
    cache: Option<(&TokenCache, u64)>,
) -> Result<Option<Authentication<'r>>, JwtError> {
    let mut first: Option<Authentication<'r>> = None;
    let mut seen: Vec<&Location> = Vec::new();
    for rule in rules {
        for location in &rule.locations {
            if seen.contains(&location) {
                continue;
            }
            seen.push(location);
            let slot = seen.len() - 1;
            let Some(raw) = location.find(headers, query) else {
                continue;
            };
            if let Some((cache, epoch)) = cache
                && let Some((i, authenticated)) = cache.get(slot, raw, epoch, now)
                && let Some(owner) = rules.get(i)
            {
                if first.is_none() {
                    first = Some(Authentication {
                        authenticated,
                        rule: owner,
                        location,
                    });
                }
                continue;
            }
            let token = Token::parse(raw)?;
            let issuer = token.issuer().ok_or(JwtError::NoIssuer)?;
            let Some((i, owner)) = rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.issuer == issuer && r.locations.contains(location))
            else {
                return Err(JwtError::UnknownIssuer);
            };
            let keys = owner
                .keys
                .as_ref()
                .map_err(|why| JwtError::KeysUnavailable(why.clone()))?;
            let authenticated = token.verify(keys, &owner.audiences, now)?;
            if let Some((cache, epoch)) = cache {
                cache.put(slot, raw, epoch, now, i, &authenticated);
            }
            if first.is_none() {
                first = Some(Authentication {
                    authenticated,
                    rule: owner,
                    location,
                });
            }
        }
    }
    Ok(first)
}

/// Tokens verified recently, so a client that sends the same token again is not
/// verified again (the signature check is nearly all of a token's cost). An entry is
/// keyed by the whole token (never a hash alone) and where it was found; it holds only
/// for the rules it was verified under (`epoch`) and until the token's `exp` or
/// [`CACHE_FOR`], whichever is sooner. Only valid tokens are kept. Shards are taken
/// with `try_lock`: a request never waits for the cache (a busy shard is a miss).
pub struct TokenCache {
    shards: Vec<Shard>,
}

/// Verified tokens by (where found, token).
type Shard = std::sync::Mutex<std::collections::HashMap<(usize, Box<str>), Cached>>;

struct Cached {
    epoch: u64,
    until: Duration,
    rule: usize,
    authenticated: Authenticated,
}

/// How long a verified token is trusted without checking it again, at most.
pub const CACHE_FOR: Duration = Duration::from_secs(60);
const CACHE_SHARDS: usize = 16;
/// Entries per shard; a full shard is emptied (simple, and bounded).
const CACHE_PER_SHARD: usize = 64;

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            shards: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
        }
    }
}

impl TokenCache {
    fn shard(
        &self,
        token: &str,
    ) -> &std::sync::Mutex<std::collections::HashMap<(usize, Box<str>), Cached>> {
        let h = crate::traffic::fnv(token.as_bytes()) as usize;
        &self.shards[h % self.shards.len()]
    }

    fn get(
        &self,
        slot: usize,
        token: &str,
        epoch: u64,
        now: Duration,
    ) -> Option<(usize, Authenticated)> {
        let shard = self.shard(token).try_lock().ok()?;
        let c = shard.get(&(slot, Box::from(token)))?;
        (c.epoch == epoch && now < c.until).then(|| (c.rule, c.authenticated.clone()))
    }

    fn put(
        &self,
        slot: usize,
        token: &str,
        epoch: u64,
        now: Duration,
        rule: usize,
        a: &Authenticated,
    ) {
        let mut until = now + CACHE_FOR;
        if let Some(exp) = a.claims.get("exp").and_then(Value::as_f64) {
            until = until.min(Duration::from_secs_f64(exp.max(0.0)));
        }
        if until <= now {
            return;
        }
        let Ok(mut shard) = self.shard(token).try_lock() else {
            return;
        };
        if shard.len() >= CACHE_PER_SHARD {
            shard.clear();
        }
        shard.insert(
            (slot, Box::from(token)),
            Cached {
                epoch,
                until,
                rule,
                authenticated: a.clone(),
            },
        );
    }
}

/// Rewrites a request's headers after [`authenticate`]: the output headers of every
/// rule are cleared first (a client cannot forge them), then set from the valid token;
/// the token's header is removed unless its rule forwards it.
pub fn apply(
    rules: &[&JwtRule],
    outcome: Option<&Authentication<'_>>,
    headers: &mut http::HeaderMap,
) {
    for r in rules {
        for (h, _) in &r.claim_headers {
            headers.remove(h);
        }
        if let Some(h) = &r.payload_header {
            headers.remove(h);
        }
    }
    let Some(a) = outcome else {
        return;
    };
    if !a.rule.forward_original_token
        && let Location::Header { name, .. } = a.location
    {
        headers.remove(name);
    }
    for (h, path) in &a.rule.claim_headers {
        let values = a.authenticated.claim(path);
        if let Some(v) = values.first()
            && let Ok(v) = http::HeaderValue::from_str(v)
        {
            headers.insert(h.clone(), v);
        }
    }
    if let Some(h) = &a.rule.payload_header
        && let Ok(v) = http::HeaderValue::from_str(&a.authenticated.payload_b64)
    {
        headers.insert(h.clone(), v);
    }
}

impl JwtError {
    /// The body of the 401 (Envoy's words where it has them).
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::BadKeySet(_) | JwtError::KeysUnavailable(_) => "Jwks remote fetch is failed",
            JwtError::Malformed => "Jwt is not in the form of Header.Payload.Signature",
            JwtError::TooLong => "Jwt is too long",
            JwtError::BadEncoding => "Jwt header or payload is an invalid JSON",
            JwtError::Algorithm(_) => "Jwt algorithm is not supported",
            JwtError::UnknownIssuer => "Jwt issuer is not configured",
            JwtError::NoIssuer => "Jwt has no issuer",
            JwtError::NoKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwtError::BadSignature => "Jwt verification fails",
            JwtError::Expired => "Jwt is expired",
            JwtError::NotYetValid => "Jwt not yet valid",
            JwtError::Audience => "Audiences in Jwt are not allowed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::rand::SystemRandom;
    use crate::crypto::signature::{EcdsaKeyPair, KeyPair};
    use crate::testing::JwtSigner as Signer;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    #[test]
    fn ed25519_tokens_verify_and_yield_the_principal() {
        let s = Signer::new("k1");
        let keys = Jwks::parse(&s.jwks()).unwrap();
        let t = s.sign(&serde_json::json!({"iss": "https://issuer", "sub": "alice",
            "aud": ["a", "b"], "azp": "web", "exp": 1_800_000_100u64,
            "groups": ["eng", "ops"], "org": {"team": "mesh"}, "level": 3}));
        let token = Token::parse(&t).unwrap();
        assert_eq!(token.issuer(), Some("https://issuer"));
        let a = token.verify(&keys, &["b".into()], NOW).unwrap();
        assert_eq!(a.principal, "https://issuer/alice");
        assert_eq!(a.audiences, ["a", "b"]);
        assert_eq!(a.presenter.as_deref(), Some("web"));
        assert_eq!(a.claim(&["groups"]), ["eng", "ops"]);
        assert_eq!(a.claim(&["org", "team"]), ["mesh"]);
        assert_eq!(a.claim(&["level"]), ["3"]);
        assert!(a.claim(&["missing"]).is_empty());
    }

    #[test]
    fn ecdsa_p256_tokens_verify() {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = crate::crypto::ecdsa_key_pair_from_pkcs8(alg, doc.as_ref()).unwrap();
        let point = pair.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..])}]});
        let keys = Jwks::parse(&jwks.to_string()).unwrap();
        let signed = format!(
            "{}.{}",
            b64(br#"{"alg":"ES256","typ":"JWT"}"#),
            b64(br#"{"iss":"i","sub":"s"}"#)
        );
        let sig = pair.sign(&rng, signed.as_bytes()).unwrap();
        let t = format!("{signed}.{}", b64(sig.as_ref()));
        let a = Token::parse(&t).unwrap().verify(&keys, &[], NOW).unwrap();
        assert_eq!(a.principal, "i/s");
        // The same signature over a changed payload fails.
        let forged = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"ES256","typ":"JWT"}"#),
            b64(br#"{"iss":"i","sub":"root"}"#),
            b64(sig.as_ref())
        );
        assert_eq!(
            Token::parse(&forged).unwrap().verify(&keys, &[], NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn time_audience_and_key_checks() {
        let s = Signer::new("k1");
        let keys = Jwks::parse(&s.jwks()).unwrap();
        let check = |claims: Value, aud: &[&str]| {
            let t = s.sign(&claims);
            let aud: Vec<String> = aud.iter().map(|a| a.to_string()).collect();
            Token::parse(&t)
                .unwrap()
                .verify(&keys, &aud, NOW)
                .map(|a| a.principal)
        };
        let now = NOW.as_secs();
        assert_eq!(
            check(serde_json::json!({"iss": "i", "exp": now - 61}), &[]),
            Err(JwtError::Expired)
        );
        assert!(
            check(serde_json::json!({"iss": "i", "exp": now - 59}), &[]).is_ok(),
            "within the skew"
        );
        assert_eq!(
            check(serde_json::json!({"iss": "i", "nbf": now + 61}), &[]),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            check(serde_json::json!({"iss": "i", "aud": "x"}), &["y"]),
            Err(JwtError::Audience)
        );
        assert_eq!(
            check(serde_json::json!({"iss": "i"}), &["y"]),
            Err(JwtError::Audience)
        );
        assert!(check(serde_json::json!({"iss": "i", "aud": "y"}), &["y"]).is_ok());
        assert_eq!(
            check(serde_json::json!({"sub": "s"}), &[]),
            Err(JwtError::NoIssuer)
        );
        assert_eq!(
            check(serde_json::json!({"iss": "i", "exp": "soon"}), &[]),
            Err(JwtError::BadEncoding)
        );
        // Another key with the same id does not verify it.
        let other = Signer::new("k1");
        let t = other.sign(&serde_json::json!({"iss": "i"}));
        assert_eq!(
            Token::parse(&t).unwrap().verify(&keys, &[], NOW),
            Err(JwtError::BadSignature)
        );
        // A token naming a key id the set lacks.
        let t = Signer::new("k9").sign(&serde_json::json!({"iss": "i"}));
        assert_eq!(
            Token::parse(&t).unwrap().verify(&keys, &[], NOW),
            Err(JwtError::NoKey)
        );
    }

    #[test]
    fn malformed_tokens_and_dangerous_algorithms_are_refused() {
        let none = format!("{}.{}.x", b64(br#"{"alg":"none"}"#), b64(br#"{"iss":"i"}"#));
        assert_eq!(
            Token::parse(&none).unwrap_err(),
            JwtError::Algorithm("none".into())
        );
        let hmac = format!(
            "{}.{}.x",
            b64(br#"{"alg":"HS256"}"#),
            b64(br#"{"iss":"i"}"#)
        );
        assert_eq!(
            Token::parse(&hmac).unwrap_err(),
            JwtError::Algorithm("HS256".into())
        );
        for bad in ["", "a", "a.b", "a.b.c.d", "..", "a..c", "!!!.!!!.!!!"] {
            assert!(Token::parse(bad).is_err(), "{bad:?}");
        }
        let array = format!("{}.{}.eA", b64(br#"{"alg":"EdDSA"}"#), b64(b"[1]"));
        assert_eq!(Token::parse(&array).unwrap_err(), JwtError::BadEncoding);
        let crit = format!(
            "{}.{}.eA",
            b64(br#"{"alg":"EdDSA","crit":["x"]}"#),
            b64(b"{}")
        );
        assert!(Token::parse(&crit).is_err());
        assert_eq!(
            Token::parse(&"a".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err(),
            JwtError::TooLong
        );
    }

    #[test]
    fn key_sets_are_checked() {
        for (bad, why) in [
            ("", "not JSON"),
            ("{}", "no \"keys\""),
            (r#"{"keys": 3}"#, "not a list"),
            (r#"{"keys": []}"#, "no RSA"),
            (r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#, "no RSA"),
            (
                r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#,
                "at least 2048",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}"#,
                "not supported",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#,
                "wrong length",
            ),
            (
                r#"{"keys": [{"kty": "OKP", "crv": "Ed25519"}]}"#,
                "no \"x\"",
            ),
        ] {
            let e = Jwks::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // Encryption keys and keys for other algorithms are skipped, not fatal.
        let s = Signer::new("k");
        let mut set: Value = serde_json::from_str(&s.jwks()).unwrap();
        set["keys"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"kty": "OKP", "crv": "Ed25519", "use": "enc", "x": "AA"}));
        assert_eq!(Jwks::parse(&set.to_string()).unwrap().len(), 1);
        // A bare key is a set of one.
        let bare = set["keys"][0].to_string();
        assert_eq!(Jwks::parse(&bare).unwrap().len(), 1);
    }

    #[test]
    fn a_key_bound_to_an_algorithm_verifies_only_that_one() {
        let s = Signer::new("k");
        let mut set: Value = serde_json::from_str(&s.jwks()).unwrap();
        set["keys"][0]["alg"] = "ES256".into();
        // An OKP key claimed for ES256 fits nothing: dropped, and the set is empty.
        assert!(Jwks::parse(&set.to_string()).is_err());
    }

    fn rule(s: &Signer, issuer: &str, locations: Vec<Location>) -> JwtRule {
        JwtRule {
            issuer: issuer.into(),
            audiences: Vec::new(),
            keys: Jwks::parse(&s.jwks()).map_err(|e| e.to_string()),
            locations,
            forward_original_token: false,
            claim_headers: vec![(http::HeaderName::from_static("x-sub"), vec!["sub".into()])],
            payload_header: None,
        }
    }

    #[test]
    fn requests_are_authenticated_by_the_rule_of_their_issuer() {
        let s = Signer::new("k");
        let a = rule(&s, "a", Location::defaults());
        let b = rule(&Signer::new("k2"), "b", Location::defaults());
        let rules = [&a, &b];
        let bearer = |t: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("bearer {t}").parse().unwrap(),
            );
            h.insert("x-sub", "forged".parse().unwrap());
            h
        };
        // No token: passes unauthenticated, and the forged output header is gone.
        let mut h = http::HeaderMap::new();
        h.insert("x-sub", "forged".parse().unwrap());
        let out = authenticate(&rules, &h, None, NOW).unwrap();
        assert!(out.is_none());
        apply(&rules, out.as_ref(), &mut h);
        assert!(h.get("x-sub").is_none());
        // A valid token of issuer a (prefix compared without case).
        let t = s.sign(&serde_json::json!({"iss": "a", "sub": "alice"}));
        let mut h = bearer(&t);
        let out = authenticate(&rules, &h, None, NOW).unwrap().unwrap();
        assert_eq!(out.authenticated.principal, "a/alice");
        apply(&rules, Some(&out), &mut h);
        assert_eq!(h.get("x-sub").unwrap(), "alice");
        assert!(
            h.get(http::header::AUTHORIZATION).is_none(),
            "not forwarded"
        );
        // Signed by a's key but claiming issuer b: b's keys (no key of that id) refuse it.
        let t = s.sign(&serde_json::json!({"iss": "b", "sub": "alice"}));
        assert_eq!(
            authenticate(&rules, &bearer(&t), None, NOW).unwrap_err(),
            JwtError::NoKey
        );
        // An issuer no rule names.
        let t = s.sign(&serde_json::json!({"iss": "c"}));
        assert_eq!(
            authenticate(&rules, &bearer(&t), None, NOW).unwrap_err(),
            JwtError::UnknownIssuer
        );
        // The query parameter, by default.
        let t = s.sign(&serde_json::json!({"iss": "a", "sub": "q"}));
        let q = format!("x=1&access_token={t}");
        let out = authenticate(&rules, &http::HeaderMap::new(), Some(&q), NOW)
            .unwrap()
            .unwrap();
        assert_eq!(out.authenticated.principal, "a/q");
        // Garbage where a token is looked for is an invalid token, not a missing one.
        assert_eq!(
            authenticate(&rules, &bearer("nonsense"), None, NOW).unwrap_err(),
            JwtError::Malformed
        );
    }

    #[test]
    fn configured_locations_replace_the_defaults_and_keys_may_be_missing() {
        let s = Signer::new("k");
        let mut r = rule(
            &s,
            "a",
            vec![
                Location::Header {
                    name: http::HeaderName::from_static("x-jwt"),
                    prefix: String::new(),
                },
                Location::Cookie("session".into()),
            ],
        );
        let t = s.sign(&serde_json::json!({"iss": "a", "sub": "c"}));
        // The Authorization header is not looked at.
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        assert!(authenticate(&[&r], &h, None, NOW).unwrap().is_none());
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            format!("a=b; session={t}").parse().unwrap(),
        );
        assert_eq!(
            authenticate(&[&r], &h, None, NOW)
                .unwrap()
                .unwrap()
                .authenticated
                .principal,
            "a/c"
        );
        r.keys = Err("fetching https://idp/keys failed".into());
        assert!(matches!(
            authenticate(&[&r], &h, None, NOW),
            Err(JwtError::KeysUnavailable(_))
        ));
    }

    #[test]
    fn verified_tokens_are_cached_for_their_rules_and_life_only() {
        let s = Signer::new("k");
        let r = rule(&s, "a", Location::defaults());
        let cache = TokenCache::default();
        let t = s.sign(&serde_json::json!({"iss": "a", "sub": "c", "exp": NOW.as_secs() + 30}));
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        let first = authenticate_cached(&[&r], &h, None, NOW, &cache, 1)
            .unwrap()
            .unwrap();
        assert_eq!(first.authenticated.principal, "a/c");
        // The same token again: from the cache (its keys could be gone and it still is).
        let mut gone = r.clone();
        gone.keys = Err("rotated".into());
        let again = authenticate_cached(&[&gone], &h, None, NOW, &cache, 1)
            .unwrap()
            .unwrap();
        assert_eq!(again.authenticated.principal, "a/c");
        // Other rules (a new epoch): verified again, and refused with the keys gone.
        assert!(authenticate_cached(&[&gone], &h, None, NOW, &cache, 2).is_err());
        // Past its exp: verified again (and refused: expired beyond the skew too).
        let later = NOW + Duration::from_secs(31);
        assert!(authenticate_cached(&[&gone], &h, None, later, &cache, 1).is_err());
        // A token that differs in one byte is not the cached one.
        let mut forged = t.clone();
        forged.pop();
        forged.push(if t.ends_with('A') { 'B' } else { 'A' });
        let mut h2 = http::HeaderMap::new();
        h2.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {forged}").parse().unwrap(),
        );
        assert!(authenticate_cached(&[&r], &h2, None, NOW, &cache, 1).is_err());
    }
}
