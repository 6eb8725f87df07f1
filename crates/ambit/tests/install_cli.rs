//! `ambit install`, `check` and `uninstall` as a user runs them, against a genuine
//! kube-apiserver (`tests/k8s/apiserver.sh`; the test starts it). No kubelet runs there,
//! so the install applies cleanly and `ambit check` must say what is not running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn apiserver() -> PathBuf {
    ambit_testenv::kube_apiserver()
}

fn ambit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ambit"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn secret_data(kubeconfig: &str, ns: &str) -> String {
    // The CA Secret's certificate, read back through `ambit install --dry-run`, which
    // reuses the installed CA when the cluster is reachable.
    let o = ambit(&["install", "--dry-run", "--kubeconfig", kubeconfig, "-n", ns]);
    assert!(o.status.success(), "{}", text(&o));
    let yaml = String::from_utf8(o.stdout).unwrap();
    let start = yaml.find("\"root-cert.pem\"").unwrap();
    yaml[start..start + 200].to_owned()
}

#[test]
fn install_check_and_uninstall_against_an_api_server() {
    let kubeconfig = apiserver();
    let k = kubeconfig.to_str().unwrap();
    let ns = format!("ambit-i-{}", std::process::id());

    // Rendering needs no cluster.
    let o = ambit(&[
        "install",
        "--dry-run",
        "-o",
        "yaml",
        "--kubeconfig",
        "/nonexistent",
        "--set",
        "image=registry.example/ambit:1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let yaml = String::from_utf8_lossy(&o.stdout);
    assert!(yaml.contains("registry.example/ambit:1") && yaml.contains("\"kind\": \"DaemonSet\""));
    let o = ambit(&["install", "--dry-run", "--set", "bogus=1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("unknown setting"), "{}", text(&o));

    // The waypoint commands read a cluster too.
    let o = ambit(&[
        "waypoint",
        "status",
        "--kubeconfig",
        k,
        "-n",
        &ns,
        "--name",
        "w",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no waypoints in the cluster (namespace"),
        "{}",
        text(&o)
    );

    let o = ambit(&["check", "--pre", "--kubeconfig", k]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("ok   API server reachable: Kubernetes 1.20"),
        "{}",
        text(&o)
    );

    let o = ambit(&["install", "--kubeconfig", k, "-n", &ns, "--wait", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    // Other tests on this API server may have created some CRDs already: those are kept.
    assert!(
        out.contains("applied CustomResourceDefinition virtualservices.networking.istio.io")
            || out.contains("kept CustomResourceDefinition virtualservices.networking.istio.io"),
        "{out}"
    );
    for line in [
        &format!("applied Deployment {ns}/ambit-control"),
        &format!("applied DaemonSet {ns}/ambit-node"),
        &format!("applied DaemonSet {ns}/ambit-cni"),
        &format!("applied PodDisruptionBudget {ns}/ambit-control"),
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    let ca = secret_data(k, &ns);

    // No kubelet: the control plane and the node proxies never become ready, and the
    // check says so, with what to do; what an install can ensure passes.
    let o = ambit(&["check", "--kubeconfig", k, "-n", &ns]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    for line in [
        "ok   Istio CRDs present",
        "ok   mesh root certificate valid",
        "FAIL control plane ready: 0 of 2 replicas ready",
        "FAIL a node proxy ready on every node",
        "FAIL a node agent ready on every node (pod capture)",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    assert!(out.contains("     fix: "), "{out}");

    // Installing again keeps the mesh CA.
    let o = ambit(&["install", "--kubeconfig", k, "-n", &ns, "--wait", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("keeping the installed mesh CA"),
        "{}",
        text(&o)
    );
    assert_eq!(secret_data(k, &ns), ca);

    let o = ambit(&["uninstall", "--kubeconfig", k, "-n", &ns]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("deleted Deployment ambit-control"), "{out}");
    assert!(out.contains("kept Istio's CRDs"), "{out}");
    assert!(out.contains("kept the mesh CA"), "{out}");
    assert!(!out.contains("deleted Secret ambit-ca"), "{out}");
    // A reinstall finds the same root.
    assert_eq!(secret_data(k, &ns), ca);
    let o = ambit(&["uninstall", "--kubeconfig", k, "-n", &ns, "--purge"]);
    assert!(text(&o).contains("deleted Secret ambit-ca"), "{}", text(&o));
    let o = ambit(&["check", "--kubeconfig", k, "-n", &ns]);
    assert!(
        text(&o).contains("FAIL control plane ready: no Deployment ambit-control"),
        "{}",
        text(&o)
    );
}

fn obj<T: for<'de> k8s_openapi::serde::Deserialize<'de>>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

#[test]
fn config_reaches_a_cluster_nodes_proxy_through_the_api_server() {
    let kubeconfig = apiserver();
    let k = kubeconfig.to_str().unwrap();
    let ns = format!("ambit-cfg-{}", std::process::id());
    let node = format!("cfg-node-{}", std::process::id());

    // No node named: said so.
    let o = ambit(&["config", "workloads", "--kubeconfig", k, "-n", &ns]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--node NAME"), "{}", text(&o));

    // No node proxy on that node.
    let o = ambit(&[
        "config",
        "workloads",
        "--kubeconfig",
        k,
        "-n",
        &ns,
        "--node",
        &node,
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!(
            "no running node proxy pod on node {node} in namespace {ns}"
        )),
        "{}",
        text(&o)
    );

    // A running node proxy pod there: the port-forward is asked of the API server, which
    // (with no kubelet here) cannot reach the node; the error names the pod and port.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
        use kube::api::{Api, Patch, PatchParams, PostParams};
        let (client, _) = ambit_kube::client(Some(&kubeconfig)).await.unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &obj(serde_json::json!({"metadata": {"name": ns}})))
            .await
            .unwrap();
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &obj(serde_json::json!({"metadata": {"name": node}})))
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let _ = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &obj(serde_json::json!({"metadata": {"name": "default"}})))
            .await;
        pods.create(
            &PostParams::default(),
            &obj(serde_json::json!({
                "metadata": {"name": "ambit-node-x", "labels": {"app.kubernetes.io/component": "ambit-node"}},
                "spec": {"nodeName": node, "containers": [{"name": "node", "image": "example.invalid/ambit"}]}
            })),
        )
        .await
        .unwrap();
        pods.patch_status(
            "ambit-node-x",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"phase": "Running", "podIP": "198.18.99.1"}})),
        )
        .await
        .unwrap();
    });
    let o = ambit(&[
        "config",
        "workloads",
        "--kubeconfig",
        k,
        "-n",
        &ns,
        "--node",
        &node,
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("port-forward to {ns}/ambit-node-x:15000")),
        "{}",
        text(&o)
    );
}
