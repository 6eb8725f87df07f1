//! L4 authorization at the destination: the policies discovery sent
//! ([`ambit_core::policy`]), decided once per connection with the peer's SPIFFE ID,
//! and again for each open connection when policies change.
//!
//! The policies that apply to a workload are found through the state's indexes
//! (mesh-wide, the workload's namespace, those its discovery entry lists), so a
//! decision costs the same whether the mesh holds ten policies or ten thousand.

use std::sync::Arc;

use ambit_core::policy::{Connection, Evaluation, evaluate};
use ambit_core::state::Store;
use tokio::sync::watch;

use crate::dataplane::{Authorizer, DataPlane, InboundConn};

/// Enforces the policies of the discovery state.
#[derive(Debug, Default)]
pub struct Policies;

impl Authorizer for Policies {
    fn check<'s>(&self, c: &InboundConn<'s>) -> Evaluation<'s> {
        // Without its discovery entry the workload's selector policies are unknown.
        let Some(destination) = c.destination else {
            return Evaluation::unknown_workload();
        };
        let principal = c.source_identity.map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            )
        });
        let conn = Connection {
            source_ip: c.source_addr.ip(),
            source_principal: principal.as_deref(),
            source_namespace: c.source_identity.map(|id| id.namespace()),
            destination_ip: c.destination_addr.ip(),
            destination_port: c.destination_addr.port(),
        };
        evaluate(c.state.policies_for(destination).map(|p| &**p), &conn)
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
