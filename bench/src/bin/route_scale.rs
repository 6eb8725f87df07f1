//! Waypoint routing at scale: the cost of choosing a request's rule when one Service has
//! 10, 1,000 or 10,000 HTTPRoutes, what the routes cost to translate, to apply at the
//! waypoint and to hold.
//!
//! ```sh
//! cargo run --release -p ambit-bench --bin route-scale
//! ```
//!
//! The routes are generated manifests (route `r-<i>` sends `PathPrefix /r<i>` with a
//! header match to a backend, and has a second rule for `Exact /r<i>/exact`), translated
//! by the control plane's translator, encoded, converted by the waypoint's converter and
//! indexed in its state, as discovery does it (without the network). A request's choice
//! is what the waypoint does per request (`State::route_table`, built on first use
//! after a change, then `RouteTable::select`): for a path in the middle of the table,
//! for the last route, and for a path no route matches (404). The first choice after a
//! change builds the index; its time is reported on its own.

#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use ambit_bench::alloc::Counting;
use ambit_control::model::Model;
use ambit_control::model::parse::parse_manifest;
use ambit_control::xds::translate::{ResourceType, TranslateOptions, Translator};
use ambit_core::http_route::{RequestFacts, Selected};
use ambit_core::state::State;
use ambit_xds::convert;
use anyhow::Context;
use clap::Parser;

#[global_allocator]
static ALLOC: Counting<mimalloc::MiMalloc> = Counting::new(mimalloc::MiMalloc);

#[derive(Debug, Parser)]
struct Args {
    /// Route counts on the Service.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    routes: Vec<usize>,
    /// Choices timed per table and request kind.
    #[arg(long, default_value = "20000")]
    choices: usize,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/results/route-scale.md")]
    output: PathBuf,
}

const SERVICE: &str = "demo/echo.demo.svc.cluster.local";

fn manifests(routes: usize) -> String {
    let mut out = String::from(
        "apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.11, ports: [{name: http, port: 80}]}
",
    );
    for i in 0..routes {
        let _ = write!(
            out,
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r-{i}, namespace: demo}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /r{i}}}, headers: [{{name: x-tenant, value: t{i}}}]}}]
    backendRefs: [{{name: echo-v2, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /r{i}/exact}}}}]
    backendRefs: [{{name: echo, port: 80}}]
"
        );
    }
    out
}

struct Run {
    routes: usize,
    translate_s: f64,
    apply_s: f64,
    index_s: f64,
    state_bytes_per_route: f64,
    middle_ns: f64,
    last_ns: f64,
    miss_ns: f64,
}

/// Times `choices` choices of the rule for `path` (with header `x-tenant: tenant`), as the
/// waypoint makes them; checks the outcome.
fn time_choice(
    state: &State,
    choices: usize,
    path: &str,
    tenant: &str,
    want: Option<&str>,
) -> anyhow::Result<f64> {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", tenant.parse()?);
    let req = RequestFacts {
        method: "GET",
        path_and_query: path,
        headers: &headers,
    };
    let choose = || {
        // What the waypoint does per request (routing::choose).
        let table = state.route_table(SERVICE)?;
        match table.select(SERVICE, 80, "demo", &req) {
            Selected::Rule { route, .. } => Some(route.key.to_string()),
            _ => None,
        }
    };
    let got = choose();
    anyhow::ensure!(
        got.as_deref() == want,
        "{path}: chose {got:?}, expected {want:?}"
    );
    let t0 = Instant::now();
    for _ in 0..choices {
        black_box(choose());
    }
    Ok(t0.elapsed().as_nanos() as f64 / choices as f64)
}

fn run(routes: usize, choices: usize) -> anyhow::Result<Run> {
    let text = manifests(routes);
    let objects = parse_manifest(&text).map_err(|e| anyhow::anyhow!("manifests: {e:?}"))?;
    let model = Model::from_objects(1, objects);
    let t0 = Instant::now();
    let mut translator = Translator::new(TranslateOptions::default());
    translator.full(&model);
    let translate_s = t0.elapsed().as_secs_f64();

    let before = ALLOC.live();
    let t0 = Instant::now();
    let mut state = State::default();
    for (name, enc) in translator.resources(ResourceType::WaypointRoute).iter() {
        use ambit_proto::prost::Message;
        let r = ambit_proto::waypoint::Route::decode(&*enc.body)?;
        state.upsert_http_route(convert::waypoint_route(name, r).map_err(anyhow::Error::msg)?);
    }
    let apply_s = t0.elapsed().as_secs_f64();
    let held = state.http_routes().count();
    anyhow::ensure!(
        held == routes,
        "expected {routes} routes, the waypoint holds {held}"
    );
    let t0 = Instant::now();
    state.route_table(SERVICE).context("the route table")?;
    let index_s = t0.elapsed().as_secs_f64();
    // Routes and their index.
    let state_bytes_per_route = (ALLOC.live() - before) as f64 / routes as f64;
    let mid = routes / 2;
    let last = routes - 1;
    let middle_ns = time_choice(
        &state,
        choices,
        &format!("/r{mid}/x"),
        &format!("t{mid}"),
        Some(&format!("demo/r-{mid}")),
    )?;
    let last_ns = time_choice(
        &state,
        choices,
        &format!("/r{last}/exact"),
        "nobody",
        Some(&format!("demo/r-{last}")),
    )?;
    let miss_ns = time_choice(&state, choices, "/none", "nobody", None)?;
    Ok(Run {
        routes,
        translate_s,
        apply_s,
        index_s,
        state_bytes_per_route,
        middle_ns,
        last_ns,
        miss_ns,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut table = String::from(
        "| HTTPRoutes on the Service | Choice: prefix + header (middle) | Choice: exact (last route) | Choice: no match (404) | Translate all (control plane) | Apply all (waypoint) | Index (first request after a change) | Waypoint state per route (with its index) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for &n in &args.routes {
        anyhow::ensure!(n >= 1, "at least one route");
        println!("{n} routes: translating, applying, then choosing...");
        let r = run(n, args.choices)?;
        let _ = writeln!(
            table,
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.3} s | {:.3} s | {:.2} ms | {:.0} B |",
            r.routes,
            r.middle_ns,
            r.last_ns,
            r.miss_ns,
            r.translate_s,
            r.apply_s,
            r.index_s * 1000.0,
            r.state_bytes_per_route
        );
    }
    println!("\n{table}");
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.output,
        format!(
            "# route-scale\n\n`cargo run --release -p ambit-bench --bin route-scale`\n\n{table}"
        ),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    println!("written to {}", args.output.display());
    Ok(())
}
