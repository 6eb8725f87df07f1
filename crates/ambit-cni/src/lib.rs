//! Ambit's node agent (`ambit cni`, Istio's istio-cni role).
//!
//! [`redirect`]: the redirection rules installed inside an enrolled pod's network
//! namespace, so the node proxy sees its traffic. Enrollment over ZDS comes with the
//! node agent itself.

pub mod redirect;
