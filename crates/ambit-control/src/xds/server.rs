//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`) node proxies subscribe to.
//!
//! Per stream and per type, a subscriber is in one of three states: not subscribed;
//! waiting for the acknowledgement of what was last sent (at most one push in flight, so
//! a slow subscriber gets changes coalesced rather than queued); or up to date with some
//! snapshot generation. On subscribing, a reconnecting client lists the versions it holds
//! (`initial_resource_versions`) and is sent only what differs and what was removed.
//! Later pushes send what changed since the generation the subscriber acknowledged.
//! A NACK is logged with the subscriber and its reason and counted; the stream goes on.
//! Large pushes are split into responses of about 1 MiB.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ambit_core::discovery::Str;
use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ambit_proto::prost::Message as _;
use ambit_proto::prost_types::Any;
use ambit_proto::prost_types::value::Kind as ValueKind;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::snapshot::Snapshot;
use super::translate::{ResourceType, TYPES};
use crate::auth::{Authenticator, bearer_token};
use crate::metrics::Metrics;

/// Resource bytes per response before a push is split.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Largest request accepted (a reconnect lists every resource it holds).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The discovery service.
pub struct AdsService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The model, to check that a waypoint credential names a waypoint that exists.
    model: watch::Receiver<Arc<crate::model::Model>>,
    authenticator: Arc<dyn Authenticator>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    log_limit: crate::loglimit::LogLimit,
}

impl AdsService {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        model: watch::Receiver<Arc<crate::model::Model>>,
        authenticator: Arc<dyn Authenticator>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            snapshots,
            model,
            authenticator,
            registry,
            metrics,
            log_limit: Default::default(),
        }
    }
}

/// Who is subscribed, for the debug endpoint.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    subscribers: Mutex<BTreeMap<u64, SubscriberInfo>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubscriberInfo {
    pub id: u64,
    pub node: String,
    pub peer: String,
    pub connected_at: String,
    pub types: BTreeMap<&'static str, TypeInfo>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeInfo {
    /// The snapshot generation the subscriber acknowledged last.
    pub acked_generation: Option<u64>,
    /// Responses sent and not yet acknowledged.
    pub in_flight: usize,
    pub responses_sent: u64,
    pub resources_sent: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

impl Registry {
    pub fn list(&self) -> Vec<SubscriberInfo> {
        self.lock().values().cloned().collect()
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SubscriberInfo>> {
        // Entries are replaced whole; a panicking holder cannot leave one half-written.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, id: u64, t: ResourceType, f: impl FnOnce(&mut TypeInfo)) {
        if let Some(s) = self.lock().get_mut(&id) {
            f(s.types.entry(type_name(t)).or_default());
        }
    }
}

fn type_name(t: ResourceType) -> &'static str {
    match t {
        ResourceType::Address => "Address",
        ResourceType::Authorization => "Authorization",
        ResourceType::WaypointPolicy => "WaypointPolicy",
        ResourceType::WaypointRoute => "WaypointRoute",
        ResourceType::WaypointTraffic => "WaypointTraffic",
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = crate::server::caller(&request);
        let refuse = |status: Status| {
            if let Some(suppressed) = self.log_limit.admit() {
                tracing::warn!(%peer, code = ?status.code(), reason = status.message(), suppressed, "discovery request refused");
            }
            status
        };
        let token =
            bearer_token(&request).map_err(|e| refuse(Status::unauthenticated(e.to_string())))?;
        let caller = self
            .authenticator
            .authenticate(token)
            .await
            .map_err(|e| refuse(Status::unauthenticated(e.to_string())))?;
        // Node proxies present a node credential. A workload's own credential (a
        // cluster's service-account token) is accepted from a waypoint only: its node
        // metadata WAYPOINT must name the Gateway whose service account it runs as.
        let (node, waypoint_account) = match (caller.node, caller.identity) {
            (Some(node), _) => (node, None),
            (None, Some(id)) => {
                // Only the service account of an istio-waypoint Gateway of that name.
                if !is_waypoint(&self.model.borrow(), id.namespace(), id.service_account()) {
                    return Err(refuse(Status::permission_denied(format!(
                        "a workload credential ({}/{}) may subscribe to discovery only as a waypoint, and there is no istio-waypoint Gateway of that name",
                        id.namespace(),
                        id.service_account()
                    ))));
                }
                let account = format!("{}/{}", id.namespace(), id.service_account());
                (format!("waypoint {account}"), Some(account))
            }
            (None, None) => {
                return Err(refuse(Status::permission_denied(
                    "discovery is for node proxies and waypoints: present a node credential",
                )));
            }
        };
        let (tx, rx) = mpsc::channel(8);
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.registry.lock().insert(
            id,
            SubscriberInfo {
                id,
                node: node.clone(),
                peer: peer.clone(),
                connected_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                types: BTreeMap::new(),
            },
        );
        self.metrics.xds_subscribers.inc();
        tracing::info!(subscriber = id, %node, %peer, "discovery subscriber connected");
        let stream = Subscriber {
            id,
            node,
            peer,
            requests: request.into_inner(),
            out: tx,
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            types: Default::default(),
            nonce: 0,
            ambit: false,
            waypoint: None,
            waypoint_account,
            model: self.model.clone(),
        };
        tokio::spawn(stream.run());
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Per-type state of one subscriber.
#[derive(Default)]
struct TypeState {
    subscribed: bool,
    /// Versions the client said it holds on subscribing; used once, for the first push.
    initial: Option<HashMap<String, String>>,
    /// Names the client asked for explicitly; sent even if unchanged.
    forced: BTreeSet<String>,
    /// Generation the client is known to hold (after acknowledgement).
    acked: Option<u64>,
    /// Nonces of the push in flight, and the generation it brings the client to.
    in_flight: BTreeSet<String>,
    in_flight_generation: u64,
}

struct Subscriber {
    id: u64,
    node: String,
    peer: String,
    requests: Streaming<DeltaDiscoveryRequest>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    types: [TypeState; TYPES],
    nonce: u64,
    /// An Ambit node proxy (node id `ambit~...`): it is also sent the policies that
    /// carry Ambit's extensions; other clients (Istio's ztunnel) are not.
    ambit: bool,
    /// The waypoint (`<namespace>/<name>`) the subscriber serves, from its node metadata
    /// `WAYPOINT`: it is sent only the waypoint policies that apply to it.
    waypoint: Option<String>,
    /// Set when the credential is a workload's own (`<namespace>/<service account>`): the
    /// subscriber must be the waypoint of that name.
    waypoint_account: Option<String>,
    model: watch::Receiver<Arc<crate::model::Model>>,
}

/// Whether `namespace/name` is an istio-waypoint Gateway in the model.
fn is_waypoint(model: &crate::model::Model, namespace: &str, name: &str) -> bool {
    matches!(
        model.lookup(crate::model::Kind::Gateway, namespace, name),
        Some(crate::model::Object::Gateway(g))
            if g.spec.gateway_class_name.as_str() == "istio-waypoint"
    )
}

impl Subscriber {
    /// A waypoint's own credential is good only while its Gateway exists.
    fn still_allowed(&self) -> Result<(), Status> {
        let Some(account) = &self.waypoint_account else {
            return Ok(());
        };
        let (ns, name) = account.split_once('/').unwrap_or((account.as_str(), ""));
        if is_waypoint(&self.model.borrow(), ns, name) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "the istio-waypoint Gateway {account} this credential subscribed as is gone"
            )))
        }
    }

    async fn run(mut self) {
        let reason = loop {
            if let Err(status) = self.still_allowed() {
                let _ = self.out.send(Err(status.clone())).await;
                break status.message().to_owned();
            }
            if let Err(status) = self.push_ready().await {
                let _ = self.out.send(Err(status.clone())).await;
                break status.message().to_owned();
            }
            tokio::select! {
                message = self.requests.message() => match message {
                    Ok(Some(req)) => {
                        if let Err(status) = self.handle(req) {
                            let _ = self.out.send(Err(status.clone())).await;
                            break status.message().to_owned();
                        }
                    }
                    Ok(None) => break "the client closed the stream".to_owned(),
                    Err(status) => break format!("stream error: {}", status.message()),
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        let _ = self.out.send(Err(Status::unavailable("the control plane is shutting down"))).await;
                        break "shutting down".to_owned();
                    }
                }
                // Only a waypoint's own credential depends on the model (its Gateway).
                changed = self.model.changed(), if self.waypoint_account.is_some() => {
                    if changed.is_err() {
                        break "shutting down".to_owned();
                    }
                }
                _ = self.out.closed() => break "the client went away".to_owned(),
            }
        };
        self.registry.lock().remove(&self.id);
        self.metrics.xds_subscribers.dec();
        tracing::info!(subscriber = self.id, node = %self.node, peer = %self.peer, reason, "discovery subscriber disconnected");
    }

    fn handle(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            tracing::debug!(subscriber = self.id, type_url = %req.type_url, "ignoring a subscription to an unknown type");
            return Ok(());
        };
        if let Some(node) = &req.node
            && !node.id.is_empty()
        {
            self.ambit = node.id.starts_with("ambit~");
            self.waypoint = node_metadata(&req, "WAYPOINT").map(str::to_owned);
        }
        if let Some(account) = &self.waypoint_account {
            if self.waypoint.as_ref() != Some(account) {
                return Err(Status::permission_denied(format!(
                    "a workload credential ({account}) may subscribe only as the waypoint it runs as: send node metadata WAYPOINT={account}"
                )));
            }
        } else if let Some(name) = node_name(&req)
            && name != self.node
        {
            return Err(Status::permission_denied(format!(
                "the node metadata says NODE_NAME={name} but the credential is for node {}",
                self.node
            )));
        }
        let state = &mut self.types[t.index()];
        if !req.response_nonce.is_empty() {
            if !state.in_flight.remove(&req.response_nonce) {
                // A stale acknowledgement (for a response before a resubscribe): ignore.
                return Ok(());
            }
            match &req.error_detail {
                Some(err) => {
                    self.metrics.xds_nack(type_name(t));
                    tracing::warn!(
                        subscriber = self.id,
                        node = %self.node,
                        peer = %self.peer,
                        type_url = %req.type_url,
                        nonce = %req.response_nonce,
                        reason = %err.message,
                        "a node proxy rejected (NACKed) discovery resources"
                    );
                    let message = err.message.clone();
                    self.registry.update(self.id, t, |i| {
                        i.nacks += 1;
                        i.last_nack = Some(message);
                    });
                }
                None => self.registry.update(self.id, t, |i| i.acks += 1),
            }
            if state.in_flight.is_empty() {
                // The client processed the whole push (rejected parts stay rejected until
                // they change again).
                state.acked = Some(state.in_flight_generation);
                let g = state.acked;
                self.registry.update(self.id, t, |i| {
                    i.acked_generation = g;
                    i.in_flight = 0;
                });
            }
            return Ok(());
        }
        // A subscription (first, or a change of names).
        if !state.subscribed {
            state.subscribed = true;
            state.initial = Some(req.initial_resource_versions);
            state.acked = None;
        }
        state.forced.extend(
            req.resource_names_subscribe
                .into_iter()
                .filter(|n| n != "*" && !n.is_empty()),
        );
        Ok(())
    }

    /// Sends the next push round: every subscribed type's changes up to the current
    /// snapshot, once nothing is in flight. Within a round the stream carries, in order:
    /// policies added or changed, then workloads and services, then policies removed. A
    /// subscriber applies responses in stream order, so a workload never names a policy
    /// it has not received yet, nor loses one it still names (a healthy sync has no
    /// moment in which a named policy is missing).
    async fn push_ready(&mut self) -> Result<(), Status> {
        let snapshot = self.snapshots.borrow_and_update().clone();
        if snapshot.generation == 0 {
            // Nothing translated yet: wait for the first snapshot.
            return Ok(());
        }
        if self.types.iter().any(|t| !t.in_flight.is_empty()) {
            return Ok(());
        }
        let mut plans: [Option<Plan>; TYPES] = Default::default();
        for t in ResourceType::ALL {
            plans[t.index()] = self.plan(&snapshot, t)?;
        }
        let take = |p: &Option<Plan>| p.as_ref().map(|p| (p.send.clone(), p.removed.clone()));
        let (auth, addr) = (
            take(&plans[ResourceType::Authorization.index()]),
            take(&plans[ResourceType::Address.index()]),
        );
        let mut round: Vec<(ResourceType, Vec<DeltaDiscoveryResponse>)> = Vec::new();
        let empty = BTreeSet::new();
        if let Some((send, removed)) = &auth {
            // (With only removals, the policies' one response comes after the workloads.)
            if !send.is_empty() || removed.is_empty() {
                let first = build_responses(
                    &snapshot,
                    ResourceType::Authorization,
                    send,
                    &empty,
                    &mut self.nonce,
                );
                round.push((ResourceType::Authorization, first));
            }
            if let Some((send, removed_addr)) = &addr {
                let responses = build_responses(
                    &snapshot,
                    ResourceType::Address,
                    send,
                    removed_addr,
                    &mut self.nonce,
                );
                round.push((ResourceType::Address, responses));
            }
            if !removed.is_empty() {
                let last = build_responses(
                    &snapshot,
                    ResourceType::Authorization,
                    &empty,
                    removed,
                    &mut self.nonce,
                );
                round.push((ResourceType::Authorization, last));
            }
        } else if let Some((send, removed)) = &addr {
            let responses = build_responses(
                &snapshot,
                ResourceType::Address,
                send,
                removed,
                &mut self.nonce,
            );
            round.push((ResourceType::Address, responses));
        }
        // Waypoint policies the same way: added or changed before the addresses (a
        // service never becomes bound to a waypoint ahead of its policies), removed
        // after them.
        for t in [
            ResourceType::WaypointTraffic,
            ResourceType::WaypointRoute,
            ResourceType::WaypointPolicy,
        ] {
            let Some((send, removed)) = take(&plans[t.index()]) else {
                continue;
            };
            if !send.is_empty() || removed.is_empty() {
                let first = build_responses(&snapshot, t, &send, &empty, &mut self.nonce);
                round.insert(0, (t, first));
            }
            if !removed.is_empty() {
                let last = build_responses(&snapshot, t, &empty, &removed, &mut self.nonce);
                round.push((t, last));
            }
        }
        // Every response of a type but its last says more of the push follows, so a
        // subscriber knows when its first push is complete.
        for t in ResourceType::ALL {
            let total: usize = round
                .iter()
                .filter(|(rt, _)| *rt == t)
                .map(|(_, r)| r.len())
                .sum();
            let mut seen = 0;
            for (rt, responses) in round.iter_mut() {
                if *rt != t {
                    continue;
                }
                for r in responses.iter_mut() {
                    seen += 1;
                    if seen < total {
                        r.system_version_info.push_str(MORE);
                    }
                }
            }
        }
        for t in ResourceType::ALL {
            let Some(plan) = &plans[t.index()] else {
                continue;
            };
            let n: usize = round
                .iter()
                .filter(|(rt, _)| *rt == t)
                .map(|(_, r)| r.len())
                .sum();
            let state = &mut self.types[t.index()];
            state.in_flight_generation = snapshot.generation;
            for (rt, responses) in &round {
                if *rt == t {
                    state
                        .in_flight
                        .extend(responses.iter().map(|r| r.nonce.clone()));
                }
            }
            let count = plan.send.len() as u64;
            self.registry.update(self.id, t, |i| {
                i.in_flight = n;
                i.responses_sent += n as u64;
                i.resources_sent += count;
            });
            self.metrics.xds_push(type_name(t), count);
        }
        for (_, responses) in round {
            for r in responses {
                if self.out.send(Ok(r)).await.is_err() {
                    return Err(Status::cancelled("the client went away"));
                }
            }
        }
        Ok(())
    }

    /// What type `t` needs to reach `snapshot`; `None` when nothing is to be sent.
    fn plan(&mut self, snapshot: &Snapshot, t: ResourceType) -> Result<Option<Plan>, Status> {
        let state = &mut self.types[t.index()];
        if !state.subscribed {
            return Ok(None);
        }
        let resources = snapshot.resources(t);
        let (mut send, removed): (BTreeSet<Str>, BTreeSet<Str>) =
            match (&state.initial, state.acked) {
                (Some(initial), _) => {
                    let send = resources
                        .iter()
                        .filter(|(name, enc)| initial.get(name.as_ref()) != Some(&enc.version))
                        .map(|(name, _)| name.clone())
                        .collect();
                    let removed = initial
                        .keys()
                        .filter(|n| !resources.contains_key(n.as_str()))
                        .map(|n| Str::from(n.as_str()))
                        .collect();
                    (send, removed)
                }
                (None, Some(acked)) if acked == snapshot.generation && state.forced.is_empty() => {
                    return Ok(None);
                }
                (None, Some(acked)) => match snapshot.catch_up(t, acked) {
                    Some(c) => (c.changed, c.removed),
                    None => {
                        return Err(Status::aborted(
                            "this subscriber fell too far behind; reconnect to resync",
                        ));
                    }
                },
                (None, None) => (resources.keys().cloned().collect(), BTreeSet::new()),
            };
        for name in std::mem::take(&mut state.forced) {
            if resources.contains_key(name.as_str()) {
                send.insert(Str::from(name.as_str()));
            }
        }
        // Another node proxy is not sent Ambit's extension policies; one it holds in an
        // earlier form is removed from it.
        let mut removed = removed;
        if t == ResourceType::Authorization && !self.ambit && !snapshot.ambit_only.is_empty() {
            let ambit_only: Vec<Str> = send
                .iter()
                .filter(|n| snapshot.ambit_only.contains(n.as_ref()))
                .cloned()
                .collect();
            for n in ambit_only {
                send.remove(&n);
                removed.insert(n);
            }
        }
        // A waypoint is sent the waypoint policies and routes that apply to it; one that
        // stopped applying is removed from it.
        if matches!(
            t,
            ResourceType::WaypointPolicy
                | ResourceType::WaypointRoute
                | ResourceType::WaypointTraffic
        ) && let Some(w) = &self.waypoint
        {
            let applies = |body: &[u8]| -> bool {
                match t {
                    ResourceType::WaypointRoute => ambit_proto::waypoint::Route::decode(body)
                        .is_ok_and(|r| r.waypoints.iter().any(|x| x == w)),
                    ResourceType::WaypointTraffic => {
                        ambit_proto::waypoint::TrafficPolicy::decode(body)
                            .is_ok_and(|r| r.waypoints.iter().any(|x| x == w))
                    }
                    _ => ambit_proto::waypoint::Policy::decode(body)
                        .is_ok_and(|p| p.waypoints.iter().any(|x| x == w)),
                }
            };
            let elsewhere: Vec<Str> = send
                .iter()
                .filter(|n| {
                    resources
                        .get(n.as_ref())
                        .is_some_and(|enc| !applies(&enc.body))
                })
                .cloned()
                .collect();
            for n in elsewhere {
                send.remove(&n);
                removed.insert(n);
            }
        }
        state.initial = None;
        // Send even an empty push once on subscribing: the client learns it is in sync.
        let first_push = state.acked.is_none();
        if send.is_empty() && removed.is_empty() && !first_push {
            state.acked = Some(snapshot.generation);
            return Ok(None);
        }
        Ok(Some(Plan { send, removed }))
    }
}

/// One type's part of a push round.
struct Plan {
    send: BTreeSet<Str>,
    removed: BTreeSet<Str>,
}

use ambit_proto::discovery::PUSH_CONTINUES as MORE;

/// `node.metadata.NODE_NAME`, if sent.
fn node_name(req: &DeltaDiscoveryRequest) -> Option<&str> {
    node_metadata(req, "NODE_NAME")
}

/// A string of `node.metadata`, if sent.
fn node_metadata<'r>(req: &'r DeltaDiscoveryRequest, key: &str) -> Option<&'r str> {
    let value = req.node.as_ref()?.metadata.as_ref()?.fields.get(key)?;
    match &value.kind {
        Some(ValueKind::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// One push as responses of about [`MAX_RESPONSE_BYTES`] each; removals go in the last.
fn build_responses(
    snapshot: &Snapshot,
    t: ResourceType,
    send: &BTreeSet<Str>,
    removed: &BTreeSet<Str>,
    nonce: &mut u64,
) -> Vec<DeltaDiscoveryResponse> {
    let resources = snapshot.resources(t);
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0usize;
    let mut flush = |current: &mut Vec<Resource>, removed: Vec<String>, nonce: &mut u64| {
        *nonce += 1;
        out.push(DeltaDiscoveryResponse {
            system_version_info: snapshot.generation.to_string(),
            resources: std::mem::take(current),
            type_url: t.type_url().to_owned(),
            nonce: format!("{}-{}", snapshot.generation, nonce),
            removed_resources: removed,
        });
    };
    for name in send {
        let Some(enc) = resources.get(name) else {
            continue;
        };
        bytes += enc.body.len() + name.len() + 32;
        current.push(Resource {
            version: enc.version.clone(),
            resource: Some(Any {
                type_url: t.type_url().to_owned(),
                value: enc.body.to_vec(),
            }),
            name: name.to_string(),
            aliases: Vec::new(),
        });
        if bytes >= MAX_RESPONSE_BYTES {
            flush(&mut current, Vec::new(), nonce);
            bytes = 0;
        }
    }
    flush(
        &mut current,
        removed.iter().map(|n| n.to_string()).collect(),
        nonce,
    );
    out
}
