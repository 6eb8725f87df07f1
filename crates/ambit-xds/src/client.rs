//! The discovery client (node proxy and node agent): one delta ADS stream to the control plane,
//! subscribed to workloads/services (`istio.workload.Address`) and L4 policies
//! (`istio.security.Authorization`).
//!
//! Each response is decoded and validated resource by resource; the valid ones are
//! applied to the [`Store`] in one swap and acknowledged; if any was invalid, the response
//! is NACKed with their names and reasons (the valid ones still apply). When the stream
//! breaks, the client reconnects with backoff and lists the versions it holds, so only
//! what changed meanwhile is sent again; the data path keeps using the last state the
//! whole time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::discovery::Str;
use ambit_core::state::Store;
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as XdsStatus,
};
use ambit_proto::prost::Message;
use ambit_proto::prost_types::{Struct, Value, value::Kind};
use ambit_proto::security as pb_sec;
use ambit_proto::workload as pb;
use ambit_tls::client::{TokenSource, control_plane_channel};
use ambit_tls::spiffe::TrustBundle;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::convert::{self, Interner};

/// The two discovery types, in subscription order.
/// A discovery type the client can follow; each decodes into the shared state its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// Istio's workloads and services (`istio.workload.Address`).
    Address,
    /// Istio's L4 policies (`istio.security.Authorization`).
    Authorization,
    /// Ambit's waypoint policies (`ambit.waypoint.v1.Policy`).
    WaypointPolicy,
    /// Ambit's waypoint routes (`ambit.waypoint.v1.Route`).
    WaypointRoute,
    /// Ambit's waypoint traffic policies (`ambit.waypoint.v1.TrafficPolicy`).
    WaypointTraffic,
}

impl ResourceKind {
    /// What a node proxy follows (Istio's two types).
    pub const NODE: [ResourceKind; 2] = [ResourceKind::Address, ResourceKind::Authorization];
    /// What a waypoint follows.
    pub const WAYPOINT: [ResourceKind; 5] = [
        ResourceKind::Address,
        ResourceKind::Authorization,
        ResourceKind::WaypointPolicy,
        ResourceKind::WaypointRoute,
        ResourceKind::WaypointTraffic,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceKind::Address => pb::ADDRESS_TYPE_URL,
            ResourceKind::Authorization => pb_sec::AUTHORIZATION_TYPE_URL,
            ResourceKind::WaypointPolicy => ambit_proto::waypoint::POLICY_TYPE_URL,
            ResourceKind::WaypointRoute => ambit_proto::waypoint::ROUTE_TYPE_URL,
            ResourceKind::WaypointTraffic => ambit_proto::waypoint::TRAFFIC_TYPE_URL,
        }
    }

    fn decode(self, name: &Str, body: &[u8], i: &mut Interner) -> Result<Update, String> {
        match self {
            ResourceKind::Address => decode_address(name, body, i),
            ResourceKind::Authorization => decode_authorization(name, body, i).map(Update::Policy),
            ResourceKind::WaypointPolicy => {
                let p = ambit_proto::waypoint::Policy::decode(body)
                    .map_err(|e| format!("undecodable waypoint Policy: {e}"))?;
                convert::waypoint_policy(name, p, i).map(|p| Update::Targeted(Box::new(p)))
            }
            ResourceKind::WaypointRoute => {
                let r = ambit_proto::waypoint::Route::decode(body)
                    .map_err(|e| format!("undecodable waypoint Route: {e}"))?;
                convert::waypoint_route(name, r).map(|r| Update::Route(Box::new(r)))
            }
            ResourceKind::WaypointTraffic => {
                let t = ambit_proto::waypoint::TrafficPolicy::decode(body)
                    .map_err(|e| format!("undecodable waypoint TrafficPolicy: {e}"))?;
                convert::waypoint_traffic(name, t).map(|t| Update::Traffic(Box::new(t)))
            }
        }
    }

    /// What stands in for a resource that could not be read, if anything.
    fn refused(self, name: &str, body: &[u8], reason: &str) -> Option<Update> {
        match self {
            ResourceKind::Address => None,
            ResourceKind::Authorization => {
                refused_policy(name, body, reason).map(|p| Update::Policy(Box::new(p)))
            }
            // Its targets cannot be trusted; a waypoint refuses the requests of a
            // service whose policies it could not read (see the waypoint).
            ResourceKind::WaypointPolicy => None,
            // Where its requests should go is unknown; the waypoint answers 500 while
            // any route is refused (see the waypoint).
            ResourceKind::WaypointRoute => None,
            // Which limits and breakers apply is unknown; the waypoint answers 500 while
            // any traffic policy is refused (see the waypoint).
            ResourceKind::WaypointTraffic => None,
        }
    }

    fn remove(self, st: &mut ambit_core::state::State, name: &str) {
        match self {
            ResourceKind::Address => {
                st.remove_address(name);
            }
            ResourceKind::Authorization => {
                st.remove_policy(name);
            }
            ResourceKind::WaypointPolicy => {
                st.remove_targeted_policy(name);
            }
            ResourceKind::WaypointRoute => {
                st.remove_http_route(name);
            }
            ResourceKind::WaypointTraffic => {
                st.remove_traffic_policy(name);
            }
        }
    }
}

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// `host:port` of the control plane's gRPC port.
    pub address: String,
    /// The mesh root(s) the control plane's certificate chains to (shared with the rest
    /// of the process, so a reloaded bundle applies to the next connection).
    pub roots: TrustBundle,
    /// Name to check the control plane's certificate against (default: the host).
    pub server_name: Option<String>,
    pub token: TokenSource,
    /// This node's name: sent as `NODE_NAME`, must match the token.
    pub node_name: String,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// What the client is doing, for the admin endpoint and readiness.
#[derive(Debug, Clone, Default, Serialize)]
pub struct XdsState {
    pub control_plane: String,
    pub connected: bool,
    /// Whether a first complete push of every type has been applied (since start).
    pub synced: bool,
    pub connects: u64,
    pub responses: u64,
    pub nacks_sent: u64,
    pub last_nack: Option<String>,
    pub last_error: Option<String>,
    pub last_update: Option<String>,
}

/// The discovery client.
pub struct XdsClient {
    config: XdsConfig,
    store: Arc<Store>,
    /// Resource name -> version, per type, as held (for reconnects). Workload names are
    /// the same allocation as the workload's uid.
    kinds: Vec<ResourceKind>,
    versions: Vec<HashMap<Str, Version>>,
    synced: Vec<bool>,
    /// Per type, waypoint policies and routes the last push could not read, by name:
    /// until a readable version arrives the waypoint cannot apply them (it refuses what
    /// they may apply to).
    refused: Vec<std::collections::BTreeMap<Str, String>>,
    /// Per type, the resources held as denying stand-ins because their last version
    /// could not be read. A reconnect lists them (with an empty version) so the control
    /// plane either sends them again or says they are gone: a stand-in for a resource
    /// deleted while disconnected must not outlive it.
    stand_ins: Vec<std::collections::HashSet<Str>>,
    /// `<namespace>/<name>` of the waypoint this client serves, announced to the control
    /// plane (node metadata `WAYPOINT`) so it is sent only that waypoint's policies.
    waypoint: Option<String>,
    interner: Interner,
    state: watch::Sender<XdsState>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Setup(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Grpc(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
}

impl XdsClient {
    /// A client following Istio's two types, as a node proxy does.
    pub fn new(config: XdsConfig, store: Arc<Store>) -> (Self, watch::Receiver<XdsState>) {
        Self::with_kinds(config, store, &ResourceKind::NODE)
    }

    /// A client following `kinds`.
    pub fn with_kinds(
        config: XdsConfig,
        store: Arc<Store>,
        kinds: &[ResourceKind],
    ) -> (Self, watch::Receiver<XdsState>) {
        let (state, rx) = watch::channel(XdsState {
            control_plane: config.address.clone(),
            ..XdsState::default()
        });
        (
            Self {
                config,
                store,
                kinds: kinds.to_vec(),
                versions: vec![HashMap::new(); kinds.len()],
                synced: vec![false; kinds.len()],
                refused: vec![Default::default(); kinds.len()],
                stand_ins: vec![Default::default(); kinds.len()],
                waypoint: None,
                interner: Interner::default(),
                state,
            },
            rx,
        )
    }

    /// Announces the waypoint (`<namespace>/<name>`) this client serves.
    pub fn for_waypoint(mut self, waypoint: String) -> Self {
        self.waypoint = Some(waypoint);
        self
    }

    /// Keeps a stream open until `stop` fires, reconnecting with backoff.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = self.config.initial_backoff;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = self.session() => r,
                _ = stop.changed() => return,
            };
            let reason = match result {
                Ok(()) => "ended".to_owned(),
                Err(e) => e.to_string(),
            };
            self.state.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(reason.clone());
            });
            // A session that lasted a while resets the backoff.
            if started.elapsed() > Duration::from_secs(30) {
                backoff = self.config.initial_backoff;
            }
            let delay = backoff.mul_f64(0.8 + 0.4 * fastrand::f64());
            tracing::warn!(
                control_plane = %self.config.address,
                error = %reason,
                retry_in_ms = delay.as_millis() as u64,
                "discovery stream lost; serving the last known state until it is back"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    fn node(&self) -> Node {
        let mut metadata = Struct::default();
        metadata.fields.insert(
            "NODE_NAME".into(),
            Value {
                kind: Some(Kind::StringValue(self.config.node_name.clone())),
            },
        );
        if let Some(w) = &self.waypoint {
            metadata.fields.insert(
                "WAYPOINT".into(),
                Value {
                    kind: Some(Kind::StringValue(w.clone())),
                },
            );
        }
        Node {
            id: format!("ambit~{}", self.config.node_name),
            cluster: String::new(),
            metadata: Some(metadata),
        }
    }

    /// The first request of each type on a new stream: what is held (accepted
    /// versions, and stand-ins with an empty version, which never matches), so only
    /// differences and removals are sent. Policies first: the control plane then has
    /// them out before the workloads that name them.
    fn subscriptions(&self) -> Vec<DeltaDiscoveryRequest> {
        self.kinds
            .iter()
            .enumerate()
            .rev()
            .map(|(i, kind)| DeltaDiscoveryRequest {
                node: Some(self.node()),
                type_url: kind.type_url().to_owned(),
                initial_resource_versions: self.versions[i]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain(
                        self.stand_ins[i]
                            .iter()
                            .filter(|k| !self.versions[i].contains_key(*k))
                            .map(|k| (k.to_string(), String::new())),
                    )
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    async fn session(&mut self) -> Result<(), SessionError> {
        let channel = control_plane_channel(
            &self.config.address,
            &self.config.roots,
            self.config.server_name.as_deref(),
            Duration::from_secs(10),
        )
        .map_err(|e| SessionError::Setup(e.to_string()))?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for request in self.subscriptions() {
            // The channel has room for every subscription.
            let _ = tx.try_send(request);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        self.config.token.authorize(&mut request).await?;
        let mut responses = client
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        self.state.send_modify(|s| {
            s.connected = true;
            s.connects += 1;
            s.last_error = None;
        });
        tracing::info!(control_plane = %self.config.address, "discovery stream open");
        loop {
            let Some(response) = responses.message().await? else {
                return Err(SessionError::Closed);
            };
            let ack = self.handle(response);
            if tx.send(ack).await.is_err() {
                return Err(SessionError::Closed);
            }
        }
    }

    /// Applies one response; returns its ACK (or NACK).
    fn handle(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let Some(index) = self
            .kinds
            .iter()
            .position(|k| k.type_url() == response.type_url)
        else {
            return self.reply(
                &response,
                vec![format!("unknown type {}", response.type_url)],
            );
        };
        let mut errors = Vec::new();
        let mut accepted = Vec::new();
        let mut updates = Vec::new();
        for resource in &response.resources {
            let body = resource
                .resource
                .as_ref()
                .map(|a| a.value.as_slice())
                .unwrap_or_default();
            let name = Str::from(resource.name.as_str());
            let kind = self.kinds[index];
            match kind.decode(&name, body, &mut self.interner) {
                Ok(update) => {
                    self.refused[index].remove(&name);
                    self.stand_ins[index].remove(&name);
                    accepted.push((name, Version::parse(&resource.version)));
                    updates.push(update);
                }
                Err(reason) => {
                    // Held in its place: it denies wherever it would apply until a
                    // version this proxy can read arrives.
                    if let Some(stand_in) = kind.refused(&resource.name, body, &reason) {
                        updates.push(stand_in);
                        self.stand_ins[index].insert(name.clone());
                    }
                    if matches!(
                        kind,
                        ResourceKind::WaypointPolicy
                            | ResourceKind::WaypointRoute
                            | ResourceKind::WaypointTraffic
                    ) {
                        self.refused[index].insert(name.clone(), reason.clone());
                        self.stand_ins[index].insert(name.clone());
                    }
                    errors.push(format!("{}: {reason}", resource.name));
                }
            }
        }
        let removed = response.removed_resources.clone();
        let changes = accepted.len() + removed.len();
        let kind = self.kinds[index];
        for name in &removed {
            self.refused[index].remove(name.as_str());
            self.stand_ins[index].remove(name.as_str());
        }
        let refused: Vec<String> = self.refused[index].keys().map(|k| k.to_string()).collect();
        self.store.update(|st| {
            for update in updates {
                match update {
                    Update::Workload(w) => st.upsert_workload(*w),
                    Update::Service(s) => st.upsert_service(*s),
                    Update::Policy(p) => st.upsert_policy(*p),
                    Update::Targeted(p) => st.upsert_targeted_policy(*p),
                    Update::Route(r) => st.upsert_http_route(*r),
                    Update::Traffic(t) => st.upsert_traffic_policy(*t),
                }
            }
            for name in &removed {
                kind.remove(st, name);
            }
            if kind == ResourceKind::WaypointPolicy {
                st.set_refused_targeted(refused);
            } else if kind == ResourceKind::WaypointRoute {
                st.set_refused_routes(refused);
            } else if kind == ResourceKind::WaypointTraffic {
                st.set_refused_traffic(refused);
            }
        });
        for (name, version) in accepted {
            self.versions[index].insert(name, version);
        }
        for name in &removed {
            self.versions[index].remove(name.as_str());
        }
        self.interner.prune();
        // The type is in sync once a whole push has been applied: a response that says
        // more of its push follows does not complete it.
        if !response
            .system_version_info
            .ends_with(ambit_proto::discovery::PUSH_CONTINUES)
        {
            self.synced[index] = true;
        }
        let synced = self.synced.iter().all(|s| *s);
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        self.state.send_modify(|s| {
            s.responses += 1;
            s.synced = synced;
            s.last_update = Some(now);
        });
        tracing::debug!(type_url = %response.type_url, changes, rejected = errors.len(), "discovery update applied");
        self.reply(&response, errors)
    }

    fn reply(
        &mut self,
        response: &DeltaDiscoveryResponse,
        errors: Vec<String>,
    ) -> DeltaDiscoveryRequest {
        let error_detail = if errors.is_empty() {
            None
        } else {
            let message = errors.join("; ");
            tracing::warn!(type_url = %response.type_url, reason = %message, "rejecting discovery resources (NACK)");
            self.state.send_modify(|s| {
                s.nacks_sent += 1;
                s.last_nack = Some(message.clone());
            });
            Some(XdsStatus {
                // google.rpc.Code INVALID_ARGUMENT
                code: 3,
                message,
            })
        };
        DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail,
            ..Default::default()
        }
    }
}

/// A resource version as held: the control plane's digests (16 hex digits) in 8 bytes,
/// anything else as text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    Digest(u64),
    Text(Box<str>),
}

impl Version {
    fn parse(v: &str) -> Self {
        let canonical = v.len() == 16 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match u64::from_str_radix(v, 16) {
            Ok(d) if canonical => Version::Digest(d),
            _ => Version::Text(v.into()),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::Digest(d) => write!(f, "{d:016x}"),
            Version::Text(t) => f.write_str(t),
        }
    }
}

/// One decoded resource, ready to apply.
enum Update {
    Workload(Box<ambit_core::discovery::Workload>),
    Service(Box<ambit_core::discovery::Service>),
    Policy(Box<ambit_core::policy::Authorization>),
    Targeted(Box<ambit_core::policy::Authorization>),
    Route(Box<ambit_core::http_route::HttpRoute>),
    Traffic(Box<ambit_core::traffic::TrafficPolicy>),
}

fn decode_address(name: &Str, body: &[u8], i: &mut Interner) -> Result<Update, String> {
    let address = pb::Address::decode(body).map_err(|e| format!("undecodable Address: {e}"))?;
    match address.r#type {
        Some(pb::address::Type::Workload(w)) => {
            convert::workload(name, w, i).map(|w| Update::Workload(Box::new(w)))
        }
        Some(pb::address::Type::Service(s)) => {
            convert::service(name.as_ref(), s, i).map(|s| Update::Service(Box::new(s)))
        }
        None => Err("an Address that is neither a workload nor a service".into()),
    }
}

/// The stand-in for a policy this proxy could not accept (see
/// [`ambit_core::policy::Authorization::refused`]): it applies where the policy would,
/// as far as that can be read (its scope when the bytes decode; otherwise its namespace,
/// from the resource name), and denies everything there. `None` when the resource name
/// is not `<namespace>/<name>` (no workload can name it, and it belongs to no namespace).
fn refused_policy(
    name: &str,
    body: &[u8],
    reason: &str,
) -> Option<ambit_core::policy::Authorization> {
    use ambit_core::policy::PolicyScope;
    let (namespace, short) = name.split_once('/')?;
    if namespace.is_empty() || short.is_empty() {
        return None;
    }
    let scope = match pb_sec::Authorization::decode(body) {
        Ok(a) if a.namespace == namespace && a.name == short => {
            match pb_sec::Scope::try_from(a.scope) {
                Ok(pb_sec::Scope::Global) => PolicyScope::Global,
                Ok(pb_sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
                _ => PolicyScope::Namespace,
            }
        }
        _ => PolicyScope::Namespace,
    };
    Some(ambit_core::policy::Authorization::refused(
        namespace.into(),
        short.into(),
        scope,
        reason.into(),
    ))
}

fn decode_authorization(
    name: &str,
    body: &[u8],
    i: &mut Interner,
) -> Result<Box<ambit_core::policy::Authorization>, String> {
    let a = pb_sec::Authorization::decode(body)
        .map_err(|e| format!("undecodable Authorization: {e}"))?;
    convert::authorization(name, a, i).map(Box::new)
}

#[cfg(test)]
mod tests {
    use ambit_proto::discovery::Resource;
    use ambit_proto::prost_types::Any;

    use super::*;

    fn client() -> XdsClient {
        XdsClient::new(
            XdsConfig {
                address: "127.0.0.1:1".into(),
                roots: TrustBundle::empty(),
                server_name: None,
                token: TokenSource::None,
                node_name: "n".into(),
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(1),
            },
            Arc::new(Store::new()),
        )
        .0
    }

    fn workload_resource(name: &str, address: Vec<u8>) -> Resource {
        let body = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: name.into(),
                name: "p".into(),
                namespace: "ns".into(),
                addresses: vec![address],
                ..Default::default()
            })),
        }
        .encode_to_vec();
        Resource {
            version: "v1".into(),
            resource: Some(Any {
                type_url: pb::ADDRESS_TYPE_URL.into(),
                value: body,
            }),
            name: name.into(),
            aliases: vec![],
        }
    }

    #[test]
    fn a_bad_resource_is_nacked_and_the_good_ones_apply() {
        let mut c = client();
        let reply = c.handle(DeltaDiscoveryResponse {
            resources: vec![
                workload_resource("good", vec![198, 18, 0, 1]),
                workload_resource("bad", vec![1, 2, 3]),
            ],
            type_url: pb::ADDRESS_TYPE_URL.into(),
            nonce: "n1".into(),
            ..Default::default()
        });
        assert_eq!(reply.response_nonce, "n1");
        let err = reply.error_detail.expect("a NACK");
        assert!(err.message.starts_with("bad: "), "{}", err.message);
        assert!(c.store.load().workload("good").is_some());
        assert!(c.store.load().workload("bad").is_none());
        // Only the accepted resource's version is remembered for a reconnect.
        assert_eq!(c.versions[0].len(), 1);
        assert_eq!(c.versions[0]["good"].to_string(), "v1");
        assert_eq!(c.state.borrow().nacks_sent, 1);

        // A clean response is ACKed; removals apply.
        let reply = c.handle(DeltaDiscoveryResponse {
            type_url: pb::ADDRESS_TYPE_URL.into(),
            nonce: "n2".into(),
            removed_resources: vec!["good".into()],
            ..Default::default()
        });
        assert!(reply.error_detail.is_none());
        assert!(c.store.load().workload("good").is_none());
        assert!(c.versions[0].is_empty());
    }

    #[test]
    fn a_refused_policy_is_held_as_a_denying_stand_in_until_a_good_version_arrives() {
        let mut c = client();
        let policy = |action: i32, scope: pb_sec::Scope| Resource {
            version: "v1".into(),
            resource: Some(Any {
                type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
                value: pb_sec::Authorization {
                    name: "p".into(),
                    namespace: "ns".into(),
                    scope: scope as i32,
                    action,
                    ..Default::default()
                }
                .encode_to_vec(),
            }),
            name: "ns/p".into(),
            aliases: vec![],
        };
        let push = |c: &mut XdsClient, r: Resource| {
            c.handle(DeltaDiscoveryResponse {
                resources: vec![r],
                type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
                nonce: "n".into(),
                ..Default::default()
            })
        };
        // An action this proxy does not know: NACKed, and held as refused with the
        // scope the bytes say.
        let reply = push(&mut c, policy(9, pb_sec::Scope::WorkloadSelector));
        assert!(reply.error_detail.is_some());
        let held = c.store.load().policy("ns/p").cloned().expect("a stand-in");
        assert!(held.refused.as_deref().unwrap().contains("unknown action"));
        assert_eq!(
            held.scope,
            ambit_core::policy::PolicyScope::WorkloadSelector
        );
        assert!(
            c.versions[1].is_empty(),
            "a refused version is not remembered"
        );
        // Undecodable bytes: the namespace from the name, namespace-wide.
        let mut garbage = policy(0, pb_sec::Scope::Global);
        garbage.resource.as_mut().unwrap().value = vec![0xff, 0xff];
        push(&mut c, garbage);
        let held = c.store.load().policy("ns/p").cloned().unwrap();
        assert_eq!(held.scope, ambit_core::policy::PolicyScope::Namespace);
        assert!(held.refused.is_some());
        // A good version replaces the stand-in.
        let reply = push(&mut c, policy(1, pb_sec::Scope::Namespace));
        assert!(reply.error_detail.is_none());
        assert!(c.store.load().policy("ns/p").unwrap().refused.is_none());
    }

    /// A policy held as a refused stand-in is listed when the stream reconnects, so a
    /// control plane that deleted it meanwhile says so and the stand-in goes; one that
    /// still has it sends it again.
    #[test]
    fn a_reconnect_lists_refused_stand_ins_so_their_deletion_is_not_missed() {
        let mut c = client();
        let bad = Resource {
            version: "v1".into(),
            resource: Some(Any {
                type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
                value: vec![0xff, 0xff],
            }),
            name: "ns/p".into(),
            aliases: vec![],
        };
        let reply = c.handle(DeltaDiscoveryResponse {
            resources: vec![bad],
            type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
            nonce: "n".into(),
            ..Default::default()
        });
        assert!(reply.error_detail.is_some());
        assert!(
            c.store.load().policy("ns/p").is_some(),
            "held as a stand-in"
        );
        let subs = c.subscriptions();
        let authz = subs
            .iter()
            .find(|r| r.type_url == pb_sec::AUTHORIZATION_TYPE_URL)
            .unwrap();
        assert_eq!(
            authz
                .initial_resource_versions
                .get("ns/p")
                .map(String::as_str),
            Some(""),
            "the stand-in is listed with a version that never matches"
        );
        // The control plane answers the reconnect: gone.
        c.handle(DeltaDiscoveryResponse {
            type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
            nonce: "n2".into(),
            removed_resources: vec!["ns/p".into()],
            ..Default::default()
        });
        assert!(c.store.load().policy("ns/p").is_none());
        assert!(
            c.subscriptions()
                .iter()
                .all(|r| r.initial_resource_versions.is_empty())
        );
    }

    #[test]
    fn a_type_is_in_sync_only_after_the_last_response_of_its_first_push() {
        let mut c = client();
        let part = |nonce: &str, more: bool| DeltaDiscoveryResponse {
            resources: vec![workload_resource(nonce, vec![198, 18, 0, 1])],
            type_url: pb::ADDRESS_TYPE_URL.into(),
            nonce: nonce.into(),
            system_version_info: if more { "1/more".into() } else { "1".into() },
            ..Default::default()
        };
        let empty_policies = DeltaDiscoveryResponse {
            type_url: pb_sec::AUTHORIZATION_TYPE_URL.into(),
            nonce: "p".into(),
            system_version_info: "1".into(),
            ..Default::default()
        };
        c.handle(empty_policies);
        c.handle(part("a", true));
        assert!(!c.state.borrow().synced, "half a push is not a sync");
        c.handle(part("b", false));
        assert!(c.state.borrow().synced);
    }

    #[test]
    fn versions_round_trip_compactly() {
        for v in ["0123456789abcdef", "v1", "0123456789ABCDEF", "12", ""] {
            assert_eq!(Version::parse(v).to_string(), v);
        }
        assert!(matches!(
            Version::parse("00000000000000ff"),
            Version::Digest(255)
        ));
    }

    #[test]
    fn garbage_bytes_are_rejected_not_fatal() {
        let mut c = client();
        let mut r = workload_resource("x", vec![198, 18, 0, 1]);
        r.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        let reply = c.handle(DeltaDiscoveryResponse {
            resources: vec![r],
            type_url: pb::ADDRESS_TYPE_URL.into(),
            nonce: "n".into(),
            ..Default::default()
        });
        assert!(reply.error_detail.unwrap().message.contains("undecodable"));
    }
}
