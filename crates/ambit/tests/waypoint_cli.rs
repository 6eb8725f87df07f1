//! `ambit waypoint apply | list | status` on a copy of the example manifests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ambit");

fn copy_examples(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mesh");
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn ambit(args: &[&str], manifests: &Path) -> Output {
    Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(args)
        .arg("--manifests")
        .arg(manifests)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn apply_declares_a_waypoint_the_control_plane_accepts_and_list_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let before = std::fs::read_to_string(dir.path().join("namespace.yaml")).unwrap();

    let out = ambit(
        &[
            "waypoint",
            "apply",
            "-n",
            "demo",
            "--for",
            "all",
            "--enroll-namespace",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("waypoint demo/waypoint applied"));
    assert!(
        out.stderr.is_empty(),
        "a tool logs nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The namespace keeps its labels and comment and gains the binding.
    let after = std::fs::read_to_string(dir.path().join("namespace.yaml")).unwrap();
    assert!(
        after.contains("istio.io/dataplane-mode: ambient"),
        "{after}"
    );
    assert!(after.contains("istio.io/use-waypoint: waypoint"), "{after}");
    assert_eq!(
        before.lines().next(),
        after.lines().next(),
        "the leading comment stays"
    );
    // The other documents of that file are untouched.
    assert!(after.contains("kind: ServiceAccount"));

    // The folder is still valid, with a Gateway and the waypoint's Service.
    let v = Command::new(BIN)
        .env("AMBIT_CONSOLE_ADDR", "off")
        .args(["control", "validate"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", stdout(&v));
    assert!(stdout(&v).contains("1 Gateway"), "{}", stdout(&v));

    let list = ambit(&["waypoint", "list"], dir.path());
    let text = stdout(&list);
    let row = text
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // Services: echo. Workloads (it takes all): the three pods.
    assert_eq!(cols, ["demo", "waypoint", "all", "0/0", "1", "3"], "{text}");
    assert!(
        text.lines().all(|l| !l.ends_with(' ')),
        "no trailing spaces"
    );

    let status = ambit(&["waypoint", "status", "-n", "demo"], dir.path());
    let text = stdout(&status);
    assert!(
        text.contains("identity:  spiffe://cluster.local/ns/demo/sa/waypoint"),
        "{text}"
    );
    assert!(text.contains("services:  demo/echo"), "{text}");
    assert!(text.contains("refused until a ready pod runs it"), "{text}");
    assert!(text.contains("routes:    none"), "{text}");

    // A route on the echo service: shown with what is wrong in it.
    std::fs::write(
        dir.path().join("route.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules: [{name: split, backendRefs: [{name: echo, port: 80}, {name: echo-v9, port: 80}]}]
",
    )
    .unwrap();
    let status = ambit(&["waypoint", "status", "-n", "demo"], dir.path());
    let text = stdout(&status);
    assert!(text.contains("route:     HTTPRoute demo/canary"), "{text}");
    assert!(
        text.contains("! split: backend echo-v9: no Service demo/echo-v9"),
        "{text}"
    );
    std::fs::remove_file(dir.path().join("route.yaml")).unwrap();

    // Traffic policies and a VirtualService: listed by kind, with their findings.
    std::fs::write(
        dir.path().join("traffic.yaml"),
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}}
---
apiVersion: networking.ambit.io/v1alpha1
kind: LocalRateLimit
metadata: {name: echo, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: echo}]
  tokenBucket: {maxTokens: 100, fillInterval: 1s}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo}}]}]
",
    )
    .unwrap();
    let status = ambit(&["waypoint", "status", "-n", "demo"], dir.path());
    let text = stdout(&status);
    for line in [
        "route:     VirtualService demo/echo",
        "traffic:   DestinationRule demo/echo",
        "! trafficPolicy.loadBalancer.warmupDurationSecs is not supported; ignored",
        "traffic:   LocalRateLimit demo/echo",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    std::fs::remove_file(dir.path().join("traffic.yaml")).unwrap();

    // Applying again changes nothing.
    let again = ambit(
        &[
            "waypoint",
            "apply",
            "-n",
            "demo",
            "--for",
            "all",
            "--enroll-namespace",
        ],
        dir.path(),
    );
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("namespace.yaml")).unwrap(),
        after
    );
}

#[test]
fn apply_refuses_bad_names_and_status_of_an_unknown_waypoint_fails() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let out = ambit(&["waypoint", "apply", "-n", "Demo"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid name"));
    let out = ambit(&["waypoint", "status", "--name", "nope"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("no waypoints"));
}
