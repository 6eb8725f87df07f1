//! The control plane on Kubernetes: a cluster's API server as the source of the model.
//!
//! [`KubeSource`] watches every kind the model holds (Namespaces, Nodes, ServiceAccounts,
//! Pods, Services, Istio's AuthorizationPolicy, PeerAuthentication, ServiceEntry and
//! WorkloadEntry, Gateway API Gateways and HTTPRoutes) with kube-rs watchers: a list, then
//! a watch from its resource version, relisted when the watch expires or fails (with
//! backoff). Every event becomes an [`Event`] on the persistent [`Model`], so a change
//! costs O(log n) however large the cluster, and the discovery server learns what
//! changed from the model's change log instead of comparing whole models.
//!
//! Objects are read by the same parser as manifest files, so a cluster and a folder mean
//! the same thing. Failing closed:
//! - the first model is published only when every kind has been listed once; until then
//!   [`KubeSource::start`] waits (with a deadline and a progress line per kind);
//! - a relist replaces a kind's objects in one step when it completes; the objects in
//!   force stay until then;
//! - an object the API server accepted but Ambit cannot read keeps its last good version;
//!   an AuthorizationPolicy or PeerAuthentication with none is replaced by a stand-in that
//!   denies (DENY everything in its namespace; STRICT mutual TLS), so a policy that cannot
//!   be read never opens what it was written to close. Each is reported in the status.
//!
//! This crate is linked by the control plane and the CLI only; the node proxy and the
//! waypoint never link kube-rs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_control::model::parse::parse_manifest;
use ambit_control::model::{Event, Kind, Model, Object, ObjectRef};
use ambit_control::source::{FileError, FileErrors, Source, SourceStatus};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::TypeMeta;
use kube::discovery::Discovery;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

pub mod chart;
pub mod cni;
pub mod install;
pub mod leader;
pub mod status;
mod tokenreview;
pub mod waypoints;
pub use kube::Client;
pub use tokenreview::TokenReviewAuthenticator;

/// One kind the source watches: where the API serves it and which model kind it is.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub group: &'static str,
    pub kind: Kind,
    /// Whether a cluster without it (its CRD not installed) is still usable: Istio's and
    /// the Gateway API's kinds are optional, the core ones are not.
    pub optional: bool,
}

/// Everything the model holds, in the order it is listed at start.
pub const WATCHED: [Watched; 19] = [
    Watched {
        group: "",
        kind: Kind::Namespace,
        optional: false,
    },
    Watched {
        group: "",
        kind: Kind::Node,
        optional: false,
    },
    Watched {
        group: "",
        kind: Kind::ServiceAccount,
        optional: false,
    },
    Watched {
        group: "",
        kind: Kind::Pod,
        optional: false,
    },
    Watched {
        group: "",
        kind: Kind::Service,
        optional: false,
    },
    Watched {
        group: "security.istio.io",
        kind: Kind::AuthorizationPolicy,
        optional: true,
    },
    Watched {
        group: "security.istio.io",
        kind: Kind::PeerAuthentication,
        optional: true,
    },
    Watched {
        group: "networking.istio.io",
        kind: Kind::ServiceEntry,
        optional: true,
    },
    Watched {
        group: "networking.istio.io",
        kind: Kind::WorkloadEntry,
        optional: true,
    },
    Watched {
        group: "gateway.networking.k8s.io",
        kind: Kind::Gateway,
        optional: true,
    },
    Watched {
        group: "gateway.networking.k8s.io",
        kind: Kind::HTTPRoute,
        optional: true,
    },
    Watched {
        group: "discovery.k8s.io",
        kind: Kind::EndpointSlice,
        optional: true,
    },
    Watched {
        group: "gateway.networking.k8s.io",
        kind: Kind::GRPCRoute,
        optional: true,
    },
    Watched {
        group: "networking.istio.io",
        kind: Kind::VirtualService,
        optional: true,
    },
    Watched {
        group: "networking.istio.io",
        kind: Kind::DestinationRule,
        optional: true,
    },
    Watched {
        group: "networking.ambit.io",
        kind: Kind::LocalRateLimit,
        optional: true,
    },
    Watched {
        group: "security.istio.io",
        kind: Kind::RequestAuthentication,
        optional: true,
    },
    // Istio's mesh config (only ConfigMaps named `istio` are listed: see `watch_kind`).
    Watched {
        group: "",
        kind: Kind::ConfigMap,
        optional: false,
    },
    Watched {
        group: "gateway.networking.k8s.io",
        kind: Kind::ReferenceGrant,
        optional: true,
    },
];

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading the kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "no Kubernetes configuration found ({0}); pass --kubeconfig, set KUBECONFIG, or run in a pod"
    )]
    Infer(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
    #[error(
        "asking the API server {url} which resources it serves: {message}; check that it is reachable and that the credentials may list API groups"
    )]
    Discovery { url: String, message: String },
    #[error(
        "the API server {url} does not serve {kind} ({group}); Ambit needs it to build the mesh"
    )]
    Missing {
        url: String,
        group: String,
        kind: Kind,
    },
    #[error(
        "the API server {url} did not list every kind within {seconds} s (still waiting for: {waiting}); last errors: {errors}"
    )]
    SyncTimeout {
        url: String,
        seconds: u64,
        waiting: String,
        errors: String,
    },
}

/// A client for the cluster: from `kubeconfig` when given, else inferred (`KUBECONFIG`,
/// `~/.kube/config`, or the pod's service account when running in a cluster). Returns
/// the client and the API server's URL.
pub async fn client(kubeconfig: Option<&Path>) -> Result<(kube::Client, String), KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(e.to_string()))?,
    };
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))?;
    Ok((client, url))
}

/// Whether this process runs in a Kubernetes pod (the API server's address in the
/// environment and a service-account token mounted).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
}

#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// How long [`KubeSource::start`] waits for every kind's first list.
    pub sync_timeout: Duration,
    /// How often the API server is asked again for optional kinds it did not serve.
    pub rediscover: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            sync_timeout: Duration::from_secs(120),
            rediscover: Duration::from_secs(30),
        }
    }
}

/// The model, read from a cluster's API server. Dropping it stops the watches.
pub struct KubeSource {
    model: watch::Receiver<Arc<Model>>,
    status: watch::Receiver<Arc<SourceStatus>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Source for KubeSource {
    fn model(&self) -> watch::Receiver<Arc<Model>> {
        self.model.clone()
    }

    fn status(&self) -> watch::Receiver<Arc<SourceStatus>> {
        self.status.clone()
    }
}

/// What a watch task tells the model task.
enum Msg {
    Init(Kind),
    InitApply(Read),
    InitDone(Kind),
    Apply(Read),
    Delete(ObjectRef),
    WatchError(Kind, String),
    /// A kind the API server did not serve at start now is (its CRD was installed).
    Served(Kind),
    /// The objects of a kind Ambit reads but does not enforce yet, by `<ns>/<name>`.
    Unmodelled(&'static str, BTreeSet<String>),
}

/// One object as read: its key and the parsed object, or why it could not be read.
struct Read {
    key: ObjectRef,
    object: Result<Object, Vec<FileError>>,
}

impl KubeSource {
    /// Finds which kinds the API server serves, starts a watch for each and returns once
    /// every one has been listed: the first model is the whole cluster.
    pub async fn start(
        client: kube::Client,
        url: String,
        options: KubeOptions,
    ) -> Result<Self, KubeError> {
        let groups: BTreeSet<&str> = WATCHED.iter().map(|w| w.group).collect();
        let groups: Vec<&str> = groups.into_iter().collect();
        let discovery = Discovery::new(client.clone())
            .filter(&groups)
            .run()
            .await
            .map_err(|e| KubeError::Discovery {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let mut served = Vec::new();
        let mut absent = Vec::new();
        for w in WATCHED {
            let found = discovery
                .get(w.group)
                .and_then(|g| g.recommended_kind(w.kind.as_str()));
            match found {
                Some((resource, _)) => served.push((w, resource)),
                None if w.optional => {
                    tracing::warn!(
                        group = w.group,
                        kind = %w.kind,
                        "the API server does not serve this kind (its CRD is not installed): none are read until it is (checked every {} s)",
                        options.rediscover.as_secs()
                    );
                    absent.push(w);
                }
                None => {
                    return Err(KubeError::Missing {
                        url,
                        group: w.group.to_owned(),
                        kind: w.kind,
                    });
                }
            }
        }

        let (tx, rx) = mpsc::channel(1024);
        let mut tasks = Vec::new();
        for (w, resource) in &served {
            tasks.push(tokio::spawn(watch_kind(
                client.clone(),
                w.kind,
                resource.clone(),
                tx.clone(),
            )));
        }
        for (group, kind) in UNMODELLED {
            tasks.push(tokio::spawn(watch_unmodelled(
                client.clone(),
                group,
                kind,
                options.rediscover,
                tx.clone(),
            )));
        }
        if !absent.is_empty() {
            tasks.push(tokio::spawn(rediscover(
                client.clone(),
                absent.clone(),
                options.rediscover,
                tx.clone(),
            )));
        }
        drop(tx);
        let absent: BTreeMap<Kind, String> = absent
            .iter()
            .map(|w| {
                (
                    w.kind,
                    format!(
                        "{} {}: not served by the API server (CRD not installed)",
                        w.group, w.kind
                    ),
                )
            })
            .collect();

        let kinds: Vec<Kind> = served.iter().map(|(w, _)| w.kind).collect();
        let (model_tx, model_rx) = watch::channel(Arc::new(Model::default()));
        let (status_tx, status_rx) = watch::channel(Arc::new(SourceStatus {
            dir: format!("kubernetes {url}"),
            ignored: absent.values().cloned().collect(),
            ..SourceStatus::default()
        }));
        let (synced_tx, mut synced_rx) = watch::channel(false);
        let state = State {
            url: url.clone(),
            model: Arc::new(Model::default()),
            waiting: kinds.iter().copied().collect(),
            buffers: HashMap::new(),
            refused: BTreeMap::new(),
            watch_errors: BTreeMap::new(),
            absent,
            unmodelled: BTreeMap::new(),
            events: 0,
        };
        tasks.push(tokio::spawn(run(state, rx, model_tx, status_tx, synced_tx)));
        let source = KubeSource {
            model: model_rx,
            status: status_rx,
            tasks,
        };

        let deadline = tokio::time::sleep(options.sync_timeout);
        tokio::pin!(deadline);
        tokio::select! {
            r = synced_rx.wait_for(|s| *s) => {
                if r.is_err() {
                    return Err(KubeError::Client("the watch task stopped before the first list completed".into()));
                }
            }
            () = &mut deadline => {
                let status = source.status.borrow().clone();
                let waiting = status.conflicts.join(", ");
                let errors: Vec<String> = status
                    .file_errors
                    .iter()
                    .filter(|f| f.file.starts_with("watch "))
                    .map(|f| format!("{}: {}", f.file, f.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))
                    .collect();
                return Err(KubeError::SyncTimeout {
                    url,
                    seconds: options.sync_timeout.as_secs(),
                    waiting,
                    errors: if errors.is_empty() { "none".into() } else { errors.join(" | ") },
                });
            }
        }
        Ok(source)
    }
}

/// Kinds of the mesh's API groups that users write and Ambit does not enforce yet: they
/// are watched (names only) so that each one is reported, never silently ignored.
/// (None at present: every kind of those groups that Ambit reads is modelled.)
pub const UNMODELLED: [(&str, &str); 0] = [];

/// Watches the names of one unmodelled kind (looking for it every `every` while the API
/// server does not serve it) and sends the full set whenever it changes.
async fn watch_unmodelled(
    client: kube::Client,
    group: &'static str,
    kind: &'static str,
    every: Duration,
    tx: mpsc::Sender<Msg>,
) {
    let resource = loop {
        let found = Discovery::new(client.clone())
            .filter(&[group])
            .run()
            .await
            .ok()
            .and_then(|d| d.get(group).and_then(|g| g.recommended_kind(kind)))
            .map(|(r, _)| r);
        if let Some(r) = found {
            break r;
        }
        tokio::time::sleep(every).await;
    };
    let api: Api<kube::core::PartialObjectMeta<DynamicObject>> = Api::all_with(client, &resource);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    let mut names = BTreeSet::new();
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(item) = stream.next().await {
        let name = |m: &kube::api::ObjectMeta| {
            format!(
                "{}/{}",
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default()
            )
        };
        let before = names.clone();
        match item {
            Ok(watcher::Event::Init) => listing = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(name(&o.metadata));
                }
            }
            Ok(watcher::Event::InitDone) => names = listing.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(o)) => {
                names.insert(name(&o.metadata));
            }
            Ok(watcher::Event::Delete(o)) => {
                names.remove(&name(&o.metadata));
            }
            Err(_) => {}
        }
        if names != before {
            for added in names.difference(&before) {
                tracing::warn!(kind, object = %added, "Ambit does not enforce this kind yet: the object is read and reported, and has no effect");
            }
            if tx.send(Msg::Unmodelled(kind, names.clone())).await.is_err() {
                return;
            }
        }
    }
}

/// Asks the API server every `every` for the kinds it did not serve; starts a watch for
/// each that appears (a CRD installed after the control plane started).
async fn rediscover(
    client: kube::Client,
    mut absent: Vec<Watched>,
    every: Duration,
    tx: mpsc::Sender<Msg>,
) {
    let mut watches = Vec::new();
    while !absent.is_empty() {
        tokio::time::sleep(every).await;
        let groups: BTreeSet<&str> = absent.iter().map(|w| w.group).collect();
        let groups: Vec<&str> = groups.into_iter().collect();
        let Ok(discovery) = Discovery::new(client.clone()).filter(&groups).run().await else {
            continue;
        };
        let mut still = Vec::new();
        for w in absent {
            match discovery
                .get(w.group)
                .and_then(|g| g.recommended_kind(w.kind.as_str()))
            {
                Some((resource, _)) => {
                    tracing::info!(group = w.group, kind = %w.kind, "the API server now serves this kind; reading it");
                    if tx.send(Msg::Served(w.kind)).await.is_err() {
                        return;
                    }
                    watches.push(tokio::spawn(watch_kind(
                        client.clone(),
                        w.kind,
                        resource,
                        tx.clone(),
                    )));
                }
                None => still.push(w),
            }
        }
        absent = still;
    }
    // The watches run as long as this task would: wait for them, so aborting this task
    // (the source dropped) ends them too.
    let _abort = AbortOnDrop(watches);
    std::future::pending::<()>().await;
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Reads one kind for ever: list, watch, relist on expiry or error (with backoff).
async fn watch_kind(
    client: kube::Client,
    kind: Kind,
    resource: ApiResource,
    tx: mpsc::Sender<Msg>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let config = match kind {
        // Only the mesh config is read: other ConfigMaps are neither listed nor held.
        Kind::ConfigMap => watcher::Config::default().fields(&format!(
            "metadata.name={}",
            ambit_control::model::MESH_CONFIG_MAP
        )),
        _ => watcher::Config::default(),
    };
    let stream = watcher(api, config).default_backoff();
    tokio::pin!(stream);
    while let Some(item) = stream.next().await {
        let msg = match item {
            Ok(watcher::Event::Init) => Msg::Init(kind),
            Ok(watcher::Event::InitApply(o)) => Msg::InitApply(read(kind, &resource, o)),
            Ok(watcher::Event::InitDone) => Msg::InitDone(kind),
            Ok(watcher::Event::Apply(o)) => Msg::Apply(read(kind, &resource, o)),
            Ok(watcher::Event::Delete(o)) => Msg::Delete(key_of(kind, &o)),
            Err(e) => Msg::WatchError(kind, e.to_string()),
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

fn key_of(kind: Kind, o: &DynamicObject) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: if kind.is_namespaced() {
            o.metadata.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name: o.metadata.name.clone().unwrap_or_default(),
    }
}

/// Parses an object from the API server with the manifest parser (JSON is YAML), so a
/// cluster's objects are checked exactly as a folder's are.
fn read(kind: Kind, resource: &ApiResource, mut o: DynamicObject) -> Read {
    let key = key_of(kind, &o);
    // List items come without apiVersion and kind.
    o.types = Some(TypeMeta {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
    });
    // Server-side bookkeeping the model has no use for; large on busy objects.
    o.metadata.managed_fields = None;
    let object = match serde_json::to_string(&o) {
        Err(e) => Err(vec![FileError::Io {
            message: format!("re-encoding the object: {e}"),
        }]),
        Ok(text) => match parse_manifest(&text) {
            Ok(mut objects) if objects.len() == 1 => Ok(objects.remove(0)),
            Ok(_) => Err(vec![FileError::Io {
                message: format!(
                    "{} is not a kind Ambit reads in {}",
                    resource.kind, resource.api_version
                ),
            }]),
            Err(errors) => Err(errors.into_iter().map(FileError::Manifest).collect()),
        },
    };
    Read { key, object }
}

struct State {
    url: String,
    model: Arc<Model>,
    /// Kinds not listed yet: nothing is published until this is empty.
    waiting: BTreeSet<Kind>,
    /// Objects of a kind being relisted, kept until the list completes.
    buffers: HashMap<Kind, Vec<Read>>,
    /// Objects that could not be read, with why.
    refused: BTreeMap<ObjectRef, Vec<FileError>>,
    /// The last error of each kind's watch, until its next event.
    watch_errors: BTreeMap<Kind, String>,
    /// Optional kinds the API server does not serve, with what to tell the operator.
    absent: BTreeMap<Kind, String>,
    /// Objects of kinds Ambit does not enforce yet, by kind.
    unmodelled: BTreeMap<&'static str, BTreeSet<String>>,
    events: u64,
}

async fn run(
    mut state: State,
    mut rx: mpsc::Receiver<Msg>,
    model_tx: watch::Sender<Arc<Model>>,
    status_tx: watch::Sender<Arc<SourceStatus>>,
    synced_tx: watch::Sender<bool>,
) {
    let mut logged_waiting = BTreeSet::new();
    while let Some(first) = rx.recv().await {
        // Fold everything already queued into one model version.
        let mut events = Vec::new();
        state.handle(first, &mut events);
        while let Ok(more) = rx.try_recv() {
            state.handle(more, &mut events);
            if events.len() >= 10_000 {
                break;
            }
        }
        if !events.is_empty() {
            state.model = Arc::new(state.model.apply(events));
        }
        if state.waiting.is_empty() {
            if model_tx.borrow().generation != state.model.generation {
                model_tx.send_replace(state.model.clone());
            }
            if !*synced_tx.borrow() {
                tracing::info!(
                    url = %state.url,
                    objects = state.model.len(),
                    "every kind listed; serving the cluster's mesh"
                );
                synced_tx.send_replace(true);
            }
        } else if logged_waiting != state.waiting {
            tracing::info!(
                waiting = %join_kinds(&state.waiting),
                "listing the cluster's objects"
            );
            logged_waiting = state.waiting.clone();
        }
        status_tx.send_replace(Arc::new(state.status()));
    }
}

fn join_kinds(kinds: &BTreeSet<Kind>) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl State {
    fn handle(&mut self, msg: Msg, events: &mut Vec<Event>) {
        self.events += 1;
        match msg {
            Msg::Init(kind) => {
                self.buffers.insert(kind, Vec::new());
            }
            Msg::InitApply(read) => {
                self.watch_errors.remove(&read.key.kind);
                match self.buffers.get_mut(&read.key.kind) {
                    Some(buffer) => buffer.push(read),
                    None => self.applied(read, events),
                }
            }
            Msg::InitDone(kind) => {
                self.watch_errors.remove(&kind);
                // What the relist no longer has is judged against everything seen so
                // far, this batch's earlier events included.
                self.flush(events);
                let listed = self.buffers.remove(&kind).unwrap_or_default();
                let present: BTreeSet<ObjectRef> = listed.iter().map(|r| r.key.clone()).collect();
                // Objects gone while the watch was down: in force before, absent now.
                let gone: Vec<ObjectRef> = self
                    .model
                    .of_kind(kind)
                    .map(Object::key)
                    .filter(|k| !present.contains(k))
                    .collect();
                self.refused
                    .retain(|k, _| k.kind != kind || present.contains(k));
                for key in gone {
                    events.push(Event::Delete(key));
                }
                for read in listed {
                    self.applied(read, events);
                }
                self.waiting.remove(&kind);
            }
            Msg::Apply(read) => {
                self.watch_errors.remove(&read.key.kind);
                self.applied(read, events);
            }
            Msg::Delete(key) => {
                self.watch_errors.remove(&key.kind);
                self.refused.remove(&key);
                events.push(Event::Delete(key));
            }
            Msg::Served(kind) => {
                self.absent.remove(&kind);
            }
            Msg::Unmodelled(kind, names) => {
                self.unmodelled.insert(kind, names);
            }
            Msg::WatchError(kind, message) => {
                tracing::warn!(%kind, error = %message, "watch failed; relisting with backoff, the objects in force stay");
                self.watch_errors.insert(kind, message);
            }
        }
    }

    /// Applies the batch's pending events to the model, so what follows reads the model
    /// as those events left it.
    fn flush(&mut self, events: &mut Vec<Event>) {
        if !events.is_empty() {
            self.model = Arc::new(self.model.apply(std::mem::take(events)));
        }
    }

    fn applied(&mut self, read: Read, events: &mut Vec<Event>) {
        if read.object.is_err() {
            // Whether a last good version is in force depends on this batch's earlier
            // events (a deletion just before, say).
            self.flush(events);
        }
        match read.object {
            Ok(object) => {
                self.refused.remove(&read.key);
                events.push(Event::Apply(object));
            }
            Err(errors) => {
                tracing::warn!(
                    object = %read.key,
                    errors = %errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    "object refused; its last good version (or a denying stand-in) stays in force"
                );
                // Its last good version stays; a policy with none fails closed.
                if self.model.get(&read.key).is_none()
                    && let Some(stand_in) = stand_in(&read.key)
                {
                    events.push(Event::Apply(stand_in));
                }
                self.refused.insert(read.key, errors);
            }
        }
    }

    fn status(&self) -> SourceStatus {
        let mut file_errors: Vec<FileErrors> = self
            .watch_errors
            .iter()
            .map(|(kind, message)| FileErrors {
                file: format!("watch {kind}"),
                errors: vec![FileError::Io {
                    message: message.clone(),
                }],
            })
            .collect();
        file_errors.extend(self.refused.iter().map(|(key, errors)| FileErrors {
            file: key.to_string(),
            errors: errors.clone(),
        }));
        SourceStatus {
            dir: format!("kubernetes {}", self.url),
            files: self.model.len(),
            file_errors,
            // While listing: the kinds not listed yet.
            conflicts: self
                .waiting
                .iter()
                .map(|k| format!("{k} not listed yet"))
                .collect(),
            ignored: self
                .absent
                .values()
                .cloned()
                .chain(self.unmodelled.iter().flat_map(|(kind, names)| {
                    names.iter().map(move |n| {
                        format!("{kind} {n}: not enforced by Ambit yet (it has no effect)")
                    })
                }))
                .collect(),
            generation: self.model.generation,
            rescans: self.events,
            failing: None,
            panics: 0,
        }
    }
}

/// What stands in for a policy the API server holds but Ambit cannot read: the
/// strictest form of its kind, for its namespace.
fn stand_in(key: &ObjectRef) -> Option<Object> {
    let text = match key.kind {
        Kind::AuthorizationPolicy => format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: \"{}\", namespace: \"{}\", annotations: {{ambit.io/stand-in: \"the policy could not be read; denying\"}}}}\nspec: {{action: DENY, rules: [{{}}]}}\n",
            key.name, key.namespace
        ),
        Kind::PeerAuthentication => format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: \"{}\", namespace: \"{}\", annotations: {{ambit.io/stand-in: \"the policy could not be read; requiring mutual TLS\"}}}}\nspec: {{mtls: {{mode: STRICT}}}}\n",
            key.name, key.namespace
        ),
        _ => return None,
    };
    match parse_manifest(&text) {
        Ok(mut objects) if objects.len() == 1 => Some(objects.remove(0)),
        other => {
            tracing::error!(object = %key, result = ?other.map(|o| o.len()), "building the denying stand-in failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind, ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn stand_ins_deny() {
        let Some(Object::AuthorizationPolicy(p)) =
            stand_in(&key(Kind::AuthorizationPolicy, "shop", "allow-web"))
        else {
            panic!("an AuthorizationPolicy stand-in");
        };
        assert_eq!(p.metadata.name.as_str(), "allow-web");
        assert_eq!(p.metadata.namespace(), "shop");
        let text = serde_json::to_string(&p.spec).unwrap();
        assert!(text.contains("DENY"), "{text}");
        let Some(Object::PeerAuthentication(pa)) =
            stand_in(&key(Kind::PeerAuthentication, "shop", "mtls"))
        else {
            panic!("a PeerAuthentication stand-in");
        };
        assert!(serde_json::to_string(&pa.spec).unwrap().contains("STRICT"));
        assert!(stand_in(&key(Kind::Pod, "shop", "p")).is_none());
    }

    fn resource(kind: &str, api_version: &str, plural: &str) -> ApiResource {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    fn dynamic(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn reads_a_listed_pod_without_type_fields() {
        let pod = dynamic(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl"}], "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "198.18.0.5"}
        }));
        let read = read(Kind::Pod, &resource("Pod", "v1", "pods"), pod);
        assert_eq!(read.key, key(Kind::Pod, "shop", "web-1"));
        let Ok(Object::Pod(p)) = read.object else {
            panic!("parsed: {:?}", read.object.err());
        };
        assert_eq!(p.node(), Some("n1"));
    }

    #[test]
    fn a_policy_that_cannot_be_read_is_refused_and_stood_in_for() {
        let policy = dynamic(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principalz": ["x"]}}]}]}
        }));
        let read = read(
            Kind::AuthorizationPolicy,
            &resource(
                "AuthorizationPolicy",
                "security.istio.io/v1",
                "authorizationpolicies",
            ),
            policy,
        );
        let errors = read.object.as_ref().expect_err("refused");
        assert!(errors[0].to_string().contains("principalz"), "{errors:?}");

        let mut state = empty_state(&[]);
        let mut events = Vec::new();
        state.handle(Msg::Apply(read), &mut events);
        state.model = Arc::new(state.model.apply(events));
        let k = key(Kind::AuthorizationPolicy, "shop", "p");
        let Some(Object::AuthorizationPolicy(p)) = state.model.get(&k) else {
            panic!("a stand-in in force");
        };
        assert!(serde_json::to_string(&p.spec).unwrap().contains("DENY"));
        let status = state.status();
        assert_eq!(status.file_errors.len(), 1);
        assert_eq!(status.file_errors[0].file, k.to_string());
    }

    #[test]
    fn a_relist_replaces_a_kind_in_one_step() {
        let ns = |name: &str| {
            read(
                Kind::Namespace,
                &resource("Namespace", "v1", "namespaces"),
                dynamic(serde_json::json!({"metadata": {"name": name}})),
            )
        };
        let mut state = empty_state(&[Kind::Namespace]);
        let mut events = Vec::new();
        state.handle(Msg::Init(Kind::Namespace), &mut events);
        state.handle(Msg::InitApply(ns("a")), &mut events);
        state.handle(Msg::InitApply(ns("b")), &mut events);
        assert!(events.is_empty(), "nothing before the list completes");
        state.handle(Msg::InitDone(Kind::Namespace), &mut events);
        assert!(state.waiting.is_empty());
        state.model = Arc::new(state.model.apply(std::mem::take(&mut events)));
        assert_eq!(state.model.len(), 2);

        // The watch fails and relists; "a" was deleted meanwhile.
        state.handle(
            Msg::WatchError(Kind::Namespace, "410 Gone".into()),
            &mut events,
        );
        assert_eq!(state.status().file_errors[0].file, "watch Namespace");
        state.handle(Msg::Init(Kind::Namespace), &mut events);
        state.handle(Msg::InitApply(ns("b")), &mut events);
        assert!(events.is_empty());
        state.handle(Msg::InitDone(Kind::Namespace), &mut events);
        let before = state.model.clone();
        state.model = Arc::new(state.model.apply(events));
        assert_eq!(state.model.len(), 1);
        assert_eq!(
            state.model.changes_since(&before),
            vec![ambit_control::model::Change::Removed(key(
                Kind::Namespace,
                "",
                "a"
            ))]
        );
        assert!(state.status().file_errors.is_empty());
    }
    fn empty_state(waiting: &[Kind]) -> State {
        State {
            url: "test".into(),
            model: Arc::new(Model::default()),
            waiting: waiting.iter().copied().collect(),
            buffers: HashMap::new(),
            refused: BTreeMap::new(),
            watch_errors: BTreeMap::new(),
            absent: BTreeMap::new(),
            unmodelled: BTreeMap::new(),
            events: 0,
        }
    }

    fn namespace(name: &str) -> Read {
        read(
            Kind::Namespace,
            &resource("Namespace", "v1", "namespaces"),
            dynamic(serde_json::json!({"metadata": {"name": name}})),
        )
    }

    fn policy(name: &str, source_field: &str) -> Read {
        read(
            Kind::AuthorizationPolicy,
            &resource(
                "AuthorizationPolicy",
                "security.istio.io/v1",
                "authorizationpolicies",
            ),
            dynamic(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {source_field: ["x"]}}]}]}
            })),
        )
    }

    #[test]
    fn a_relist_in_the_same_batch_as_an_apply_still_deletes_what_it_lacks() {
        let mut state = empty_state(&[]);
        let mut events = Vec::new();
        // One batch: "a" applied by the watch, then a relist that no longer has it.
        state.handle(Msg::Apply(namespace("a")), &mut events);
        state.handle(Msg::Init(Kind::Namespace), &mut events);
        state.handle(Msg::InitApply(namespace("b")), &mut events);
        state.handle(Msg::InitDone(Kind::Namespace), &mut events);
        state.flush(&mut events);
        let names: Vec<String> = state
            .model
            .of_kind(Kind::Namespace)
            .map(|o| o.key().name)
            .collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn an_unreadable_policy_recreated_in_the_batch_of_its_deletion_is_stood_in_for() {
        let mut state = empty_state(&[]);
        let mut events = Vec::new();
        state.handle(Msg::Apply(policy("p", "principals")), &mut events);
        state.flush(&mut events);
        // One batch: deleted, then re-created unreadable.
        state.handle(
            Msg::Delete(key(Kind::AuthorizationPolicy, "shop", "p")),
            &mut events,
        );
        state.handle(Msg::Apply(policy("p", "principalz")), &mut events);
        state.flush(&mut events);
        let Some(Object::AuthorizationPolicy(p)) =
            state
                .model
                .get(&key(Kind::AuthorizationPolicy, "shop", "p"))
        else {
            panic!("a stand-in in force");
        };
        assert!(serde_json::to_string(&p.spec).unwrap().contains("DENY"));
    }
}
