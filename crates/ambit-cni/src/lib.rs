//! Ambit's node agent (`ambit cni`, Istio's istio-cni role).
//!
//! - [`agent`]: follows discovery for the pods on its node, enrolls and un-enrolls them.
//! - [`redirect`]: the redirection rules installed inside an enrolled pod's network
//!   namespace, so the node proxy sees its traffic.
//! - [`zds`]: the client side of ZDS, which hands pods (and their network namespaces) to
//!   the node proxy.

pub mod agent;
pub mod redirect;
pub mod zds;
