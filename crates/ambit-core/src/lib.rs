//! Ambit's mesh model, free of I/O.
//!
//! - [`identity`]: the SPIFFE identity of a workload.
//! - [`crypto`]: the one cryptography library of the build (aws-lc-rs or ring).
//! - [`datapath`]: which threads carry traffic, and the work kept off them.
//! - [`discovery`]: workloads and services as the node proxy receives them.
//! - [`policy`]: L4 authorization policies as the node proxy receives them.
//! - [`route`]: where a connection (or a waypoint's request) to an address goes.
//! - [`telemetry`]: Istio's metric label sets.
//! - [`traffic`]: DestinationRule and LocalRateLimit settings at the waypoint.
//! - [`state`]: the indexed view the node proxy's data path reads without locks.
//!
//! Nothing here opens a socket or a file, so everything is testable in isolation and
//! cheap to depend on.

pub mod crypto;
pub mod datapath;
pub mod discovery;
pub mod enrollment;
pub mod http_route;
pub mod identity;
pub mod jwt;
pub mod policy;
pub mod route;
pub mod state;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod traffic;

pub use identity::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId};
