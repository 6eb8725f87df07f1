//! Discovery: the model translated into Istio's discovery resources and served to node
//! proxies over delta xDS.
//!
//! [`snapshot::publish`] turns model versions into resource [`snapshot::Snapshot`]s
//! (re-translating only what changed, batching bursts); [`server::AdsService`] serves
//! them to each subscriber as deltas.

pub mod peer_authn;
pub mod server;
pub mod snapshot;
pub mod translate;
