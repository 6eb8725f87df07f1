use super::*;
use crate::model::parse::parse_manifest;

const MESH: &str = "apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo, labels: {app: sleep}}
spec: {nodeName: a, serviceAccountName: sleep, containers: [{name: c}]}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {nodeName: b, serviceAccountName: echo, containers: [{name: c}]}
status: {podIP: 198.18.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.10, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]
";

fn console() -> Console {
    let model = Model::from_objects(1, parse_manifest(MESH).unwrap());
    let (_m, model) = watch::channel(Arc::new(model));
    let (_s, snaps) = watch::channel(Arc::new(Snapshot::default()));
    // The senders may go: the receivers keep the last value.
    Console::new(model, snaps, TranslateOptions::default())
}

fn tcp(
    side: &str,
    src: &str,
    dst: &str,
    security: &str,
    flags: &str,
    opened: u32,
    bytes: u32,
) -> String {
    let l = format!(
        "reporter=\"{side}\",source_workload=\"{src}\",source_workload_namespace=\"demo\",source_principal=\"spiffe://cluster.local/ns/demo/sa/{src}\",destination_workload=\"{dst}\",destination_workload_namespace=\"demo\",destination_principal=\"spiffe://cluster.local/ns/demo/sa/echo\",destination_service=\"echo.demo.svc.cluster.local\",connection_security_policy=\"{security}\",response_flags=\"{flags}\""
    );
    format!(
        "istio_tcp_connections_opened_total{{{l}}} {opened}\nistio_tcp_connections_closed_total{{{l}}} {opened}\nistio_tcp_sent_bytes_total{{{l}}} {bytes}\nistio_tcp_received_bytes_total{{{l}}} 0\n"
    )
}

fn report(name: &str, metrics: String) -> ambit_proto::telemetry::TelemetryReport {
    ambit_proto::telemetry::TelemetryReport {
        component: "node".into(),
        name: name.into(),
        metrics,
        certificates: vec![ambit_proto::telemetry::CertificateInfo {
            identity: "spiffe://cluster.local/ns/demo/sa/echo".into(),
            serial: "0abc".into(),
            not_after: "2026-12-02T00:00:00Z".into(),
        }],
        traces: Vec::new(),
    }
}

#[test]
fn reports_become_edges_with_rates_security_and_the_larger_side() {
    let c = console();
    // Both sides count the same connections; the destination also saw a denial.
    c.ingest(report(
        "a",
        tcp("source", "sleep", "echo-1", "mutual_tls", "-", 10, 1000),
    ))
    .unwrap();
    c.ingest(report(
        "b",
        tcp(
            "destination",
            "sleep",
            "echo-1",
            "mutual_tls",
            "-",
            10,
            1000,
        ),
    ))
    .unwrap();
    let g = c.graph();
    let edges = g["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 1, "{g}");
    let e = &edges[0];
    assert_eq!(e["source"], "demo/sleep");
    assert_eq!(e["destination"], "demo/echo-1");
    assert_eq!(e["security"], "mutual_tls");
    assert_eq!(e["connections_total"], 10.0, "one side's count, not both");
    assert_eq!(
        e["source_principal"],
        "spiffe://cluster.local/ns/demo/sa/sleep"
    );
    // A second report from b: 20 more, 5 of them denied, a rate over the interval.
    std::thread::sleep(Duration::from_millis(20));
    let more = tcp(
        "destination",
        "sleep",
        "echo-1",
        "mutual_tls",
        "-",
        30,
        3000,
    ) + &tcp("destination", "sleep", "echo-1", "mutual_tls", "DENY", 5, 0);
    c.ingest(report("b", more)).unwrap();
    let g = c.graph();
    let e = &g["edges"][0];
    assert_eq!(e["security"], "denied");
    assert_eq!(e["denied_total"], 5.0);
    assert_eq!(e["connections_total"], 35.0);
    assert!(e["connections_per_s"].as_f64().unwrap() > 0.0, "{e}");
    // Workload nodes come from the model, with identities.
    let nodes = g["nodes"].as_array().unwrap();
    assert!(
        nodes.iter().any(|n| n["id"] == "demo/sleep"
            && n["identity"] == "spiffe://cluster.local/ns/demo/sa/sleep")
    );
    // The workload page: its policy, services, certificate and traffic.
    let w = c.workload("demo", "echo-1").unwrap();
    assert_eq!(w["services"], serde_json::json!(["echo"]));
    assert_eq!(w["certificate"]["serial"], "0abc");
    assert_eq!(w["policies"][0]["name"], "only-sleep");
    assert_eq!(w["traffic"].as_array().unwrap().len(), 1);
    assert!(
        c.workload("demo", "sleep").unwrap()["policies"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the selector picks echo only"
    );
    assert!(c.workload("demo", "nope").is_none());
    // Search.
    let hits = c.search("ECHO");
    assert!(
        hits["results"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "demo/echo-1")
    );
    // A report that does not parse is refused, and the last good one stays.
    assert!(
        c.ingest(report("b", "istio_requests_total{a=1} 2".into()))
            .is_err()
    );
    assert_eq!(c.graph()["edges"][0]["denied_total"], 5.0);
}

#[test]
fn request_latency_quantiles_interpolate_within_buckets() {
    let buckets = [
        (1.0, 0.0),
        (5.0, 50.0),
        (10.0, 90.0),
        (f64::INFINITY, 100.0),
    ];
    assert_eq!(quantile(&buckets, 0.5), Some(5.0));
    let p99 = quantile(&buckets, 0.99).unwrap();
    assert_eq!(p99, 10.0, "past the last finite bucket: its bound");
    let p25 = quantile(&buckets, 0.25).unwrap();
    assert!((p25 - 3.0).abs() < 1e-9, "{p25}");
    assert_eq!(quantile(&[], 0.5), None);
    assert_eq!(quantile(&[(1.0, 0.0)], 0.5), None);
}

#[test]
fn waypoint_decisions_count_on_the_policy_like_node_proxy_ones() {
    let c = console();
    c.ingest(report(
        "node-a",
        "ambit_node_policy_decisions_total{policy=\"demo/p\",decision=\"allow\"} 2\n".into(),
    ))
    .unwrap();
    let mut r = report(
        "demo/waypoint",
        "ambit_waypoint_policy_decisions_total{policy=\"demo/p\",decision=\"allow\"} 3\nambit_waypoint_policy_decisions_total{policy=\"demo/p\",decision=\"deny\"} 1\n".into(),
    );
    r.component = "waypoint".into();
    c.ingest(r).unwrap();
    let counts = c.decisions().remove("demo/p").unwrap_or_default();
    assert_eq!(counts.get("allow"), Some(&5.0), "{counts:?}");
    assert_eq!(counts.get("deny"), Some(&1.0), "{counts:?}");
}
