//! Protobuf messages and gRPC services Ambit speaks, generated at build time from the
//! `.proto` files in this crate's `proto/` folder.
//!
//! Every message here but `ambit.waypoint.v1` (Ambit's own) is wire-compatible with Istio ambient: package names, message names,
//! field numbers and types match what Istio's components send, so an Istio node proxy can
//! talk to Ambit's control plane and the reverse. Only the fields Ambit uses are declared;
//! protobuf skips the others on decode.

#![allow(missing_docs, clippy::all)]

/// `istio.v1.auth`: the certificate-signing service (Istio's CSR API).
pub mod ca {
    tonic::include_proto!("istio.v1.auth");

    /// The metadata key a node proxy uses to ask for a workload's identity.
    pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
}

/// `istio.workload`: the discovery types (workloads and services).
pub mod workload {
    tonic::include_proto!("istio.workload");

    /// Type URL of [`Address`] resources.
    pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
}

/// `istio.security`: L4 authorization policies.
pub mod security {
    tonic::include_proto!("istio.security");

    /// Type URL of [`Authorization`] resources.
    pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

    /// The extension that carries an AUDIT policy's rules (its config: an
    /// [`Authorization`] holding only them), on a policy published as a DENY without rules.
    pub const AUDIT_EXTENSION: &str = "ambit.io/audit";

    /// The extension that marks a policy no node proxy enforces (bound to a waypoint by
    /// `targetRefs`, or action CUSTOM) on a policy published as a DENY without rules, so
    /// that node proxies can show it; its config is a `google.protobuf.StringValue`
    /// saying why.
    pub const UNENFORCED_EXTENSION: &str = "ambit.io/unenforced";

    /// Type URL of `google.protobuf.StringValue`.
    pub const STRING_VALUE_TYPE_URL: &str = "type.googleapis.com/google.protobuf.StringValue";
}

/// `istio.workload.zds`: node agent <-> node proxy.
pub mod zds {
    tonic::include_proto!("istio.workload.zds");
}

/// `ambit.waypoint.v1`: Ambit's discovery type for waypoints (AuthorizationPolicies bound
/// by `targetRefs`, with their request fields). Not part of Istio's API: Istio's node
/// proxy never asks for it.
pub mod waypoint {
    tonic::include_proto!("ambit.waypoint.v1");

    /// Type URL of [`Policy`] resources.
    pub const POLICY_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.Policy";
    /// Type URL of [`Route`] resources.
    pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.Route";
    /// Type URL of [`TrafficPolicy`] resources.
    pub const TRAFFIC_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.TrafficPolicy";
}

/// `ambit.telemetry.v1`: node proxies' and waypoints' reports to the control plane's
/// mesh console. Not part of Istio's API.
pub mod telemetry {
    tonic::include_proto!("ambit.telemetry.v1");
}

/// `envoy.service.discovery.v3`: delta aggregated discovery.
pub mod discovery {
    tonic::include_proto!("envoy.service.discovery.v3");

    /// Ambit's control plane ends `system_version_info` with this on every response of a
    /// push but the last of its type: more of the same push follows. A client learns
    /// from it when its first push is complete (a large push is split into several
    /// responses); a client that does not read it loses nothing else.
    pub const PUSH_CONTINUES: &str = "/more";
}

/// `envoy.service.auth.v3`: external authorization (the `Check` call a waypoint makes
/// for a CUSTOM AuthorizationPolicy).
pub mod ext_authz {
    tonic::include_proto!("envoy.service.auth.v3");

    /// The gRPC method path of `Check`.
    pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
}

/// OTLP trace export (`opentelemetry.proto.collector.trace.v1`): the spans a waypoint
/// sends to a collector.
pub mod otlp {
    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
}

pub use prost;
pub use prost_types;
