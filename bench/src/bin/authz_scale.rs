//! L4 authorization at scale: the cost of one decision at the node proxy when the mesh
//! holds 10, 1,000 or 10,000 AuthorizationPolicies, and what the policies cost to
//! translate and to hold.
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin authz-scale
//! ```
//!
//! The policies are generated manifests, translated by the control plane's translator,
//! encoded, validated by the node proxy's converter and indexed in its state, exactly as
//! discovery does it (without the network). Every mesh has the same three policies that
//! apply to the workload under test (mesh-wide DENY, namespace-wide ALLOW, selector
//! DENY); the rest live in 1,000 other namespaces, half of them selector policies. A
//! decision is `ambit_node::authz::Policies::check`, the call the data path makes per
//! connection.

#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use ambit_bench::alloc::Counting;
use ambit_control::model::Model;
use ambit_control::model::parse::parse_manifest;
use ambit_control::xds::translate::{ResourceType, TranslateOptions, Translator};
use ambit_core::SpiffeId;
use ambit_core::state::State;
use ambit_node::authz::Policies;
use ambit_node::{Authorizer, InboundConn};
use ambit_proto::prost::Message;
use ambit_proto::security as pb_sec;
use ambit_proto::workload as pb;
use ambit_xds::convert::{self, Interner};
use anyhow::Context;
use clap::Parser;

#[global_allocator]
static ALLOC: Counting<mimalloc::MiMalloc> = Counting::new(mimalloc::MiMalloc);

#[derive(Debug, Parser)]
struct Args {
    /// Policy counts in the mesh.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    policies: Vec<usize>,
    /// Decisions timed per mesh.
    #[arg(long, default_value = "1000000")]
    decisions: usize,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/results/authz-scale.md")]
    output: PathBuf,
}

const TARGET: &str = "Kubernetes//Pod/demo/echo-1";

fn manifests(policies: usize) -> String {
    let mut out = String::from(
        "apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node-b}
status: {podIP: 198.18.2.10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [198.19.255.0/24]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-demo-prod, namespace: demo}
spec: {rules: [{from: [{source: {namespaces: [demo, prod]}}], to: [{operation: {ports: ['8080']}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/other]}}]}]
",
    );
    for i in 0..policies.saturating_sub(3) {
        let ns = i % 1000;
        let selector = if i % 2 == 0 {
            "selector: {matchLabels: {app: a}}, "
        } else {
            ""
        };
        let _ = write!(
            out,
            "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p-{i}, namespace: ns-{ns}}}
spec: {{{selector}action: DENY, rules: [{{from: [{{source: {{principals: ['*/sa/blocked-{i}'], ipBlocks: [198.19.{}.0/24]}}}}], to: [{{operation: {{ports: ['8080', '9090']}}}}]}}]}}
",
            i % 250
        );
    }
    out
}

struct Run {
    policies: usize,
    translate_s: f64,
    state_bytes_per_policy: f64,
    applicable: usize,
    ns_per_decision: f64,
    allowed: usize,
}

fn run(policies: usize, decisions: usize) -> anyhow::Result<Run> {
    let text = manifests(policies);
    let objects = parse_manifest(&text).map_err(|e| anyhow::anyhow!("manifests: {e:?}"))?;
    let model = Model::from_objects(1, objects);
    let t0 = Instant::now();
    let mut translator = Translator::new(TranslateOptions::default());
    translator.full(&model);
    let translate_s = t0.elapsed().as_secs_f64();

    let before = ALLOC.live();
    let mut state = State::default();
    let mut interner = Interner::default();
    for (name, enc) in translator.resources(ResourceType::Address).iter() {
        if let Some(pb::address::Type::Workload(w)) = pb::Address::decode(&*enc.body)?.r#type {
            state.upsert_workload(
                convert::workload(name, w, &mut interner).map_err(anyhow::Error::msg)?,
            );
        }
    }
    let mut held = 0;
    for (name, enc) in translator.resources(ResourceType::Authorization).iter() {
        let a = pb_sec::Authorization::decode(&*enc.body)?;
        state.upsert_policy(
            convert::authorization(name, a, &mut interner).map_err(anyhow::Error::msg)?,
        );
        held += 1;
    }
    anyhow::ensure!(
        held == policies,
        "expected {policies} policies, the node holds {held}"
    );
    let state_bytes_per_policy = (ALLOC.live() - before) as f64 / policies as f64;

    let workload = state
        .workload(TARGET)
        .context("the target workload")?
        .clone();
    let applicable = state.policies_for(&workload).count();
    let clients: Vec<(SpiffeId, SocketAddr)> = [
        ("demo", "sleep", "198.18.1.10:40000"),
        ("demo", "other", "198.18.1.11:40000"),
        ("prod", "client", "198.18.3.10:40000"),
        ("legacy", "legacy", "198.18.1.20:40000"),
    ]
    .iter()
    .map(|(ns, sa, addr)| {
        (
            SpiffeId::new("cluster.local", *ns, *sa).expect("valid"),
            addr.parse().expect("valid"),
        )
    })
    .collect();
    let destination: SocketAddr = "198.18.2.10:8080".parse()?;
    let authz = Policies::new(
        vec!["cluster.local".to_owned()],
        std::sync::Arc::new(ambit_node::metrics::Metrics::default()),
    );
    let mut allowed = 0;
    let t0 = Instant::now();
    for i in 0..decisions {
        let (id, addr) = &clients[i % clients.len()];
        let e = authz.check(&InboundConn {
            state: &state,
            destination: Some(&workload),
            destination_addr: destination,
            source_addr: *addr,
            source_identity: Some(id),
        });
        if black_box(e.verdict.allowed) {
            allowed += 1;
        }
    }
    let ns_per_decision = t0.elapsed().as_nanos() as f64 / decisions as f64;
    Ok(Run {
        policies,
        translate_s,
        state_bytes_per_policy,
        applicable,
        ns_per_decision,
        allowed,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut table = String::from(
        "| Policies in the mesh | Apply to the workload | One decision | Translate all (control plane) | Node state per policy |\n|---|---|---|---|---|\n",
    );
    for &n in &args.policies {
        anyhow::ensure!(n >= 3, "at least 3 policies (the three that apply)");
        println!(
            "{n} policies: translating, indexing, then {} decisions...",
            args.decisions
        );
        let r = run(n, args.decisions)?;
        // sleep and prod allowed, other (DENY) and legacy (not on the allow-list) denied.
        anyhow::ensure!(
            r.allowed == args.decisions / 2,
            "unexpected decisions: {} of {} allowed",
            r.allowed,
            args.decisions
        );
        let _ = writeln!(
            table,
            "| {} | {} | {:.0} ns | {:.2} s | {:.0} B |",
            r.policies, r.applicable, r.ns_per_decision, r.translate_s, r.state_bytes_per_policy
        );
    }
    println!("\n{table}");
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.output,
        format!(
            "# authz-scale\n\n`cargo run --release -p ambit-bench --bin authz-scale`\n\n{table}"
        ),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    println!("written to {}", args.output.display());
    Ok(())
}
