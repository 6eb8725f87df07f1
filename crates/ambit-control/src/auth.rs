//! Who is calling the control plane, and what they may obtain.
//!
//! Callers present `authorization: Bearer <token>`. An [`Authenticator`] turns the token
//! into a [`Caller`]; [`authorize_identity`] then decides which workload identity the
//! caller may get a certificate for. The authenticator is a trait so other token kinds
//! (Kubernetes service-account tokens checked with TokenReview) can be added beside the
//! local one.
//!
//! The local token ([`NodeTokenAuthenticator`]) is a compact JWT (ES256) minted by
//! `ambit control token --node <name>`, signed by a P-256 key kept in the state folder
//! (`token-key.pem`, mode 0600), bound to one node name, with an expiry. Rotating that key
//! (delete the file and restart) revokes every token at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_core::SpiffeId;
use ambit_core::crypto::rand::SystemRandom;
use ambit_core::crypto::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use ambit_core::identity::is_dns1123_subdomain;
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::model::Model;

/// File name of the token signing key in the state folder.
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest lifetime a token may be minted with.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

const ISSUER: &str = "ambit-control";
const AUDIENCE: &str = "ambit";
/// Tolerated clock difference between the minting and the checking machine.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node the caller speaks for: it may obtain identities of pods on that node.
    pub node: Option<String>,
    /// The caller's own workload identity, if the credential carries one.
    pub identity: Option<SpiffeId>,
    /// How the caller was authenticated, for logs.
    pub method: &'static str,
}

/// Why a token was not accepted (gRPC UNAUTHENTICATED). Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send the metadata `authorization: Bearer <token>`")]
    Missing,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's signature does not verify (signed by another control plane, or altered)")]
    BadSignature,
    #[error("the token expired at {0}; mint a new one with `ambit control token --node <name>`")]
    Expired(String),
    #[error("the token is not valid yet (issued in the future: check the clocks)")]
    NotYetValid,
    #[error("the token is not meant for this control plane: {0}")]
    WrongAudience(String),
    /// Refused by another authenticator (Kubernetes' TokenReview): why, never the token.
    #[error("{0}")]
    Refused(String),
}

/// Turns a bearer token into a [`Caller`].
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError>;
}

/// Tries Ambit's own node tokens first, then another kind of credential (a cluster's
/// service-account tokens): a token either verifies as one of Ambit's or is handed on.
pub struct EitherAuthenticator {
    pub first: Arc<dyn Authenticator>,
    pub second: Arc<dyn Authenticator>,
}

#[async_trait]
impl Authenticator for EitherAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        match self.first.authenticate(token).await {
            Ok(caller) => Ok(caller),
            // One of Ambit's tokens that is expired, early or for another audience is
            // answered as such; anything else may be the other kind.
            Err(e @ (AuthError::Expired(_) | AuthError::NotYetValid | AuthError::WrongAudience(_))) => {
                Err(e)
            }
            Err(first) => self.second.authenticate(token).await.map_err(|second| {
                AuthError::Refused(format!(
                    "not a node token of this control plane ({first}); as a Kubernetes token: {second}"
                ))
            }),
        }
    }
}

/// Why a caller may not have the identity it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// gRPC PERMISSION_DENIED.
    #[error("{0}")]
    Denied(String),
    /// gRPC INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
}

/// The bearer token of a request, if one is well formed.
pub fn bearer_token<T>(request: &tonic::Request<T>) -> Result<&str, AuthError> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed("the authorization header is not ASCII".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("expected `Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed("expected `Bearer <token>`".into()));
    }
    Ok(token.trim())
}

/// Decides the identity a certificate is issued for.
///
/// - With `impersonate` (Istio's `ImpersonatedIdentity`): the caller must speak for a
///   node, and the model must place a running pod with that namespace and service account
///   on that node.
/// - Without: the caller gets its own identity, if its credential carries one.
pub fn authorize_identity(
    caller: &Caller,
    impersonate: Option<&str>,
    model: &Model,
    trust_domain: &str,
) -> Result<SpiffeId, Refusal> {
    match impersonate {
        Some(requested) => {
            let id: SpiffeId = requested.parse().map_err(|e| {
                Refusal::Invalid(format!("ImpersonatedIdentity {requested:?}: {e}"))
            })?;
            if id.trust_domain() != trust_domain {
                return Err(Refusal::Denied(format!(
                    "{id} is outside the trust domain {trust_domain}"
                )));
            }
            // Asking for one's own identity by name is not impersonation.
            if caller.identity.as_ref() == Some(&id) {
                return Ok(id);
            }
            let Some(node) = &caller.node else {
                return Err(Refusal::Denied(
                    "this credential is not a node credential and cannot impersonate".into(),
                ));
            };
            if model.node_runs_identity(node, &id) {
                Ok(id)
            } else {
                Err(Refusal::Denied(format!(
                    "no running pod on node {node} has identity {id}"
                )))
            }
        }
        None => caller.identity.clone().ok_or_else(|| {
            Refusal::Denied(
                "a node credential carries no identity of its own: ask for a pod's identity with the ImpersonatedIdentity metadata field"
                    .into(),
            )
        }),
    }
}

/// Errors reading or creating the signing key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error(transparent)]
    Io(#[from] ambit_tls::CaError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The control plane's token signing key.
pub struct TokenSigner {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// The claims of a node token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub node: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

impl TokenSigner {
    /// Loads the key from `<state_dir>/token-key.pem`, creating it on first use. Safe to
    /// race with another process creating it: the loser reads the winner's key.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, KeyError> {
        let path = state_dir.join(TOKEN_KEY_FILE);
        if !path.exists() {
            ambit_tls::ca::create_private_dir(state_dir)?;
            let rng = SystemRandom::new();
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| KeyError::Bad {
                    path: path.clone(),
                    message: "key generation failed".into(),
                })?;
            let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()));
            match ambit_tls::ca::write_new_file(&path, pem.as_bytes(), 0o600) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "created the node token signing key")
                }
                Err(ambit_tls::CaError::Write { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::load(&path)
    }

    fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&bytes).map_err(|e| KeyError::Bad {
            path: path.to_owned(),
            message: format!("no PKCS#8 PEM private key: {e}"),
        })?;
        let rng = SystemRandom::new();
        let key = ambit_core::crypto::ecdsa_key_pair_from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
        )
        .map_err(|e| KeyError::Bad {
            path: path.to_owned(),
            message: format!("not an ECDSA P-256 key: {e}"),
        })?;
        let kid = key_id(key.public_key().as_ref());
        Ok(Self { key, kid, rng })
    }

    /// Mints a token for `node`, valid for `ttl` (at most [`MAX_TOKEN_TTL`]).
    pub fn mint(&self, node: &str, ttl: Duration) -> Result<String, String> {
        if !is_dns1123_subdomain(node) {
            return Err(format!(
                "{node:?} is not a valid node name (a DNS-1123 subdomain)"
            ));
        }
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(format!(
                "token lifetime must be between 1s and {} days",
                MAX_TOKEN_TTL.as_secs() / 86_400
            ));
        }
        let now = unix_now();
        let mut jti = [0u8; 12];
        ambit_core::crypto::rand::SecureRandom::fill(&self.rng, &mut jti)
            .map_err(|_| "the system random generator failed".to_owned())?;
        let claims = NodeClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: format!("node:{node}"),
            node: node.into(),
            iat: now,
            exp: now + ttl.as_secs(),
            jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let header = Header {
            alg: "ES256".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let claims = serde_json::to_vec(&claims).map_err(|e| e.to_string())?;
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| "signing failed".to_owned())?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// The verifying half.
    pub fn verifier(&self) -> NodeTokenAuthenticator {
        NodeTokenAuthenticator {
            public_key: self.key.public_key().as_ref().to_vec(),
            kid: self.kid.clone(),
        }
    }
}

fn key_id(public_key: &[u8]) -> String {
    let digest = ambit_core::crypto::sha256(public_key);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks node tokens minted by this control plane's key.
#[derive(Debug, Clone)]
pub struct NodeTokenAuthenticator {
    public_key: Vec<u8>,
    kid: String,
}

impl NodeTokenAuthenticator {
    /// Verifies `token` at time `now` (seconds since the epoch) and returns its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<NodeClaims, AuthError> {
        let malformed = |m: &str| AuthError::Malformed(m.to_owned());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed("longer than 8 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected three dot-separated parts"));
        };
        let header: Header = decode_json(h).ok_or_else(|| malformed("bad header"))?;
        if header.alg != "ES256" {
            return Err(AuthError::Malformed(format!(
                "algorithm {:?} is not accepted (ES256 only)",
                header.alg
            )));
        }
        if header.kid.as_deref().is_some_and(|k| k != self.kid) {
            return Err(AuthError::BadSignature);
        }
        let sig = B64
            .decode(s)
            .map_err(|_| malformed("bad signature encoding"))?;
        let signing_input = &token[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.public_key)
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| AuthError::BadSignature)?;
        let claims: NodeClaims = decode_json(c).ok_or_else(|| malformed("bad claims"))?;
        if claims.iss != ISSUER || claims.aud != AUDIENCE {
            return Err(AuthError::WrongAudience(format!(
                "issuer {:?}, audience {:?}",
                claims.iss, claims.aud
            )));
        }
        if claims.exp <= now {
            return Err(AuthError::Expired(
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(claims.exp))
                    .to_string(),
            ));
        }
        if claims.iat > now + CLOCK_SKEW.as_secs() {
            return Err(AuthError::NotYetValid);
        }
        if !is_dns1123_subdomain(&claims.node) || claims.sub != format!("node:{}", claims.node) {
            return Err(malformed("bad node claim"));
        }
        Ok(claims)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = B64.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[async_trait]
impl Authenticator for NodeTokenAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let claims = self.verify(token, unix_now())?;
        Ok(Caller {
            node: Some(claims.node),
            identity: None,
            method: "node-token",
        })
    }
}

#[cfg(test)]
mod tests;
