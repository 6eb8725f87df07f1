//! Ambit's mesh model, free of I/O.
//!
//! This crate holds the types every component shares: the SPIFFE identity of a workload
//! today; the discovery model (workloads, services, policies) and its indexed state as the
//! node proxy arrives. Nothing here opens a socket or a file, so everything is testable in
//! isolation and cheap to depend on.

pub mod identity;

pub use identity::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId};
