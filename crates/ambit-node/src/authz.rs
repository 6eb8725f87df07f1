//! L4 authorization at the destination: the policies discovery sent
//! ([`ambit_core::policy`]), decided once per connection with the peer's SPIFFE ID,
//! and again for each open connection when policies change.
//!
//! The policies that apply to a workload are found through the state's indexes
//! (mesh-wide, the workload's namespace, those its discovery entry lists), so a
//! decision costs the same whether the mesh holds ten policies or ten thousand.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ambit_core::SpiffeId;
use ambit_core::policy::{Connection, Decider, Evaluation, evaluate};
use ambit_core::state::Store;
use tokio::sync::watch;

use crate::dataplane::{Authorizer, DataPlane, InboundConn};
use crate::metrics::Metrics;

/// Enforces the policies of the discovery state.
pub struct Policies {
    /// The mesh's trust domain and its aliases: only identities from these are matched
    /// by `principals`, `namespaces` and `serviceAccounts`.
    trust_domains: Vec<String>,
    metrics: Arc<Metrics>,
    /// Policies already reported as unavailable (each is logged and counted once).
    reported: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("trust_domains", &self.trust_domains)
            .finish_non_exhaustive()
    }
}

impl Policies {
    pub fn new(trust_domains: Vec<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            trust_domains,
            metrics,
            reported: Mutex::new(HashSet::new()),
        }
    }

    /// Logs and counts a policy that decided a connection without being known, once.
    /// Never waits: if another connection is reporting at this moment, this one skips
    /// (the policy is reported by that one or the next).
    fn report(&self, e: &Evaluation<'_>) {
        let (key, reason) = match e.verdict.by {
            Decider::MissingPolicy(key) => (key.to_owned(), "missing"),
            Decider::Refused(p) => (p.key(), "refused"),
            _ => return,
        };
        let Ok(mut seen) = self.reported.try_lock() else {
            return;
        };
        if seen.insert(format!("{reason} {key}")) {
            self.metrics.unavailable_policy(reason);
            tracing::warn!(
                policy = %key,
                reason,
                decision = %e.verdict,
                "a policy that applies is not available to this node proxy; connections it applies to are denied until it is"
            );
        }
    }

    fn in_mesh(&self, id: &SpiffeId) -> bool {
        self.trust_domains.iter().any(|td| td == id.trust_domain())
    }
}

impl Authorizer for Policies {
    fn check<'s>(&self, c: &InboundConn<'s>) -> Evaluation<'s> {
        // How each unknown resolves, and why:
        // - The destination is not in discovery (not synced yet, or removed): its
        //   selector policies are unknown, and any of them may deny. Refused.
        // - It names a policy this proxy does not hold (not received yet, or removed
        //   before the workload stopped naming it): that policy may be a DENY, or an
        //   ALLOW that admits only some peers. Refused.
        // - A policy that applies was sent but could not be accepted (undecodable, an
        //   unknown action or extension): it is held as a refused stand-in, which
        //   denies (see `Authorization::refused`). Refused, by `evaluate`.
        // - The peer's identity is from another trust domain: it matches no principal,
        //   namespace or service account, like a peer without one (the HBONE server
        //   already refuses such certificates at the handshake; this holds even if a
        //   bundle trusts a foreign root).
        let Some(destination) = c.destination else {
            return Evaluation::unknown_workload();
        };
        if let Some(key) = c.state.missing_policy(destination) {
            let e = Evaluation::refusal(Decider::MissingPolicy(key));
            self.report(&e);
            return e;
        }
        let peer = c.source_identity.filter(|id| self.in_mesh(id));
        let principal = |td: &str, id: &SpiffeId| {
            format!("{td}/ns/{}/sa/{}", id.namespace(), id.service_account())
        };
        // With aliases, the peer's identity under every other accepted trust domain too.
        let aliases: Vec<String> = match peer {
            Some(id) if self.trust_domains.len() > 1 => self
                .trust_domains
                .iter()
                .filter(|td| td.as_str() != id.trust_domain())
                .map(|td| principal(td, id))
                .collect(),
            _ => Vec::new(),
        };
        let principal = peer.map(|id| principal(id.trust_domain(), id));
        let conn = Connection {
            source_ip: c.source_addr.ip(),
            source_principal: principal.as_deref(),
            source_principal_aliases: &aliases,
            source_namespace: peer.map(|id| id.namespace()),
            source_service_account: peer.map(|id| id.service_account()),
            destination_ip: c.destination_addr.ip(),
            destination_port: c.destination_addr.port(),
            request: None,
        };
        let e = evaluate(c.state.policies_for(destination).map(|p| &**p), &conn);
        self.report(&e);
        e
    }
}

/// Publishes the state's policy epoch to the data path whenever it moves, so open
/// connections re-check themselves only when policies may have changed (not on every
/// workload update). Runs until the discovery client goes away.
pub async fn follow_policy_changes(
    store: Arc<Store>,
    mut updates: watch::Receiver<ambit_xds::XdsState>,
    dp: Arc<DataPlane>,
) {
    let mut last = store.load().policy_epoch();
    while updates.changed().await.is_ok() {
        let epoch = store.load().policy_epoch();
        if epoch != last {
            last = epoch;
            dp.policy_changes.send_replace(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ambit_core::discovery::{Str, TunnelProtocol};
    use ambit_core::policy::{Authorization, PolicyAction, PolicyScope, Rule};
    use ambit_core::state::State;

    use super::*;
    use ambit_core::testing::workload;

    fn deny_all(ns: &str, name: &str, scope: PolicyScope) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action: PolicyAction::Deny,
            dry_run: false,
            rules: vec![Rule::default()],
            refused: None,
            unenforced: None,
            targets: Vec::new(),
            custom: None,
        }
    }

    fn decide(p: &Policies, state: &State, uid: &str, peer: Option<&SpiffeId>) -> (bool, String) {
        let destination = state.workload(uid).map(|w| &**w);
        let e = p.check(&InboundConn {
            state,
            destination,
            destination_addr: SocketAddr::from(([198, 18, 2, 10], 8080)),
            source_addr: SocketAddr::from(([198, 18, 1, 10], 40000)),
            source_identity: peer,
        });
        (e.verdict.allowed, e.verdict.to_string())
    }

    fn unavailable(m: &Metrics, reason: &str) -> String {
        m.encode()
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "ambit_node_unavailable_policies_total{{reason=\"{reason}\"}}"
                ))
            })
            .unwrap_or("")
            .to_owned()
    }

    #[test]
    fn a_named_policy_this_proxy_does_not_hold_denies_and_is_counted_once() {
        let metrics = Arc::new(Metrics::default());
        let p = Policies::new(vec!["cluster.local".into()], metrics.clone());
        let mut w = workload("echo", "198.18.2.10", "n", "z", TunnelProtocol::Hbone, &[]);
        let mut profile = (*w.profile).clone();
        profile.authorization_policies = vec![Str::from("demo/allow-some")].into();
        w.profile = Arc::new(profile);
        let mut state = State::default();
        state.upsert_workload(w);
        let sleep: SpiffeId = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
        for _ in 0..3 {
            let (allowed, why) = decide(&p, &state, "echo", Some(&sleep));
            assert!(!allowed);
            assert!(why.contains("demo/allow-some"), "{why}");
        }
        assert!(
            unavailable(&metrics, "missing").ends_with(" 1"),
            "{}",
            metrics.encode()
        );
        // Once it arrives, it decides: here a DENY without rules, which denies nobody.
        let mut held = deny_all("demo", "allow-some", PolicyScope::WorkloadSelector);
        held.rules.clear();
        state.upsert_policy(held);
        assert!(decide(&p, &state, "echo", Some(&sleep)).0);
    }

    #[test]
    fn a_refused_policy_denies_where_it_would_apply() {
        let metrics = Arc::new(Metrics::default());
        let p = Policies::new(vec!["cluster.local".into()], metrics.clone());
        let mut state = State::default();
        state.upsert_workload(workload(
            "echo",
            "198.18.2.10",
            "n",
            "z",
            TunnelProtocol::Hbone,
            &[],
        ));
        state.upsert_policy(Authorization::refused(
            "demo".into(),
            "bad".into(),
            PolicyScope::Namespace,
            "unknown action 9".into(),
        ));
        let (allowed, why) = decide(&p, &state, "echo", None);
        assert!(!allowed);
        assert!(
            why.contains("demo/bad") && why.contains("unknown action 9"),
            "{why}"
        );
        assert!(unavailable(&metrics, "refused").ends_with(" 1"));
    }

    #[test]
    fn identities_of_another_trust_domain_match_no_identity_field() {
        let metrics = Arc::new(Metrics::default());
        let mut state = State::default();
        let mut w = workload("echo", "198.18.2.10", "n", "z", TunnelProtocol::Hbone, &[]);
        let mut profile = (*w.profile).clone();
        profile.authorization_policies = vec![Str::from("demo/deny-plaintext")].into();
        w.profile = Arc::new(profile);
        state.upsert_workload(w);
        // DENY notPrincipals ["*"]: refuses connections without a (mesh) identity.
        let mut deny = deny_all("demo", "deny-plaintext", PolicyScope::WorkloadSelector);
        deny.rules = vec![Rule {
            clauses: vec![ambit_core::policy::Clause {
                matches: vec![ambit_core::policy::Match {
                    not_principals: vec![ambit_core::policy::StringMatch::Presence],
                    ..Default::default()
                }],
            }],
        }];
        state.upsert_policy(deny);
        let ours: SpiffeId = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
        let theirs: SpiffeId = "spiffe://evil.example/ns/demo/sa/sleep".parse().unwrap();
        let old: SpiffeId = "spiffe://old.local/ns/demo/sa/sleep".parse().unwrap();
        let p = Policies::new(vec!["cluster.local".into(), "old.local".into()], metrics);
        assert!(decide(&p, &state, "echo", Some(&ours)).0);
        assert!(
            decide(&p, &state, "echo", Some(&old)).0,
            "an alias is the mesh's own"
        );
        assert!(!decide(&p, &state, "echo", Some(&theirs)).0);

        // A principal written with one accepted trust domain matches the identity under
        // another: a DENY of cluster.local/.../sa/sleep stops old.local's sleep too.
        let mut deny = deny_all("demo", "deny-plaintext", PolicyScope::WorkloadSelector);
        deny.rules = vec![Rule {
            clauses: vec![ambit_core::policy::Clause {
                matches: vec![ambit_core::policy::Match {
                    principals: vec![ambit_core::policy::StringMatch::Exact(
                        "cluster.local/ns/demo/sa/sleep".into(),
                    )],
                    ..Default::default()
                }],
            }],
        }];
        state.upsert_policy(deny);
        assert!(!decide(&p, &state, "echo", Some(&ours)).0);
        assert!(
            !decide(&p, &state, "echo", Some(&old)).0,
            "the alias form is denied too"
        );
        let other: SpiffeId = "spiffe://old.local/ns/demo/sa/other".parse().unwrap();
        assert!(decide(&p, &state, "echo", Some(&other)).0);
    }
}
