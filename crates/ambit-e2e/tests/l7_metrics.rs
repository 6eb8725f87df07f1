//! Request metrics at the node proxies, without a waypoint, across network namespaces:
//! `sleep` on node-a calls an HTTP server in `echo-1` on node-b through the echo service;
//! namespace `demo` carries `ambit.io/l7-metrics: enabled`. node-a reports the requests
//! with `reporter="source"`, node-b with `reporter="destination"`, and whatever is not
//! HTTP passes through byte for byte and is counted at L4 only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::*;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = BoxBody<Bytes, Infallible>;

/// The port of the plain echo application (for what is not HTTP).
const RAW_PORT: u16 = 9000;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// `/status/NNN` answers NNN; `/chunked` answers with a streamed (chunked) body; gRPC
/// calls answer 200 with `grpc-status` from the method name (`/t.S/Code5` -> 5).
async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // The body is read whole first, so a request is complete before it is answered.
    let _ = req.into_body().collect().await;
    if grpc {
        let code = path.rsplit_once("/Code").map_or("0", |(_, c)| c).to_owned();
        let body = Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
            .with_trailers(async move {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", code.parse().unwrap());
                Some(Ok(t))
            })
            .boxed();
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap());
    }
    if path == "/chunked" {
        let chunks = (0..3).map(|_| Ok(Frame::data(Bytes::from_static(b"0123456789"))));
        return Ok(Response::new(
            StreamBody::new(tokio_stream::iter(chunks)).boxed(),
        ));
    }
    let code: u16 = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse().ok())
        .unwrap_or(200);
    Ok(Response::builder()
        .status(code)
        .body(full(format!("status {code}\n")))
        .unwrap())
}

/// An HTTP/1.1 and HTTP/2 (prior knowledge) server on the app port of `echo-1`.
fn http_server(mesh: &Mesh) {
    let listener = mesh.pod("echo-1").listen(APP_PORT).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut first = [0u8; 3];
                for _ in 0..100 {
                    if conn.peek(&mut first).await.unwrap_or(0) >= 3 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let service = hyper::service::service_fn(answer);
                let io = TokioIo::new(conn);
                if &first == b"PRI" {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .pipeline_flush(true)
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
}

/// Requests recorded by `node` with `reporter` and these labels.
async fn requests(mesh: &Mesh, node: &str, labels: &[(&str, &str)]) -> f64 {
    sum(&mesh.metrics(node).await, "istio_requests_total", labels)
}

/// Waits until both node proxies report `want` requests with these labels (each with its
/// own reporter), and checks the labels every request carries.
async fn expect_requests(mesh: &Mesh, labels: &[(&str, &str)], want: f64) {
    for (node, reporter) in [("node-a", "source"), ("node-b", "destination")] {
        let mut all = vec![
            ("reporter", reporter),
            ("source_workload", "sleep"),
            ("destination_workload", "echo-1"),
            ("destination_service", "echo.demo.svc.cluster.local"),
            ("connection_security_policy", "mutual_tls"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/demo/sa/sleep",
            ),
        ];
        all.extend_from_slice(labels);
        let start = std::time::Instant::now();
        loop {
            let have = requests(mesh, node, &all).await;
            if have == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{node}: {have} requests with {all:?}, expected {want}\n{}",
                mesh.metrics(node).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn enable(mesh: &Mesh) {
    mesh.write_manifests_edited(true, |m| {
        m.replace(
            "metadata: {name: demo, labels:",
            "metadata: {name: demo, annotations: {ambit.io/l7-metrics: enabled}, labels:",
        )
    });
    for node in ["node-a", "node-b"] {
        let proxy = mesh.node(node);
        eventually("the pods' request metrics turned on", || {
            let state = proxy.store().load();
            let on = |name: &str| {
                state
                    .workloads()
                    .any(|w| w.name.as_ref() == name && w.profile.l7_metrics)
            };
            on("sleep") && on("echo-1")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_proxies_report_requests_without_a_waypoint() {
    let (collector, endpoint) = Collector::start().await;
    let mesh = Mesh::start_with(cast(), |c| c.otlp_endpoint = Some(endpoint.clone())).await;
    http_server(&mesh);
    mesh.echo_app("echo-1", RAW_PORT);
    let sleep = mesh.pod("sleep");

    // Off by default: a request is counted at L4 only.
    let tcp = sleep.connect(ECHO_VIP).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(path)
            .header("host", "echo.demo")
            .body(full(""))
            .unwrap()
    };
    send.ready().await.unwrap();
    let resp = send.send_request(get("/status/200")).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop((send, resp));
    let page = mesh.metrics("node-b").await;
    assert_eq!(sum(&page, "istio_requests_total", &[]), 0.0, "{page}");

    enable(&mesh).await;

    // HTTP/1.1 keep-alive: three requests on one connection, one with a chunked request
    // body and one with a chunked response.
    let tcp = sleep.connect(ECHO_VIP).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap();
    let resp = send.send_request(get("/status/200")).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let chunks = (0..4).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"part"))));
    let post = Request::post("/status/201")
        .header("host", "echo.demo")
        .body(StreamBody::new(tokio_stream::iter(chunks)).boxed())
        .unwrap();
    send.ready().await.unwrap();
    let resp = send.send_request(post).await.unwrap();
    assert_eq!(resp.status(), 201);
    resp.into_body().collect().await.unwrap();
    send.ready().await.unwrap();
    let resp = send.send_request(get("/chunked")).await.unwrap();
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len(),
        30
    );
    drop(send);
    expect_requests(
        &mesh,
        &[("response_code", "201"), ("request_protocol", "http")],
        1.0,
    )
    .await;
    expect_requests(
        &mesh,
        &[("response_code", "200"), ("request_protocol", "http")],
        2.0,
    )
    .await;

    // Pipelining: three requests in one write, then their three responses in order.
    let mut conn = sleep.connect(ECHO_VIP).await.unwrap();
    conn.write_all(
        b"GET /status/204 HTTP/1.1\r\nHost: echo\r\n\r\n\
          HEAD /status/404 HTTP/1.1\r\nHost: echo\r\n\r\n\
          GET /status/503 HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&back);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 3, "{text}");
    for code in ["204", "404", "503"] {
        expect_requests(&mesh, &[("response_code", code)], 1.0).await;
    }

    // HTTP/2: five concurrent streams on one connection, and two gRPC calls.
    let tcp = sleep.connect(ECHO_VIP).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Spawned, so the five streams are open on the connection at once.
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let req = Request::get("http://echo.demo/status/202")
                    .body(full(""))
                    .unwrap();
                send.ready().await.unwrap();
                let resp = send.send_request(req).await.unwrap();
                let status = resp.status();
                resp.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 202);
    }
    for (method, want) in [("/t.S/Code0", "0"), ("/t.S/Code5", "5")] {
        let req = Request::post(format!("http://echo.demo{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let resp = send.clone().send_request(req).await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], want);
    }
    drop(send);
    expect_requests(
        &mesh,
        &[("response_code", "202"), ("request_protocol", "http")],
        5.0,
    )
    .await;
    for code in ["0", "5"] {
        expect_requests(
            &mesh,
            &[
                ("response_code", "200"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", code),
            ],
            1.0,
        )
        .await;
    }
    // A request in a sampled trace is a span at each node proxy, both children of the
    // caller's span; one not sampled is none.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let tcp = sleep.connect(ECHO_VIP).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for flags in ["01", "00"] {
        let req = Request::get("/status/200?q=1")
            .header("host", "echo.demo")
            .header("traceparent", format!("00-{trace}-{caller}-{flags}"))
            .body(full(""))
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    drop(send);
    eventually("a span from each node proxy", || {
        collector.spans.lock().unwrap().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = collector.spans.lock().unwrap().clone();
    assert_eq!(
        spans.len(),
        2,
        "only the sampled request, once per node: {spans:#?}"
    );
    let kind = |k: ambit_proto::otlp::span::SpanKind| {
        spans
            .iter()
            .find(|s| s.kind == k as i32)
            .unwrap_or_else(|| panic!("no {k:?} span in {spans:#?}"))
    };
    let client = kind(ambit_proto::otlp::span::SpanKind::Client);
    let server = kind(ambit_proto::otlp::span::SpanKind::Server);
    for (span, reporter, node) in [
        (client, "source", "node-a"),
        (server, "destination", "node-b"),
    ] {
        assert_eq!(hex(&span.trace_id), trace);
        assert_eq!(
            hex(&span.parent_span_id),
            caller,
            "the caller's span is the parent"
        );
        assert_ne!(hex(&span.span_id), caller);
        assert_eq!(span.name, "echo.demo.svc.cluster.local/status/200");
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert_eq!(span_tag(span, "reporter"), reporter);
        assert_eq!(span_tag(span, "node_id"), format!("ambit-node~{node}"));
        assert_eq!(span_tag(span, "http.method"), "GET");
        assert_eq!(span_tag(span, "http.status_code"), "200");
        assert_eq!(
            span_tag(span, "http.url"),
            "http://echo.demo.svc.cluster.local/status/200?q=1"
        );
        assert_eq!(
            span_tag(span, "peer.address"),
            "spiffe://cluster.local/ns/demo/sa/sleep"
        );
    }
    assert_eq!(span_tag(client, "istio.canonical_service"), "sleep");
    assert_eq!(span_tag(server, "istio.canonical_service"), "echo");
    // The console lists the traced request on the workload behind the service.
    let console = mesh.cp.console_addr().unwrap();
    eventually_async("the node proxies' trace on the console", || async {
        let (_, body) = ambit_admin::get(console, "/api/workload?namespace=demo&name=echo-1")
            .await
            .unwrap();
        let w: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        w["traces"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["trace_id"] == trace && t["path"] == "/status/200?q=1")
        })
    })
    .await;

    let histogram = sum(
        &mesh.metrics("node-b").await,
        "istio_request_duration_milliseconds_count",
        &[("reporter", "destination")],
    );
    let total = requests(&mesh, "node-b", &[("reporter", "destination")]).await;
    assert_eq!(histogram, total, "every request has a duration");

    // Not HTTP: TLS from the application, binary, half a request. Each passes through
    // byte for byte and adds no request.
    let before_a = requests(&mesh, "node-a", &[]).await;
    let before_b = requests(&mesh, "node-b", &[]).await;
    let raw = SocketAddr::new(mesh.addr("echo-1", RAW_PORT).ip(), RAW_PORT);
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend(pattern(1, 4000));
    let half = b"GET /half HTTP/1.1\r\nHost: echo\r\nX-Long: ".to_vec();
    let mut pri = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    pri.extend(pattern(3, 3000));
    for payload in [hello, pattern(2, 100_000), half, pri] {
        let back = exchange(sleep, raw, &payload).await.unwrap();
        assert!(
            back == payload,
            "{} bytes changed in passing",
            payload.len()
        );
    }
    let page = mesh.metrics("node-b").await;
    assert!(
        sum(
            &page,
            "ambit_node_sniffed_connections_total",
            &[("protocol", "opaque")]
        ) >= 3.0,
        "{page}"
    );
    assert_eq!(requests(&mesh, "node-a", &[]).await, before_a);
    assert_eq!(requests(&mesh, "node-b", &[]).await, before_b);
}
