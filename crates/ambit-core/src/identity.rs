//! SPIFFE identities of mesh workloads.
//!
//! A workload's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! the form Istio uses. It is carried as the only URI SAN of workload certificates and is
//! what authorization policies match as the source principal.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";

/// A workload identity in Istio's SPIFFE form.
///
/// Constructing one validates every part, so a value of this type is always well formed
/// and its string form parses back to an equal value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a valid workload SPIFFE ID (or one of its parts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    MissingScheme,
    #[error(
        "a workload SPIFFE ID must have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadPath,
    #[error(
        "invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_' (at most 255 characters)"
    )]
    BadTrustDomain(String),
    #[error(
        "invalid namespace {0:?}: must be a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters)"
    )]
    BadNamespace(String),
    #[error(
        "invalid service account {0:?}: must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)"
    )]
    BadServiceAccount(String),
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let trust_domain = trust_domain.into();
        let namespace = namespace.into();
        let service_account = service_account.into();
        if !is_trust_domain(&trust_domain) {
            return Err(IdentityError::BadTrustDomain(trust_domain));
        }
        if !is_dns1123_label(&namespace) {
            return Err(IdentityError::BadNamespace(namespace));
        }
        if !is_dns1123_subdomain(&service_account) {
            return Err(IdentityError::BadServiceAccount(service_account));
        }
        Ok(Self {
            trust_domain,
            namespace,
            service_account,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(SCHEME).ok_or(IdentityError::MissingScheme)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::BadPath);
        };
        Self::new(td, ns, sa)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`; 1 to 255 characters.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// A DNS-1123 label (Kubernetes namespace and most object names): `[a-z0-9]([-a-z0-9]*[a-z0-9])?`,
/// at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain (Kubernetes object names): dot-separated DNS-1123 labels, at most
/// 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        let again: SpiffeId = id.to_string().parse().unwrap();
        assert_eq!(again, id);
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("cluster.local/ns/a/sa/b", IdentityError::MissingScheme),
            ("spiffe://cluster.local/ns/a", IdentityError::BadPath),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                IdentityError::BadPath,
            ),
            ("spiffe://cluster.local/sa/a/ns/b", IdentityError::BadPath),
            (
                "spiffe://cluster.local/ns/a/sa/",
                IdentityError::BadServiceAccount(String::new()),
            ),
            (
                "spiffe:///ns/a/sa/b",
                IdentityError::BadTrustDomain(String::new()),
            ),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                IdentityError::BadTrustDomain("Cluster.Local".into()),
            ),
            (
                "spiffe://td/ns/A/sa/b",
                IdentityError::BadNamespace("A".into()),
            ),
            (
                "spiffe://td/ns/-a/sa/b",
                IdentityError::BadNamespace("-a".into()),
            ),
            (
                "spiffe://td/ns/a.b/sa/b",
                IdentityError::BadNamespace("a.b".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b_c",
                IdentityError::BadServiceAccount("b_c".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "{input}");
        }
    }

    #[test]
    fn service_account_may_be_a_subdomain() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b.c".parse().unwrap();
        assert_eq!(id.service_account(), "b.c");
    }

    #[test]
    fn dns_names() {
        assert!(is_dns1123_label("a"));
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_dns1123_subdomain("a.b-c.d"));
    }
}
