//! What Istio users write, decided as the node proxy decides it: AuthorizationPolicy and
//! PeerAuthentication manifests go through the control plane's translation, the
//! protobuf encoding, the node proxy's validation and its evaluation, and each case
//! states the outcome Istio's documented semantics give.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ambit_control::model::Model;
use ambit_control::model::parse::parse_manifest;
use ambit_control::xds::translate::{ResourceType, TranslateOptions, Translator};
use ambit_core::policy::{Connection, Evaluation, evaluate};
use ambit_core::state::State;
use ambit_proto::prost::Message;
use ambit_proto::security as pb_sec;
use ambit_proto::workload as pb;
use ambit_xds::convert::{self, Interner};

const BASE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node-b}
status: {podIP: 198.18.2.10}
";

const UID: &str = "Kubernetes//Pod/demo/echo-1";

/// The node proxy's state after the control plane translated `policies`.
fn node_state(policies: &str) -> (State, Translator) {
    let objects = parse_manifest(&format!("{BASE}---\n{policies}"))
        .unwrap_or_else(|e| panic!("bad test manifest: {e:?}"));
    let model = Model::from_objects(1, objects);
    let mut t = Translator::new(TranslateOptions::default());
    t.full(&model);
    let mut state = State::default();
    let mut i = Interner::default();
    for (name, enc) in t.resources(ResourceType::Address).iter() {
        if let Some(pb::address::Type::Workload(w)) =
            pb::Address::decode(&*enc.body).unwrap().r#type
        {
            state.upsert_workload(convert::workload(name, w, &mut i).unwrap());
        }
    }
    for (name, enc) in t.resources(ResourceType::Authorization).iter() {
        let a = pb_sec::Authorization::decode(&*enc.body).unwrap();
        state.upsert_policy(convert::authorization(name, a, &mut i).unwrap());
    }
    (state, t)
}

/// A client: its principal (None: plaintext) and address.
#[derive(Clone, Copy)]
struct Client(Option<&'static str>, &'static str);

const SLEEP: Client = Client(Some("cluster.local/ns/demo/sa/sleep"), "198.18.1.10");
const OTHER: Client = Client(Some("cluster.local/ns/demo/sa/other"), "198.18.1.11");
const PROD: Client = Client(Some("cluster.local/ns/prod/sa/client"), "198.18.3.10");
const PLAIN: Client = Client(None, "198.19.9.9");

fn decide<'s>(state: &'s State, client: Client, port: u16) -> Evaluation<'s> {
    let w = state.workload(UID).expect("echo-1 is a workload");
    let conn = Connection {
        source_ip: client.1.parse().unwrap(),
        source_principal: client.0,
        source_principal_aliases: &[],
        source_namespace: client.0.map(|p| p.split('/').nth(2).unwrap()),
        source_service_account: client.0.map(|p| p.split('/').nth(4).unwrap()),
        destination_ip: "198.18.2.10".parse().unwrap(),
        destination_port: port,
        request: None,
    };
    evaluate(state.policies_for(w).map(|p| &**p), &conn)
}

fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn pa(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// What, the manifests, and (client, port, allowed?) checks.
type Case = (&'static str, String, Vec<(Client, u16, bool)>);

fn ap_dry_run(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{istio.io/dry-run: 'true'}}}}\nspec: {spec}\n"
    )
}

/// Runs every case and fails listing each check that went the other way.
fn check_table(table: &[Case]) {
    let mut failures = Vec::new();
    for (what, manifests, checks) in table {
        let (state, _) = node_state(manifests);
        for (client, port, want) in checks {
            let e = decide(&state, *client, *port);
            if e.verdict.allowed != *want {
                failures.push(format!(
                    "{what}: {} -> :{port}: got {}, want {}",
                    client.0.unwrap_or("plaintext"),
                    e.verdict,
                    if *want { "allowed" } else { "denied" }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

const A: bool = true;
const D: bool = false;

#[test]
fn authorization_policy_table() {
    #[rustfmt::skip]
    let table: Vec<Case> = vec![
        ("no policy allows everything", String::new(),
            vec![(SLEEP, 8080, A), (PROD, 8080, A), (PLAIN, 8080, A)]),
        ("DENY principals", ap("p", "demo", "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]}"),
            vec![(SLEEP, 8080, D), (OTHER, 8080, A), (PLAIN, 8080, A)]),
        ("DENY notPrincipals", ap("p", "demo", "{action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/demo/sa/sleep]}}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, D), (PLAIN, 8080, D)]),
        ("ALLOW namespaces", ap("p", "demo", "{rules: [{from: [{source: {namespaces: [demo]}}]}]}"),
            vec![(SLEEP, 8080, A), (PROD, 8080, D), (PLAIN, 8080, D)]),
        ("ALLOW notNamespaces", ap("p", "demo", "{rules: [{from: [{source: {notNamespaces: [prod]}}]}]}"),
            vec![(SLEEP, 8080, A), (PROD, 8080, D), (PLAIN, 8080, A)]),
        ("ALLOW serviceAccounts", ap("p", "demo", "{rules: [{from: [{source: {serviceAccounts: [demo/sleep]}}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, D), (PLAIN, 8080, D)]),
        ("DENY notServiceAccounts", ap("p", "demo", "{action: DENY, rules: [{from: [{source: {notServiceAccounts: [demo/other]}}]}]}"),
            vec![(SLEEP, 8080, D), (OTHER, 8080, A)]),
        ("ALLOW ipBlocks", ap("p", "demo", "{rules: [{from: [{source: {ipBlocks: [198.18.1.0/24]}}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, A), (PROD, 8080, D), (PLAIN, 8080, D)]),
        ("DENY notIpBlocks", ap("p", "demo", "{action: DENY, rules: [{from: [{source: {notIpBlocks: [198.18.0.0/16]}}]}]}"),
            vec![(SLEEP, 8080, A), (PLAIN, 8080, D)]),
        ("ALLOW ports", ap("p", "demo", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}"),
            vec![(SLEEP, 8080, A), (SLEEP, 9090, D)]),
        ("DENY notPorts", ap("p", "demo", "{action: DENY, rules: [{to: [{operation: {notPorts: ['9090']}}]}]}"),
            vec![(SLEEP, 8080, D), (SLEEP, 9090, A)]),
        ("from AND to", ap("p", "demo", "{rules: [{from: [{source: {namespaces: [demo]}}], to: [{operation: {ports: ['8080']}}]}]}"),
            vec![(SLEEP, 8080, A), (SLEEP, 9090, D), (PROD, 8080, D)]),
        ("two sources OR-ed", ap("p", "demo", "{rules: [{from: [{source: {namespaces: [prod]}}, {source: {principals: ['*/sa/sleep']}}]}]}"),
            vec![(SLEEP, 8080, A), (PROD, 8080, A), (OTHER, 8080, D)]),
        ("two rules OR-ed", ap("p", "demo", "{rules: [{from: [{source: {namespaces: [prod]}}]}, {to: [{operation: {ports: ['9090']}}]}]}"),
            vec![(PROD, 8080, A), (SLEEP, 9090, A), (SLEEP, 8080, D)]),
        ("when source.ip", ap("p", "demo", "{rules: [{when: [{key: source.ip, values: [198.18.1.10]}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, D)]),
        ("when source.ip notValues", ap("p", "demo", "{action: DENY, rules: [{when: [{key: source.ip, notValues: [198.18.0.0/16]}]}]}"),
            vec![(SLEEP, 8080, A), (PLAIN, 8080, D)]),
        ("when source.namespace notValues", ap("p", "demo", "{rules: [{when: [{key: source.namespace, notValues: [prod]}]}]}"),
            vec![(SLEEP, 8080, A), (PROD, 8080, D)]),
        ("when source.principal suffix", ap("p", "demo", "{rules: [{when: [{key: source.principal, values: ['*/sa/sleep']}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, D)]),
        ("when destination.ip", ap("p", "demo", "{action: DENY, rules: [{when: [{key: destination.ip, values: [198.18.2.0/24]}]}]}"),
            vec![(SLEEP, 8080, D), (PROD, 9090, D)]),
        ("when destination.port", ap("p", "demo", "{action: DENY, rules: [{when: [{key: destination.port, values: ['9090']}]}]}"),
            vec![(SLEEP, 8080, A), (SLEEP, 9090, D)]),
        ("principal prefix", ap("p", "demo", "{rules: [{from: [{source: {principals: [cluster.local/ns/demo/*]}}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, A), (PROD, 8080, D)]),
        ("principal presence admits any mTLS peer", ap("p", "demo", "{rules: [{from: [{source: {principals: ['*']}}]}]}"),
            vec![(SLEEP, 8080, A), (PROD, 8080, A), (PLAIN, 8080, D)]),
        ("namespace suffix", ap("p", "demo", "{rules: [{from: [{source: {namespaces: ['*od']}}]}]}"),
            vec![(PROD, 8080, A), (SLEEP, 8080, D)]),
        ("DENY beats ALLOW", format!("{}---\n{}",
            ap("allow", "demo", "{rules: [{}]}"),
            ap("deny", "demo", "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]}")),
            vec![(SLEEP, 8080, D), (OTHER, 8080, A)]),
        ("ALLOW without rules allows nothing", ap("p", "demo", "{}"),
            vec![(SLEEP, 8080, D), (PLAIN, 8080, D)]),
        ("ALLOW with an empty rule allows everything", ap("p", "demo", "{rules: [{}]}"),
            vec![(SLEEP, 8080, A), (PLAIN, 8080, A)]),
        ("DENY without rules denies nothing", ap("p", "demo", "{action: DENY}"),
            vec![(SLEEP, 8080, A)]),
        ("selector that matches", ap("p", "demo", "{selector: {matchLabels: {app: echo}}, action: DENY, rules: [{}]}"),
            vec![(SLEEP, 8080, D)]),
        ("selector that does not match", ap("p", "demo", "{selector: {matchLabels: {app: other}}, action: DENY, rules: [{}]}"),
            vec![(SLEEP, 8080, A)]),
        ("mesh-wide (root namespace)", ap("p", "istio-system", "{action: DENY, rules: [{from: [{source: {namespaces: [prod]}}]}]}"),
            vec![(PROD, 8080, D), (SLEEP, 8080, A)]),
        ("another namespace's policy", ap("p", "prod", "{action: DENY, rules: [{}]}"),
            vec![(SLEEP, 8080, A)]),
        ("ALLOW with an L7 field matches nothing", ap("p", "demo", "{rules: [{to: [{operation: {methods: [GET]}}]}]}"),
            vec![(SLEEP, 8080, D), (PLAIN, 8080, D)]),
        ("ALLOW keeps its L4-only rules", ap("p", "demo", "{rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [demo]}}]}]}"),
            vec![(SLEEP, 8080, A), (PROD, 8080, D)]),
        ("DENY with an L7 field denies on the rest", ap("p", "demo", "{action: DENY, rules: [{from: [{source: {namespaces: [demo]}}], to: [{operation: {paths: [/admin]}}]}]}"),
            vec![(SLEEP, 8080, D), (PROD, 8080, A)]),
        ("DENY with only L7 fields denies all", ap("p", "demo", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}"),
            vec![(SLEEP, 8080, D), (PROD, 8080, D)]),
        ("DENY with request principals", ap("p", "demo", "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}"),
            vec![(SLEEP, 8080, D)]),
        ("ALLOW with a header condition", ap("p", "demo", "{rules: [{when: [{key: 'request.headers[x-user]', values: [admin]}]}]}"),
            vec![(SLEEP, 8080, D)]),
        ("a bare service account is in the policy's namespace", ap("p", "demo", "{rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}"),
            vec![(SLEEP, 8080, A), (OTHER, 8080, D), (PLAIN, 8080, D)]),
        ("serviceAccounts need the namespace too", ap("p", "demo", "{rules: [{from: [{source: {serviceAccounts: [prod/sleep]}}]}]}"),
            vec![(SLEEP, 8080, D)]),
        ("malformed service account fails closed", ap("p", "demo", "{rules: [{from: [{source: {serviceAccounts: ['a/b/c']}}]}]}"),
            vec![(SLEEP, 8080, D), (OTHER, 8080, D)]),
        ("dry-run DENY is not enforced", ap_dry_run("p", "demo", "{action: DENY, rules: [{}]}"),
            vec![(SLEEP, 8080, A)]),
        ("dry-run ALLOW is not enforced", ap_dry_run("p", "demo", "{rules: [{from: [{source: {namespaces: [prod]}}]}]}"),
            vec![(SLEEP, 8080, A)]),
        ("AUDIT is not enforced", ap("p", "demo", "{action: AUDIT, rules: [{}]}"),
            vec![(SLEEP, 8080, A)]),
        ("waypoint-bound policy is not the node proxy's", ap("p", "demo", "{targetRefs: [{kind: Service, group: '', name: echo}], action: DENY, rules: [{}]}"),
            vec![(SLEEP, 8080, A)]),
    ];
    check_table(&table);
}

#[test]
fn decisions_name_the_policy_and_report_dry_run_and_audit() {
    let manifests = format!(
        "{}---\n{}---\n{}",
        ap(
            "deny-other",
            "demo",
            "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/other']}}]}]}"
        ),
        ap(
            "audit-prod",
            "demo",
            "{action: AUDIT, rules: [{from: [{source: {namespaces: [prod]}}]}]}"
        ),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: would-deny-sleep, namespace: demo, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]}\n",
    );
    let (state, t) = node_state(&manifests);
    let e = decide(&state, OTHER, 8080);
    assert_eq!(e.verdict.to_string(), "denied by demo/deny-other");
    let e = decide(&state, SLEEP, 8080);
    assert!(e.verdict.allowed);
    assert_eq!(
        e.dry_run.unwrap().to_string(),
        "denied by demo/would-deny-sleep"
    );
    assert!(e.audit.is_none());
    let e = decide(&state, PROD, 8080);
    assert!(e.verdict.allowed);
    assert_eq!(
        e.audit.map(|p| p.name.to_string()).as_deref(),
        Some("audit-prod")
    );
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());

    // L7 fields are reported.
    let (_, t) = node_state(&ap(
        "p",
        "demo",
        "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
    ));
    assert!(t.warnings()["demo/p"][0].contains("operation.methods"));
}

#[test]
fn peer_authentication_table() {
    #[rustfmt::skip]
    let table: Vec<Case> = vec![
        ("none: permissive", String::new(),
            vec![(PLAIN, 8080, A), (SLEEP, 8080, A)]),
        ("mesh-wide STRICT", pa("default", "istio-system", "{mtls: {mode: STRICT}}"),
            vec![(PLAIN, 8080, D), (PLAIN, 9090, D), (SLEEP, 8080, A)]),
        ("mesh-wide PERMISSIVE", pa("default", "istio-system", "{mtls: {mode: PERMISSIVE}}"),
            vec![(PLAIN, 8080, A)]),
        ("mesh-wide UNSET", pa("default", "istio-system", "{mtls: {mode: UNSET}}"),
            vec![(PLAIN, 8080, A)]),
        ("namespace STRICT", pa("default", "demo", "{mtls: {mode: STRICT}}"),
            vec![(PLAIN, 8080, D), (SLEEP, 8080, A)]),
        ("other namespace STRICT", pa("default", "prod", "{mtls: {mode: STRICT}}"),
            vec![(PLAIN, 8080, A)]),
        ("namespace PERMISSIVE overrides mesh STRICT", format!("{}---\n{}",
            pa("default", "istio-system", "{mtls: {mode: STRICT}}"),
            pa("default", "demo", "{mtls: {mode: PERMISSIVE}}")),
            vec![(PLAIN, 8080, A)]),
        ("namespace UNSET inherits mesh STRICT", format!("{}---\n{}",
            pa("default", "istio-system", "{mtls: {mode: STRICT}}"),
            pa("default", "demo", "{mtls: {mode: UNSET}}")),
            vec![(PLAIN, 8080, D)]),
        ("workload PERMISSIVE overrides namespace STRICT", format!("{}---\n{}",
            pa("default", "demo", "{mtls: {mode: STRICT}}"),
            pa("echo", "demo", "{selector: {matchLabels: {app: echo}}, mtls: {mode: PERMISSIVE}}")),
            vec![(PLAIN, 8080, A)]),
        ("workload selector that does not match", format!("{}---\n{}",
            pa("default", "demo", "{mtls: {mode: STRICT}}"),
            pa("other", "demo", "{selector: {matchLabels: {app: other}}, mtls: {mode: PERMISSIVE}}")),
            vec![(PLAIN, 8080, D)]),
        ("STRICT with a PERMISSIVE port", pa("echo", "demo", "{selector: {matchLabels: {app: echo}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: PERMISSIVE}}}"),
            vec![(PLAIN, 8080, D), (PLAIN, 9090, A), (SLEEP, 8080, A)]),
        ("inherited PERMISSIVE with a STRICT port", format!("{}---\n{}",
            pa("default", "demo", "{mtls: {mode: PERMISSIVE}}"),
            pa("echo", "demo", "{selector: {matchLabels: {app: echo}}, portLevelMtls: {8080: {mode: STRICT}}}")),
            vec![(PLAIN, 8080, D), (PLAIN, 9090, A), (SLEEP, 8080, A)]),
        ("inherited mesh STRICT with a PERMISSIVE port", format!("{}---\n{}",
            pa("default", "istio-system", "{mtls: {mode: STRICT}}"),
            pa("echo", "demo", "{selector: {matchLabels: {app: echo}}, portLevelMtls: {9090: {mode: PERMISSIVE}}}")),
            vec![(PLAIN, 8080, D), (PLAIN, 9090, A)]),
        ("DISABLE is PERMISSIVE", pa("default", "demo", "{mtls: {mode: DISABLE}}"),
            vec![(PLAIN, 8080, A), (SLEEP, 8080, A)]),
        ("STRICT and an AuthorizationPolicy together", format!("{}---\n{}",
            pa("default", "demo", "{mtls: {mode: STRICT}}"),
            ap("p", "demo", "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/other']}}]}]}")),
            vec![(PLAIN, 8080, D), (OTHER, 8080, D), (SLEEP, 8080, A)]),
    ];
    check_table(&table);
}

#[test]
fn peer_authentication_warnings_and_names() {
    let (state, t) = node_state(&format!(
        "{}---\n{}---\n{}",
        pa("default", "demo", "{mtls: {mode: DISABLE}}"),
        pa("strict", "istio-system", "{mtls: {mode: STRICT}}"),
        pa("second", "demo", "{mtls: {mode: STRICT}}"),
    ));
    let w = &t.warnings()["PeerAuthentication demo/default"];
    assert!(w[0].contains("DISABLE"), "{w:?}");
    let w = &t.warnings()["PeerAuthentication demo/second"];
    assert!(w[0].contains("demo/default is the namespace's"), "{w:?}");
    // The namespace's PERMISSIVE decides for echo-1: no converted policy listed.
    let wl = state.workload(UID).unwrap();
    assert!(wl.profile.authorization_policies.is_empty());
    // The mesh-wide STRICT one exists as a policy for the workloads it decides for.
    assert!(
        state
            .policy("istio-system/ambit_peer_authentication_strict")
            .is_some()
    );
    let e = decide(&state, PLAIN, 8080);
    assert!(e.verdict.allowed);
}
