use super::*;
use crate::model::parse::parse_manifest;

const BASE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo, version: v2}}
spec:
  serviceAccountName: echo
  nodeName: node-a
  containers: [{ports: [{name: http-alt, containerPort: 9090}]}]
status: {podIP: 198.18.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: demo, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a}
status: {podIP: 198.18.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: demo}
spec: {nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: plain}
spec: {nodeName: node-b}
status: {podIP: 198.18.0.12}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 198.19.0.10
  trafficDistribution: PreferClose
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: alt, port: 90, targetPort: http-alt}
";

fn model(generation: u64, text: &str) -> Model {
    Model::from_objects(generation, parse_manifest(text).unwrap())
}

fn decode_address(t: &Translator, name: &str) -> pb::Address {
    let enc = t
        .resources(ResourceType::Address)
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"));
    pb::Address::decode(&*enc.body).unwrap()
}

fn workload(t: &Translator, name: &str) -> pb::Workload {
    match decode_address(t, name).r#type {
        Some(pb::address::Type::Workload(w)) => w,
        other => panic!("{other:?}"),
    }
}

#[test]
fn pods_become_workloads() {
    let m = model(1, BASE);
    let mut t = Translator::new(TranslateOptions::default());
    let delta = t.full(&m);
    let names: Vec<&String> = delta.changed[0].iter().collect();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/demo/echo-1",
            "Kubernetes//Pod/demo/opted-out",
            "Kubernetes//Pod/plain/outside",
            "demo/echo.demo.svc.cluster.local"
        ],
        "the pending pod is not published"
    );

    let w = workload(&t, "Kubernetes//Pod/demo/echo-1");
    assert_eq!(w.tunnel_protocol, pb::TunnelProtocol::Hbone as i32);
    assert_eq!(w.addresses, vec![vec![198, 18, 0, 10]]);
    assert_eq!(w.service_account, "echo");
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(
        (w.canonical_name.as_str(), w.canonical_revision.as_str()),
        ("echo", "v2")
    );
    assert_eq!(w.node, "node-a");
    assert_eq!(w.status, pb::WorkloadStatus::Healthy as i32);
    let loc = w.locality.unwrap();
    assert_eq!((loc.region.as_str(), loc.zone.as_str()), ("eu", "eu-1"));
    let ports = &w.services["demo/echo.demo.svc.cluster.local"].ports;
    let pairs: Vec<(u32, u32)> = ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(
        pairs,
        [(80, 8080), (90, 9090)],
        "named targetPort resolved on the pod"
    );

    assert_eq!(
        workload(&t, "Kubernetes//Pod/demo/opted-out").tunnel_protocol,
        pb::TunnelProtocol::None as i32
    );
    assert_eq!(
        workload(&t, "Kubernetes//Pod/plain/outside").tunnel_protocol,
        pb::TunnelProtocol::None as i32
    );
}

#[test]
fn services_become_services() {
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&model(1, BASE));
    let Some(pb::address::Type::Service(s)) =
        decode_address(&t, "demo/echo.demo.svc.cluster.local").r#type
    else {
        panic!()
    };
    assert_eq!(s.hostname, "echo.demo.svc.cluster.local");
    assert_eq!(s.addresses[0].address, vec![198, 19, 0, 10]);
    let pairs: Vec<(u32, u32)> = s
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(
        pairs,
        [(80, 8080), (90, 0)],
        "a named target port is per workload"
    );
    let lb = s.load_balancing.unwrap();
    assert_eq!(lb.mode, pb::load_balancing::Mode::Failover as i32);
    assert_eq!(lb.routing_preference.len(), 4);
}

#[test]
fn versions_are_content_digests() {
    let mut a = Translator::new(TranslateOptions::default());
    let mut b = Translator::new(TranslateOptions::default());
    a.full(&model(1, BASE));
    b.full(&model(7, BASE));
    assert_eq!(
        a.resources(ResourceType::Address),
        b.resources(ResourceType::Address)
    );
}

#[test]
fn only_what_a_change_touches_is_retranslated() {
    let old = model(1, BASE);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&old);

    // Un-enrolling the namespace changes its pods, nothing else.
    let new = model(
        2,
        &BASE.replace("labels: {istio.io/dataplane-mode: ambient}}", "}"),
    );
    let delta = t.apply(&new, &old, &new.diff(&old));
    let changed: Vec<&String> = delta.changed[0].iter().collect();
    assert_eq!(
        changed,
        ["Kubernetes//Pod/demo/echo-1"],
        "opted-out was already NONE"
    );
    assert_eq!(
        workload(&t, "Kubernetes//Pod/demo/echo-1").tunnel_protocol,
        pb::TunnelProtocol::None as i32
    );

    // Removing the service removes it and updates the pod it selected.
    let newer = model(
        3,
        BASE.split("---\napiVersion: v1\nkind: Service")
            .next()
            .unwrap(),
    );
    let delta = t.apply(&newer, &new, &newer.diff(&new));
    assert!(delta.removed[0].contains("demo/echo.demo.svc.cluster.local"));
    assert!(delta.changed[0].contains("Kubernetes//Pod/demo/echo-1"));
    assert!(
        workload(&t, "Kubernetes//Pod/demo/echo-1")
            .services
            .is_empty()
    );

    // A pod that stops running (no IP any more) is removed.
    let gone = model(
        4,
        &BASE.replace(
            "spec: {nodeName: node-b}\nstatus: {podIP: 198.18.0.12}",
            "spec: {nodeName: node-b}",
        ),
    );
    let delta = t.apply(&gone, &newer, &gone.diff(&newer));
    assert!(
        delta.removed[0].contains("Kubernetes//Pod/plain/outside"),
        "{delta:?}"
    );
}

const POLICIES: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep], notNamespaces: [evil*]}}, {source: {serviceAccounts: [demo/curl]}}]
    to: [{operation: {ports: ['8080'], notPorts: ['9999']}}]
    when: [{key: source.ip, values: [198.18.0.0/16]}, {key: destination.port, notValues: ['22']}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7-allow, namespace: demo}
spec:
  rules:
  - to: [{operation: {methods: [GET]}}]
  - from: [{source: {namespaces: [demo]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7-deny, namespace: demo}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [other]}}]
    to: [{operation: {paths: [/admin]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry, namespace: demo, annotations: {istio.io/dry-run: 'true'}}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [prod]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: demo}
spec: {action: AUDIT, rules: [{to: [{operation: {ports: ['8080']}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-bound, namespace: demo}
spec: {targetRefs: [{kind: Service, group: '', name: echo}]}
";

fn policy(t: &Translator, name: &str) -> pb_sec::Authorization {
    let enc = t
        .resources(ResourceType::Authorization)
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"));
    pb_sec::Authorization::decode(&*enc.body).unwrap()
}

#[test]
fn policies_become_l4_authorizations() {
    let m = model(1, &format!("{BASE}---\n{POLICIES}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let names: Vec<&str> = t
        .resources(ResourceType::Authorization)
        .keys()
        .map(|k| k.as_ref())
        .collect();
    assert_eq!(
        names,
        [
            "demo/allow-sleep",
            "demo/audit",
            "demo/dry",
            "demo/l7-allow",
            "demo/l7-deny",
            "istio-system/mesh-wide"
        ],
    );
    // A policy with targetRefs is a waypoint's: published as Ambit's waypoint resource
    // (never to node proxies), and, with no waypoint serving its Service, warned about.
    assert!(
        t.resources(ResourceType::WaypointPolicy)
            .contains_key("demo/waypoint-bound")
    );
    let warning = &t.warnings()["demo/waypoint-bound"][0];
    assert!(
        warning.starts_with("NOT ENFORCED") && warning.contains("Service echo"),
        "{warning}"
    );
    assert_eq!(unenforced_count(t.warnings()), 1);

    // A dry-run policy goes out as Istio writes it: its real action and rules, flagged.
    let dry = policy(&t, "demo/dry");
    assert!(dry.dry_run);
    assert_eq!(dry.action, pb_sec::Action::Deny as i32);
    assert!(!dry.rules.is_empty());
    assert!(dry.extensions.is_empty());
    // AUDIT: a DENY without rules on the wire (a proxy that ignores the extension
    // enforces nothing), the rules in Ambit's extension.
    let audit = policy(&t, "demo/audit");
    assert_eq!(audit.action, pb_sec::Action::Deny as i32);
    assert!(audit.rules.is_empty() && !audit.dry_run);
    assert_eq!(audit.extensions.len(), 1);
    assert_eq!(audit.extensions[0].name, pb_sec::AUDIT_EXTENSION);
    let config = audit.extensions[0].config.as_ref().unwrap();
    assert_eq!(config.type_url, pb_sec::AUTHORIZATION_TYPE_URL);
    assert!(
        !pb_sec::Authorization::decode(&*config.value)
            .unwrap()
            .rules
            .is_empty()
    );

    let p = policy(&t, "demo/allow-sleep");
    assert_eq!(p.scope, pb_sec::Scope::WorkloadSelector as i32);
    assert_eq!(p.action, pb_sec::Action::Allow as i32);
    let clauses = &p.rules[0].clauses;
    assert_eq!(clauses.len(), 4, "from, to, and two when conditions");
    assert_eq!(clauses[0].matches.len(), 2, "two sources, OR-ed");
    assert_eq!(clauses[0].matches[0].principals.len(), 1);
    assert_eq!(clauses[0].matches[0].not_namespaces.len(), 1);
    // Service accounts as Istio's node proxy matches them.
    assert_eq!(
        clauses[0].matches[1].service_accounts,
        [pb_sec::ServiceAccountMatch {
            namespace: "demo".into(),
            service_account: "curl".into()
        }]
    );
    assert_eq!(clauses[1].matches[0].destination_ports, [8080]);
    assert_eq!(clauses[1].matches[0].not_destination_ports, [9999]);
    assert_eq!(clauses[2].matches[0].source_ips[0].length, 16);
    assert_eq!(clauses[3].matches[0].not_destination_ports, [22]);

    // The echo pod lists the selector policy.
    assert_eq!(
        workload(&t, "Kubernetes//Pod/demo/echo-1").authorization_policies,
        ["demo/allow-sleep"]
    );

    // ALLOW with an L7 field: that rule matches nothing; the other stays.
    let p = policy(&t, "demo/l7-allow");
    assert_eq!(p.scope, pb_sec::Scope::Namespace as i32);
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].clauses[0].matches[0].namespaces.len(), 1);
    // DENY with an L7 field: the rule denies on its L4 conditions alone.
    let p = policy(&t, "demo/l7-deny");
    assert_eq!(p.rules.len(), 1);
    assert_eq!(
        p.rules[0].clauses.len(),
        1,
        "the `to` clause with only paths is gone"
    );
    assert!(
        t.warnings().contains_key("demo/l7-allow") && t.warnings().contains_key("demo/l7-deny")
    );
    assert!(t.warnings()["demo/l7-deny"][0].contains("operation.paths"));

    assert_eq!(
        policy(&t, "istio-system/mesh-wide").scope,
        pb_sec::Scope::Global as i32
    );
}

#[test]
fn policy_changes_update_the_selected_workloads() {
    let old = model(1, BASE);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&old);
    let new = model(2, &format!("{BASE}---\n{POLICIES}"));
    let delta = t.apply(&new, &old, &new.diff(&old));
    assert!(delta.changed[1].contains("demo/allow-sleep"));
    assert!(delta.changed[0].contains("Kubernetes//Pod/demo/echo-1"));
    assert!(!delta.changed[0].contains("Kubernetes//Pod/plain/outside"));
}

fn service_resource(t: &Translator, name: &str) -> pb::Service {
    match decode_address(t, name).r#type {
        Some(pb::address::Type::Service(s)) => s,
        other => panic!("{other:?}"),
    }
}

fn waypoint_host(w: &Option<pb::GatewayAddress>) -> Option<String> {
    match w.as_ref()?.destination.as_ref()? {
        pb::gateway_address::Destination::Hostname(h) => {
            Some(format!("{}/{}", h.namespace, h.hostname))
        }
        pb::gateway_address::Destination::Address(_) => Some("address".into()),
    }
}

#[test]
fn use_waypoint_labels_bind_services_and_workloads_as_istio_publishes_them() {
    const ECHO_SVC: &str = "demo/echo.demo.svc.cluster.local";
    const ECHO_POD: &str = "Kubernetes//Pod/demo/echo-1";
    let translate = |extra: &str, ns_label: &str| {
        let base = BASE.replace(
            "metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}",
            &format!(
                "metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient{ns_label}}}}}"
            ),
        );
        let mut t = Translator::new(TranslateOptions::default());
        t.full(&model(1, &format!("{base}{extra}")));
        t
    };
    // Nothing named: nothing published.
    let t = translate("", "");
    assert_eq!(
        waypoint_host(&service_resource(&t, ECHO_SVC).waypoint),
        None
    );

    // On the namespace: the service binds (published even though no waypoint runs, so
    // node proxies refuse rather than bypass); the pod does not (service is the default).
    let t = translate("", ", istio.io/use-waypoint: wp");
    let svc = service_resource(&t, ECHO_SVC);
    assert_eq!(
        waypoint_host(&svc.waypoint).as_deref(),
        Some("demo/wp.demo.svc.cluster.local")
    );
    assert_eq!(svc.waypoint.unwrap().hbone_mtls_port, 15008);
    assert_eq!(waypoint_host(&workload(&t, ECHO_POD).waypoint), None);

    // A Gateway that takes workloads too binds the pod; one in another namespace is
    // named with use-waypoint-namespace.
    let gateway = "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: infra, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";
    let t = translate(
        gateway,
        ", istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra",
    );
    assert_eq!(
        waypoint_host(&workload(&t, ECHO_POD).waypoint).as_deref(),
        Some("infra/wp.infra.svc.cluster.local")
    );
    assert!(service_resource(&t, ECHO_SVC).waypoint.is_some());

    // The service's own label wins over its namespace's; `none` opts out.
    let opt_out = BASE.replace(
        "metadata: {name: echo, namespace: demo}",
        "metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: none}}",
    );
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&model(
        1,
        &opt_out.replace(
            "labels: {istio.io/dataplane-mode: ambient}}",
            "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}",
        ),
    ));
    assert_eq!(
        waypoint_host(&service_resource(&t, ECHO_SVC).waypoint),
        None
    );
}

#[test]
fn a_namespace_label_change_retranslates_its_services() {
    let before = model(1, BASE);
    let after = model(
        2,
        &BASE.replace(
            "labels: {istio.io/dataplane-mode: ambient}}",
            "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}",
        ),
    );
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&before);
    let delta = t.apply(&after, &before, &after.diff(&before));
    assert!(
        delta.changed[ResourceType::Address.index()].contains("demo/echo.demo.svc.cluster.local"),
        "{delta:?}"
    );
}

fn waypoint_policy(t: &Translator, name: &str) -> ambit_proto::waypoint::Policy {
    let enc = t
        .resources(ResourceType::WaypointPolicy)
        .get(name)
        .unwrap_or_else(|| panic!("no waypoint policy {name}"));
    ambit_proto::waypoint::Policy::decode(&*enc.body).unwrap()
}

const WAYPOINT: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 198.19.0.30, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: web}, {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep], remoteIpBlocks: [198.18.0.0/16]}}]
    to: [{operation: {methods: [GET], paths: ['/api/*'], hosts: [web.demo], ports: ['80']}}]
    when: [{key: 'request.headers[X-User]', values: [alice]}]
  - from: [{source: {requestPrincipals: ['*']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-deny, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: DENY
  rules: [{from: [{source: {requestPrincipals: ['*'], namespaces: [other]}}]}]
";

#[test]
fn targeted_policies_become_waypoint_policies_with_their_request_fields() {
    let m = model(1, &format!("{BASE}---\n{WAYPOINT}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    assert!(
        !t.resources(ResourceType::Authorization)
            .contains_key("demo/l7")
    );
    let p = waypoint_policy(&t, "demo/l7");
    assert_eq!(p.action, ambit_proto::waypoint::Action::Allow as i32);
    let targets: Vec<(&str, &str)> = p
        .targets
        .iter()
        .map(|t| (t.kind.as_str(), t.name.as_str()))
        .collect();
    assert_eq!(targets, [("Service", "web"), ("Gateway", "waypoint")]);
    // Both rules are kept: the request principal is checked at the waypoint, and the
    // other keeps every field: from, to, and the header condition.
    assert_eq!(p.rules.len(), 2, "{p:?}");
    assert_eq!(p.rules[1].clauses[0].matches[0].request_principals.len(), 1);
    let clauses = &p.rules[0].clauses;
    assert_eq!(clauses.len(), 3);
    let from = &clauses[0].matches[0];
    assert_eq!(from.connection.as_ref().unwrap().principals.len(), 1);
    assert_eq!(from.remote_ips.len(), 1);
    let to = &clauses[1].matches[0];
    assert_eq!(to.methods.len(), 1);
    assert_eq!(to.paths.len(), 1);
    assert_eq!(to.hosts.len(), 1);
    assert_eq!(to.connection.as_ref().unwrap().destination_ports, [80]);
    assert_eq!(clauses[2].matches[0].headers[0].name, "x-user");
    assert!(!t.warnings().contains_key("demo/l7"), "{:?}", t.warnings());
    // A DENY on request principals keeps them, with its other conditions.
    let deny = waypoint_policy(&t, "demo/jwt-deny");
    assert_eq!(deny.rules.len(), 1);
    assert_eq!(deny.rules[0].clauses.len(), 1);
    let dm = &deny.rules[0].clauses[0].matches[0];
    assert_eq!(dm.request_principals.len(), 1);
    assert_eq!(dm.connection.as_ref().unwrap().namespaces.len(), 1);
    // Served by a waypoint: nothing unenforced.
    assert_eq!(unenforced_count(t.warnings()), 0, "{:?}", t.warnings());

    // The Service loses its waypoint: its policies say they are not enforced.
    let unbound = WAYPOINT.replace(", labels: {istio.io/use-waypoint: waypoint}", "");
    let m2 = model(2, &format!("{BASE}---\n{unbound}"));
    let changes = m2.diff(&m);
    t.apply(&m2, &m, &changes);
    let warnings = &t.warnings()["demo/jwt-deny"];
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("NOT ENFORCED for Service web")),
        "{warnings:?}"
    );
}

#[test]
fn a_service_without_a_selector_is_left_to_its_original_destination() {
    let text = format!(
        "{BASE}---
apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  clusterIP: 198.19.0.1
  ports: [{{name: https, port: 443, targetPort: 6443}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  selector: {{}}
  clusterIP: 198.19.0.2
  ports: [{{port: 80}}]
"
    );
    let m = model(1, &text);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let names: Vec<String> = t
        .resources(ResourceType::Address)
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains("kubernetes.default") && !n.contains("empty.demo")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.contains("echo.demo")), "{names:?}");
}

#[test]
fn endpoint_slices_of_a_service_without_a_selector_become_its_endpoints() {
    let slice = |addresses: &str| {
        format!(
            "---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {{name: db-abc, namespace: demo, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv4
endpoints:
- addresses: [{addresses}]
  conditions: {{ready: true}}
  topology: {{kubernetes.io/hostname: node-a}}
- addresses: [198.18.0.10]
  targetRef: {{kind: Pod, name: echo-1, namespace: demo}}
ports: [{{name: sql, port: 5432, protocol: TCP}}]
"
        )
    };
    let service = "---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: 198.19.0.30
  ports: [{name: sql, port: 15432}]
";
    let m1 = model(1, &format!("{BASE}{service}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m1);
    let svc_name = "demo/db.demo.svc.cluster.local";
    assert!(
        t.resources(ResourceType::Address).get(svc_name).is_none(),
        "no endpoints yet: left to its original destination"
    );

    // The slice arrives: the service is published with one workload per address that is
    // not a pod's, its port mapped by name.
    let m2 = model(
        2,
        &format!("{BASE}{service}{}", slice("198.18.7.1, 198.18.7.2")),
    );
    let delta = t.apply(&m2, &m1, &m2.changes_since(&m1));
    let uid = "Kubernetes/discovery.k8s.io/EndpointSlice/demo/db-abc/198.18.7.1";
    assert!(delta.changed[0].contains(svc_name), "{delta:?}");
    assert!(delta.changed[0].contains(uid), "{delta:?}");
    let w = workload(&t, uid);
    assert_eq!(w.tunnel_protocol, pb::TunnelProtocol::None as i32);
    assert_eq!(w.addresses, vec![vec![198, 18, 7, 1]]);
    assert_eq!(
        w.services[svc_name].ports,
        vec![pb::Port {
            service_port: 15432,
            target_port: 5432
        }]
    );
    let slice_workloads = t
        .resources(ResourceType::Address)
        .keys()
        .filter(|k| k.contains("EndpointSlice"))
        .count();
    assert_eq!(
        slice_workloads, 2,
        "the pod's endpoint is the pod's workload"
    );

    // An address leaves the slice: its workload is removed, the other stays.
    let m3 = model(3, &format!("{BASE}{service}{}", slice("198.18.7.2")));
    let delta = t.apply(&m3, &m2, &m3.changes_since(&m2));
    assert!(delta.removed[0].contains(uid), "{delta:?}");
    assert!(t.resources(ResourceType::Address).get(svc_name).is_some());

    // The slice goes: so do its workloads and the service.
    let delta = t.apply(&m1, &m3, &m1.changes_since(&m3));
    assert!(delta.removed[0].contains(svc_name), "{delta:?}");
    assert_eq!(
        t.resources(ResourceType::Address)
            .keys()
            .filter(|k| k.contains("EndpointSlice"))
            .count(),
        0
    );
}

#[test]
fn an_httproute_is_reported_as_not_enforced_until_it_is_gone() {
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: demo}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
";
    let m1 = model(1, &format!("{BASE}{route}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m1);
    let w = &t.warnings()["HTTPRoute demo/canary"];
    assert!(w[0].starts_with("NOT ENFORCED"), "{w:?}");
    assert_eq!(unenforced_count(t.warnings()), 0, "not counted as a policy");
    let m2 = model(2, BASE);
    t.apply(&m2, &m1, &m2.changes_since(&m1));
    assert!(!t.warnings().contains_key("HTTPRoute demo/canary"));
}

#[test]
fn a_grpcroute_becomes_paths_of_its_own_resource() {
    let text = format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: demo}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: grpc, namespace: demo, labels: {{istio.io/use-waypoint: wp}}}}
spec: {{selector: {{app: echo}}, clusterIP: 198.19.0.40, ports: [{{name: grpc, port: 9000}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: canary, namespace: demo}}
spec:
  parentRefs: [{{group: '', kind: Service, name: grpc}}]
  rules:
  - matches: [{{method: {{service: pkg.Echo, method: Say}}}}]
    backendRefs: [{{name: grpc, port: 9000}}]
  - matches: [{{method: {{service: pkg.Echo}}}}, {{method: {{method: Ping}}}}]
    backendRefs: [{{name: grpc, port: 9000}}]
  - matches: [{{method: {{type: RegularExpression, service: 'pkg\\..*', method: 'Get.*'}}}}]
    backendRefs: [{{name: grpc, port: 9000}}]
  - matches: [{{method: {{service: 'bad/name'}}}}]
    backendRefs: [{{name: grpc, port: 9000}}]
"
    );
    let m = model(1, &text);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let enc = t
        .resources(ResourceType::WaypointRoute)
        .get("demo/grpc:canary")
        .expect("a resource of its own, not colliding with an HTTPRoute of the same name");
    let r = ambit_proto::waypoint::Route::decode(&*enc.body).unwrap();
    let paths: Vec<(i32, String)> = r
        .rules
        .iter()
        .flat_map(|rule| rule.matches.iter())
        .map(|m| {
            let p = m.path.clone().unwrap();
            (p.kind, p.value)
        })
        .collect();
    use ambit_proto::waypoint::path_match::Kind as K;
    assert_eq!(paths[0], (K::Exact as i32, "/pkg.Echo/Say".into()));
    assert_eq!(paths[1], (K::Prefix as i32, "/pkg.Echo".into()));
    assert_eq!(paths[2], (K::Regex as i32, "/[^/]+/Ping".into()));
    assert_eq!(
        paths[3],
        (K::Regex as i32, "/(?:pkg\\..*)/(?:Get.*)".into())
    );
    assert_eq!(
        paths[4],
        (K::Exact as i32, "/-".into()),
        "an unreadable match matches nothing"
    );
    let w = &t.warnings()["GRPCRoute demo/canary"];
    assert!(w.iter().any(|w| w.contains("cannot hold a /")), "{w:?}");
}

#[test]
fn redirects_and_rewrites_are_checked_where_they_are_written() {
    let text = format!(
        "{BASE}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: demo}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo}}]
  rules:
  - name: ok
    matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, statusCode: 308, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}]
  - name: exact-prefix
    matches: [{{path: {{type: Exact, value: /x}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /y}}}}}}]
    backendRefs: [{{name: echo, port: 80}}]
  - name: bad-status
    filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: 200}}}}]
"
    );
    let m = model(1, &text);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let w = &t.warnings()["HTTPRoute demo/r"];
    assert!(
        w.iter().any(
            |w| w.starts_with("exact-prefix: URLRewrite: ReplacePrefixMatch needs every match")
        ),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.starts_with("bad-status: RequestRedirect: statusCode 200")),
        "{w:?}"
    );
    assert!(!w.iter().any(|w| w.starts_with("ok:")), "{w:?}");
}

#[test]
fn a_virtualservice_becomes_an_ordered_route_with_faults_and_is_refused_next_to_an_httproute() {
    let gateway = "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {selector: {app: echo}, clusterIP: 198.19.0.50, ports: [{name: http, port: 80}]}
";
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - name: faulty
    match: [{uri: {prefix: /api}, headers: {x-user: {exact: test}}}]
    fault:
      abort: {httpStatus: 503, percentage: {value: 50}}
      delay: {fixedDelay: 0.5s, percentage: {value: 10.5}}
    route: [{destination: {host: web}}]
  - name: rest
    timeout: 2s
    retries: {attempts: 3, retryOn: 5xx,connect-failure}
    route: [{destination: {host: web.demo.svc.cluster.local, port: {number: 80}}, weight: 90}, {destination: {host: web, subset: v2}, weight: 10}]
  - name: mirrored
    mirror: {host: web}
    route: [{destination: {host: web}}]
";
    let m = model(1, &format!("{BASE}{gateway}{vs}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let enc = t
        .resources(ResourceType::WaypointRoute)
        .get("demo/vs:web")
        .expect("the VirtualService's route");
    let r = ambit_proto::waypoint::Route::decode(&*enc.body).unwrap();
    assert!(r.ordered);
    let faulty = &r.rules[0];
    let path = faulty.matches[0].path.clone().unwrap();
    assert_eq!(
        (path.kind, path.value.as_str()),
        (
            ambit_proto::waypoint::path_match::Kind::StringPrefix as i32,
            "/api"
        )
    );
    let fault = faulty.fault.unwrap();
    assert_eq!(
        (fault.abort_http_status, fault.abort_per_million),
        (503, 500_000)
    );
    assert_eq!((fault.delay_ms, fault.delay_per_million), (500, 105_000));
    assert_eq!(
        faulty.backends[0].weight, 100,
        "a single destination takes every request"
    );
    let rest = &r.rules[1];
    assert_eq!(rest.request_timeout_ms, 2000);
    let retry = rest.retry.clone().unwrap();
    assert_eq!(retry.attempts, 3);
    assert!(retry.codes.contains(&503) && retry.codes.len() == 100);
    assert_eq!(rest.backends[0].service, "demo/web.demo.svc.cluster.local");
    assert_eq!(
        (
            rest.backends[1].service.as_str(),
            rest.backends[1].subset.as_str()
        ),
        ("demo/web.demo.svc.cluster.local", "v2"),
        "a subset is resolved at the waypoint"
    );
    assert!(
        r.rules[2].backends.is_empty(),
        "an unsupported field answers 500"
    );
    let w = &t.warnings()["VirtualService demo/web"];
    assert!(
        w.iter()
            .any(|w| w.starts_with("mirrored: mirror not supported yet")),
        "{w:?}"
    );

    // An HTTPRoute on the same Service: the VirtualService is refused for that host.
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
";
    let m2 = model(2, &format!("{BASE}{gateway}{vs}{route}"));
    t.apply(&m2, &m, &m2.changes_since(&m));
    assert!(
        t.resources(ResourceType::WaypointRoute)
            .get("demo/vs:web")
            .is_none()
    );
    assert!(
        t.resources(ResourceType::WaypointRoute)
            .get("demo/r")
            .is_some()
    );
    let w = &t.warnings()["VirtualService demo/web"];
    assert!(
        w.iter()
            .any(|w| w.contains("an HTTPRoute or GRPCRoute also routes")),
        "{w:?}"
    );
}

fn traffic_policy(t: &Translator, name: &str) -> Option<ambit_proto::waypoint::TrafficPolicy> {
    t.resources(ResourceType::WaypointTraffic)
        .get(name)
        .map(|enc| ambit_proto::waypoint::TrafficPolicy::decode(&*enc.body).unwrap())
}

const TRAFFIC_BASE: &str = "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {selector: {app: echo}, clusterIP: 198.19.0.50, ports: [{name: http, port: 80}, {name: alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.51, ports: [{port: 80}]}
";

#[test]
fn a_destinationrule_becomes_backend_settings_for_the_waypoint_of_its_host() {
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo, creationTimestamp: '2026-01-01T00:00:00Z'}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: X-User}}
    connectionPool:
      tcp: {maxConnections: 2, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 10, maxRequestsPerConnection: 5, idleTimeout: 30s, maxRetries: 3}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 50}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: ROUND_ROBIN}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-later, namespace: demo, creationTimestamp: '2026-02-01T00:00:00Z'}
spec: {host: web.demo.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: demo}
spec: {host: plain, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bad, namespace: other}
spec: {host: web.demo, trafficPolicy: {loadBalancer: {simple: FASTEST}}}
";
    let m = model(1, &format!("{BASE}{TRAFFIC_BASE}{dr}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let p = traffic_policy(&t, "demo/dr:web").expect("the DestinationRule's resource");
    assert_eq!(p.services, ["demo/web.demo.svc.cluster.local"]);
    assert_eq!(p.waypoints, ["demo/wp"]);
    assert_eq!(p.created, 1_767_225_600);
    let b = p.backend.unwrap();
    use ambit_proto::waypoint::backend_settings::Balance;
    assert_eq!(
        (b.balance, b.hash_key.as_str()),
        (Balance::HashHeader as i32, "x-user")
    );
    assert_eq!(
        (
            b.max_connections,
            b.max_pending,
            b.max_requests,
            b.max_requests_per_connection
        ),
        (2, 1, 10, 5)
    );
    assert_eq!((b.connect_timeout_ms, b.idle_timeout_ms), (250, 30_000));
    let o = b.outlier.unwrap();
    assert_eq!(
        (
            o.consecutive_5xx,
            o.interval_ms,
            o.base_ejection_ms,
            o.max_ejection_percent
        ),
        (2, 1000, 3000, 50)
    );
    assert_eq!(p.ports[0].port, 8080);
    assert_eq!(
        p.ports[0].settings.as_ref().unwrap().balance,
        Balance::RoundRobin as i32
    );
    let w = &t.warnings()["DestinationRule demo/web"];
    assert!(
        w.iter().any(|w| w.contains("maxRetries is not supported")),
        "{w:?}"
    );
    // For a Service without a waypoint: sent to the waypoints (their routes may send
    // requests there), with a word.
    assert!(traffic_policy(&t, "demo/dr:plain").is_some());
    let w = &t.warnings()["DestinationRule demo/plain"];
    assert!(
        w.iter().any(|w| w.contains("not bound to a waypoint")),
        "{w:?}"
    );
    // The younger one for the same host and an unreadable one: not published, and each
    // says why.
    for (name, why) in [
        ("demo/web-later", "is older and applies to the same host"),
        ("other/bad", "FASTEST"),
    ] {
        let (ns, n) = name.split_once('/').unwrap();
        assert!(
            traffic_policy(&t, &format!("{ns}/dr:{n}")).is_none(),
            "{name}"
        );
        let w = &t.warnings()[&format!("DestinationRule {name}")];
        assert!(
            w.iter()
                .any(|w| w.starts_with("NOT ENFORCED") && w.contains(why)),
            "{name}: {w:?}"
        );
    }
    // The older one gone, the younger applies.
    let without = m.apply(vec![crate::model::Event::Delete(crate::model::ObjectRef {
        kind: Kind::DestinationRule,
        namespace: "demo".into(),
        name: "web".into(),
    })]);
    let changes = without.changes_since(&m);
    t.apply(&without, &m, &changes);
    assert!(traffic_policy(&t, "demo/dr:web").is_none());
    assert!(traffic_policy(&t, "demo/dr:web-later").is_some());
}

#[test]
fn a_local_rate_limit_becomes_buckets_for_its_services_and_waypoints() {
    let rl = "---
apiVersion: networking.ambit.io/v1alpha1
kind: LocalRateLimit
metadata: {name: web, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: web}, {kind: Service, name: plain}, {group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  tokenBucket: {maxTokens: 10, fillInterval: 1s}
  descriptors:
  - {header: X-User, tokenBucket: {maxTokens: 2, tokensPerFill: 1, fillInterval: 1m}}
  - {sourcePrincipal: true, value: 'spiffe://cluster.local/ns/demo/sa/batch', tokenBucket: {maxTokens: 1, fillInterval: 10s}}
---
apiVersion: networking.ambit.io/v1alpha1
kind: LocalRateLimit
metadata: {name: broken, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: web}]
  tokenBucket: {maxTokens: 0, fillInterval: 1s}
";
    let m = model(1, &format!("{BASE}{TRAFFIC_BASE}{rl}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let p = traffic_policy(&t, "demo/rl:web").expect("the rate limit's resource");
    assert_eq!(p.services, ["demo/web.demo.svc.cluster.local"]);
    assert_eq!(p.gateways, ["demo/wp"]);
    assert_eq!(p.waypoints, ["demo/wp"]);
    let r = p.rate_limit.unwrap();
    let b = r.bucket.unwrap();
    assert_eq!(
        (b.max_tokens, b.tokens_per_fill, b.fill_interval_ms),
        (10, 10, 1000)
    );
    assert_eq!(r.descriptors[0].header, "x-user");
    assert_eq!(r.descriptors[0].bucket.unwrap().fill_interval_ms, 60_000);
    assert!(r.descriptors[1].source_principal);
    let w = &t.warnings()["LocalRateLimit demo/web"];
    assert!(
        w.iter()
            .any(|w| w.contains("Service plain") && w.contains("not bound to a waypoint")),
        "{w:?}"
    );
    assert!(traffic_policy(&t, "demo/rl:broken").is_none());
    let w = &t.warnings()["LocalRateLimit demo/broken"];
    assert!(w.iter().any(|w| w.contains("maxTokens")), "{w:?}");
}

#[test]
fn a_backend_in_another_namespace_needs_a_reference_grant_there() {
    let route = "---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backends}
spec: {selector: {app: api}, clusterIP: 198.19.0.60, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cross, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{name: out, backendRefs: [{name: api, namespace: backends, port: 80}]}]
";
    let grant = "---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-demo, namespace: backends}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: demo}]
  to: [{group: '', kind: Service, name: api}]
";
    let backend = |t: &Translator| {
        let enc = t
            .resources(ResourceType::WaypointRoute)
            .get("demo/cross")
            .expect("the route");
        let r = ambit_proto::waypoint::Route::decode(&*enc.body).unwrap();
        r.rules[0].backends[0].service.clone()
    };
    let without = model(1, &format!("{BASE}{TRAFFIC_BASE}{route}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&without);
    assert_eq!(backend(&t), "", "not resolved: its share is answered 500");
    let w = &t.warnings()["HTTPRoute demo/cross"];
    assert!(
        w.iter().any(|w| w.contains("needs a ReferenceGrant")),
        "{w:?}"
    );
    // The grant written: the route is translated again and resolves.
    let with = model(2, &format!("{BASE}{TRAFFIC_BASE}{route}{grant}"));
    let changes = with.changes_since(&without);
    t.apply(&with, &without, &changes);
    assert_eq!(backend(&t), "backends/api.backends.svc.cluster.local");
    assert!(!t.warnings().contains_key("HTTPRoute demo/cross"));
    // A grant for GRPCRoutes only, or for another Service, does not do.
    for other in [
        grant.replace("kind: HTTPRoute", "kind: GRPCRoute"),
        grant.replace("name: api}", "name: other}"),
    ] {
        let m = model(3, &format!("{BASE}{TRAFFIC_BASE}{route}{other}"));
        let mut t = Translator::new(TranslateOptions::default());
        t.full(&m);
        assert_eq!(backend(&t), "", "{other}");
    }
}

#[test]
fn request_auth_conditions_become_principal_and_claim_matches() {
    let text = format!(
        "{TRAFFIC_BASE}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  rules:
  - from: [{{source: {{notRequestPrincipals: ['https://idp/bob']}}}}]
    when:
    - {{key: request.auth.principal, values: ['https://idp/*']}}
    - {{key: request.auth.audiences, values: [api]}}
    - {{key: request.auth.presenter, notValues: [evil]}}
    - {{key: 'request.auth.claims[org][team]', values: [mesh]}}
  - when: [{{key: 'request.auth.claims[]', values: [x]}}]
"
    );
    let m = model(1, &text);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let p = waypoint_policy(&t, "demo/jwt");
    // The second rule's claim has no name: an ALLOW rule that cannot be read matches
    // nothing, and says so.
    assert_eq!(p.rules.len(), 1, "{p:?}");
    let warnings = &t.warnings()["demo/jwt"];
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("request.auth.claims[]") && w.contains("matches nothing")),
        "{warnings:?}"
    );
    let c = &p.rules[0].clauses;
    assert_eq!(c[0].matches[0].not_request_principals.len(), 1);
    assert_eq!(c[1].matches[0].request_principals.len(), 1);
    let path = |i: usize| c[i].matches[0].claims[0].path.clone();
    assert_eq!(path(2), ["aud"]);
    assert_eq!(path(3), ["azp"]);
    assert_eq!(c[3].matches[0].claims[0].not_values.len(), 1);
    assert_eq!(path(4), ["org", "team"]);
}

#[test]
fn a_requestauthentication_is_sent_to_the_waypoint_of_its_targets_with_its_keys() {
    let signer = ambit_core::testing::JwtSigner::new("k1");
    let jwks = signer.jwks().replace('"', "\\\"");
    let text = format!(
        "{TRAFFIC_BASE}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}, {{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}, {{kind: Service, group: '', name: plain}}]
  jwtRules:
  - issuer: https://idp
    audiences: [api]
    jwks: \"{jwks}\"
    fromHeaders: [{{name: X-Token, prefix: 'Token '}}]
    outputClaimToHeaders: [{{header: X-Sub, claim: sub}}]
    forwardOriginalToken: true
  - issuer: https://broken
    jwks: 'not json'
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: sidecar, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  jwtRules: [{{issuer: x, jwks: '{{}}'}}]
"
    );
    let m = model(1, &text);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let p = traffic_policy(&t, "demo/ra:jwt").expect("sent");
    assert_eq!(p.services, ["demo/web.demo.svc.cluster.local"]);
    assert_eq!(p.gateways, ["demo/wp"]);
    assert_eq!(p.waypoints, ["demo/wp"]);
    let a = p.authentication.unwrap();
    assert_eq!(a.rules.len(), 2);
    let r = &a.rules[0];
    assert!(ambit_core::jwt::Jwks::parse(&r.jwks).is_ok());
    assert_eq!(r.from_headers[0].name, "x-token");
    assert_eq!(r.output_claim_to_headers[0].header, "x-sub");
    assert!(r.forward_original_token);
    // A key set that cannot be read is sent as a reason: that issuer's tokens are refused.
    assert!(a.rules[1].jwks.is_empty() && a.rules[1].jwks_error.contains("not JSON"));
    let warnings = &t.warnings()["RequestAuthentication demo/jwt"];
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("NOT ENFORCED for Service plain")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("https://broken") && w.contains("refused")),
        "{warnings:?}"
    );
    // A selector is for sidecars: reported, not sent, and counted as unenforced.
    assert!(traffic_policy(&t, "demo/ra:sidecar").is_none());
    assert!(t.warnings()["RequestAuthentication demo/sidecar"][0].starts_with("NOT ENFORCED"));
    assert!(unenforced_count(t.warnings()) >= 2);
}

#[test]
fn a_jwks_uri_is_sent_once_fetched_and_refused_until_then() {
    let signer = ambit_core::testing::JwtSigner::new("k1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, signer.jwks()).unwrap();
    let text = format!(
        "{TRAFFIC_BASE}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  jwtRules: [{{issuer: https://idp, jwksUri: 'file://{}'}}]
",
        path.display()
    );
    let m = model(1, &text);
    let options = TranslateOptions::default();
    let cache = options.jwks.clone();
    let mut t = Translator::new(options);
    t.full(&m);
    let rule = |t: &Translator| {
        traffic_policy(t, "demo/ra:jwt")
            .unwrap()
            .authentication
            .unwrap()
            .rules[0]
            .clone()
    };
    assert!(rule(&t).jwks.is_empty());
    assert!(
        rule(&t).jwks_error.contains("being fetched"),
        "{:?}",
        rule(&t)
    );
    // The fetcher runs; the translator is told and translates the policy again.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut changed = cache.subscribe();
        changed.borrow_and_update();
        let (_stop, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(cache.clone().run(stop));
        tokio::time::timeout(std::time::Duration::from_secs(10), changed.changed())
            .await
            .expect("the fetch finished")
            .unwrap();
    });
    let delta = t.refresh_authentications(&m);
    assert!(delta.changed[ResourceType::WaypointTraffic.index()].contains("demo/ra:jwt"));
    assert_eq!(rule(&t).jwks, signer.jwks());
    assert!(rule(&t).jwks_error.is_empty());
}

#[test]
fn custom_policies_carry_their_authorizer_from_the_mesh_config() {
    let mesh = "---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    accessLogFile: /dev/stdout
    extensionProviders:
    - name: authz
      envoyExtAuthzHttp: {service: demo/plain.demo.svc.cluster.local, port: 80, timeout: 2s, pathPrefix: /check, statusOnError: '503', includeRequestHeadersInCheck: [X-Auth]}
    - name: bad
      envoyExtAuthzGrpc: {service: nowhere.demo.svc.cluster.local, port: 9000}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: CUSTOM
  provider: {name: authz}
  rules: [{to: [{operation: {paths: ['/admin/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: CUSTOM
  provider: {name: bad}
  rules: [{}]
";
    let m = model(1, &format!("{TRAFFIC_BASE}{mesh}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let p = waypoint_policy(&t, "demo/ext");
    assert_eq!(p.action, ambit_proto::waypoint::Action::Custom as i32);
    let e = p.ext_authz.unwrap();
    assert!(e.error.is_empty(), "{e:?}");
    assert!(!e.grpc);
    assert_eq!(e.service, "demo/plain.demo.svc.cluster.local");
    assert_eq!((e.port, e.timeout_ms, e.status_on_error), (80, 2000, 503));
    assert_eq!(e.path_prefix, "/check");
    assert_eq!(e.include_request_headers, ["x-auth"]);
    // A provider whose Service does not exist: sent with the reason (the waypoint denies
    // what the policy matches), and reported.
    let b = waypoint_policy(&t, "demo/broken").ext_authz.unwrap();
    assert!(b.error.contains("no Service"), "{b:?}");
    assert!(t.warnings()["demo/broken"][0].contains("denied"));
    // The Service appearing resolves it, without touching the policy.
    let svc = "---
apiVersion: v1
kind: Service
metadata: {name: nowhere, namespace: demo}
spec: {selector: {app: x}, clusterIP: 198.19.0.60, ports: [{port: 9000}]}
";
    let m2 = model(2, &format!("{TRAFFIC_BASE}{mesh}{svc}"));
    let changes = m2.diff(&m);
    t.apply(&m2, &m, &changes);
    let b = waypoint_policy(&t, "demo/broken").ext_authz.unwrap();
    assert!(b.error.is_empty() && b.grpc, "{b:?}");
    assert_eq!(b.timeout_ms, 600_000, "Istio's default timeout");
    // The mesh config losing the provider: denied again.
    let m3 = model(
        3,
        &format!(
            "{TRAFFIC_BASE}{}{svc}",
            mesh.replace("- name: authz", "- name: renamed")
        ),
    );
    let changes = m3.diff(&m2);
    t.apply(&m3, &m2, &changes);
    let e = waypoint_policy(&t, "demo/ext").ext_authz.unwrap();
    assert!(e.error.contains("no extension provider \"authz\""), "{e:?}");
}

#[test]
fn a_route_attached_to_the_waypoint_gateway_applies_to_the_services_it_names() {
    let route = |name: &str, ns: &str, hostnames: &str| {
        format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{{name: wp, namespace: demo}}]
  hostnames: {hostnames}
  rules: [{{backendRefs: [{{name: plain, namespace: demo, port: 80}}]}}]
"
        )
    };
    let text = format!(
        "{TRAFFIC_BASE}{}{}{}{}",
        route("all", "demo", "[]"),
        route("named", "demo", "['web.demo.svc.cluster.local']"),
        route("elsewhere", "demo", "['*.example.com']"),
        route("foreign", "other", "[]"),
    );
    let m = model(1, &text);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let parents = |t: &Translator, name: &str| -> Option<Vec<String>> {
        t.resources(ResourceType::WaypointRoute)
            .get(name)
            .map(|enc| {
                let r = ambit_proto::waypoint::Route::decode(&*enc.body).unwrap();
                assert_eq!(r.waypoints, ["demo/wp"]);
                r.parents.into_iter().map(|p| p.service).collect()
            })
    };
    // Only `web` is bound to the waypoint (`plain` is not): it is the route's parent.
    assert_eq!(
        parents(&t, "demo/all").unwrap(),
        ["demo/web.demo.svc.cluster.local"]
    );
    assert_eq!(
        parents(&t, "demo/named").unwrap(),
        ["demo/web.demo.svc.cluster.local"]
    );
    assert!(parents(&t, "demo/elsewhere").is_none());
    assert!(t.warnings()["HTTPRoute demo/elsewhere"][0].contains("matches the route's hostnames"));
    // Another namespace's route is refused by the listener's default (Same).
    assert!(parents(&t, "other/foreign").is_none());
    assert!(t.warnings()["HTTPRoute other/foreign"][0].contains("allowedRoutes"));
    // allowedRoutes from All takes it.
    let open = text.replace(
        "listeners: [{name: mesh, port: 15008, protocol: HBONE}]",
        "listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]",
    );
    assert_ne!(open, text);
    let m2 = model(2, &open);
    let changes = m2.diff(&m);
    t.apply(&m2, &m, &changes);
    assert_eq!(
        parents(&t, "other/foreign").unwrap(),
        ["demo/web.demo.svc.cluster.local"]
    );
}

#[test]
fn destinationrule_subsets_list_the_workloads_their_labels_select() {
    let pods = "---
apiVersion: v1
kind: Pod
metadata: {name: echo-v1, namespace: demo, labels: {app: echo, version: v1}}
spec: {nodeName: n, containers: [{name: c}]}
status: {podIP: 198.18.9.1}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v2, namespace: demo, labels: {app: echo, version: v2}}
spec: {nodeName: n, containers: [{name: c}]}
status: {podIP: 198.18.9.2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  - {name: none, labels: {version: v9}}
";
    let m = model(1, &format!("{TRAFFIC_BASE}{pods}"));
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&m);
    let p = traffic_policy(&t, "demo/dr:web").unwrap();
    let subsets: Vec<(String, Vec<String>, bool)> = p
        .subsets
        .iter()
        .map(|s| (s.name.clone(), s.workloads.clone(), s.settings.is_some()))
        .collect();
    assert_eq!(
        subsets,
        [
            (
                "v1".into(),
                vec!["Kubernetes//Pod/demo/echo-v1".to_owned()],
                false
            ),
            (
                "v2".into(),
                vec!["Kubernetes//Pod/demo/echo-v2".to_owned()],
                true
            ),
            ("none".into(), vec![], false),
        ]
    );
    // A pod relabelled moves between subsets without touching the rule.
    let moved = pods.replacen("version: v1", "version: v9", 1);
    let m2 = model(2, &format!("{TRAFFIC_BASE}{moved}"));
    let changes = m2.diff(&m);
    t.apply(&m2, &m, &changes);
    let p = traffic_policy(&t, "demo/dr:web").unwrap();
    assert!(p.subsets[0].workloads.is_empty());
    assert_eq!(p.subsets[2].workloads, ["Kubernetes//Pod/demo/echo-v1"]);
}

#[test]
fn the_l7_metrics_annotation_marks_workloads_by_namespace_or_pod() {
    let has = |t: &Translator, pod: &str| {
        workload(t, &format!("Kubernetes//Pod/{pod}"))
            .extensions
            .iter()
            .any(|e| e.name == ambit_core::discovery::L7_METRICS_EXTENSION)
    };
    let before = model(1, BASE);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&before);
    assert!(!has(&t, "demo/echo-1"), "off by default");

    // Turned on for the namespace: its pods are re-sent with the extension...
    let enabled = BASE.replace(
        "metadata: {name: demo, labels:",
        "metadata: {name: demo, annotations: {ambit.io/l7-metrics: enabled}, labels:",
    );
    let after = model(2, &enabled);
    let delta = t.apply(&after, &before, &after.diff(&before));
    assert!(delta.changed[ResourceType::Address.index()].contains("Kubernetes//Pod/demo/echo-1"));
    assert!(has(&t, "demo/echo-1"));
    assert!(!has(&t, "plain/outside"));

    // ...and a pod can turn it off for itself.
    let opted_out = model(
        3,
        &enabled.replace(
            "metadata: {name: echo-1, namespace: demo,",
            "metadata: {name: echo-1, namespace: demo, annotations: {ambit.io/l7-metrics: disabled},",
        ),
    );
    let delta = t.apply(&opted_out, &after, &opted_out.diff(&after));
    assert!(delta.changed[ResourceType::Address.index()].contains("Kubernetes//Pod/demo/echo-1"));
    assert!(!has(&t, "demo/echo-1"));
}
