//! A conformance-style table of HTTPRoute behaviours, written from the Gateway API's
//! specification (the HTTPRoute type reference and its GEPs: matching, precedence,
//! filters, redirects, rewrites, weights, timeouts, retries, mirrors) for its mesh
//! profile: each case installs one route on the echo Service, sends requests from the
//! sleep pod across real namespaces through its node proxy, HBONE, the real waypoint
//! and the echo pods' node proxy, and checks what the backend says it received.
//!
//! The backend is a JSON echo on two ports of both echo pods, one per backend Service
//! (`b1` on 9001, `b2` on 9002, `echo` itself on the app port): it answers with the
//! method, path, query, host and headers it got, which Service port served it, and can
//! be told by query parameters to wait (`delay=<ms>`), answer a status (`status=<code>`)
//! or fail the first times a key is seen (`fail=<n>&key=<k>`, answered 500).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::*;

/// What the JSON echo servers have seen: `(backend, method, path, host)`, in order.
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// JSON echo servers for `b1` (9001) and `b2` (9002) in both echo pods.
fn json_echo(mesh: &Mesh) -> Seen {
    let seen: Seen = Arc::default();
    let failures: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    for pod in ["echo-1", "echo-2"] {
        for (port, backend) in [(9001u16, "b1"), (9002, "b2")] {
            let listener = mesh.pod(pod).listen(port).unwrap();
            let seen = seen.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    let seen = seen.clone();
                    let failures = failures.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let seen = seen.clone();
                            let failures = failures.clone();
                            async move {
                                Ok::<_, Infallible>(
                                    answer(req, backend, pod, &seen, &failures).await,
                                )
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(conn), service)
                            .await;
                    });
                }
            });
        }
    }
    seen
}

async fn answer(
    req: Request<Incoming>,
    backend: &str,
    pod: &str,
    seen: &Seen,
    failures: &Mutex<BTreeMap<String, u32>>,
) -> Response<Body> {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(prior)) => *prior = format!("{prior},{v}"),
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(v));
            }
        }
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    seen.lock().unwrap().push((
        backend.to_owned(),
        method.clone(),
        path.clone(),
        host.clone(),
    ));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    if let Some(ms) = query.get("delay").and_then(|d| d.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status: u16 = query
        .get("status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    if let (Some(n), Some(key)) = (
        query.get("fail").and_then(|n| n.parse::<u32>().ok()),
        query.get("key"),
    ) {
        let mut f = failures.lock().unwrap();
        let count = f.entry(key.clone()).or_default();
        *count += 1;
        if *count <= n {
            status = 500;
        }
    }
    let json = serde_json::json!({
        "backend": backend, "pod": pod, "method": method, "path": path,
        "query": query, "host": host, "headers": headers, "body": body,
    });
    let mut resp = Response::new(full(json.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut()
        .insert("x-backend-header", "from-backend".parse().unwrap());
    resp
}

/// The backend Services `b1` and `b2` (both selecting the echo pods).
const BACKENDS: &str = "apiVersion: v1
kind: Service
metadata: {name: b1, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 198.19.0.21
  ports: [{name: http, port: 80, targetPort: 9001}]
---
apiVersion: v1
kind: Service
metadata: {name: b2, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 198.19.0.22
  ports: [{name: http, port: 80, targetPort: 9002}]
";

/// Installs one HTTPRoute `name` on the echo Service (with the backend Services) and
/// waits until it is the waypoint's only route.
async fn install(s: &Setup, name: &str, rules: &str) {
    let yaml = format!(
        "{BACKENDS}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: demo}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: 80}}]
  rules:
{rules}"
    );
    std::fs::write(s.mesh.dir.path().join("manifests/routes.yaml"), yaml).unwrap();
    let key = format!("demo/{name}");
    eventually(&format!("route {name} at the waypoint"), || {
        let state = s.waypoint.state();
        let routes: Vec<String> = state.http_routes().map(|r| r.key.to_string()).collect();
        routes == [key.clone()]
            && ["b1", "b2"]
                .iter()
                .all(|b| state.services().any(|s| s.name.as_ref() == *b))
    })
    .await;
}

/// A response as the cases read it.
struct Got {
    status: u16,
    headers: http::HeaderMap,
    /// The echo's JSON, or `Null` when the waypoint answered.
    json: Value,
}

impl Got {
    fn backend(&self) -> &str {
        self.json["backend"].as_str().unwrap_or("-")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.json["headers"][name].as_str()
    }
}

/// One request to the echo Service from the sleep pod.
async fn send(s: &Setup, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut c = h1(&s.mesh, ECHO_VIP).await;
    c.ready().await.unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "echo.demo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c.send_request(req.body(full("")).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = text(resp).await;
    Got {
        status,
        headers,
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
    }
}

async fn get(s: &Setup, path: &str) -> Got {
    send(s, "GET", path, &[]).await
}

const TO_B1: &str = "backendRefs: [{name: b1, port: 80}]";
const TO_B2: &str = "backendRefs: [{name: b2, port: 80}]";

/// Matching and precedence: one case per rule of the specification's "Matches" and
/// "precedence" sections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_matching_and_precedence() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    let _seen = json_echo(&s.mesh);
    // (case, rules, [(method, path, headers, expected backend or status)])
    type Ask = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let table: Vec<(&str, String, Vec<Ask>)> = vec![
        (
            "pathprefix-matches-whole-segments",
            format!("  - matches: [{{path: {{type: PathPrefix, value: /a}}}}]\n    {TO_B1}\n"),
            vec![
                ("GET", "/a", &[], "b1"),
                ("GET", "/a/", &[], "b1"),
                ("GET", "/a/b", &[], "b1"),
                ("GET", "/ab", &[], "404"),
            ],
        ),
        (
            "pathprefix-trailing-slash-is-ignored",
            format!("  - matches: [{{path: {{type: PathPrefix, value: /a/}}}}]\n    {TO_B1}\n"),
            vec![
                ("GET", "/a", &[], "b1"),
                ("GET", "/a/x", &[], "b1"),
                ("GET", "/ax", &[], "404"),
            ],
        ),
        (
            "exact-path-wins-over-prefix",
            format!(
                "  - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    {TO_B1}\n  - matches: [{{path: {{type: Exact, value: /exact}}}}]\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/exact", &[], "b2"),
                ("GET", "/exactly", &[], "b1"),
                ("GET", "/exact/x", &[], "b1"),
            ],
        ),
        (
            "longest-prefix-wins",
            format!(
                "  - matches: [{{path: {{type: PathPrefix, value: /foo}}}}]\n    {TO_B1}\n  - matches: [{{path: {{type: PathPrefix, value: /foo/bar}}}}]\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/foo/bar/x", &[], "b2"),
                ("GET", "/foo/x", &[], "b1"),
                ("GET", "/foo/barista", &[], "b1"),
            ],
        ),
        (
            "regular-expression-path-matches-whole-path",
            format!(
                "  - matches: [{{path: {{type: RegularExpression, value: '/v[0-9]+/items'}}}}]\n    {TO_B1}\n"
            ),
            vec![
                ("GET", "/v12/items", &[], "b1"),
                ("GET", "/v12/items/x", &[], "404"),
                ("GET", "/vx/items", &[], "404"),
            ],
        ),
        (
            "method-wins-over-nothing-more-specific",
            format!(
                "  - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    {TO_B1}\n  - matches: [{{path: {{type: PathPrefix, value: /}}, method: POST}}]\n    {TO_B2}\n"
            ),
            vec![
                ("POST", "/x", &[], "b2"),
                ("GET", "/x", &[], "b1"),
                ("PUT", "/x", &[], "b1"),
            ],
        ),
        (
            "header-exact-and-case-insensitive-name",
            format!(
                "  - {TO_B1}\n  - matches: [{{headers: [{{name: X-Env, value: canary}}]}}]\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/", &[("x-env", "canary")], "b2"),
                ("GET", "/", &[("X-ENV", "canary")], "b2"),
                ("GET", "/", &[("x-env", "Canary")], "b1"),
                ("GET", "/", &[], "b1"),
            ],
        ),
        (
            "header-regular-expression",
            format!(
                "  - {TO_B1}\n  - matches: [{{headers: [{{type: RegularExpression, name: x-build, value: '[0-9]+-rc'}}]}}]\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/", &[("x-build", "42-rc")], "b2"),
                ("GET", "/", &[("x-build", "42")], "b1"),
            ],
        ),
        (
            "more-header-matches-win",
            format!(
                "  - matches: [{{headers: [{{name: x-a, value: '1'}}]}}]\n    {TO_B1}\n  - matches: [{{headers: [{{name: x-a, value: '1'}}, {{name: x-b, value: '1'}}]}}]\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/", &[("x-a", "1"), ("x-b", "1")], "b2"),
                ("GET", "/", &[("x-a", "1")], "b1"),
                ("GET", "/", &[("x-b", "1")], "404"),
            ],
        ),
        (
            "query-param-exact-and-regex",
            format!(
                "  - {TO_B1}\n  - matches: [{{queryParams: [{{name: tier, value: gold}}]}}]\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/?tier=gold", &[], "b2"),
                ("GET", "/?other=1&tier=gold", &[], "b2"),
                ("GET", "/?tier=silver", &[], "b1"),
            ],
        ),
        (
            "matches-within-a-rule-are-ored-fields-anded",
            format!(
                "  - matches:\n    - {{path: {{type: Exact, value: /one}}, method: GET}}\n    - {{path: {{type: Exact, value: /two}}}}\n    {TO_B2}\n"
            ),
            vec![
                ("GET", "/one", &[], "b2"),
                ("POST", "/one", &[], "404"),
                ("POST", "/two", &[], "b2"),
                ("GET", "/three", &[], "404"),
            ],
        ),
        (
            "no-match-is-404",
            format!("  - matches: [{{path: {{type: Exact, value: /only}}}}]\n    {TO_B1}\n"),
            vec![("GET", "/other", &[], "404"), ("GET", "/only", &[], "b1")],
        ),
    ];
    for (case, rules, asks) in table {
        install(&s, case, &rules).await;
        for (method, path, headers, want) in asks {
            let got = send(&s, method, path, headers).await;
            let what = if got.status == 200 {
                got.backend().to_owned()
            } else {
                got.status.to_string()
            };
            assert_eq!(what, want, "{case}: {method} {path} {headers:?}");
        }
    }
}

/// Header filters (rule and backend level) and rewrites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_header_filters_and_rewrites() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    let _seen = json_echo(&s.mesh);

    install(
        &s,
        "request-header-modifier",
        "  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: set-value}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    backendRefs: [{name: b1, port: 80}]
",
    )
    .await;
    let got = send(
        &s,
        "GET",
        "/",
        &[
            ("x-set", "client"),
            ("x-add", "client"),
            ("x-remove", "gone"),
            ("x-keep", "kept"),
        ],
    )
    .await;
    assert_eq!(got.header("x-set"), Some("set-value"), "set replaces");
    assert_eq!(got.header("x-add"), Some("client,added"), "add appends");
    assert_eq!(got.header("x-remove"), None, "remove removes");
    assert_eq!(got.header("x-keep"), Some("kept"), "others untouched");

    install(
        &s,
        "response-header-modifier",
        "  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-backend-header, value: replaced}]
        add: [{name: x-added, value: 'yes'}]
        remove: [content-type]
    backendRefs: [{name: b1, port: 80}]
",
    )
    .await;
    let got = get(&s, "/").await;
    assert_eq!(got.headers["x-backend-header"], "replaced");
    assert_eq!(got.headers["x-added"], "yes");
    assert!(!got.headers.contains_key("content-type"));

    install(
        &s,
        "backend-level-header-modifier",
        "  - backendRefs:
    - name: b1
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: b1}]}
",
    )
    .await;
    assert_eq!(get(&s, "/").await.header("x-backend"), Some("b1"));

    // URLRewrite: (rules, request path, expected path, expected host)
    let rewrites: Vec<(&str, &str, &str, &str, &str)> = vec![
        (
            "rewrite-full-path",
            "/full",
            "{type: ReplaceFullPath, replaceFullPath: /new}",
            "/full/x?q=1",
            "/new",
        ),
        (
            "rewrite-prefix",
            "/prefix/one",
            "{type: ReplacePrefixMatch, replacePrefixMatch: /one}",
            "/prefix/one/two",
            "/one/two",
        ),
        (
            "rewrite-prefix-to-root",
            "/prefix",
            "{type: ReplacePrefixMatch, replacePrefixMatch: /}",
            "/prefix/x",
            "/x",
        ),
        (
            "rewrite-prefix-exact-hit",
            "/prefix",
            "{type: ReplacePrefixMatch, replacePrefixMatch: /other}",
            "/prefix",
            "/other",
        ),
        (
            "rewrite-prefix-trailing-slash",
            "/prefix/",
            "{type: ReplacePrefixMatch, replacePrefixMatch: /other/}",
            "/prefix/x",
            "/other/x",
        ),
    ];
    for (case, prefix, path, ask, want) in rewrites {
        install(
            &s,
            case,
            &format!(
                "  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {path}}}}}]
    backendRefs: [{{name: b1, port: 80}}]
"
            ),
        )
        .await;
        let got = get(&s, ask).await;
        assert_eq!(got.json["path"], want, "{case}: {ask}");
    }
    install(
        &s,
        "rewrite-hostname",
        "  - filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example}}]
    backendRefs: [{name: b1, port: 80}]
",
    )
    .await;
    let got = get(&s, "/?q=1").await;
    assert_eq!(got.json["host"], "rewritten.example");
    assert_eq!(got.json["query"]["q"], "1", "the query is kept");
}

/// RequestRedirect: every status, scheme, hostname, port (with the default port left out
/// of `Location`) and both path forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_redirects() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    let _seen = json_echo(&s.mesh);
    // (case, requestRedirect, request path, status, Location)
    let table: Vec<(&str, &str, &str, u16, &str)> = vec![
        (
            "redirect-default-302",
            "{hostname: other.example}",
            "/a?x=1",
            302,
            "http://other.example/a?x=1",
        ),
        (
            "redirect-301",
            "{statusCode: 301}",
            "/a",
            301,
            "http://echo.demo/a",
        ),
        (
            "redirect-302",
            "{statusCode: 302}",
            "/a",
            302,
            "http://echo.demo/a",
        ),
        (
            "redirect-303",
            "{statusCode: 303}",
            "/a",
            303,
            "http://echo.demo/a",
        ),
        (
            "redirect-307",
            "{statusCode: 307}",
            "/a",
            307,
            "http://echo.demo/a",
        ),
        (
            "redirect-308",
            "{statusCode: 308}",
            "/a",
            308,
            "http://echo.demo/a",
        ),
        (
            "redirect-https-elides-443",
            "{scheme: https}",
            "/a",
            302,
            "https://echo.demo/a",
        ),
        (
            "redirect-https-other-port",
            "{scheme: https, port: 8443}",
            "/a",
            302,
            "https://echo.demo:8443/a",
        ),
        (
            "redirect-http-port",
            "{port: 8080}",
            "/a",
            302,
            "http://echo.demo:8080/a",
        ),
        (
            "redirect-http-80-elided",
            "{port: 80}",
            "/a",
            302,
            "http://echo.demo/a",
        ),
        (
            "redirect-full-path",
            "{path: {type: ReplaceFullPath, replaceFullPath: /moved}}",
            "/a/b?x=1",
            302,
            "http://echo.demo/moved?x=1",
        ),
    ];
    for (case, redirect, ask, status, location) in table {
        install(
            &s,
            case,
            &format!("  - filters: [{{type: RequestRedirect, requestRedirect: {redirect}}}]\n"),
        )
        .await;
        let got = get(&s, ask).await;
        assert_eq!(got.status, status, "{case}");
        assert_eq!(got.headers["location"], location, "{case}");
    }
    install(
        &s,
        "redirect-prefix",
        "  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
",
    )
    .await;
    let got = get(&s, "/old/page").await;
    assert_eq!(got.headers["location"], "http://echo.demo/new/page");
}

/// Weighted backends within tolerance, weight 0, an unresolved backend's share (500),
/// timeouts, retries and mirrors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_weights_timeouts_retries_mirrors() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    let seen = json_echo(&s.mesh);

    install(
        &s,
        "weights-80-20",
        "  - backendRefs: [{name: b1, port: 80, weight: 80}, {name: b2, port: 80, weight: 20}]\n",
    )
    .await;
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let n = 400;
    let mut c = h1(&s.mesh, ECHO_VIP).await;
    for _ in 0..n {
        c.ready().await.unwrap();
        let resp = c
            .send_request(
                Request::get("/")
                    .header("host", "echo.demo")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        let json: Value = serde_json::from_str(&text(resp).await).unwrap();
        *counts
            .entry(json["backend"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // 80% of 400 is 320; a binomial standard deviation is 8: allow 4 of them.
    let b1 = counts.get("b1").copied().unwrap_or(0);
    assert!((288..=352).contains(&b1), "{counts:?}");
    assert_eq!(b1 + counts.get("b2").copied().unwrap_or(0), n);

    install(
        &s,
        "weight-zero",
        "  - backendRefs: [{name: b1, port: 80, weight: 1}, {name: b2, port: 80, weight: 0}]\n",
    )
    .await;
    for _ in 0..30 {
        assert_eq!(get(&s, "/").await.backend(), "b1", "weight 0 takes nothing");
    }

    install(
        &s,
        "unresolved-backend-share",
        "  - backendRefs: [{name: b1, port: 80, weight: 1}, {name: missing, port: 80, weight: 1}]\n",
    )
    .await;
    let mut statuses: BTreeMap<u16, u32> = BTreeMap::new();
    for _ in 0..60 {
        *statuses.entry(get(&s, "/").await.status).or_default() += 1;
    }
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200, 500],
        "{statuses:?}"
    );
    assert!(
        statuses[&500] >= 15 && statuses[&200] >= 15,
        "about half each: {statuses:?}"
    );

    // Timeouts: the request timeout answers 504; `0s` disables it.
    install(
        &s,
        "request-timeout",
        "  - timeouts: {request: 300ms}\n    backendRefs: [{name: b1, port: 80}]\n",
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(get(&s, "/?delay=2000").await.status, 504);
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(get(&s, "/?delay=50").await.status, 200);
    install(
        &s,
        "backend-request-timeout",
        "  - timeouts: {request: 5s, backendRequest: 300ms}\n    backendRefs: [{name: b1, port: 80}]\n",
    )
    .await;
    assert_eq!(get(&s, "/?delay=2000").await.status, 504);
    install(
        &s,
        "timeout-zero-disables",
        "  - timeouts: {request: 0s}\n    backendRefs: [{name: b1, port: 80}]\n",
    )
    .await;
    assert_eq!(get(&s, "/?delay=600").await.status, 200);

    // Retries: codes and attempts; a request that keeps failing gets the last answer.
    install(
        &s,
        "retry-500",
        "  - retry: {codes: [500], attempts: 2, backoff: 10ms}\n    backendRefs: [{name: b1, port: 80}]\n",
    )
    .await;
    assert_eq!(
        get(&s, "/?fail=2&key=a").await.status,
        200,
        "two failures, two retries"
    );
    assert_eq!(
        get(&s, "/?fail=3&key=b").await.status,
        500,
        "three failures exhaust it"
    );
    assert_eq!(
        get(&s, "/?status=503").await.status,
        503,
        "other codes are not retried"
    );
    let before = seen.lock().unwrap().len();
    assert_eq!(get(&s, "/?status=503&x=1").await.status, 503);
    assert_eq!(seen.lock().unwrap().len(), before + 1, "sent once");

    // Mirrors: the copy reaches b2 (host marked `-shadow`), the answer is b1's.
    install(
        &s,
        "mirror",
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b2, port: 80}}}]
    backendRefs: [{name: b1, port: 80}]
",
    )
    .await;
    seen.lock().unwrap().clear();
    let got = get(&s, "/mirrored").await;
    assert_eq!((got.status, got.backend()), (200, "b1"));
    eventually("the mirrored copy at b2", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(b, _, p, h)| b == "b2" && p == "/mirrored" && h == "echo.demo-shadow")
    })
    .await;
    // `percent: 0` mirrors nothing.
    install(
        &s,
        "mirror-percent",
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b2, port: 80}, percent: 0}}]
    backendRefs: [{name: b1, port: 80}]
",
    )
    .await;
    seen.lock().unwrap().clear();
    for _ in 0..10 {
        get(&s, "/not-mirrored").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !seen.lock().unwrap().iter().any(|(b, ..)| b == "b2"),
        "percent 0 mirrors nothing"
    );
}

/// VirtualService fault injection by percentage: over many requests the share aborted
/// and the share delayed fall within a binomial tolerance, each counted by its flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_percentages_fall_within_tolerance() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    let _seen = json_echo(&s.mesh);
    let yaml = format!(
        "{BACKENDS}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: demo}}
spec:
  hosts: [echo]
  http:
  - name: flaky
    match: [{{uri: {{prefix: /abort}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 30}}}}}}
    route: [{{destination: {{host: b1}}}}]
  - name: slow
    fault: {{delay: {{fixedDelay: 5ms, percentage: {{value: 50}}}}}}
    route: [{{destination: {{host: b1}}}}]
"
    );
    std::fs::write(s.mesh.dir.path().join("manifests/routes.yaml"), yaml).unwrap();
    eventually("the VirtualService at the waypoint", || {
        s.waypoint
            .state()
            .http_routes()
            .any(|r| r.key.as_ref() == "demo/vs:echo")
    })
    .await;
    let n = 300;
    let mut c = h1(&s.mesh, ECHO_VIP).await;
    let mut aborted = 0;
    for i in 0..2 * n {
        let path = if i < n { "/abort" } else { "/delay" };
        c.ready().await.unwrap();
        let resp = c
            .send_request(
                Request::get(path)
                    .header("host", "echo.demo")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        if i < n && resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            aborted += 1;
        }
        let _ = text(resp).await;
    }
    // 30% of 300 is 90, standard deviation about 8: four of them either way.
    assert!((58..=122).contains(&aborted), "{aborted} of {n} aborted");
    // Each request is reported when its response ends: wait for the last.
    let flagged = |flag: &str| {
        sum(
            &s.waypoint.metrics_text(),
            "istio_requests_total",
            &[("response_flags", flag), ("reporter", "waypoint")],
        )
    };
    eventually("every request reported", || {
        sum(
            &s.waypoint.metrics_text(),
            "istio_requests_total",
            &[("reporter", "waypoint")],
        ) == f64::from(2 * n)
    })
    .await;
    assert_eq!(flagged("FI") as u32, aborted, "each abort counted with FI");
    // 50% of 300 is 150, standard deviation about 9.
    let delayed = flagged("DI");
    assert!(
        (114.0..=186.0).contains(&delayed),
        "{delayed} of {n} delayed"
    );
}
