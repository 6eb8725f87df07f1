//! The node agent in a cluster, against a genuine Kubernetes API server and real network
//! namespaces: a namespace label enrolls running pods (their network namespaces found by
//! address), their traffic becomes HBONE, an AuthorizationPolicy created through the API
//! is enforced across namespaces; and the CNI plugin binary, run as a container runtime
//! runs it (CNI specification environment and stdin), captures a new pod before it has
//! an address in the API, passes other pods through, and answers bad input with the
//! specification's error object.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_cni::agent::{Agent, AgentConfig, PodPhase};
use ambit_control::auth::TokenSigner;
use ambit_control::{Config, ControlPlane};
use ambit_kube::{KubeOptions, KubeSource, TokenReviewAuthenticator};
use ambit_node::{NodeConfig, NodeProxy, XdsConfig};
use ambit_testenv::{Pod as NetPod, Topology};
use ambit_tls::client::TokenSource;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Cluster {
    kubeconfig: PathBuf,
    client: kube::Client,
    dir: tempfile::TempDir,
    cp: ControlPlane,
    ns: String,
    other_ns: String,
    subnet: u8,
}

impl Cluster {
    async fn start() -> Cluster {
        let kubeconfig = ambit_testenv::kube_apiserver();
        let (client, url) = ambit_kube::client(Some(&kubeconfig)).await.unwrap();
        let crd: Value = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "authorizationpolicies.security.istio.io"},
            "spec": {"group": "security.istio.io", "scope": "Namespaced",
                "names": {"kind": "AuthorizationPolicy", "plural": "authorizationpolicies"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
        });
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        let _ = crds
            .create(
                &PostParams::default(),
                &serde_json::from_value(crd).unwrap(),
            )
            .await;
        wait_for("the AuthorizationPolicy CRD to be served", async || {
            let api = policies(&client, "default");
            api.list(&Default::default()).await.ok().map(|_| ())
        })
        .await;
        let ns = unique("ambit-cni");
        let other_ns = unique("ambit-plain");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for n in [&ns, &other_ns] {
            namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap(),
                )
                .await
                .unwrap();
            // No controller manager runs here to create the default service account.
            let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                Api::namespaced(client.clone(), n);
            let _ = sas
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
                )
                .await;
        }
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
        let cp = ControlPlane::start_with_source(config, Box::new(source), Some(tokens))
            .await
            .unwrap();
        // Addresses other tests on this API server never use: they take 198.18.0-108.x,
        // and Services get theirs from 198.18.128.0/17.
        let subnet = 109
            + (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 11) as u8;
        Cluster {
            kubeconfig,
            client,
            dir,
            cp,
            ns,
            other_ns,
            subnet,
        }
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, host)
    }

    async fn node(&self, name: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }

    fn xds(&self, node: &str) -> XdsConfig {
        let state = self.dir.path().join("state");
        let signer = TokenSigner::load_or_create(&state).unwrap();
        let pem = std::fs::read(state.join("ca/root-cert.pem")).unwrap();
        XdsConfig {
            address: self.cp.grpc_addr().to_string(),
            roots: ambit_tls::spiffe::TrustBundle::from_pem(&pem).unwrap(),
            server_name: Some("localhost".into()),
            token: TokenSource::Static(signer.mint(node, Duration::from_secs(600)).unwrap()),
            node_name: node.into(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        }
    }

    fn zds(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.zds.sock"))
    }

    fn cni_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.cni.sock"))
    }

    async fn node_proxy(&self, node: &str) -> NodeProxy {
        let mut config = NodeConfig::new(self.xds(node));
        config.admin_addr = "127.0.0.1:0".parse().unwrap();
        config.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.readiness_addr = "127.0.0.1:0".parse().unwrap();
        config.worker_threads = 1;
        config.zds_socket = Some(self.zds(node));
        config.dataplane.connect_timeout = Duration::from_secs(2);
        NodeProxy::start(config).await.unwrap()
    }

    /// The agent as `ambit cni --kubernetes` runs it: labels from the API server, the
    /// plugin's socket, network namespaces found by address.
    async fn agent(&self, node: &str) -> Agent {
        let mut config = AgentConfig::new(self.xds(node), self.zds(node));
        config.netns_dir = self.dir.path().join("no-named-netns");
        config.reconcile_interval = Duration::from_millis(500);
        config.admin_addr = "127.0.0.1:0".parse().unwrap();
        config.cni_socket = Some(self.cni_socket(node));
        config.netns_search = Some(ambit_cni::netns::Search::default());
        config.enrollment = Some(Arc::new(ambit_kube::cni::PodLabels::new(
            self.client.clone(),
        )));
        Agent::start(config).await.unwrap()
    }

    /// A pod in the API on `node`; with an address, running as a kubelet would report it.
    async fn pod(&self, ns: &str, name: &str, node: &str, ip: Option<Ipv4Addr>) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {"nodeName": node, "serviceAccountName": "default",
                    "containers": [{"name": "app", "image": "example.invalid/app:1"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        if let Some(ip) = ip {
            self.pod_ip(ns, name, ip).await;
        }
    }

    async fn pod_ip(&self, ns: &str, name: &str, ip: Ipv4Addr) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                "hostIP": "198.18.0.1", "conditions": [{"type": "Ready", "status": "True"}]
            }})),
        )
        .await
        .unwrap();
    }

    async fn cleanup(&self) {
        for ns in [&self.ns, &self.other_ns] {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            let _ = pods
                .delete_collection(
                    &DeleteParams::default().grace_period(0),
                    &Default::default(),
                )
                .await;
        }
    }
}

fn policies(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

fn phase(agent: &Agent, pod: &str) -> Option<PodPhase> {
    agent
        .status()
        .pods
        .iter()
        .find(|p| p.name == pod)
        .map(|p| p.phase)
}

fn echo(pod: &NetPod) {
    let listener = pod.listen(APP_PORT).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// One echo exchange from `from` to `to`, or why it failed.
async fn exchange(from: &NetPod, to: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let attempt = async {
        let mut conn = from.connect(to).await.map_err(|e| e.to_string())?;
        conn.write_all(payload).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; payload.len()];
        conn.read_exact(&mut back)
            .await
            .map_err(|e| e.to_string())?;
        if back == payload {
            Ok(())
        } else {
            Err("the echo differed".into())
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 5s".into()))
}

/// Whether `server` holds an HBONE connection (port 15008) right now.
fn holds_hbone(server: &NetPod) -> bool {
    server
        .tcp_connections()
        .unwrap()
        .iter()
        .any(|(local, _)| local.port() == 15008)
}

fn rules_in(pod: &NetPod) -> bool {
    let file = std::fs::File::open(pod.netns_path()).unwrap();
    ambit_cni::redirect::installed(&file).unwrap()
}

/// Runs the `ambit` binary as the container runtime runs the installed plugin: under
/// the name `ambit-cni`, CNI_* in the environment, the configuration on stdin.
fn plugin(dir: &Path, env: &[(&str, String)], stdin: &str) -> (Output, Value) {
    let link = dir.join("bin/ambit-cni");
    if !link.exists() {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ambit"), &link).unwrap();
    }
    let mut child = Command::new(&link)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
    };
    (out, value)
}

fn cni_env(command: &str, netns: &Path, ns: &str, pod: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.into()),
        ("CNI_CONTAINERID", format!("c-{pod}")),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".into()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=c-{pod}"
            ),
        ),
        ("CNI_PATH", "/opt/cni/bin".into()),
    ]
}

fn conf(socket: &Path, kubeconfig: Option<&Path>, ip: Ipv4Addr) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "pods", "type": "ambit-cni",
        "agentSocket": socket,
        "excludeNamespaces": ["kube-system"],
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": format!("{ip}/16"), "interface": 0, "gateway": "198.18.0.1"}]
        }
    });
    if let Some(k) = kubeconfig {
        c["kubeconfig"] = json!(k);
    }
    c.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_enrolls_by_label_and_the_cni_plugin_captures_new_pods() {
    let env = Cluster::start().await;
    let (node_a, node_b) = (unique("node-a"), unique("node-b"));
    env.node(&node_a).await;
    env.node(&node_b).await;
    let mut topo = Topology::new().expect("building the test topology");
    let sleep = topo.pod(&node_a, env.ip(10)).unwrap();
    let server = topo.pod(&node_b, env.ip(20)).unwrap();
    echo(&server);
    env.pod(&env.ns, "sleep", &node_a, Some(sleep.ip)).await;
    env.pod(&env.ns, "echo", &node_b, Some(server.ip)).await;

    let proxies = [env.node_proxy(&node_a).await, env.node_proxy(&node_b).await];
    let agents = [env.agent(&node_a).await, env.agent(&node_b).await];
    for agent in &agents {
        wait_for("each agent to reach its node proxy and sync", async || {
            let s = agent.status();
            (s.node_proxy_connected && s.discovery_synced).then_some(())
        })
        .await;
    }
    let to_echo = SocketAddr::from((server.ip, APP_PORT));

    // Not labelled: plain TCP, no rules.
    exchange(&sleep, to_echo, b"plain").await.unwrap();
    assert!(!rules_in(&sleep) && !rules_in(&server));
    assert!(!holds_hbone(&server));

    // Label the namespace through the API: both running pods are enrolled, their
    // namespaces found by address, and new connections are HBONE.
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces
        .patch(
            &env.ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})),
        )
        .await
        .unwrap();
    wait_for("both pods enrolled", async || {
        (phase(&agents[0], "sleep") == Some(PodPhase::Enrolled)
            && phase(&agents[1], "echo") == Some(PodPhase::Enrolled))
        .then_some(())
    })
    .await;
    let found = agents[0].status().pods[0].netns.clone();
    assert_eq!(
        std::fs::canonicalize(&found).unwrap(),
        std::fs::canonicalize(sleep.netns_path()).unwrap(),
        "found by its address"
    );
    assert!(rules_in(&sleep) && rules_in(&server));
    for p in &proxies {
        wait_for("node proxies ready", async || {
            ambit_admin::get(p.readiness_addr(), "/healthz/ready")
                .await
                .ok()
                .filter(|(s, _)| s.is_success())
                .map(|_| ())
        })
        .await;
    }
    wait_for("a mesh connection to the echo pod", async || {
        exchange(&sleep, to_echo, b"in the mesh").await.ok()
    })
    .await;
    let mut conn = sleep.connect(to_echo).await.unwrap();
    conn.write_all(b"held").await.unwrap();
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).await.unwrap();
    assert!(holds_hbone(&server), "no HBONE connection in the echo pod");
    drop(conn);

    // An AuthorizationPolicy created through the API is enforced across namespaces.
    let deny = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-sleep", "namespace": env.ns},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{}/sa/default", env.ns)]}}]}]}
    });
    let api = policies(&env.client, &env.ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(deny).unwrap(),
    )
    .await
    .unwrap();
    wait_for("the policy to deny", async || {
        exchange(&sleep, to_echo, b"denied?").await.err()
    })
    .await;
    api.delete("deny-sleep", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the policy's removal to allow again", async || {
        exchange(&sleep, to_echo, b"allowed").await.ok()
    })
    .await;

    // A Service without a selector, its endpoint written in an EndpointSlice (outside
    // the mesh, as the API server's own `kubernetes` Service is): reached by its VIP.
    let outside = topo.pod(&node_b, env.ip(50)).unwrap();
    echo(&outside);
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(env.client.clone(), &env.ns);
    let svc = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "external"},
                "spec": {"ports": [{"name": "app", "port": 9000, "protocol": "TCP"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let vip: std::net::IpAddr = svc.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
    let slices: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        },
    );
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "external-1", "labels": {"kubernetes.io/service-name": "external"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [outside.ip.to_string()], "conditions": {"ready": true}}],
                "ports": [{"name": "app", "port": APP_PORT, "protocol": "TCP"}]
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    wait_for("the selectorless service reached by its VIP", async || {
        exchange(&sleep, SocketAddr::new(vip, 9000), b"to the outside")
            .await
            .ok()
    })
    .await;

    // The CNI plugin: a new pod is captured at ADD, before the API has its address.
    let late = topo.pod(&node_a, env.ip(30)).unwrap();
    env.pod(&env.ns, "late", &node_a, None).await;
    let socket = env.cni_socket(&node_a);
    let (out, result) = plugin(
        env.dir.path(),
        &cni_env("ADD", &late.netns_path(), &env.ns, "late"),
        &conf(&socket, None, late.ip),
    );
    assert!(out.status.success(), "ADD failed: {result}");
    assert_eq!(
        result["ips"][0]["address"],
        format!("{}/16", late.ip),
        "prevResult passed through"
    );
    assert!(rules_in(&late), "captured before the application starts");
    let (out, result) = plugin(
        env.dir.path(),
        &cni_env("CHECK", &late.netns_path(), &env.ns, "late"),
        &conf(&socket, None, late.ip),
    );
    assert!(out.status.success(), "CHECK failed: {result}");
    assert_eq!(result, Value::Null);
    // The kubelet reports the address: the node proxy serves the pod.
    env.pod_ip(&env.ns, "late", late.ip).await;
    wait_for("the new pod enrolled", async || {
        (phase(&agents[0], "late") == Some(PodPhase::Enrolled)).then_some(())
    })
    .await;
    assert_eq!(
        agents[0]
            .status()
            .pods
            .iter()
            .find(|p| p.name == "late")
            .unwrap()
            .netns,
        late.netns_path(),
        "the namespace the plugin reported"
    );
    wait_for("the new pod's mesh connection", async || {
        exchange(&late, to_echo, b"late").await.ok()
    })
    .await;
    // The pod gets a new sandbox (its old one's DEL missed): the agent moves it there.
    let again = topo.pod(&node_a, env.ip(31)).unwrap();
    let mut add_again = cni_env("ADD", &again.netns_path(), &env.ns, "late");
    add_again[1].1 = "c-late-2".into();
    let (out, result) = plugin(env.dir.path(), &add_again, &conf(&socket, None, again.ip));
    assert!(out.status.success(), "{result}");
    assert!(rules_in(&again));
    env.pod_ip(&env.ns, "late", again.ip).await;
    wait_for("the pod served in its new sandbox", async || {
        agents[0]
            .status()
            .pods
            .iter()
            .any(|p| {
                p.name == "late" && p.phase == PodPhase::Enrolled && p.netns == again.netns_path()
            })
            .then_some(())
    })
    .await;
    // The old sandbox's DEL, late: nothing changes for the pod.
    let (out, _) = plugin(
        env.dir.path(),
        &cni_env("DEL", &late.netns_path(), &env.ns, "late"),
        &conf(&socket, None, late.ip),
    );
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        phase(&agents[0], "late"),
        Some(PodPhase::Enrolled),
        "a stale DEL is ignored"
    );
    assert!(rules_in(&again));
    // The current sandbox's DEL: never fails, the agent lets go of the pod.
    let mut del = cni_env("DEL", &again.netns_path(), &env.ns, "late");
    del[1].1 = "c-late-2".into();
    let (out, _) = plugin(env.dir.path(), &del, &conf(&socket, None, again.ip));
    assert!(out.status.success());
    wait_for("the deleted pod released", async || {
        (phase(&agents[0], "late") != Some(PodPhase::Enrolled)).then_some(())
    })
    .await;

    // A pod in a namespace outside the mesh passes through untouched.
    let plain = topo.pod(&node_a, env.ip(40)).unwrap();
    env.pod(&env.other_ns, "plain", &node_a, None).await;
    let (out, result) = plugin(
        env.dir.path(),
        &cni_env("ADD", &plain.netns_path(), &env.other_ns, "plain"),
        &conf(&socket, None, plain.ip),
    );
    assert!(out.status.success(), "{result}");
    assert!(!rules_in(&plain));

    // Bad input: the specification's error object, exit status 1.
    let (out, err) = plugin(
        env.dir.path(),
        &cni_env("ADD", &plain.netns_path(), &env.other_ns, "plain"),
        "{\"cniVersion\": ",
    );
    assert!(!out.status.success());
    assert_eq!(err["code"], 6, "{err}");
    let (out, err) = plugin(env.dir.path(), &[("CNI_COMMAND", "VERSION".into())], "{}");
    assert!(out.status.success());
    assert!(err["supportedVersions"].as_array().unwrap().len() >= 4);

    // The agent away: a pod in the mesh is held (try again later), others start.
    let gone = env.dir.path().join("no-agent.sock");
    let (out, err) = plugin(
        env.dir.path(),
        &cni_env("ADD", &late.netns_path(), &env.ns, "late"),
        &conf(&gone, Some(&env.kubeconfig), late.ip),
    );
    assert!(!out.status.success());
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("is in the mesh"),
        "{err}"
    );
    let (out, result) = plugin(
        env.dir.path(),
        &cni_env("ADD", &plain.netns_path(), &env.other_ns, "plain"),
        &conf(&gone, Some(&env.kubeconfig), plain.ip),
    );
    assert!(out.status.success(), "{result}");

    // The kubeconfig the agent keeps for the plugin: a token of the agent's account, not
    // bound to its pod, that the plugin can use on its own.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(env.client.clone(), &env.ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "ambit-cni"}})).unwrap(),
    )
    .await
    .unwrap();
    let admin = std::fs::read_to_string(&env.kubeconfig).unwrap();
    let server = admin
        .split("server: \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let ca_b64 = admin
        .split("certificate-authority-data: ")
        .nth(1)
        .and_then(|r| r.split(['}', '\n', ' ']).next())
        .unwrap()
        .trim_matches('"')
        .to_owned();
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(ca_b64)
        .unwrap();
    let kubeconfig =
        ambit_kube::cni::plugin_kubeconfig_for(&env.client, &server, &ca, &env.ns, "ambit-cni")
            .await
            .unwrap();
    let plugin_kubeconfig = env.dir.path().join("plugin-kubeconfig");
    std::fs::write(&plugin_kubeconfig, kubeconfig).unwrap();
    let (out, err) = plugin(
        env.dir.path(),
        &cni_env("ADD", &late.netns_path(), &env.ns, "late"),
        &conf(&gone, Some(&plugin_kubeconfig), late.ip),
    );
    assert!(!out.status.success());
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("is in the mesh"),
        "the token read the pod's labels: {err}"
    );

    env.cleanup().await;
    for a in agents {
        a.shutdown().await;
    }
    drop(proxies);
}
