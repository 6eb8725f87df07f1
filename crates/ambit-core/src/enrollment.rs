//! Which pods are in the mesh: one rule, read by the control plane (for discovery) and by
//! the node agent (when the container runtime creates a pod, before discovery knows it).

/// The label that enrolls a namespace or a pod (`ambient`), or opts a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// A pod is in the mesh when its own label says `ambient`, or it has no such label and
/// its namespace's says `ambient`. Any other value of the pod's label (`none`) opts it
/// out; host-network pods share the node's namespace and are never enrolled.
pub fn is_enrolled(
    pod_label: Option<&str>,
    namespace_label: Option<&str>,
    host_network: bool,
) -> bool {
    if host_network {
        return false;
    }
    match pod_label {
        Some(mode) => mode == "ambient",
        None => namespace_label == Some("ambient"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_label_wins_over_the_namespace_label() {
        assert!(is_enrolled(None, Some("ambient"), false));
        assert!(is_enrolled(Some("ambient"), None, false));
        assert!(!is_enrolled(Some("none"), Some("ambient"), false));
        assert!(!is_enrolled(None, None, false));
        assert!(!is_enrolled(None, Some("sidecar"), false));
        assert!(!is_enrolled(Some("ambient"), Some("ambient"), true));
    }
}
