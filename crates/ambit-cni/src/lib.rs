//! Ambit's node agent (`ambit cni`, Istio's istio-cni role).
//!
//! - [`redirect`]: the redirection rules installed inside an enrolled pod's network
//!   namespace, so the node proxy sees its traffic.
//! - [`zds`]: the client side of ZDS, which hands pods (and their network namespaces) to
//!   the node proxy.

pub mod redirect;
pub mod zds;
