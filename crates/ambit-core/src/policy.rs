//! L4 authorization policies as the node proxy receives them (Istio's
//! `istio.security.Authorization`): already reduced by the control plane to what can be
//! decided from a connection (identities, namespaces, addresses, ports).

use std::net::IpAddr;

use serde::Serialize;

use crate::discovery::Str;

/// One policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Authorization {
    pub name: Str,
    pub namespace: Str,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// The policy matches a connection if any rule matches.
    pub rules: Vec<Rule>,
}

impl Authorization {
    /// The discovery resource name: `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// Matches when every clause matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches when any of its matches matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Every non-empty field must hold: a positive list by any entry, a negative list by
/// none of its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// A string match as Istio writes them: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(Str),
    Prefix(Str),
    Suffix(Str),
    Presence,
}

impl StringMatch {
    /// Reads Istio's wildcard syntax.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.into())
        } else if let Some(x) = s.strip_prefix('*') {
            StringMatch::Suffix(x.into())
        } else {
            StringMatch::Exact(s.into())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e.as_ref(),
            StringMatch::Prefix(p) => value.starts_with(p.as_ref()),
            StringMatch::Suffix(s) => value.ends_with(s.as_ref()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// A block, if the prefix fits the address family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matches() {
        assert!(StringMatch::parse("a").matches("a"));
        assert!(!StringMatch::parse("a").matches("ab"));
        assert!(StringMatch::parse("cluster.local/*").matches("cluster.local/ns/x/sa/y"));
        assert!(StringMatch::parse("*/sa/sleep").matches("cluster.local/ns/x/sa/sleep"));
        assert!(StringMatch::parse("*").matches("x"));
        assert!(!StringMatch::parse("*").matches(""));
    }

    #[test]
    fn nets() {
        let n = IpNet::new("198.18.0.0".parse().unwrap(), 15).unwrap();
        assert!(n.contains("198.19.1.1".parse().unwrap()));
        assert!(!n.contains("198.20.0.0".parse().unwrap()));
        assert!(IpNet::new("1.2.3.4".parse().unwrap(), 33).is_none());
        let all = IpNet::new("::".parse().unwrap(), 0).unwrap();
        assert!(all.contains("fd00::1".parse().unwrap()));
        assert!(!all.contains("1.2.3.4".parse().unwrap()));
    }
}
