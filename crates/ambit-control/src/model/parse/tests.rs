use super::*;
use crate::model::fields::{IntOrString, Port};

fn one(text: &str) -> Object {
    let mut objects = parse_manifest(text).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(objects.len(), 1);
    objects.remove(0)
}

fn errors(text: &str) -> Vec<ManifestError> {
    parse_file(text).expect_err("the manifest should be refused")
}

#[test]
fn pod_with_everything() {
    let Object::Pod(pod) = one("
apiVersion: v1
kind: Pod
metadata:
  name: sleep-1
  namespace: demo
  labels: {app: sleep, version: v1}
  uid: 1234
spec:
  serviceAccountName: sleep
  nodeName: node-a
  containers: [{name: c, image: busybox}]
status:
  phase: Running
  podIP: 198.18.1.10
  podIPs: [{ip: 198.18.1.10}, {ip: 'fd00::10'}]
  conditions: [{type: Ready, status: 'False'}]
")
    else {
        panic!("not a pod")
    };
    assert_eq!(pod.metadata.name.as_str(), "sleep-1");
    assert_eq!(pod.metadata.namespace(), "demo");
    assert_eq!(pod.metadata.labels.get("version"), Some("v1"));
    assert_eq!(pod.metadata.uid.as_deref(), Some("1234"));
    assert_eq!(pod.service_account(), "sleep");
    assert_eq!(pod.node(), Some("node-a"));
    assert_eq!(pod.ips().len(), 2);
    assert_eq!(pod.phase(), PodPhase::Running);
    assert!(!pod.is_ready(), "the Ready condition wins");
}

#[test]
fn pod_defaults() {
    let Object::Pod(pod) =
        one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 198.18.0.1}\n")
    else {
        panic!()
    };
    assert_eq!(pod.metadata.namespace(), "default");
    assert_eq!(pod.service_account(), "default");
    assert_eq!(pod.phase(), PodPhase::Running, "an IP implies running");
    assert!(pod.is_ready());
    let Object::Pod(pending) = one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n") else {
        panic!()
    };
    assert_eq!(pending.phase(), PodPhase::Pending);
    assert!(!pending.is_ready());
}

#[test]
fn service_with_ports() {
    let Object::Service(svc) = one("
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 198.19.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: grpc, port: 9090, targetPort: grpc-port, protocol: TCP}
")
    else {
        panic!()
    };
    assert_eq!(
        svc.vips(),
        vec!["198.19.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        svc.spec.ports[0].target_port,
        Some(IntOrString::Int(Port(8080)))
    );
    assert_eq!(
        svc.spec.ports[1].target_port,
        Some(IntOrString::String("grpc-port".into()))
    );
    assert_eq!(svc.spec.ports[0].app_protocol.as_deref(), Some("http"));
    let Object::Service(headless) =
        one("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None}\n")
    else {
        panic!()
    };
    assert!(headless.vips().is_empty());
}

#[test]
fn authorization_policy() {
    let Object::AuthorizationPolicy(p) = one(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/sleep"]
        notNamespaces: ["prod*"]
        ipBlocks: ["198.18.0.0/16"]
    to:
    - operation: {ports: ["8080", 9090]}
    when:
    - {key: source.ip, values: ["198.18.0.1"]}
"#)
    else {
        panic!()
    };
    assert_eq!(p.spec.action, Some(AuthorizationAction::Deny));
    let rule = &p.spec.rules[0];
    assert_eq!(
        rule.from[0].source.principals,
        ["cluster.local/ns/demo/sa/sleep"]
    );
    assert_eq!(rule.from[0].source.ip_blocks[0].prefix, 16);
    assert_eq!(rule.to[0].operation.ports, [Port(8080), Port(9090)]);
    assert_eq!(rule.when[0].key.as_str(), "source.ip");
}

#[test]
fn authorization_policy_is_strict() {
    // A misspelt field must not be ignored: it could widen access.
    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source: {principal: [x]}\n",
    );
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].line, 7, "{e:?}");
    assert_eq!(
        e[0].field.as_deref(),
        Some("spec.rules[0].from[0].source.principal")
    );
    assert!(e[0].message.contains("unknown field"), "{}", e[0].message);

    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: ALOW}\n",
    );
    assert_eq!(e[0].field.as_deref(), Some("spec.action"), "{e:?}");

    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules: [{when: [{key: source.bogus, values: [a]}]}]\n",
    );
    assert!(e[0].message.contains("unknown condition key"), "{e:?}");
}

#[test]
fn authorization_policy_semantic_checks() {
    let cases = [
        ("{action: CUSTOM}", "spec.provider"),
        ("{provider: {name: x}}", "spec.provider"),
        (
            "{selector: {matchLabels: {a: b}}, targetRefs: [{kind: Service, name: s}]}",
            "spec.selector",
        ),
        (
            "{rules: [{from: [{source: {}}]}]}",
            "spec.rules[0].from[0].source",
        ),
        (
            "{rules: [{to: [{operation: {}}]}]}",
            "spec.rules[0].to[0].operation",
        ),
        (
            "{rules: [{when: [{key: source.ip}]}]}",
            "spec.rules[0].when[0]",
        ),
    ];
    for (spec, field) in cases {
        let text = format!(
            "# comment\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
        );
        let e = errors(&text);
        assert_eq!(e[0].field.as_deref(), Some(field), "{spec}: {e:?}");
        assert_eq!(e[0].line, 5, "the line of the field: {e:?}");
    }
}

#[test]
fn peer_authentication() {
    let Object::PeerAuthentication(pa) = one("
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
")
    else {
        panic!()
    };
    assert_eq!(pa.spec.mtls.as_ref().unwrap().mode, Some(MtlsMode::Strict));
    assert_eq!(
        pa.spec.port_level_mtls[&Port(8080)].mode,
        Some(MtlsMode::Permissive)
    );
    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  portLevelMtls: {80: {mode: STRICT}}\n",
    );
    assert_eq!(e[0].field.as_deref(), Some("spec.portLevelMtls"));
}

#[test]
fn istio_networking_and_gateway_kinds() {
    let objects = parse_manifest(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  addresses: [198.19.5.0/24]
  ports: [{number: 443, protocol: TLS, name: tls}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: vm1}
spec: {address: 198.18.9.9, labels: {app: vm}, serviceAccount: vm, ports: {http: 8080}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x, value: y}]}}]
    backendRefs: [{name: echo-v2, port: 80, weight: 90}]
",
    )
    .unwrap();
    let kinds: Vec<Kind> = objects.iter().map(Object::kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::ServiceEntry,
            Kind::WorkloadEntry,
            Kind::Gateway,
            Kind::HTTPRoute
        ]
    );
    let Object::HttpRoute(route) = &objects[3] else {
        panic!()
    };
    assert_eq!(route.spec.rules[0].backend_refs[0].weight, Some(90));
    assert_eq!(route.spec.rules[0].filters.len(), 1);
}

#[test]
fn multi_document_lines_are_file_lines() {
    let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
# a comment
apiVersion: v1
kind: Pod
metadata: {name: ok, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata:
  name: bad
  namespace: demo
status:
  podIP: 198.18.0.300
";
    let e = errors(text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].line, 16, "{e:?}");
    assert_eq!(e[0].column, 10);
    assert_eq!(e[0].field.as_deref(), Some("status.podIP"));
    assert!(
        e[0].to_string()
            .starts_with("line 16, column 10, field status.podIP: ")
    );
}

#[test]
fn every_bad_document_is_reported() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {ports: [{port: 70000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: Bad_Name}
";
    let e = errors(text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(
        (e[0].line, e[0].field.as_deref()),
        (4, Some("spec.ports[0].port"))
    );
    assert!(e[0].message.contains("out of range"), "{}", e[0].message);
    assert_eq!(
        (e[1].line, e[1].field.as_deref()),
        (8, Some("metadata.name"))
    );
}

#[test]
fn labels_are_validated() {
    let e = errors("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {'bad key!': x}\n");
    assert_eq!(e[0].field.as_deref(), Some("metadata.labels"), "{e:?}");
    assert_eq!(e[0].line, 5);
    // Numbers and booleans are label values as written.
    let Object::Pod(p) =
        one("apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {version: 2, canary: true}}\n")
    else {
        panic!()
    };
    assert_eq!(p.metadata.labels.get("version"), Some("2"));
    assert_eq!(p.metadata.labels.get("canary"), Some("true"));
}

#[test]
fn unknown_kinds_are_skipped_and_listed() {
    let parsed = parse_file(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: v}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
    )
    .unwrap();
    assert!(parsed.objects.is_empty());
    assert_eq!(
        parsed.ignored,
        [
            "apps/v1 Deployment (line 1)",
            "networking.istio.io/v1 Sidecar (line 5)",
            "v1 ConfigMap (line 9)"
        ]
    );
}

#[test]
fn a_known_kind_in_an_unknown_version_is_an_error() {
    // Skipping it would silently drop a security policy.
    let e = errors(
        "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
    );
    assert_eq!(e[0].field.as_deref(), Some("apiVersion"));
    assert!(
        e[0].message.contains("security.istio.io/v1"),
        "{}",
        e[0].message
    );
}

#[test]
fn missing_header_fields() {
    let e = errors("kind: Pod\nmetadata: {name: p}\n");
    assert_eq!(e[0].field.as_deref(), Some("apiVersion"));
    let e = errors("apiVersion: v1\nmetadata: {name: p}\n");
    assert_eq!(e[0].field.as_deref(), Some("kind"));
    let e = errors("apiVersion: v1\nkind: Pod\n");
    assert!(e[0].message.contains("metadata"), "{e:?}");
}

#[test]
fn yaml_syntax_errors_have_a_location() {
    let e = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: p\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].line >= 3, "{e:?}");
    let e = errors("---\n- just\n- a list\n");
    assert_eq!(e[0].line, 2, "{e:?}");
}

#[test]
fn empty_and_comment_only_files_are_fine() {
    for text in ["", "\n\n", "# nothing\n", "---\n---\n", "---\n# x\n...\n"] {
        let parsed = parse_file(text).unwrap_or_else(|e| panic!("{text:?}: {e:?}"));
        assert!(parsed.objects.is_empty());
    }
}

#[test]
fn namespace_objects_are_cluster_scoped() {
    let o = one("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, namespace: ignored}\n");
    assert_eq!(o.key().namespace, "");
    assert_eq!(o.key().name, "demo");
}

#[test]
fn control_characters_in_messages_are_escaped() {
    let e = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: \"a\\nb\"}\n");
    assert!(!e[0].message.contains('\n'), "{:?}", e[0].message);
}

#[test]
fn document_splitting() {
    let docs = split_documents("a: 1\n---\nb: 2\n--- \nc: 3\n---x: 1\n");
    let texts: Vec<&str> = docs.iter().map(|d| d.text).collect();
    assert_eq!(texts, ["a: 1\n", "---\nb: 2\n", "--- \nc: 3\n---x: 1\n"]);
    assert_eq!(
        docs.iter().map(|d| d.line_offset).collect::<Vec<_>>(),
        [0, 1, 3]
    );
}

#[test]
fn lone_carriage_returns_count_as_line_breaks() {
    // Found by the fuzzer: YAML (and editors) treat a lone CR as a line break.
    let text = "apiVersion: v1\rkind: Pod\rmetadata: {name: a}\r---\rapiVersion: v1\rkind: Pod\rmetadata: {name: B}\r";
    let e = errors(text);
    assert_eq!(e[0].line, 7, "{e:?}");
    let crlf = text.replace('\r', "\r\n");
    assert_eq!(errors(&crlf)[0].line, 7);
    let lines: Vec<&str> = yaml_lines("a\r\nb\rc\nd").collect();
    assert_eq!(lines, ["a\r\n", "b\r", "c\n", "d"]);
}

#[test]
fn a_misspelt_field_of_a_pod_service_or_namespace_is_an_error() {
    // serviceAcountName would otherwise give the pod the `default` identity.
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {serviceAcountName: sleep}\n",
            "spec",
            "serviceAcountName",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, lables: {app: x}}\n",
            "metadata",
            "lables",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIp: 198.18.0.1}\n",
            "status",
            "podIp",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPorts: 80}]}]}\n",
            "spec.containers[0].ports[0]",
            "containerPorts",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {selecter: {app: x}}\n",
            "spec",
            "selecter",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetport: 8080}]}\n",
            "spec.ports[0]",
            "targetport",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\nlabels: {istio.io/dataplane-mode: ambient}\n",
            "",
            "labels",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspc: {mtls: {mode: STRICT}}\n",
            "",
            "spc",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 198.18.0.9, serviceAcount: x}\n",
            "spec",
            "serviceAcount",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRef: [{name: x}]}\n",
            "spec",
            "parentRef",
        ),
    ];
    for (text, path, field) in cases {
        let e = errors(text);
        assert!(e[0].message.contains(field), "{text}: {}", e[0].message);
        assert!(
            e[0].field.as_deref().unwrap_or("").starts_with(path),
            "{text}: field {:?}",
            e[0].field
        );
    }
}

#[test]
fn every_known_kubernetes_field_is_accepted_and_the_deprecated_service_account_counts() {
    let Object::Pod(pod) = one("
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: demo
  generateName: p-
  resourceVersion: '42'
  creationTimestamp: '2026-01-01T00:00:00Z'
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: r, uid: u}]
  managedFields: []
spec:
  serviceAccount: legacy-sa
  nodeName: n
  restartPolicy: Always
  dnsPolicy: ClusterFirst
  terminationGracePeriodSeconds: 30
  securityContext: {runAsNonRoot: true}
  tolerations: [{key: k, operator: Exists}]
  volumes: [{name: v, emptyDir: {}}]
  containers:
  - name: app
    image: busybox
    resources: {limits: {cpu: 1}}
    ports: [{containerPort: 8080, name: http, protocol: TCP}]
status:
  phase: Running
  hostIP: 198.18.0.1
  podIP: 198.18.0.10
  startTime: '2026-01-01T00:00:00Z'
  qosClass: Burstable
  containerStatuses: [{name: app, ready: true}]
  conditions: [{type: Ready, status: 'True', lastTransitionTime: '2026-01-01T00:00:00Z'}]
")
    else {
        panic!("not a pod")
    };
    assert_eq!(pod.service_account(), "legacy-sa");
    assert_eq!(pod.named_port("http"), Some(8080));
    // Ignored fields are not written back out.
    let json = serde_json::to_string(&*pod).unwrap();
    assert!(
        !json.contains("Burstable") && !json.contains("generateName"),
        "{json}"
    );
}

#[test]
fn a_misspelt_kind_in_a_mesh_group_is_an_error() {
    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata: {name: p}\nspec: {action: DENY}\n",
    );
    assert_eq!(e[0].field.as_deref(), Some("kind"));
    assert!(
        e[0].message.contains("did you mean AuthorizationPolicy?"),
        "{}",
        e[0].message
    );
    for text in [
        "apiVersion: networking.istio.io/v1\nkind: VirtualServices\nmetadata: {name: v}\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HttpRoute2\nmetadata: {name: r}\n",
    ] {
        assert_eq!(errors(text)[0].field.as_deref(), Some("kind"), "{text}");
    }
    // A typo in the group itself.
    let e = errors(
        "apiVersion: secuirty.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
    );
    assert!(
        e[0].message.contains("did you mean security.istio.io?"),
        "{}",
        e[0].message
    );
    // Known kinds Ambit does not model, and other groups, are skipped and listed.
    let parsed = parse_file(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\n---\napiVersion: example.com/v1\nkind: Widgit\nmetadata: {name: w}\n",
    )
    .unwrap();
    // RequestAuthentication is modelled now; Sidecar and Widgit are not.
    assert_eq!(parsed.ignored.len(), 2);
    assert_eq!(parsed.objects.len(), 1);
}

#[test]
fn every_error_of_one_document_is_reported_at_its_own_line() {
    let text = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo}
spec:
  action: DENNY
  rules:
  - from:
    - source: {principals: [a], bogus: 1}
  - to:
    - operation: {ports: [x]}
    - operation: {}
";
    let e = errors(text);
    let got: Vec<(u64, Option<&str>)> = e.iter().map(|e| (e.line, e.field.as_deref())).collect();
    assert_eq!(
        got,
        [
            (5, Some("spec.action")),
            (8, Some("spec.rules[0].from[0].source.bogus")),
            (10, Some("spec.rules[1].to[0].operation.ports[0]")),
        ],
        "{e:#?}"
    );
    assert!(e[0].message.contains("DENNY"), "{}", e[0].message);
    assert!(e[1].message.contains("bogus"), "{}", e[1].message);
}

#[test]
fn checks_on_a_parsed_object_report_every_problem() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  ports:
  - {port: 80}
  - {port: 80}
";
    let e = errors(text);
    let got: Vec<(u64, Option<&str>)> = e.iter().map(|e| (e.line, e.field.as_deref())).collect();
    assert_eq!(
        got,
        [
            (6, Some("spec.ports[0]")),
            (7, Some("spec.ports[1]")),
            (7, Some("spec.ports[1].port")),
        ],
        "{e:#?}"
    );
}

#[test]
fn a_field_cut_for_its_error_is_not_reported_missing_but_a_missing_field_is() {
    // `port` is required: its bad value is one error, not two.
    let e =
        errors("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: x}]}\n");
    assert_eq!(e.len(), 1, "{e:?}");
    // A bad name and, elsewhere, a port with no number at all: both.
    let e = errors(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {a: [1]}}\nspec: {ports: [{name: http}]}\n",
    );
    let fields: Vec<Option<&str>> = e.iter().map(|e| e.field.as_deref()).collect();
    assert_eq!(
        fields,
        [Some("metadata.labels.a"), Some("spec.ports[0]")],
        "{e:?}"
    );
    assert!(
        e[1].message.contains("missing field `port`"),
        "{}",
        e[1].message
    );
}

#[test]
fn messages_keep_their_quotes() {
    let e = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n");
    assert!(e[0].message.contains("\"Bad_Name\""), "{}", e[0].message);
    assert!(!e[0].message.contains('\\'), "{}", e[0].message);
}

#[test]
fn an_unknown_field_near_a_known_one_is_named() {
    let e =
        errors("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {serviceAcountName: s}\n");
    assert_eq!(
        e[0].message,
        "unknown field `serviceAcountName`; did you mean `serviceAccountName`?"
    );
    // Far from every known one: the list stays.
    let e = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {zzz: s}\n");
    assert!(e[0].message.contains("expected one of"), "{}", e[0].message);
}
