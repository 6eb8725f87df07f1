//! Workload certificates in a cluster: Kubernetes service-account tokens, checked by the
//! API server (TokenReview), as Istio's CA accepts them.
//!
//! - A token of a node proxy's service account (`--node-proxy-account`, by default
//!   `<root namespace>/ztunnel` and `<root namespace>/ambit-node`) speaks for the node its
//!   pod runs on: it must be bound to that pod (a projected token), the pod must be in the
//!   model with the same uid, and the node is the pod's `spec.nodeName`. The CA's rule
//!   then applies unchanged: such a caller may obtain only identities of pods on its node.
//! - Any other service account's token speaks for itself: it may obtain only its own
//!   identity, `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
//!
//! The token is sent to the API server and nowhere else; it is never logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_control::auth::{AuthError, Authenticator, Caller};
use ambit_control::model::{Kind, Model, Object};
use ambit_core::SpiffeId;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// The pod a bound service-account token names (TokenReview's `extra`).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Tokens longer than this are refused before the API server is asked.
const MAX_TOKEN_BYTES: usize = 8 << 10;
/// Reviews in flight at once; more wait (up to [`REVIEW_WAIT`]) or are refused, so
/// callers cannot turn the certificate port into a flood of API requests.
const MAX_REVIEWS: usize = 16;
const REVIEW_WAIT: Duration = Duration::from_secs(2);
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a review's answer is reused for the same token (the API server caches its
/// own for 10 s). The pod a node token is bound to is looked up afresh every time.
const CACHE_FOR: Duration = Duration::from_secs(30);
const CACHE_ENTRIES: usize = 4096;

/// What TokenReview said about a token: the service account and its extras.
#[derive(Clone)]
struct Reviewed {
    username: String,
    extra: BTreeMap<String, Vec<String>>,
}

pub struct TokenReviewAuthenticator {
    reviews: tokio::sync::Semaphore,
    cache: Mutex<HashMap<[u8; 32], (Reviewed, Instant)>>,
    client: kube::Client,
    model: watch::Receiver<Arc<Model>>,
    trust_domain: String,
    audiences: Vec<String>,
    /// `namespace/name` of the service accounts node proxies run as.
    node_accounts: BTreeSet<String>,
}

impl TokenReviewAuthenticator {
    pub fn new(
        client: kube::Client,
        model: watch::Receiver<Arc<Model>>,
        trust_domain: String,
        audiences: Vec<String>,
        node_accounts: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            reviews: tokio::sync::Semaphore::new(MAX_REVIEWS),
            cache: Mutex::new(HashMap::new()),
            client,
            model,
            trust_domain,
            audiences,
            node_accounts: node_accounts.into_iter().collect(),
        }
    }
}

fn refused(message: impl Into<String>) -> AuthError {
    AuthError::Refused(message.into())
}

impl TokenReviewAuthenticator {
    /// Asks the API server about `token` (or reuses a recent answer).
    async fn review(&self, token: &str) -> Result<Reviewed, AuthError> {
        // A JWT of sane size, or no request at all.
        if token.len() > MAX_TOKEN_BYTES
            || token.split('.').count() != 3
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
        {
            return Err(refused("not a JSON web token"));
        }
        let digest = ambit_core::crypto::sha256(token.as_bytes());
        if let Some((r, at)) = self.cache_get(&digest)
            && at.elapsed() < CACHE_FOR
        {
            return Ok(r);
        }
        let _permit = tokio::time::timeout(REVIEW_WAIT, self.reviews.acquire())
            .await
            .map_err(|_| refused("too many token reviews in progress; retry shortly"))?
            .map_err(|_| refused("shutting down"))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| refused("the API server's TokenReview timed out"))?
                .map_err(|e| refused(format!("the API server's TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(refused(format!(
                "the API server did not accept the token{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        // The API server checked the audiences we asked for; it says which matched.
        let matched = status.audiences.unwrap_or_default();
        if !matched.iter().any(|a| self.audiences.contains(a)) {
            return Err(refused(format!(
                "the token is not for audience {}",
                self.audiences.join(" or ")
            )));
        }
        let user = status.user.unwrap_or_default();
        let reviewed = Reviewed {
            username: user.username.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(digest, (reviewed.clone(), Instant::now()));
        }
        Ok(reviewed)
    }

    fn cache_get(&self, digest: &[u8; 32]) -> Option<(Reviewed, Instant)> {
        self.cache.lock().ok()?.get(digest).cloned()
    }
}

#[async_trait::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let Reviewed { username, extra } = self.review(token).await?;
        let Some(account) = username.strip_prefix("system:serviceaccount:") else {
            return Err(refused(format!(
                "{username:?} is not a service account; only service-account tokens are accepted"
            )));
        };
        let Some((namespace, name)) = account.split_once(':') else {
            return Err(refused(format!("malformed service account {account:?}")));
        };
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if !self.node_accounts.contains(&format!("{namespace}/{name}")) {
            let identity = SpiffeId::new(&self.trust_domain, namespace, name)
                .map_err(|e| refused(format!("service account {namespace}/{name}: {e}")))?;
            return Ok(Caller {
                node: None,
                identity: Some(identity),
                method: "kubernetes token",
            });
        }
        // A node proxy: its node is where the pod its token is bound to runs.
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(refused(format!(
                "the token of node proxy account {namespace}/{name} is not bound to a pod; mount a projected service-account token (audience {})",
                self.audiences.join(", ")
            )));
        };
        let model = self.model.borrow().clone();
        let Some(Object::Pod(p)) = model.lookup(Kind::Pod, namespace, &pod) else {
            return Err(refused(format!(
                "the pod {namespace}/{pod} the token is bound to is not known (yet); retry shortly"
            )));
        };
        if p.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(refused(format!(
                "the pod {namespace}/{pod} the token was bound to has been replaced"
            )));
        }
        if p.is_terminated() {
            return Err(refused(format!(
                "the pod {namespace}/{pod} the token is bound to has terminated"
            )));
        }
        let Some(node) = p.node() else {
            return Err(refused(format!(
                "the pod {namespace}/{pod} the token is bound to is not on a node"
            )));
        };
        Ok(Caller {
            node: Some(node.to_owned()),
            identity: None,
            method: "kubernetes node-proxy token",
        })
    }
}
