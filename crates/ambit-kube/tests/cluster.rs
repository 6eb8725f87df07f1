//! The control plane against a genuine Kubernetes API server (kube-apiserver and etcd,
//! started by `tests/k8s/apiserver.sh`, which builds them from Debian's sources the first
//! time): objects created through the API reach a node proxy's state as deltas.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_control::auth::{AuthError, Authenticator, Caller, TokenSigner, authorize_identity};
use ambit_control::{Config, ControlPlane};
use ambit_core::SpiffeId;
use ambit_core::discovery::TunnelProtocol;
use ambit_core::policy::PolicyAction;
use ambit_core::state::State;
use ambit_kube::{KubeOptions, KubeSource, TokenReviewAuthenticator};
use ambit_node::{NodeConfig, NodeProxy, XdsConfig};
use ambit_tls::client::TokenSource;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

fn apiserver() -> PathBuf {
    ambit_testenv::kube_apiserver()
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

const CRD_GROUP: &str = "security.istio.io";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Istio's security CRDs (schema-less: the API server keeps any fields; Ambit checks them).
async fn install_crds(client: &kube::Client) {
    install_crd(
        client,
        CRD_GROUP,
        "AuthorizationPolicy",
        "authorizationpolicies",
    )
    .await;
    install_crd(
        client,
        CRD_GROUP,
        "PeerAuthentication",
        "peerauthentications",
    )
    .await;
    install_crd(client, GATEWAY_GROUP, "Gateway", "gateways").await;
    served(client, CRD_GROUP, "AuthorizationPolicy").await;
    served(client, CRD_GROUP, "PeerAuthentication").await;
    served(client, GATEWAY_GROUP, "Gateway").await;
}

async fn install_crd(client: &kube::Client, group: &str, kind: &str, plural: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": format!("{plural}.{group}"),
                // Groups under k8s.io must say they were approved.
                "annotations": {"api-approved.kubernetes.io": "https://gateway-api.sigs.k8s.io"}
            },
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
                }]
            }
        }))
        .unwrap();
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating the {kind} CRD: {e}"),
        }
    }
}

/// Waits until the API server serves `kind` (its CRD established).
async fn served(client: &kube::Client, group: &str, kind: &str) {
    let start = Instant::now();
    loop {
        // Right after creation discovery can fail while the group is being set up.
        let discovery = kube::discovery::Discovery::new(client.clone())
            .filter(&[group])
            .run()
            .await
            .ok();
        let g = discovery.as_ref().and_then(|d| d.get(group));
        if g.is_some_and(|g| g.recommended_kind(kind).is_some()) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "CRDs not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_namespace(client: &kube::Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
}

async fn create_node(client: &kube::Client, node: serde_json::Value) {
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(node).unwrap(),
        )
        .await
        .unwrap();
}

fn gateway_resource() -> ApiResource {
    ApiResource {
        group: GATEWAY_GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GATEWAY_GROUP}/v1"),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

/// Creates an `istio-waypoint` Gateway with the HBONE listener.
async fn create_waypoint_gateway(api: &Api<DynamicObject>, ns: &str, name: &str) -> DynamicObject {
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap()
}

fn policies(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: CRD_GROUP.into(),
        version: "v1".into(),
        api_version: format!("{CRD_GROUP}/v1"),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

struct Env {
    /// This test's pod addresses are 198.18.<subnet>.x, so pods other tests left behind
    /// (the API server outlives the tests) never share an address with them.
    subnet: u8,
    tokens: Arc<TokenReviewAuthenticator>,
    client: kube::Client,
    dir: tempfile::TempDir,
    cp: ControlPlane,
    ns: String,
    node: String,
}

impl Env {
    async fn start() -> Env {
        let kubeconfig = apiserver();
        let (client, url) = ambit_kube::client(Some(&kubeconfig)).await.unwrap();
        install_crds(&client).await;
        let ns = unique("ambit-t");
        let node = unique("node");
        create_namespace(&client, &ns).await;
        create_node(
            &client,
            json!({"metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": "z1"}}}),
        )
        .await;

        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().join("manifests"), dir.path().join("state"));
        config.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.monitoring_addr = "127.0.0.1:0".parse().unwrap();
        config.push_debounce = Duration::from_millis(20);
        let source = KubeSource::start(client.clone(), url, KubeOptions::default())
            .await
            .unwrap();
        let tokens = Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            ambit_control::source::Source::model(&source),
            "cluster.local".into(),
            vec!["istio-ca".into()],
            [format!("{ns}/ambit-node")],
        ));
        let cp = ControlPlane::start_with_source(config, Box::new(source), Some(tokens.clone()))
            .await
            .unwrap();
        let subnet = 8
            + (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 100) as u8;
        Env {
            subnet,
            tokens,
            client,
            dir,
            cp,
            ns,
            node,
        }
    }

    async fn node_proxy(&self) -> NodeProxy {
        let signer = TokenSigner::load_or_create(&self.dir.path().join("state")).unwrap();
        let pem = std::fs::read(self.dir.path().join("state/ca/root-cert.pem")).unwrap();
        let mut config = NodeConfig::new(XdsConfig {
            address: self.cp.grpc_addr().to_string(),
            roots: ambit_tls::spiffe::TrustBundle::from_pem(&pem).unwrap(),
            server_name: Some("localhost".into()),
            token: TokenSource::Static(signer.mint(&self.node, Duration::from_secs(600)).unwrap()),
            node_name: self.node.clone(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        });
        config.admin_addr = "127.0.0.1:0".parse().unwrap();
        config.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.readiness_addr = "127.0.0.1:0".parse().unwrap();
        config.worker_threads = 1;
        NodeProxy::start(config).await.unwrap()
    }

    fn ip(&self, host: u8) -> String {
        format!("198.18.{}.{host}", self.subnet)
    }

    /// Deletes the test's pods (a pod placed on a node is removed only with no grace).
    async fn cleanup(&self) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let _ = pods
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &Default::default(),
            )
            .await;
    }

    /// Creates a running pod on the test node (status set as a kubelet would).
    async fn pod(&self, name: &str, sa: &str, ip: &str, labels: serde_json::Value) {
        self.pod_on(&self.node, name, sa, ip, labels).await;
    }

    /// A token for service account `sa`, for `audience`, bound to pod `pod` if given.
    async fn token(&self, sa: &str, audience: &str, pod: Option<&str>) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let bound = match pod {
            Some(name) => {
                let uid = pods.get(name).await.unwrap().metadata.uid.unwrap();
                json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid})
            }
            None => serde_json::Value::Null,
        };
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let request = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": 600, "boundObjectRef": bound}
        }))
        .unwrap();
        let answer = sas
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .unwrap();
        answer.status.unwrap().token
    }

    /// Authenticates `token`, waiting while the pod it is bound to is not in the model yet.
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let start = Instant::now();
        loop {
            match self.tokens.authenticate(token).await {
                Err(AuthError::Refused(m))
                    if m.contains("not known (yet)")
                        && start.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn pod_on(&self, node: &str, name: &str, sa: &str, ip: &str, labels: serde_json::Value) {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let _ = sas
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
            )
            .await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": sa,
                    "containers": [{"name": "app", "image": "example.invalid/app:1",
                        "ports": [{"containerPort": 8080, "name": "http"}]}]
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "hostIP": "198.18.0.1",
                "conditions": [{"type": "Ready", "status": "True"}]
            }})),
        )
        .await
        .unwrap();
    }
}

/// Waits until `f` holds for the node's state; returns how long that took.
async fn until(env: &Env, node: &NodeProxy, what: &str, f: impl Fn(&State) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f(&node.store().load()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for: {what}; the source's status: {:?}; the node's policies: {:?}",
            env.cp.source_status().borrow(),
            node.store()
                .load()
                .policies()
                .map(|p| format!("{}/{} {:?} {:?}", p.namespace, p.name, p.action, p.scope))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_created_through_the_api_reach_a_node_proxy_as_deltas() {
    let env = Env::start().await;
    let node = env.node_proxy().await;
    let ns = env.ns.clone();

    // A pod and a service.
    env.pod("web-1", "web", &env.ip(10), json!({"app": "web"}))
        .await;
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns);
    let svc = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let vip: IpAddr = svc
        .spec
        .unwrap()
        .cluster_ip
        .expect("the API server allocates a cluster IP")
        .parse()
        .unwrap();
    let took = until(&env, &node, "the pod and its service", |st| {
        st.workload_by_ip("", ip(&env.ip(10))).is_some() && st.service_by_vip("", vip).is_some()
    })
    .await;
    eprintln!("pod and service at the node proxy after {took:?}");
    let st = node.store().load();
    let web = st.workload_by_ip("", ip(&env.ip(10))).unwrap();
    assert_eq!(
        web.identity().unwrap().to_string(),
        format!("spiffe://cluster.local/ns/{ns}/sa/web")
    );
    assert_eq!(web.tunnel, TunnelProtocol::None, "not enrolled yet");
    let svc_key = st.service_by_vip("", vip).unwrap().key();
    assert_eq!(st.endpoints(&svc_key).count(), 1);

    // Label the namespace: the workload becomes HBONE, within a second.
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})),
        )
        .await
        .unwrap();
    let took = until(&env, &node, "HBONE after the namespace label", |st| {
        st.workload_by_ip("", ip(&env.ip(10)))
            .is_some_and(|w| w.tunnel == TunnelProtocol::Hbone)
    })
    .await;
    eprintln!("namespace label at the node proxy after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // An AuthorizationPolicy created as a custom resource.
    let aps = policies(&env.client, &ns);
    aps.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-other", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/other/sa/x"]}}]}]
            }
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let took = until(&env, &node, "the policy", |st| {
        st.workload_by_ip("", ip(&env.ip(10)))
            .is_some_and(|w| st.policies_for(w).any(|p| p.action == PolicyAction::Deny))
    })
    .await;
    eprintln!("policy at the node proxy after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Deleting the pod removes the workload.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    pods.delete("web-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let took = until(&env, &node, "the pod's removal", |st| {
        st.workload_by_ip("", ip(&env.ip(10))).is_none()
    })
    .await;
    assert!(took < Duration::from_secs(1), "{took:?}");

    // The control plane's status names the cluster.
    let status = env.cp.source_status().borrow().clone();
    assert!(
        status.dir.starts_with("kubernetes https://127.0.0.1:"),
        "{}",
        status.dir
    );
    env.cleanup().await;
    node.shutdown().await;
    env.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_the_api_server_accepts_but_ambit_cannot_read_denies() {
    let env = Env::start().await;
    let node = env.node_proxy().await;
    let ns = env.ns.clone();
    env.pod("api-1", "api", &env.ip(20), json!({"app": "api"}))
        .await;
    until(&env, &node, "the pod", |st| {
        st.workload_by_ip("", ip(&env.ip(20))).is_some()
    })
    .await;

    // An ALLOW policy with a misspelt field: read as written it would allow everything
    // from anywhere the misspelt condition meant to restrict.
    let aps = policies(&env.client, &ns);
    aps.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-frontend", "namespace": ns},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principalz": ["cluster.local/ns/x/sa/frontend"]}}]}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    until(&env, &node, "the denying stand-in", |st| {
        st.workload_by_ip("", ip(&env.ip(20))).is_some_and(|w| {
            st.policies_for(w)
                .any(|p| p.action == PolicyAction::Deny && p.name.as_ref() == "allow-frontend")
        })
    })
    .await;
    let status = env.cp.source_status().borrow().clone();
    let refused: Vec<&str> = status.file_errors.iter().map(|f| f.file.as_str()).collect();
    assert!(
        refused.contains(&format!("AuthorizationPolicy {ns}/allow-frontend").as_str()),
        "{refused:?}"
    );

    // Fixed: the real policy replaces the stand-in.
    aps.patch(
        "allow-frontend",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/frontend"]}}]}]}})),
    )
    .await
    .unwrap();
    until(&env, &node, "the real policy", |st| {
        st.workload_by_ip("", ip(&env.ip(20))).is_some_and(|w| {
            st.policies_for(w)
                .any(|p| p.action == PolicyAction::Allow && p.name.as_ref() == "allow-frontend")
        })
    })
    .await;
    env.cleanup().await;
    node.shutdown().await;
    env.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_installed_after_start_is_read() {
    let kubeconfig = apiserver();
    let (client, url) = ambit_kube::client(Some(&kubeconfig)).await.unwrap();
    // Only this test installs the HTTPRoute CRD (the installer does not install the
    // Gateway API's): remove it if an earlier run left it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds
        .delete(
            "httproutes.gateway.networking.k8s.io",
            &DeleteParams::default(),
        )
        .await;
    let start = Instant::now();
    while crds
        .get_opt("httproutes.gateway.networking.k8s.io")
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the HTTPRoute CRD left by an earlier run is not going away"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let options = KubeOptions {
        rediscover: Duration::from_millis(200),
        ..KubeOptions::default()
    };
    let source = KubeSource::start(client.clone(), url, options)
        .await
        .unwrap();
    let status = ambit_control::source::Source::status(&source)
        .borrow()
        .clone();
    assert!(
        status.ignored.iter().any(|i| i.contains("HTTPRoute")),
        "the HTTPRoute CRD was removed, yet the source found it served: {:?}",
        status.ignored
    );

    install_crd(&client, GATEWAY_GROUP, "HTTPRoute", "httproutes").await;
    served(&client, GATEWAY_GROUP, "HTTPRoute").await;
    let ns = unique("ambit-t");
    create_namespace(&client, &ns).await;
    let resource = ApiResource {
        group: GATEWAY_GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GATEWAY_GROUP}/v1"),
        kind: "HTTPRoute".into(),
        plural: "httproutes".into(),
    };
    let entries: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    entries
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "route-1", "namespace": ns},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut model = ambit_control::source::Source::model(&source);
    let key = ambit_control::model::ObjectRef {
        kind: ambit_control::model::Kind::HTTPRoute,
        namespace: ns.clone(),
        name: "route-1".into(),
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        model.wait_for(|m| m.get(&key).is_some()),
    )
    .await
    .expect("the HTTPRoute reaches the model once its CRD is installed")
    .unwrap();
    let status = ambit_control::source::Source::status(&source)
        .borrow()
        .clone();
    assert!(
        !status.ignored.iter().any(|i| i.contains("HTTPRoute")),
        "{:?}",
        status.ignored
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_binds_a_node_proxy_token_to_its_pods_node() {
    let env = Env::start().await;
    let ns = env.ns.clone();
    let other = unique("node");
    create_node(&env.client, json!({"metadata": {"name": other}})).await;
    // A node proxy on each node, and an application pod on each.
    env.pod("np", "ambit-node", &env.ip(1), json!({"app": "np"}))
        .await;
    env.pod_on(
        &other,
        "np-other",
        "ambit-node",
        &env.ip(2),
        json!({"app": "np"}),
    )
    .await;
    env.pod("web-1", "web", &env.ip(10), json!({"app": "web"}))
        .await;
    env.pod_on(&other, "db-1", "db", &env.ip(11), json!({"app": "db"}))
        .await;
    let id = |sa: &str| SpiffeId::new("cluster.local", &ns, sa).unwrap().to_string();

    // The node proxy's token, bound to its pod: it speaks for that pod's node.
    let token = env.token("ambit-node", "istio-ca", Some("np")).await;
    let caller = env.authenticate(&token).await.unwrap();
    assert_eq!(caller.node.as_deref(), Some(env.node.as_str()));
    let model = {
        let mut m = env.cp.model();
        m.wait_for(|m| m.pods_on_node(&other).count() == 2)
            .await
            .unwrap();
        m.borrow().clone()
    };
    authorize_identity(&caller, Some(&id("web")), &model, "cluster.local")
        .expect("a pod on its node");
    let refusal = authorize_identity(&caller, Some(&id("db")), &model, "cluster.local")
        .expect_err("a pod on another node");
    assert!(
        refusal.to_string().contains("no running pod on node"),
        "{refusal}"
    );

    // The same account's token bound to the pod on the other node speaks for that node.
    let token = env.token("ambit-node", "istio-ca", Some("np-other")).await;
    let caller = env.authenticate(&token).await.unwrap();
    assert_eq!(caller.node.as_deref(), Some(other.as_str()));
    authorize_identity(&caller, Some(&id("db")), &model, "cluster.local").unwrap();

    // Unbound, the node proxy's token speaks for no node.
    let token = env.token("ambit-node", "istio-ca", None).await;
    let err = env.authenticate(&token).await.expect_err("unbound");
    assert!(err.to_string().contains("not bound to a pod"), "{err}");

    // A workload's own token: its own identity only.
    let token = env.token("web", "istio-ca", Some("web-1")).await;
    let caller = env.authenticate(&token).await.unwrap();
    assert_eq!(caller.node, None);
    assert_eq!(
        authorize_identity(&caller, None, &model, "cluster.local")
            .unwrap()
            .to_string(),
        id("web")
    );
    authorize_identity(&caller, Some(&id("db")), &model, "cluster.local")
        .expect_err("not a node credential");

    // Another audience, or no token of the cluster's: refused, never a node.
    let token = env
        .token("ambit-node", "some-other-audience", Some("np"))
        .await;
    let err = env.authenticate(&token).await.expect_err("wrong audience");
    assert!(err.to_string().contains("did not accept"), "{err}");
    let err = env
        .authenticate("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
        .await
        .expect_err("garbage");
    assert!(matches!(err, AuthError::Refused(_)), "{err}");
    drop(model);
    env.cleanup().await;
    env.cp.shutdown().await;
}

/// Polls `f` until it returns `Some`, for at most 15 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_runs_each_waypoint_gateway_as_a_deployment_and_reports_its_status() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    let env = Env::start().await;
    let ns = env.ns.clone();
    let (leading, election) = ambit_kube::leader::elect(
        env.client.clone(),
        ambit_kube::leader::LeaderOptions::new(ns.clone(), "replica-1"),
    );
    let controller = tokio::spawn(ambit_kube::waypoints::run(
        env.client.clone(),
        env.cp.model(),
        leading,
        ambit_kube::waypoints::WaypointOptions {
            image: "ambit:test".into(),
            control_plane: "ambit-control.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            roots_pem: env.cp.roots_pem(),
        },
    ));
    let gateway_resource = gateway_resource();
    let gateways: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &ns, &gateway_resource);
    let gw = create_waypoint_gateway(&gateways, &ns, "waypoint").await;
    let uid = gw.metadata.uid.unwrap();

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let deployment = eventually("the waypoint's Deployment", || async {
        deployments.get_opt("waypoint").await.unwrap()
    })
    .await;
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Gateway", uid.as_str())
    );
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("ambit:test"));
    assert_eq!(
        container.args.as_ref().unwrap()[..4],
        ["waypoint", "run", "--name", "waypoint"]
    );
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns);
    let svc = eventually("the waypoint's Service", || async {
        services.get_opt("waypoint").await.unwrap()
    })
    .await;
    let ports: Vec<i32> = svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [15008, 15021]);
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &ns);
    eventually("the waypoint's ServiceAccount", || async {
        sas.get_opt("waypoint").await.unwrap()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let roots = eventually("the waypoint's roots", || async {
        cms.get_opt("waypoint-ambit-ca-root").await.unwrap()
    })
    .await;
    assert_eq!(
        roots.data.unwrap()["root-cert.pem"],
        env.cp.roots_pem(),
        "the mesh roots"
    );

    // Accepted, not Programmed: no pod is ready.
    let condition = |o: &DynamicObject, t: &str| {
        o.data["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t))
            .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
    };
    eventually("Accepted and not Programmed", || async {
        let g = gateways.get("waypoint").await.unwrap();
        (condition(&g, "Accepted").as_deref() == Some("True")
            && condition(&g, "Programmed").as_deref() == Some("False"))
        .then_some(())
    })
    .await;

    // A ready waypoint pod: Programmed, with the Service's address.
    env.pod(
        "waypoint-abc",
        "waypoint",
        &env.ip(5),
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
    )
    .await;
    let g = eventually("Programmed", || async {
        let g = gateways.get("waypoint").await.unwrap();
        (condition(&g, "Programmed").as_deref() == Some("True")).then_some(g)
    })
    .await;
    assert_eq!(g.data["status"]["addresses"][0]["value"], cluster_ip);

    // The Gateway deleted: what was made for it goes too.
    gateways
        .delete("waypoint", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Deployment removed", || async {
        deployments
            .get_opt("waypoint")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eventually("the Service removed", || async {
        services
            .get_opt("waypoint")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // A Gateway named after an existing Service never takes it over, nor deletes it.
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "shop"},
                "spec": {"selector": {"app": "shop"}, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    create_waypoint_gateway(&gateways, &ns, "shop").await;
    let g = eventually("Accepted=False for the clashing Gateway", || async {
        let g = gateways.get("shop").await.unwrap();
        (condition(&g, "Accepted").as_deref() == Some("False")).then_some(g)
    })
    .await;
    let message = g.data["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("does not belong to this Gateway"),
        "{message}"
    );
    let svc = services.get("shop").await.unwrap();
    assert_eq!(
        svc.spec.unwrap().selector.unwrap()["app"],
        "shop",
        "the Service is untouched"
    );
    assert!(deployments.get_opt("shop").await.unwrap().is_none());
    gateways
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        services.get_opt("shop").await.unwrap().is_some(),
        "not deleted with the Gateway"
    );

    controller.abort();
    election.abort();
    env.cleanup().await;
    env.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_takes_over_the_lease_when_the_leader_stops() {
    let kubeconfig = apiserver();
    let (client, _) = ambit_kube::client(Some(&kubeconfig)).await.unwrap();
    let lease = unique("lease");
    let options = |who: &str| ambit_kube::leader::LeaderOptions {
        name: lease.clone(),
        lease: Duration::from_secs(2),
        renew: Duration::from_millis(500),
        ..ambit_kube::leader::LeaderOptions::new("default", who)
    };
    let (mut a, task_a) = ambit_kube::leader::elect(client.clone(), options("a"));
    tokio::time::timeout(Duration::from_secs(10), a.wait_for(|l| *l))
        .await
        .expect("the first replica leads")
        .unwrap();
    let (mut b, task_b) = ambit_kube::leader::elect(client.clone(), options("b"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        *a.borrow() && !*b.borrow(),
        "one leader while the first renews"
    );

    task_a.abort();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), b.wait_for(|l| *l))
        .await
        .expect("the second replica takes over")
        .unwrap();
    let took = start.elapsed();
    eprintln!("takeover after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "within the lease time and a renewal: {took:?}"
    );
    task_b.abort();
}

/// A discovery client with `token`, as a waypoint (`waypoint`: `<namespace>/<name>`) or
/// as a node proxy.
fn xds_client(
    env: &Env,
    token: String,
    waypoint: Option<String>,
) -> (
    ambit_xds::XdsClient,
    tokio::sync::watch::Receiver<ambit_xds::XdsState>,
) {
    let pem = std::fs::read(env.dir.path().join("state/ca/root-cert.pem")).unwrap();
    let config = XdsConfig {
        address: env.cp.grpc_addr().to_string(),
        roots: ambit_tls::spiffe::TrustBundle::from_pem(&pem).unwrap(),
        server_name: Some("localhost".into()),
        token: TokenSource::Static(token),
        node_name: env.node.clone(),
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(60),
    };
    let store = Arc::new(ambit_core::state::Store::new());
    match waypoint {
        Some(w) => {
            let (client, state) =
                ambit_xds::XdsClient::with_kinds(config, store, &ambit_xds::ResourceKind::WAYPOINT);
            (client.for_waypoint(w), state)
        }
        None => ambit_xds::XdsClient::new(config, store),
    }
}

/// Subscribes, and returns the client's state once synced or refused.
async fn subscribe(env: &Env, token: String, waypoint: Option<String>) -> ambit_xds::XdsState {
    let (client, mut state) = xds_client(env, token, waypoint);
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(client.run(stop));
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| s.synced || s.last_error.is_some()),
    )
    .await
    .expect("synced or refused")
    .unwrap()
    .clone();
    task.abort();
    s
}

/// Like [`subscribe`], but leaves the client running once synced.
async fn subscribe_open(
    env: &Env,
    token: String,
    waypoint: Option<String>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<ambit_xds::XdsState>,
    tokio::sync::watch::Sender<bool>,
) {
    let (client, mut state) = xds_client(env, token, waypoint);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(client.run(stop));
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.synced))
        .await
        .expect("synced")
        .unwrap();
    (task, state, stop_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_subscribes_with_its_own_token_as_itself_only() {
    let env = Env::start().await;
    let ns = env.ns.clone();
    env.pod("waypoint-1", "waypoint", &env.ip(30), json!({"app": "w"}))
        .await;
    let token = env.token("waypoint", "istio-ca", Some("waypoint-1")).await;
    // Wait until the token's pod is known (not needed for a workload token, but keeps
    // the control plane's view settled).
    env.authenticate(&token).await.unwrap();

    // No Gateway of that name yet: refused.
    let early = subscribe(&env, token.clone(), Some(format!("{ns}/waypoint"))).await;
    let err = early.last_error.expect("no waypoint Gateway yet");
    assert!(err.contains("no istio-waypoint Gateway"), "{err}");

    let gateway_resource = gateway_resource();
    create_waypoint_gateway(
        &Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &gateway_resource),
        &ns,
        "waypoint",
    )
    .await;
    let mut model = env.cp.model();
    model
        .wait_for(|m| {
            m.lookup(ambit_control::model::Kind::Gateway, &ns, "waypoint")
                .is_some()
        })
        .await
        .unwrap();

    let ok = subscribe(&env, token.clone(), Some(format!("{ns}/waypoint"))).await;
    assert!(ok.synced, "{:?}", ok.last_error);

    // The same token naming another waypoint, or none.
    let other = subscribe(&env, token.clone(), Some(format!("{ns}/another"))).await;
    let err = other.last_error.expect("refused as another waypoint");
    assert!(err.contains("only as the waypoint it runs as"), "{err}");

    let as_node = subscribe(&env, token.clone(), None).await;
    let err = as_node.last_error.expect("refused as a node proxy");
    assert!(err.contains("WAYPOINT"), "{err}");

    // A stream kept open ends when the Gateway goes.
    let (kept, mut kept_state, _stop_kept) =
        subscribe_open(&env, token.clone(), Some(format!("{ns}/waypoint"))).await;
    Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &gateway_resource)
        .delete("waypoint", &DeleteParams::default())
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        Duration::from_secs(10),
        kept_state.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("is gone"))
        }),
    )
    .await
    .expect("the stream of a deleted waypoint is cut")
    .unwrap()
    .clone();
    assert!(!cut.connected || cut.last_error.is_some());
    kept.abort();
    env.cleanup().await;
    env.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_each_policys_status() {
    {
        let (client, _) = ambit_kube::client(Some(&apiserver())).await.unwrap();
        install_crd(&client, GATEWAY_GROUP, "HTTPRoute", "httproutes").await;
        served(&client, GATEWAY_GROUP, "HTTPRoute").await;
    }
    let env = Env::start().await;
    let lease = unique("lease");
    let (leading, election) = ambit_kube::leader::elect(
        env.client.clone(),
        ambit_kube::leader::LeaderOptions {
            name: lease,
            ..ambit_kube::leader::LeaderOptions::new(&env.ns, "status-test")
        },
    );
    let writer = tokio::spawn(ambit_kube::status::run(
        env.client.clone(),
        env.cp.snapshots(),
        env.cp.model(),
        env.cp.source_status(),
        leading,
    ));
    let api = policies(&env.client, &env.ns);
    let create = |name: &str, spec: serde_json::Value| {
        serde_json::from_value::<DynamicObject>(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": env.ns}, "spec": spec
        }))
        .unwrap()
    };
    api.create(
        &PostParams::default(),
        &create(
            "plain",
            json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["a"]}}]}]}),
        ),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &create(
            "l7",
            json!({"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        ),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &create(
            "unreadable",
            json!({"action": "ALLOW", "rules": "not a list"}),
        ),
    )
    .await
    .unwrap();
    let condition = |name: &'static str| {
        let api = api.clone();
        async move {
            let o = api.get(name).await.ok()?;
            ambit_kube::status::condition_of(&serde_json::to_value(&o).unwrap(), "ZtunnelAccepted")
        }
    };
    let plain = eventually("the plain policy's status", || condition("plain")).await;
    assert_eq!(
        (plain.0.as_str(), plain.1.as_str()),
        ("True", "Accepted"),
        "{plain:?}"
    );
    let l7 = eventually("the L7 policy's status", || condition("l7")).await;
    assert_eq!(
        (l7.0.as_str(), l7.1.as_str()),
        ("False", "UnsupportedValue"),
        "{l7:?}"
    );
    assert!(l7.2.contains("waypoint"), "says what to do: {l7:?}");
    let bad = eventually("the unreadable policy's status", || condition("unreadable")).await;
    assert_eq!(
        (bad.0.as_str(), bad.1.as_str()),
        ("False", "Invalid"),
        "{bad:?}"
    );
    assert!(bad.2.contains("denying all traffic"), "{bad:?}");

    // An HTTPRoute whose parent and backend do not exist: each condition says so.
    let routes: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &ApiResource {
            group: GATEWAY_GROUP.into(),
            version: "v1".into(),
            api_version: format!("{GATEWAY_GROUP}/v1"),
            kind: "HTTPRoute".into(),
            plural: "httproutes".into(),
        },
    );
    routes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": format!("{GATEWAY_GROUP}/v1"), "kind": "HTTPRoute",
                "metadata": {"name": "canary", "namespace": env.ns},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                         "rules": [{"backendRefs": [{"name": "web-v2", "port": 80}]}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let parent = eventually("the route's status", || {
        let routes = routes.clone();
        async move {
            let o = serde_json::to_value(routes.get("canary").await.ok()?).unwrap();
            let p = o["status"]["parents"].get(0)?.clone();
            Some(p)
        }
    })
    .await;
    assert_eq!(parent["controllerName"], "ambit.io/mesh-controller");
    assert_eq!(parent["parentRef"]["kind"], "Service");
    assert_eq!(parent["parentRef"]["name"], "web");
    let c = &parent["conditions"][0];
    assert_eq!(
        (&c["type"], &c["status"], &c["reason"]),
        (
            &json!("Accepted"),
            &json!("False"),
            &json!("NoMatchingParent")
        ),
        "{c}"
    );
    assert!(
        c["message"].as_str().unwrap().contains("no such Service"),
        "{c}"
    );
    let c = &parent["conditions"][1];
    assert_eq!(
        (&c["type"], &c["status"], &c["reason"]),
        (
            &json!("ResolvedRefs"),
            &json!("False"),
            &json!("BackendNotFound")
        ),
        "{c}"
    );
    writer.abort();
    election.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requestauthentication_is_watched_and_one_no_waypoint_can_enforce_is_reported() {
    let kubeconfig = apiserver();
    let (client, _) = ambit_kube::client(Some(&kubeconfig)).await.unwrap();
    install_crd(
        &client,
        "security.istio.io",
        "RequestAuthentication",
        "requestauthentications",
    )
    .await;
    served(&client, "security.istio.io", "RequestAuthentication").await;
    let env = Env::start().await;
    let resource = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "RequestAuthentication".into(),
        plural: "requestauthentications".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &resource);
    // A selector binds it to sidecars, which ambient mode has none of: reported as not
    // enforced (and counted), never silently dropped.
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "reviews"},
            "spec": {"selector": {"matchLabels": {"app": "reviews"}},
                     "jwtRules": [{"issuer": "https://issuer.example", "jwks": "{}"}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let key = format!("RequestAuthentication {}/reviews", env.ns);
    let mut snapshots = env.cp.snapshots();
    eventually("the RequestAuthentication reported", || {
        let warnings = snapshots.borrow_and_update().warnings.clone();
        let key = key.clone();
        async move {
            warnings
                .get(&key)
                .is_some_and(|w| w.iter().any(|m| m.starts_with("NOT ENFORCED")))
                .then_some(())
        }
    })
    .await;
    api.delete("reviews", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the report gone with it", || {
        let warnings = snapshots.borrow_and_update().warnings.clone();
        let key = key.clone();
        async move { (!warnings.contains_key(&key)).then_some(()) }
    })
    .await;
}
