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
