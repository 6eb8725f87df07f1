//! PeerAuthentication as L4 policies the node proxy enforces.
//!
//! Istio's node proxy has no notion of PeerAuthentication: the control plane expresses
//! "mTLS required" as a DENY of connections without a peer identity
//! (`notPrincipals: ["*"]`), limited to the ports the mode covers. Here the mode of
//! each workload is resolved in the control plane, with Istio's precedence:
//!
//! 1. a PeerAuthentication in the workload's namespace whose selector matches it (the
//!    first by name if several do), with its `portLevelMtls`;
//! 2. else the namespace's PeerAuthentication without a selector;
//! 3. else the mesh-wide one (no selector, in the root namespace);
//! 4. else PERMISSIVE.
//!
//! `UNSET` (or no `mtls`) inherits from the next level; `DISABLE` is treated as
//! PERMISSIVE (the node proxy always accepts mTLS), with a warning. `portLevelMtls` is
//! only valid on selector policies (the manifest parser refuses it elsewhere), as in
//! Istio.
//!
//! The PeerAuthentication that decides a workload's mode yields one `Authorization`,
//! `<its namespace>/ambit_peer_authentication_<its name>` (scope WORKLOAD_SELECTOR),
//! listed on every workload it decides for, and only when some port is STRICT.

use std::collections::BTreeSet;
use std::sync::Arc;

use ambit_proto::security as pb_sec;

use crate::model::fields::Labels;
use crate::model::resources::{MtlsMode, MutualTls, PeerAuthentication};
use crate::model::{Kind, Model, Object};

/// Prefix of the names of the policies made from PeerAuthentications (the underscore
/// cannot appear in a Kubernetes name, so they never collide with a user's policy).
pub const CONVERTED_PREFIX: &str = "ambit_peer_authentication_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Permissive,
}

fn mode_of(m: Option<&MutualTls>) -> Option<Mode> {
    match m.and_then(|m| m.mode) {
        None | Some(MtlsMode::Unset) => None,
        Some(MtlsMode::Strict) => Some(Mode::Strict),
        Some(MtlsMode::Permissive) | Some(MtlsMode::Disable) => Some(Mode::Permissive),
    }
}

fn has_selector(pa: &PeerAuthentication) -> bool {
    pa.spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty())
}

fn in_namespace<'a>(
    model: &'a Model,
    ns: &'a str,
) -> impl Iterator<Item = &'a Arc<PeerAuthentication>> + 'a {
    model
        .in_namespace(Kind::PeerAuthentication, ns)
        .filter_map(|o| match o {
            Object::PeerAuthentication(p) => Some(p),
            _ => None,
        })
}

/// The namespace-wide PeerAuthentication of `ns` (the first by name).
fn namespace_wide<'a>(model: &'a Model, ns: &'a str) -> Option<&'a Arc<PeerAuthentication>> {
    in_namespace(model, ns).find(|p| !has_selector(p))
}

/// The selector PeerAuthentication that applies to a workload with `labels` in `ns`.
fn selecting<'a>(
    model: &'a Model,
    ns: &'a str,
    labels: &Labels,
) -> Option<&'a Arc<PeerAuthentication>> {
    in_namespace(model, ns).find(|p| {
        p.spec
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty() && labels.matches(&s.match_labels))
    })
}

/// The resolved requirement of the workloads one PeerAuthentication decides for.
struct Requirement<'a> {
    owner: &'a Arc<PeerAuthentication>,
    base: Mode,
    /// Ports whose mode differs from `base`.
    exceptions: BTreeSet<u16>,
}

impl Requirement<'_> {
    fn needs_policy(&self) -> bool {
        self.base == Mode::Strict || !self.exceptions.is_empty()
    }

    fn key(&self) -> String {
        format!(
            "{}/{CONVERTED_PREFIX}{}",
            self.owner.metadata.namespace(),
            self.owner.metadata.name
        )
    }
}

/// Resolves the mode in `ns` given the selector PeerAuthentication that applies (if any).
fn resolve<'a>(
    model: &'a Model,
    workload_pa: Option<&'a Arc<PeerAuthentication>>,
    ns: &'a str,
    root: &'a str,
) -> Option<Requirement<'a>> {
    let levels = [namespace_wide(model, ns), namespace_wide(model, root)];
    let inherited = levels
        .iter()
        .flatten()
        .find_map(|p| mode_of(p.spec.mtls.as_ref()).map(|m| (*p, m)));
    if let Some(w) = workload_pa {
        let base = mode_of(w.spec.mtls.as_ref())
            .or(inherited.map(|(_, m)| m))
            .unwrap_or(Mode::Permissive);
        let exceptions = w
            .spec
            .port_level_mtls
            .iter()
            .filter(|(_, m)| mode_of(Some(m)).is_some_and(|m| m != base))
            .map(|(p, _)| p.0)
            .collect();
        return Some(Requirement {
            owner: w,
            base,
            exceptions,
        });
    }
    inherited.map(|(owner, base)| Requirement {
        owner,
        base,
        exceptions: BTreeSet::new(),
    })
}

/// The converted policy a pod with `labels` in `ns` must list, if any.
pub fn policy_for_pod(model: &Model, ns: &str, labels: &Labels, root: &str) -> Option<String> {
    resolve(model, selecting(model, ns, labels), ns, root)
        .filter(Requirement::needs_policy)
        .map(|r| r.key())
}

/// The policy made from one PeerAuthentication (`None` when it decides nothing STRICT),
/// with warnings about what it cannot do.
pub fn converted(
    model: &Model,
    pa: &Arc<PeerAuthentication>,
    root: &str,
) -> (Option<pb_sec::Authorization>, Vec<String>) {
    let mut warnings = Vec::new();
    let disabled = pa
        .spec
        .mtls
        .iter()
        .chain(pa.spec.port_level_mtls.values())
        .any(|m| m.mode == Some(MtlsMode::Disable));
    if disabled {
        warnings.push(
            "mode DISABLE is treated as PERMISSIVE: the node proxy always accepts mTLS".to_owned(),
        );
    }
    let ns = pa.metadata.namespace();
    let requirement = if has_selector(pa) {
        resolve(model, Some(pa), ns, root)
    } else {
        if let Some(first) = namespace_wide(model, ns)
            && !Arc::ptr_eq(first, pa)
        {
            warnings.push(format!(
                "{}/{} is the namespace's PeerAuthentication (the first by name); this one is ignored",
                ns, first.metadata.name
            ));
        }
        resolve(model, None, ns, root)
    };
    let Some(r) = requirement.filter(|r| Arc::ptr_eq(r.owner, pa) && r.needs_policy()) else {
        return (None, warnings);
    };
    let ports: Vec<u32> = r.exceptions.iter().map(|p| u32::from(*p)).collect();
    let presence = pb_sec::StringMatch {
        match_type: Some(pb_sec::string_match::MatchType::Presence(())),
    };
    let mut m = pb_sec::Match {
        not_principals: vec![presence],
        ..Default::default()
    };
    // Plaintext is refused on the STRICT ports: all but the exceptions, or only them.
    if r.base == Mode::Strict {
        m.not_destination_ports = ports;
    } else {
        m.destination_ports = ports;
    }
    let auth = pb_sec::Authorization {
        name: format!("{CONVERTED_PREFIX}{}", pa.metadata.name),
        namespace: ns.to_owned(),
        scope: pb_sec::Scope::WorkloadSelector as i32,
        action: pb_sec::Action::Deny as i32,
        rules: vec![pb_sec::Rule {
            clauses: vec![pb_sec::Clause { matches: vec![m] }],
        }],
        ..Default::default()
    };
    (Some(auth), warnings)
}
