//! Ambit's node agent (`ambit cni`, Istio's istio-cni role).
//!
//! - [`agent`]: follows discovery for the pods on its node, enrolls and un-enrolls them.
//! - [`redirect`]: the redirection rules installed inside an enrolled pod's network
//!   namespace, so the node proxy sees its traffic.
//! - [`plugin`]: the CNI plugin the container runtime runs when it creates a pod (hands
//!   the pod to the agent so it is captured before its application starts), and its
//!   installation into the node's CNI configuration.
//! - [`netns`]: finding a pod's network namespace by its addresses.
//! - [`zds`]: the client side of ZDS, which hands pods (and their network namespaces) to
//!   the node proxy.

pub mod agent;
mod events;
pub mod netns;
pub mod plugin;
pub mod redirect;
pub mod zds;

pub use events::EventsError;
