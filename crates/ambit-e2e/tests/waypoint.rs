//! The waypoint across network namespaces: a client pod on node-a, the echo service's
//! pod on node-b, both served by real node proxies; the waypoint runs in a pod of its
//! own on node-a (not captured), with its identity from the control plane. Requests go
//! client -> node-a proxy -> (HBONE) waypoint -> (HBONE, the waypoint's identity)
//! node-b proxy -> echo.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit_e2e::*;
use ambit_hbone::socket::Netns;
use ambit_waypoint::{Waypoint, WaypointConfig};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAYPOINT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/demo/sa/waypoint";
const SLEEP_ID: &str = "spiffe://cluster.local/ns/demo/sa/sleep";

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// The waypoint's Gateway, its Service and its pod, as `istioctl waypoint apply` and a
/// cluster would make them.
const WAYPOINT_YAML: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec:
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  clusterIP: 198.19.0.20
  ports: [{name: mesh, port: 15008, targetPort: 15008}, {name: status-port, port: 15021}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: demo
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: node-a, serviceAccountName: waypoint, containers: [{name: waypoint, ports: [{containerPort: 15008}]}]}
status: {podIP: 198.18.1.30, phase: Running, conditions: [{type: Ready, status: 'True'}]}
";

struct Setup {
    mesh: Mesh,
    waypoint: Waypoint,
}

/// The mesh with the echo service bound to a running waypoint, and an HTTP echo server
/// in echo-1.
async fn setup() -> Setup {
    setup_with("service", false).await
}

/// The mesh with a running waypoint that takes `takes` (`istio.io/waypoint-for`),
/// bound through namespace demo's label (`by_namespace`) or the echo Service's.
async fn setup_with(takes: &str, by_namespace: bool) -> Setup {
    setup_with_pods(takes, by_namespace, Vec::new()).await
}

/// As [`setup_with`], with more pods in the mesh.
async fn setup_with_pods(takes: &str, by_namespace: bool, extra: Vec<PodSpec>) -> Setup {
    setup_tuned(takes, by_namespace, extra, |_| {}).await
}

/// As [`setup_with_pods`], with the waypoint's configuration adjusted by `tune`.
async fn setup_tuned(
    takes: &str,
    by_namespace: bool,
    extra: Vec<PodSpec>,
    tune: impl Fn(&mut WaypointConfig),
) -> Setup {
    setup_full(takes, by_namespace, extra, tune, |_| {}).await
}

/// [`setup_tuned`] that also tunes the node proxies.
async fn setup_full(
    takes: &str,
    by_namespace: bool,
    extra: Vec<PodSpec>,
    tune: impl Fn(&mut WaypointConfig),
    tune_nodes: impl Fn(&mut ambit_node::NodeConfig),
) -> Setup {
    logs::init();
    let mut specs = cast();
    specs.extend(extra);
    specs.push(PodSpec {
        name: "waypoint-0",
        namespace: "demo",
        service_account: "waypoint",
        app: "waypoint",
        node: "node-a",
        ip: WAYPOINT_IP,
        enrolled: false,
        // Written below, with the waypoint's labels.
        in_model: false,
    });
    let mesh = Mesh::start_with(specs, tune_nodes).await;
    let gateway = if takes == "service" {
        WAYPOINT_YAML.to_owned()
    } else {
        WAYPOINT_YAML.replace(
            "metadata: {name: waypoint, namespace: demo}\nspec:\n  gatewayClassName",
            &format!(
                "metadata: {{name: waypoint, namespace: demo, labels: {{istio.io/waypoint-for: {takes}}}}}\nspec:\n  gatewayClassName"
            ),
        )
    };
    assert_eq!(takes == "service", gateway == WAYPOINT_YAML);
    std::fs::write(mesh.dir.path().join("manifests/waypoint.yaml"), gateway).unwrap();
    let path = mesh.dir.path().join("manifests/mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let bound = if by_namespace {
        text.replace(
            "metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
        )
    } else {
        text.replace(
            "metadata: {name: echo, namespace: demo}",
            "metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}",
        )
    };
    assert_ne!(text, bound);
    std::fs::write(&path, bound).unwrap();
    let node = mesh.node("node-a");
    eventually("the waypoint's pod and Gateway at node-a", || {
        let state = node.store().load();
        state.workloads().any(|w| w.name.as_ref() == "waypoint-0")
            && state.services().any(|s| s.name.as_ref() == "waypoint")
    })
    .await;
    // What binds depends on what the waypoint takes; wait for the control plane to have
    // published the last of it.
    let (service, workload) = match takes {
        "service" => (true, false),
        "workload" => (false, by_namespace),
        "all" => (true, by_namespace),
        _ => (false, false),
    };
    eventually("the bindings at node-a", || {
        let state = node.store().load();
        let svc = state
            .services()
            .any(|s| s.name.as_ref() == "echo" && s.waypoint.is_some());
        let wl = state
            .workloads()
            .any(|w| w.name.as_ref() == "echo-1" && w.waypoint.is_some());
        svc == service && wl == workload
    })
    .await;

    let mut config = WaypointConfig::new(mesh.node_config("node-a").xds, "demo", "waypoint");
    config.netns = Some(Netns::open(mesh.pod("waypoint-0").netns_path()).unwrap());
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.readiness_addr = "127.0.0.1:0".parse().unwrap();
    config.limits.header_timeout = Duration::from_secs(1);
    config.limits.connect_timeout = Duration::from_secs(2);
    tune(&mut config);
    let waypoint = Waypoint::start(config).await.unwrap();
    eventually("the waypoint to be ready", || waypoint.is_ready()).await;
    eventually("the bindings at the waypoint", || {
        let state = waypoint.state();
        let svc = state
            .services()
            .any(|s| s.name.as_ref() == "echo" && s.waypoint.is_some());
        let wl = state
            .workloads()
            .any(|w| w.name.as_ref() == "echo-1" && w.waypoint.is_some());
        svc == service && wl == workload
    })
    .await;
    http_echo(&mesh, "echo-1");
    Setup { mesh, waypoint }
}

/// An HTTP/1.1 and HTTP/2 (prior knowledge) echo server on the app port of `pod`.
fn http_echo(mesh: &Mesh, pod: &str) {
    let listener = mesh.pod(pod).listen(APP_PORT).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, peer)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_echo(conn, peer));
        }
    });
}

async fn serve_echo(conn: TcpStream, peer: SocketAddr) {
    let mut first = [0u8; 3];
    for _ in 0..100 {
        if conn.peek(&mut first).await.unwrap_or(0) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let service = hyper::service::service_fn(move |req| echo(peer, req));
    let io = TokioIo::new(conn);
    if &first == b"PRI" {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades()
            .await;
    }
}

/// Answers what it saw: the request line, the client, the forwarding headers and the
/// body's size; `/stream?n=N` streams N chunks of 1,000 bytes; gRPC requests get their
/// body back with a status in the trailers; `/ws` upgrades and echoes raw bytes.
async fn echo(peer: SocketAddr, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if req.uri().path() == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(""))
            .unwrap();
        return Ok(resp);
    }
    if h("content-type").starts_with("application/grpc") && req.uri().path().ends_with("/Chat") {
        // Bidirectional streaming: every message back as it arrives, then status 0.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data()
                    && tx.send(Ok(Frame::data(data))).await.is_err()
                {
                    return;
                }
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap());
    }
    if h("content-type").starts_with("application/grpc") {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "7".parse().unwrap());
        trailers.insert("grpc-message", "denied by the test".parse().unwrap());
        let body = Full::new(body)
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap());
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if req.uri().path() == "/stream" {
        let n: usize = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("n="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let chunks =
            (0..n).map(|i| Ok(Frame::data(Bytes::from(vec![b'a' + (i % 26) as u8; 1000]))));
        let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
        return Ok(Response::new(body));
    }
    let line = format!(
        "method={}\nversion={:?}\npath={}\nclient={}\nhost={}\nxff={}\nrequest-id={}\ntraceparent={}\nexpect={}\nconnection={}\nauthorization={}\nx-jwt-sub={}\nx-authz-user={}\nx-secret={}\n",
        req.method(),
        req.version(),
        req.uri().path(),
        peer.ip(),
        if req.version() == http::Version::HTTP_2 {
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default()
        } else {
            h("host")
        },
        h("x-forwarded-for"),
        h("x-request-id"),
        h("traceparent"),
        h("expect"),
        h("connection"),
        h("authorization"),
        h("x-jwt-sub"),
        h("x-authz-user"),
        h("x-secret"),
    );
    // Counted as it streams, never held (a gigabyte passes through here).
    let mut body = req.into_body();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            len += d.len();
        }
    }
    Ok(Response::new(full(format!("{line}body={len}\n"))))
}

/// A field of the echo's answer.
fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

async fn h1(mesh: &Mesh, to: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let tcp = mesh.pod("sleep").connect(to).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

async fn h2(mesh: &Mesh, to: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let tcp = mesh.pod("sleep").connect(to).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

async fn text(resp: Response<Incoming>) -> String {
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the body arrives")
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_and_chunked_bodies_cross_the_waypoint() {
    let s = setup().await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;

    // Two requests on one keep-alive connection; the second with a chunked body.
    let resp = send
        .send_request(
            Request::get("/first")
                .header("host", "echo.demo")
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t = text(resp).await;
    assert_eq!(field(&t, "method"), "GET");
    assert_eq!(field(&t, "version"), "HTTP/1.1");
    assert_eq!(field(&t, "path"), "/first");
    assert_eq!(field(&t, "host"), "echo.demo");
    // The endpoint sees the waypoint's address (its node proxy keeps the source of the
    // tunnel), and the client in x-forwarded-for.
    assert_eq!(field(&t, "client"), WAYPOINT_IP.to_string());
    assert_eq!(field(&t, "xff"), s.mesh.spec("sleep").ip.to_string());
    assert_eq!(field(&t, "request-id").len(), 36, "{t}");
    let tp = field(&t, "traceparent");
    assert!(
        tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{tp}"
    );
    assert!(
        !tp.contains("b7ad6b7169203331"),
        "the waypoint's own span: {tp}"
    );

    send.ready().await.unwrap();
    let chunks = (0..3).map(|_| Ok(Frame::data(Bytes::from_static(&[7u8; 5000]))));
    let resp = send
        .send_request(
            Request::post("/second")
                .header("host", "echo.demo")
                .header("expect", "100-continue")
                .body(StreamBody::new(tokio_stream::iter(chunks)).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    let t = text(resp).await;
    assert_eq!(field(&t, "method"), "POST");
    assert_eq!(field(&t, "body"), "15000");
    assert_eq!(
        field(&t, "expect"),
        "",
        "the waypoint answers 100-continue itself"
    );

    // A streamed (chunked) response.
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/stream?n=300")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let t = text(resp).await;
    assert_eq!(t.len(), 300_000);

    // The destination's node proxy authenticated the waypoint, not the client (its
    // access-log line comes when the pooled connection closes; the metric at once).
    let node_b = s.mesh.metrics("node-b").await;
    let from_waypoint = [
        ("reporter", "destination"),
        ("source_principal", WAYPOINT_ID),
        ("destination_workload", "echo-1"),
    ];
    assert_eq!(
        sum(
            &node_b,
            "istio_tcp_connections_opened_total",
            &from_waypoint
        ),
        1.0,
        "{node_b}"
    );
    assert_eq!(
        sum(
            &node_b,
            "istio_tcp_connections_opened_total",
            &[("source_principal", SLEEP_ID)]
        ),
        0.0,
        "the client's identity never reaches the endpoint's node: {node_b}"
    );
    // The waypoint's own line per request.
    let line = logs::wait_access("the waypoint's request line", |v| v["path"] == "/second").await;
    assert_eq!(line["method"], "POST");
    assert_eq!(line["status"], 200);
    assert_eq!(line["request_bytes"], 15000);
    assert_eq!(line["src.identity"], SLEEP_ID);
    assert_eq!(line["src.workload"], "demo/sleep");
    assert_eq!(line["dst.workload"], "demo/echo-1");
    assert_eq!(line["dst.service"], "echo.demo.svc.cluster.local");
    assert_eq!(line["flags"], "-");

    let page = s.waypoint.metrics_text();
    let labels = [
        ("reporter", "waypoint"),
        ("response_code", "200"),
        ("request_protocol", "http"),
        ("source_workload", "sleep"),
        ("source_principal", SLEEP_ID),
        ("destination_workload", "echo-1"),
        ("destination_service", "echo.demo.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(sum(&page, "istio_requests_total", &labels), 3.0, "{page}");
    assert_eq!(
        sum(&page, "istio_request_duration_milliseconds_count", &labels),
        3.0
    );
    assert_eq!(sum(&page, "istio_request_bytes_sum", &labels), 15000.0);
    assert!(sum(&page, "istio_response_bytes_sum", &labels) >= 300_000.0);
    // One pooled connection carried all three.
    assert_eq!(
        sum(&page, "ambit_waypoint_upstream_connections", &[]),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_cross_the_waypoint_with_trailers_and_status() {
    let s = setup().await;
    let mut send = h2(&s.mesh, ECHO_VIP).await;
    let resp = send
        .send_request(
            Request::get("http://echo.demo/over-h2")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t = text(resp).await;
    assert_eq!(field(&t, "version"), "HTTP/2.0");
    assert_eq!(field(&t, "host"), "echo.demo");
    assert_eq!(field(&t, "path"), "/over-h2");

    // gRPC: the body both ways, the status in the trailers.
    let resp = send
        .send_request(
            Request::post("http://echo.demo/test.Echo/Say")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(full(&b"\0\0\0\0\x05hello"[..]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "7");
    assert_eq!(trailers["grpc-message"], "denied by the test");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");

    let page = s.waypoint.metrics_text();
    assert_eq!(
        sum(
            &page,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "7"),
                ("response_code", "200"),
            ]
        ),
        1.0,
        "{page}"
    );
    assert_eq!(
        sum(
            &page,
            "istio_requests_total",
            &[("request_protocol", "http"), ("grpc_response_status", "-")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_passes_through() {
    let s = setup().await;
    let mut conn = s.mesh.pod("sleep").connect(ECHO_VIP).await.unwrap();
    conn.write_all(
        b"GET /ws HTTP/1.1\r\nHost: echo.demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // After the switch, bytes flow both ways untouched.
    for msg in [&b"\x81\x05hello"[..], b"anything at all"] {
        conn.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
}

/// Reads an HTTP/1.1 response head (through the blank line).
async fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte))
            .await
            .expect("a response head")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_slow_clients_get_a_status_or_a_close() {
    let s = setup().await;
    // A bad request line: 400.
    let mut conn = s.mesh.pod("sleep").connect(ECHO_VIP).await.unwrap();
    conn.write_all(b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    // Headers beyond the limit: 431.
    let mut conn = s.mesh.pod("sleep").connect(ECHO_VIP).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let _ = conn.write_all(big.as_bytes()).await;
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    // A client that never finishes its headers is closed after the header timeout.
    let mut conn = s.mesh.pod("sleep").connect(ECHO_VIP).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow client is still connected");

    // Invalid HTTP/2: a preface followed by garbage frames; the connection is closed.
    let mut conn = s.mesh.pod("sleep").connect(ECHO_VIP).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the h2 connection with garbage frames stays open"
    );

    // The waypoint still serves.
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let resp = send
        .send_request(
            Request::get("/after")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_503_with_envoys_flag() {
    let s = setup().await;
    // Nothing listens on the echo's port 8081 behind a second service port.
    add_echo_port(&s, 81, 8081).await;
    let dead = SocketAddr::new(ECHO_VIP.ip(), 81);
    let mut send = h1(&s.mesh, dead).await;
    let resp = send
        .send_request(
            Request::get("/dead")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let (status, body) = (resp.status(), text(resp).await);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("upstream connect error"), "{body}");
    let line = logs::wait_access("the failed request", |v| v["path"] == "/dead").await;
    assert_eq!(line["flags"], "UF");
    let page = s.waypoint.metrics_text();
    assert_eq!(
        sum(
            &page,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UF")]
        ),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policies_allow_and_deny_by_method_path_header_and_principal() {
    let s = setup().await;
    std::fs::write(
        s.mesh.dir.path().join("manifests/policies.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]
    to: [{operation: {methods: [GET, POST], paths: ['/api/*']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-writes, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {methods: [POST]}}]
    when: [{key: 'request.headers[x-tenant]', notValues: [admin]}]
",
    )
    .unwrap();
    eventually("both policies at the waypoint", || {
        s.waypoint.state().targeted_policies().count() == 2
    })
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut ask = async |method: &str, path: &str, tenant: Option<&str>| {
        send.ready().await.unwrap();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "echo.demo");
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        let resp = send
            .send_request(req.body(full("")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        (status, text(resp).await)
    };
    assert_eq!(ask("GET", "/api/items", None).await.0, StatusCode::OK);
    let (status, body) = ask("GET", "/admin", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no ALLOW matches the path");
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(
        ask("POST", "/api/items", None).await.0,
        StatusCode::FORBIDDEN,
        "the Gateway-wide DENY of POST"
    );
    assert_eq!(
        ask("POST", "/api/items", Some("admin")).await.0,
        StatusCode::OK,
        "the DENY spares x-tenant: admin"
    );
    let line = logs::wait_access("the denied POST", |v| {
        v["method"] == "POST" && v["status"] == 403
    })
    .await;
    assert!(
        line["authz"]
            .as_str()
            .is_some_and(|a| a.contains("denied by demo/no-writes")),
        "{line}"
    );
    // Each decision is counted under the policy that made it (the console's policy page
    // reads these).
    let page = s.waypoint.metrics_text();
    let decided = |policy: &str, decision: &str| {
        sum(
            &page,
            "ambit_waypoint_policy_decisions_total",
            &[("policy", policy), ("decision", decision)],
        )
    };
    assert_eq!(decided("demo/reads", "allow"), 2.0, "{page}");
    assert_eq!(decided("demo/no-writes", "deny"), 1.0, "{page}");
    assert_eq!(decided("no-allow-matched", "deny"), 1.0, "{page}");

    // By principal: an ALLOW that names only another caller denies sleep.
    std::fs::write(
        s.mesh.dir.path().join("manifests/policies.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/other]}}]}]
",
    )
    .unwrap();
    eventually("the new policy at the waypoint", || {
        let state = s.waypoint.state();
        state.targeted_policies().count() == 1
            && state.targeted_policies().all(|p| {
                p.rules
                    .iter()
                    .any(|r| format!("{r:?}").contains("sa/other"))
            })
    })
    .await;
    assert_eq!(
        ask("GET", "/api/items", None).await.0,
        StatusCode::FORBIDDEN
    );
    let page = s.waypoint.metrics_text();
    assert_eq!(
        sum(
            &page,
            "istio_requests_total",
            &[("response_code", "403"), ("reporter", "waypoint")]
        ),
        3.0,
        "{page}"
    );
}

/// Who answered a GET to `to` saw as its client: the waypoint's address when the request
/// crossed it, sleep's when it went straight to echo-1's node.
async fn seen_client(mesh: &Mesh, to: SocketAddr) -> String {
    let mut send = h1(mesh, to).await;
    let resp = send
        .send_request(
            Request::get("/who")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    field(&text(resp).await, "client").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_for_decides_whether_service_and_pod_addressed_traffic_cross_it() {
    let via = WAYPOINT_IP.to_string();
    let sleep = "198.18.1.10".to_owned();
    // (takes, through the VIP, through the pod IP)
    for (takes, vip, pod) in [
        ("service", &via, &sleep),
        ("workload", &sleep, &via),
        ("all", &via, &via),
        ("none", &sleep, &sleep),
    ] {
        let s = setup_with(takes, true).await;
        let pod_addr = s.mesh.addr("echo-1", APP_PORT);
        assert_eq!(
            &seen_client(&s.mesh, ECHO_VIP).await,
            vip,
            "{takes}: the VIP"
        );
        assert_eq!(
            &seen_client(&s.mesh, pod_addr).await,
            pod,
            "{takes}: the pod IP"
        );
        if pod == &via {
            // Pod-addressed at the waypoint: no service, the workload as destination.
            let page = s.waypoint.metrics_text();
            assert_eq!(
                sum(
                    &page,
                    "istio_requests_total",
                    &[
                        ("destination_workload", "echo-1"),
                        ("destination_service", "unknown")
                    ]
                ),
                1.0,
                "{takes}: {page}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_that_is_down_refuses_and_is_never_bypassed() {
    let s = setup().await;
    assert_eq!(
        seen_client(&s.mesh, ECHO_VIP).await,
        WAYPOINT_IP.to_string()
    );
    let Setup { mesh, waypoint } = s;
    waypoint.shutdown(Duration::from_millis(100)).await;
    // Its pod still counts as ready: the node proxy keeps sending bound traffic there,
    // and it fails rather than going around the waypoint.
    for _ in 0..3 {
        let tcp = mesh.pod("sleep").connect(ECHO_VIP).await;
        let answered = match tcp {
            Err(_) => false,
            Ok(tcp) => {
                let handshake = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp));
                match handshake.await {
                    Err(_) => false,
                    Ok((mut send, conn)) => {
                        tokio::spawn(conn);
                        let resp = tokio::time::timeout(
                            Duration::from_secs(10),
                            send.send_request(
                                Request::get("/around")
                                    .header("host", "echo.demo")
                                    .body(full(""))
                                    .unwrap(),
                            ),
                        )
                        .await
                        .expect("an answer or a close within 10 s");
                        resp.is_ok()
                    }
                }
            }
        };
        assert!(!answered, "a request reached echo-1 with the waypoint down");
    }
    let node_a = mesh.metrics("node-a").await;
    assert!(
        sum(&node_a, "ambit_node_connect_failures_total", &[]) >= 1.0,
        "the refusals are counted: {node_a}"
    );
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_upload_streams_through_with_bounded_memory() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 64 * 1024;
    let s = setup().await;
    let mut send = h2(&s.mesh, ECHO_VIP).await;
    let before = rss();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    let chunks =
        (0..TOTAL / CHUNK as u64).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone())));
    let started = std::time::Instant::now();
    let resp = send
        .send_request(
            Request::post("http://echo.demo/upload")
                .body(StreamBody::new(tokio_stream::iter(chunks)).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    let t = text(resp).await;
    sampler.abort();
    assert_eq!(field(&t, "body"), TOTAL.to_string());
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    eprintln!(
        "1 GiB through the waypoint in {:.1} s; resident memory grew by at most {} MiB",
        started.elapsed().as_secs_f64(),
        grew >> 20
    );
    // Client, both node proxies, the waypoint and the server all live in this process:
    // a copy of the body anywhere would be hundreds of MiB.
    assert!(grew < 128 << 20, "memory grew by {} MiB", grew >> 20);
    let line = logs::wait_access("the upload", |v| v["path"] == "/upload").await;
    assert_eq!(line["request_bytes"], TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_only_gateway_closes_the_way_around_it() {
    let s = setup().await;
    let pod_addr = s.mesh.addr("echo-1", APP_PORT);
    // The Service is bound, the pod is not: pod-addressed traffic skips the waypoint.
    assert_eq!(seen_client(&s.mesh, pod_addr).await, "198.18.1.10");

    let path = s.mesh.dir.path().join("manifests/waypoint.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let only = text.replace(
        "metadata: {name: waypoint, namespace: demo}\nspec:\n  gatewayClassName",
        "metadata: {name: waypoint, namespace: demo, annotations: {ambit.io/waypoint-only: 'true'}}\nspec:\n  gatewayClassName",
    );
    assert_ne!(text, only);
    std::fs::write(&path, only).unwrap();
    let node_b = s.mesh.node("node-b");
    eventually("echo-1 to list the waypoint-only policy at node-b", || {
        let state = node_b.store().load();
        state.policy("demo/ambit-waypoint-only-waypoint").is_some()
            && state.workloads().any(|w| {
                w.name.as_ref() == "echo-1"
                    && w.profile
                        .authorization_policies
                        .iter()
                        .any(|p| p.as_ref() == "demo/ambit-waypoint-only-waypoint")
            })
    })
    .await;

    // Around the waypoint: refused at echo-1's node.
    let around = tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = s.mesh.pod("sleep").connect(pod_addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        send.send_request(
            Request::get("/around")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .ok()
    })
    .await
    .expect("an answer or a close within 10 s");
    assert!(
        around.is_none(),
        "a request reached echo-1 around the waypoint"
    );
    // Through it: allowed (the waypoint's identity).
    assert_eq!(
        seen_client(&s.mesh, ECHO_VIP).await,
        WAYPOINT_IP.to_string()
    );
    let line = logs::wait_access("the refusal at node-b", |v| {
        v["direction"] == "inbound" && v["authz"].as_str().is_some_and(|a| a.starts_with("denied"))
    })
    .await;
    assert_eq!(line["src.identity"], SLEEP_ID);
}

/// Gives the echo service a second port (`port` -> the pods' `target`) and waits until
/// node-a's proxy and the waypoint both know it.
async fn add_echo_port(s: &Setup, port: u16, target: u16) {
    let path = s.mesh.dir.path().join("manifests/mesh.yaml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let more = manifest.replace(
        "ports: [{name: tcp-echo, port: 80, targetPort: 8080}]",
        &format!(
            "ports: [{{name: tcp-echo, port: 80, targetPort: 8080}}, {{name: more, port: {port}, targetPort: {target}}}]"
        ),
    );
    assert_ne!(manifest, more);
    std::fs::write(&path, more).unwrap();
    let has = |state: &ambit_core::state::State| {
        state
            .services()
            .any(|s| s.name.as_ref() == "echo" && s.ports.iter().any(|p| p.service_port == port))
    };
    eventually("the new port at node-a", || {
        has(&s.mesh.node("node-a").store().load())
    })
    .await;
    eventually("the new port at the waypoint", || has(&s.waypoint.state())).await;
}

/// Writes a DENY of paths under /admin at the echo service and waits for the waypoint.
async fn deny_admin(s: &Setup) {
    std::fs::write(
        s.mesh.dir.path().join("manifests/policies.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin*']}}]}]
",
    )
    .unwrap();
    eventually("the policy at the waypoint", || {
        s.waypoint.state().targeted_policies().count() == 1
    })
    .await;
}

/// Sends raw bytes on a new connection from sleep and reads the answer's head (empty
/// when the connection is closed without one).
async fn raw(mesh: &Mesh, to: SocketAddr, bytes: &[u8], wait_first: Duration) -> String {
    let mut conn = mesh.pod("sleep").connect(to).await.unwrap();
    tokio::time::sleep(wait_first).await;
    let _ = conn.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_hosts_and_slow_starts_cannot_get_around_an_l7_deny() {
    let s = setup().await;
    deny_admin(&s).await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    for path in [
        "/admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin/users",
        "//admin",
    ] {
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::get(path)
                    .header("host", "echo.demo")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        let _ = text(resp).await;
    }
    // Allowed paths reach the endpoint normalized, as the policy saw them.
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/a/../who")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(field(&text(resp).await, "path"), "/who");
    // One host: an absolute-form target wins over a different Host header, for the
    // policy and for the endpoint.
    let head = raw(
        &s.mesh,
        ECHO_VIP,
        b"GET http://public.example/who HTTP/1.1\r\nHost: admin.example\r\nConnection: close\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    assert!(head.contains("host=public.example"), "{head}");
    // Only WebSocket upgrades: an h2c upgrade is not passed on.
    let head = raw(
        &s.mesh,
        ECHO_VIP,
        b"GET /who HTTP/1.1\r\nHost: echo.demo\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("connection=\n") || head.contains("connection=keep-alive"),
        "{head}"
    );
    // A client that waits past the protocol detection sends HTTP as opaque TCP: the DENY
    // on paths cannot be read there, so it applies to the whole connection.
    let head = raw(
        &s.mesh,
        ECHO_VIP,
        b"GET /admin HTTP/1.1\r\nHost: echo.demo\r\nConnection: close\r\n\r\n",
        Duration::from_millis(1500),
    )
    .await;
    assert!(
        !head.contains("200 OK"),
        "the slow request got through: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_response_is_counted_once() {
    let s = setup().await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let pending = send.send_request(
        Request::get("/slow")
            .header("host", "echo.demo")
            .body(full(""))
            .unwrap(),
    );
    // Gone before the endpoint answers.
    let _ = tokio::time::timeout(Duration::from_millis(300), pending).await;
    drop(send);
    eventually("the request counted with flag DC", || {
        let page = s.waypoint.metrics_text();
        sum(
            &page,
            "istio_requests_total",
            &[("response_flags", "DC"), ("response_code", "0")],
        ) == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let page = s.waypoint.metrics_text();
    assert_eq!(
        sum(&page, "ambit_waypoint_active_requests", &[]),
        0.0,
        "{page}"
    );
    assert_eq!(
        sum(&page, "istio_requests_total", &[]),
        1.0,
        "counted once: {page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_bidirectional_stream_flows_message_by_message() {
    let s = setup().await;
    let mut send = h2(&s.mesh, ECHO_VIP).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let resp = send
        .send_request(
            Request::post("http://echo.demo/test.Echo/Chat")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: nothing waits for the whole
    // stream on either side of the waypoint.
    for i in 0..5u8 {
        let msg = Bytes::from(vec![0, 0, 0, 0, 1, b'a' + i]);
        tx.send(Ok(Frame::data(msg.clone()))).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the echo of one message, while the stream is still open")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), msg);
    }
    drop(tx);
    let mut status = None;
    while let Some(frame) = body.frame().await {
        if let Ok(t) = frame.unwrap().into_trailers() {
            status = t.get("grpc-status").cloned();
        }
    }
    assert_eq!(status.unwrap(), "0");
    let page = s.waypoint.metrics_text();
    assert_eq!(
        sum(
            &page,
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("grpc_response_status", "0")]
        ),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_receives_only_the_policies_that_apply_to_it() {
    let s = setup().await;
    let policy = |name: &str, kind: &str, target: &str| {
        format!(
            "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRefs: [{{kind: {kind}, group: '', name: {target}}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: ['/never']}}}}]}}]
"
        )
    };
    std::fs::write(
        s.mesh.dir.path().join("manifests/policies.yaml"),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: elsewhere, namespace: demo}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
{}{}{}",
            policy("for-this-gateway", "Gateway", "waypoint"),
            policy("for-another-gateway", "Gateway", "elsewhere"),
            policy("for-echo", "Service", "echo"),
        ),
    )
    .unwrap();
    let names = || {
        let mut v: Vec<String> = s
            .waypoint
            .state()
            .targeted_policies()
            .map(|p| p.key())
            .collect();
        v.sort();
        v
    };
    eventually("this waypoint's two policies", || {
        names() == ["demo/for-echo", "demo/for-this-gateway"]
    })
    .await;
    // The echo service leaves the waypoint: its policy leaves it too.
    let path = s.mesh.dir.path().join("manifests/mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}",
            "metadata: {name: echo, namespace: demo}",
        ),
    )
    .unwrap();
    eventually("only the Gateway's policy", || {
        names() == ["demo/for-this-gateway"]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(names(), ["demo/for-this-gateway"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_through_the_waypoint_counts_its_bytes_even_when_reset() {
    let s = setup().await;
    // A plain TCP echo behind a second service port.
    add_echo_port(&s, 91, 9090).await;
    s.mesh.echo_app("echo-1", 9090);
    let mut conn = s
        .mesh
        .pod("sleep")
        .connect(SocketAddr::new(ECHO_VIP.ip(), 91))
        .await
        .unwrap();
    // Not HTTP: carried as opaque TCP.
    conn.write_all(b"\x01\x02\x03abcd").await.unwrap();
    let mut back = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x01\x02\x03abcd");
    // The client resets instead of closing.
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(conn);
    eventually("the connection's bytes in the waypoint's metrics", || {
        let page = s.waypoint.metrics_text();
        sum(
            &page,
            "istio_tcp_connections_closed_total",
            &[("reporter", "waypoint")],
        ) == 1.0
    })
    .await;
    let page = s.waypoint.metrics_text();
    assert_eq!(
        sum(
            &page,
            "istio_tcp_received_bytes_total",
            &[("reporter", "waypoint")]
        ),
        7.0,
        "{page}"
    );
    assert_eq!(
        sum(
            &page,
            "istio_tcp_sent_bytes_total",
            &[("reporter", "waypoint")]
        ),
        7.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_bound_to_the_waypoint_gateway_class_applies_at_every_waypoint() {
    let s = setup().await;
    std::fs::write(
        s.mesh.dir.path().join("manifests/mesh-wide.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-deletes, namespace: istio-system}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
",
    )
    .unwrap();
    eventually("the mesh-wide policy at the waypoint", || {
        s.waypoint.state().targeted_policies().count() == 1
    })
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    for (method, want) in [("DELETE", StatusCode::FORBIDDEN), ("GET", StatusCode::OK)] {
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::builder()
                    .method(method)
                    .uri("/x")
                    .header("host", "echo.demo")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{method}");
        let _ = text(resp).await;
    }
}

/// A second server in echo-1, on `port`, that answers every request with `name`.
fn named_server(mesh: &Mesh, port: u16, name: &'static str) {
    let listener = mesh.pod("echo-1").listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(full(name)))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_matches_splits_modifies_and_times_out() {
    let s = setup().await;
    named_server(&s.mesh, 8081, "v2");
    apply_routes(
        &s,
        Some(("echo-v2", "198.19.0.11", "http", 8081)),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - name: to-v2
    matches: [{headers: [{name: x-canary, value: 'yes'}]}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-route, value: canary}]}
    backendRefs: [{name: echo-v2, port: 80}]
  - name: slow
    matches: [{path: {type: Exact, value: /slow}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: echo, port: 80}]
  - name: split
    matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-forwarded-for, value: rewritten}]}
    backendRefs: [{name: echo, port: 80, weight: 0}, {name: echo-v2, port: 80, weight: 3}]
  - name: moved
    matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
  - name: rewritten
    matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.demo, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs: [{name: echo, port: 80}]
  - name: plain
    matches: [{path: {type: PathPrefix, value: /plain}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-forwarded-for, value: rewritten}]}
    backendRefs: [{name: echo, port: 80}]
",
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut ask = async |path: &str, canary: bool| {
        send.ready().await.unwrap();
        let mut req = Request::builder().uri(path).header("host", "echo.demo");
        if canary {
            req = req.header("x-canary", "yes");
        }
        let resp = send
            .send_request(req.body(full("")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let route = resp
            .headers()
            .get("x-route")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, route, text(resp).await)
    };
    // No rule matches: 404, as the specification says.
    let (status, _, _) = ask("/", false).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A header match: to the other backend, with the response header set.
    let (status, route, body) = ask("/", true).await;
    assert_eq!(
        (status, route.as_deref(), body.as_str()),
        (StatusCode::OK, Some("canary"), "v2")
    );
    // Weights: 0 to echo, 3 to echo-v2: every request to v2.
    for _ in 0..5 {
        assert_eq!(ask("/api/items", false).await.2, "v2");
    }
    // The request header filter reaches the endpoint.
    let (status, _, body) = ask("/plain/x", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(field(&body, "xff"), "rewritten", "{body}");
    // URLRewrite: the endpoint sees the new host and the prefix replaced.
    let (status, _, body) = ask("/v1/items?x=1", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(field(&body, "path"), "/v2/items", "{body}");
    assert_eq!(field(&body, "host"), "rewritten.demo", "{body}");
    // RequestRedirect: answered by the waypoint, the prefix replaced, the query kept.
    let mut redirect = h1(&s.mesh, ECHO_VIP).await;
    let resp = redirect
        .send_request(
            Request::get("/old/page?y=2")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers()["location"], "http://echo.demo/new/page?y=2");
    // The rule's timeout: 504 well before the endpoint's 2 s answer.
    let started = std::time::Instant::now();
    let (status, _, _) = ask("/slow", false).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let line = logs::wait_access("the timed-out request", |v| {
        v["path"] == "/slow" && v["status"] == 504
    })
    .await;
    assert_eq!(line["flags"], "UT", "{line}");
    assert_eq!(line["route"], "demo/canary", "{line}");
    assert_eq!(line["route_rule"], "slow", "{line}");
    let line = logs::wait_access("the routed request", |v| {
        v["path"] == "/" && v["status"] == 200
    })
    .await;
    assert_eq!(line["route_rule"], "to-v2", "{line}");
    assert_eq!(
        line["dst.service"], "echo-v2.demo.svc.cluster.local",
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcroute_sends_one_method_to_another_backend() {
    let s = setup().await;
    named_server(&s.mesh, 8081, "v2");
    apply_routes(
        &s,
        Some(("echo-v2", "198.19.0.11", "grpc", 8081)),
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: methods, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: test.Echo, method: Say}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{method: {service: test.Echo}}]
    backendRefs: [{name: echo, port: 80}]
",
    )
    .await;
    let mut send = h2(&s.mesh, ECHO_VIP).await;
    let mut call = async |method: &str| {
        let resp = send
            .send_request(
                Request::post(format!("http://echo.demo/test.Echo/{method}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(full(&b"\0\0\0\0\x02hi"[..]))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    };
    // The exact method to v2; the rest of the service to echo (which answers gRPC status 7
    // with the body back); another service: no rule, 404.
    let (status, body) = call("Say").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"v2"[..]));
    let (status, body) = call("Other").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"\0\0\0\0\x02hi"[..])
    );
    let resp = send
        .send_request(
            Request::post("http://echo.demo/other.Service/Say")
                .header("content-type", "application/grpc")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let line = logs::wait_access("the routed gRPC call", |v| {
        v["path"] == "/test.Echo/Say" && v["status"] == 200
    })
    .await;
    assert_eq!(line["route"], "demo/grpc:methods", "{line}");
}

/// A server in echo-1 on `port` that answers its first `failures` requests 503, then
/// `ok`; returns the count of requests it got.
fn flaky_server(
    mesh: &Mesh,
    port: u16,
    failures: usize,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let listener = mesh.pod("echo-1").listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let n = seen.fetch_add(1, Ordering::SeqCst);
                        let mut resp =
                            Response::new(full(if n < failures { "busy" } else { "ok" }));
                        if n < failures {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_retries_what_it_may_and_nothing_else() {
    use std::sync::atomic::Ordering;
    let s = setup().await;
    let count = flaky_server(&s.mesh, 8082, 4);
    apply_routes(
        &s,
        Some(("flaky", "198.19.0.12", "http", 8082)),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retries, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - retry: {codes: [503], attempts: 2, backoff: 10ms}
    backendRefs: [{name: flaky, port: 80}]
",
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    // A request with a body cannot be replayed: tried once, the 503 goes back.
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::post("/write")
                .header("host", "echo.demo")
                .body(full("payload"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Without a body: tried, then retried twice, each answered 503 (the server fails
    // its first four requests): the last 503 goes back after three attempts.
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/read")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(count.load(Ordering::SeqCst), 4, "three attempts");
    // The next one succeeds at once.
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/read")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let line = logs::wait_access("the retried request", |v| {
        v["path"] == "/read" && v["status"] == 503
    })
    .await;
    assert_eq!(line["retries"], 2, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtualservice_injects_faults_and_routes_in_order() {
    let s = setup().await;
    named_server(&s.mesh, 8081, "v2");
    apply_routes(
        &s,
        Some(("echo-v2", "198.19.0.11", "http", 8081)),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  http:
  - name: broken
    match: [{uri: {prefix: /broken}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - name: grpc-broken
    match: [{uri: {prefix: /test.Echo/Fail}}]
    fault: {abort: {grpcStatus: UNAVAILABLE}}
    route: [{destination: {host: echo}}]
  - name: slow
    match: [{uri: {prefix: /slowly}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - name: to-v2
    match: [{uri: {prefix: /v}}]
    route: [{destination: {host: echo-v2}}]
  - name: default
    route: [{destination: {host: echo}}]
",
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut get = async |path: &str| {
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::get(path)
                    .header("host", "echo.demo")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        (status, text(resp).await)
    };
    // Aborted by the fault, never sent on.
    let (status, body) = get("/broken/x").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::IM_A_TEAPOT, "fault filter abort")
    );
    // Delayed, then answered.
    let started = std::time::Instant::now();
    assert_eq!(get("/slowly").await.0, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // In order, with plain prefixes: `/v` takes `/very/long` to v2.
    assert_eq!(get("/very/long").await.1, "v2");
    assert_eq!(field(&get("/other").await.1, "path"), "/other");
    let line = logs::wait_access("the aborted request", |v| {
        v["path"] == "/broken/x" && v["status"] == 418
    })
    .await;
    assert_eq!(line["flags"], "FI", "{line}");
    assert_eq!(line["route"], "demo/vs:echo", "{line}");
    let line = logs::wait_access("the delayed request", |v| v["path"] == "/slowly").await;
    assert_eq!(line["flags"], "DI", "{line}");
    // A gRPC abort answers the gRPC way.
    let mut h2send = h2(&s.mesh, ECHO_VIP).await;
    let resp = h2send
        .send_request(
            Request::post("http://echo.demo/test.Echo/Fail")
                .header("content-type", "application/grpc")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cors_filter_answers_preflights_and_marks_allowed_responses() {
    let s = setup().await;
    apply_routes(
        &s,
        None,
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cors, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ['https://app.example', 'https://*.shop.example']
        allowMethods: [GET, POST]
        allowHeaders: [x-token]
        exposeHeaders: [x-trace]
        maxAge: 600
        allowCredentials: true
    backendRefs: [{name: echo, port: 80}]
",
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut ask = async |method: &str, origin: &str, preflight: bool| {
        send.ready().await.unwrap();
        let mut req = Request::builder()
            .method(method)
            .uri("/items")
            .header("host", "echo.demo")
            .header("origin", origin);
        if preflight {
            req = req.header("access-control-request-method", "POST");
        }
        let resp = send
            .send_request(req.body(full("")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let h = resp.headers().clone();
        let body = text(resp).await;
        (status, h, body)
    };
    // An allowed origin's preflight: answered by the waypoint, never sent on.
    let (status, h, body) = ask("OPTIONS", "https://a.shop.example", true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "", "answered by the waypoint");
    assert_eq!(h["access-control-allow-origin"], "https://a.shop.example");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(h["access-control-allow-headers"], "x-token");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["access-control-allow-credentials"], "true");
    // Another origin: no CORS headers, so the browser refuses.
    let (status, h, _) = ask("OPTIONS", "https://evil.example", true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!h.contains_key("access-control-allow-origin"));
    // A request from an allowed origin reaches the echo server and is marked.
    let (status, h, body) = ask("GET", "https://app.example", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(field(&body, "path"), "/items");
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-expose-headers"], "x-trace");
}

/// What a recording server received: method, path, `Host`, body.
type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, Bytes)>>>;

/// A server in echo-1 on `port` that records what it received and answers 200.
fn recording_server(mesh: &Mesh, port: u16) -> Recorded {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let listener = mesh.pod("echo-1").listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let host = parts
                            .headers
                            .get("host")
                            .map(|h| h.to_str().unwrap_or("").to_owned())
                            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
                            .unwrap_or_default();
                        record.lock().unwrap().push((
                            parts.method.to_string(),
                            parts.uri.path().to_owned(),
                            host,
                            body,
                        ));
                        Ok::<_, Infallible>(Response::new(full("recorded")))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_mirror_copies_requests_and_their_bodies_in_the_background() {
    let s = setup().await;
    let mirrored = recording_server(&s.mesh, 8082);
    apply_routes(
        &s,
        Some(("shadow", "198.19.0.12", "http", 8082)),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}}
    backendRefs: [{name: echo, port: 80}]
",
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/seen")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(field(&text(resp).await, "path"), "/seen", "the main answer");
    eventually("the copy at the mirror", || {
        mirrored.lock().unwrap().len() == 1
    })
    .await;
    {
        let seen = mirrored.lock().unwrap();
        assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("GET", "/seen"));
        assert_eq!(
            seen[0].2, "echo.demo-shadow",
            "the shadow's Host, as Envoy marks it"
        );
    }
    // A body (in several frames) reaches the backend and, whole, the mirror.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::post("/write")
                .header("host", "echo.demo")
                .body(full(payload.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer = text(resp).await;
    assert_eq!(
        field(&answer, "body"),
        "100000",
        "the main answer: {answer}"
    );
    eventually("the copy with its body at the mirror", || {
        mirrored.lock().unwrap().len() == 2
    })
    .await;
    {
        let seen = mirrored.lock().unwrap();
        assert_eq!((seen[1].0.as_str(), seen[1].1.as_str()), ("POST", "/write"));
        assert_eq!(
            seen[1].3.as_ref(),
            payload.as_slice(),
            "the whole body, in order"
        );
    }
    // Counted when the mirror's answer is back, which is after it recorded the copy.
    eventually("both copies counted as sent", || {
        sum(
            &s.waypoint.metrics_text(),
            "ambit_waypoint_mirrored_requests_total",
            &[("reason", "sent")],
        ) == 2.0
    })
    .await;
}

/// Writes a route manifest, with a Service in front selecting echo-1 on another port
/// (`name`, VIP, port name, target port) when given, and waits until the waypoint has
/// both.
async fn apply_routes(s: &Setup, backend: Option<(&str, &str, &str, u16)>, route: &str) {
    let mut yaml = String::new();
    if let Some((name, ip, port, target)) = backend {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  selector: {{app: echo}}\n  clusterIP: {ip}\n  ports: [{{name: {port}, port: 80, targetPort: {target}}}]\n---\n"
        ));
    }
    yaml.push_str(route);
    std::fs::write(s.mesh.dir.path().join("manifests/routes.yaml"), yaml).unwrap();
    let service = backend.map(|b| b.0);
    eventually("the route (and its backend) at the waypoint", || {
        let state = s.waypoint.state();
        state.http_routes().count() == 1
            && service.is_none_or(|n| state.services().any(|s| s.name.as_ref() == n))
    })
    .await;
}

/// A second endpoint of the echo app, on node-b.
fn echo_2() -> PodSpec {
    PodSpec {
        name: "echo-2",
        namespace: "demo",
        service_account: "echo",
        app: "echo",
        node: "node-b",
        ip: Ipv4Addr::new(198, 18, 2, 11),
        enrolled: true,
        in_model: true,
    }
}

/// A server in `pod` on `port` answering every request `status` with `body`, after
/// `delay`.
fn status_server(
    mesh: &Mesh,
    pod: &str,
    port: u16,
    status: StatusCode,
    body: &'static str,
    delay: Duration,
) {
    let listener = mesh.pod(pod).listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        tokio::time::sleep(delay).await;
                        let mut resp = Response::new(full(body));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
}

/// Writes traffic policies (and any Services or routes with them) and waits until the
/// waypoint holds `policies` of them and `routes` routes.
async fn apply_traffic(s: &Setup, yaml: &str, policies: usize, routes: usize) {
    std::fs::write(s.mesh.dir.path().join("manifests/traffic.yaml"), yaml).unwrap();
    eventually("the traffic policies at the waypoint", || {
        let state = s.waypoint.state();
        state.traffic_policies().count() == policies && state.http_routes().count() == routes
    })
    .await;
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Body>,
    user: Option<&str>,
) -> Response<Incoming> {
    send.ready().await.unwrap();
    let mut req = Request::get("/limited").header("host", "echo.demo");
    if let Some(u) = user {
        req = req.header("x-user", u);
    }
    send.send_request(req.body(full("")).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint_and_readmits_it() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    status_server(
        &s.mesh,
        "echo-1",
        8083,
        StatusCode::SERVICE_UNAVAILABLE,
        "bad",
        Duration::ZERO,
    );
    status_server(
        &s.mesh,
        "echo-2",
        8083,
        StatusCode::OK,
        "good",
        Duration::ZERO,
    );
    apply_traffic(
        &s,
        "apiVersion: v1
kind: Service
metadata: {name: pool, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.13, ports: [{name: http, port: 80, targetPort: 8083}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-pool, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules: [{backendRefs: [{name: pool, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: demo}
spec:
  host: pool
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}
",
        1,
        1,
    )
    .await;
    eventually("both endpoints of pool at the waypoint", || {
        let state = s.waypoint.state();
        state.endpoints("demo/pool.demo.svc.cluster.local").count() == 2
    })
    .await;
    // A connection per round: the waypoint closes one idle for a second.
    let round = async || {
        let mut send = h1(&s.mesh, ECHO_VIP).await;
        let mut bad = 0;
        for _ in 0..20 {
            let resp = get(&mut send, None).await;
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
                bad += 1;
            }
            let _ = text(resp).await;
        }
        bad
    };
    // Round robin: echo-1 answers 503 twice in a row, then it is out for 2 s and
    // echo-2 takes every request.
    assert_eq!(round().await, 2);
    let page = s.waypoint.metrics_text();
    assert!(
        page.contains(
            "ambit_waypoint_outlier_ejections_total{name=\"demo/pool.demo.svc.cluster.local\"} 1"
        ),
        "{page}"
    );
    // Back after its ejection: tried again, failing twice, out again (for 4 s now).
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(round().await, 2);
    assert_eq!(round().await, 0, "still out");
    let page = s.waypoint.metrics_text();
    assert!(
        page.contains(
            "ambit_waypoint_outlier_ejections_total{name=\"demo/pool.demo.svc.cluster.local\"} 2"
        ),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_pool_answers_503_uo() {
    let s = setup().await;
    status_server(
        &s.mesh,
        "echo-1",
        8084,
        StatusCode::OK,
        "slow",
        Duration::from_secs(3),
    );
    apply_traffic(
        &s,
        "apiVersion: v1
kind: Service
metadata: {name: slow, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 198.19.0.14, ports: [{name: http, port: 80, targetPort: 8084}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-slow, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules: [{backendRefs: [{name: slow, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow, namespace: demo}
spec:
  host: slow
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
",
        1,
        1,
    )
    .await;
    // Three callers at once (connected first, then sending together): one is served,
    // one waits for its connection, one overflows.
    let mut senders = Vec::new();
    for _ in 0..3 {
        senders.push(h1(&s.mesh, ECHO_VIP).await);
    }
    let mut calls = Vec::new();
    for mut send in senders {
        calls.push(tokio::spawn(async move {
            let resp = get(&mut send, None).await;
            let status = resp.status();
            let _ = text(resp).await;
            status.as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503]);
    let line = logs::wait_access("the overflow", |v| {
        v["status"] == 503 && v["path"] == "/limited"
    })
    .await;
    assert_eq!(line["flags"], "UO", "{line}");
    let page = s.waypoint.metrics_text();
    assert!(
        page.contains(
            "ambit_waypoint_overflow_requests_total{name=\"demo/slow.demo.svc.cluster.local\"} 1"
        ),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_rate_limit_answers_429_past_its_tokens_exactly() {
    let s = setup().await;
    apply_traffic(
        &s,
        "apiVersion: networking.ambit.io/v1alpha1
kind: LocalRateLimit
metadata: {name: echo, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: echo}]
  tokenBucket: {maxTokens: 4, fillInterval: 1h}
  descriptors:
  - {header: x-user, tokenBucket: {maxTokens: 1, fillInterval: 1h}}
",
        1,
        0,
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut seen = Vec::new();
    for user in ["alice", "alice", "bob", "carol", "dave"] {
        let resp = get(&mut send, Some(user)).await;
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        seen.push((
            resp.status().as_u16(),
            h("x-ratelimit-limit"),
            h("x-ratelimit-remaining"),
        ));
        let _ = text(resp).await;
    }
    let owned = |s: u16, l: &str, r: &str| (s, l.to_owned(), r.to_owned());
    assert_eq!(
        seen,
        [
            // alice's own bucket (1) is the tighter one.
            owned(200, "1", "0"),
            owned(429, "1", "0"),
            // The shared bucket of 4: two taken by alice, one each now.
            owned(200, "1", "0"),
            owned(200, "4", "0"),
            owned(429, "4", "0"),
        ]
    );
    let line = logs::wait_access("a rate-limited request", |v| v["status"] == 429).await;
    assert_eq!(line["flags"], "RL", "{line}");
    let page = s.waypoint.metrics_text();
    assert!(
        page.contains("ambit_waypoint_rate_limited_requests_total{name=\"demo/rl:echo\"} 2"),
        "{page}"
    );
    assert!(page.contains("response_flags=\"RL\""), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_checked_and_their_claims_decide_in_policy() {
    let s = setup().await;
    let idp = ambit_core::testing::JwtSigner::new("key-1");
    let impostor = ambit_core::testing::JwtSigner::new("key-1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    apply_traffic(
        &s,
        &format!(
            "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, group: '', name: echo}}]
  jwtRules:
  - issuer: https://idp.test
    audiences: [api]
    jwks: '{}'
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: by-claims, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, group: '', name: echo}}]
  rules:
  - from: [{{source: {{requestPrincipals: ['https://idp.test/*']}}}}]
    when: [{{key: 'request.auth.claims[groups]', values: [eng]}}]
  - to: [{{operation: {{paths: [/public]}}}}]
",
            idp.jwks()
        ),
        1,
        0,
    )
    .await;
    eventually("the policy at the waypoint", || {
        s.waypoint.state().targeted_policies().count() == 1
    })
    .await;
    let token =
        |signer: &ambit_core::testing::JwtSigner, claims: serde_json::Value| signer.sign(&claims);
    let good = token(
        &idp,
        serde_json::json!({"iss": "https://idp.test", "sub": "alice",
        "aud": "api", "groups": ["eng"], "exp": now + 3600}),
    );
    let sales = token(
        &idp,
        serde_json::json!({"iss": "https://idp.test", "sub": "bob",
        "aud": "api", "groups": ["sales"], "exp": now + 3600}),
    );
    let expired = token(
        &idp,
        serde_json::json!({"iss": "https://idp.test", "sub": "alice",
        "aud": "api", "groups": ["eng"], "exp": now - 3600}),
    );
    let other_audience = token(
        &idp,
        serde_json::json!({"iss": "https://idp.test", "sub": "alice",
        "aud": "billing", "groups": ["eng"], "exp": now + 3600}),
    );
    let forged = token(
        &impostor,
        serde_json::json!({"iss": "https://idp.test", "sub": "alice",
        "aud": "api", "groups": ["eng"], "exp": now + 3600}),
    );
    let unknown_issuer = token(
        &idp,
        serde_json::json!({"iss": "https://elsewhere", "sub": "x"}),
    );

    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut ask = async |path: &str, bearer: Option<&str>, extra: Option<(&str, &str)>| {
        send.ready().await.unwrap();
        let mut req = Request::get(path).header("host", "echo.demo");
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some((k, v)) = extra {
            req = req.header(k, v);
        }
        let resp = send
            .send_request(req.body(full("")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, challenge, text(resp).await)
    };
    // A valid token with the claim: allowed; the backend sees the subject, not the token.
    let (status, _, body) = ask("/private", Some(&good), Some(("x-jwt-sub", "mallory"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(field(&body, "x-jwt-sub"), "alice");
    assert_eq!(
        field(&body, "authorization"),
        "",
        "the token is not forwarded"
    );
    // The same token as the `access_token` query parameter.
    let (status, _, _) = ask(&format!("/private?access_token={good}"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    // Valid, without the claim the policy asks for: 403.
    let (status, _, body) = ask("/private", Some(&sales), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Missing: no principal, so only the public path; a forged claim header is removed.
    let (status, _, _) = ask("/private", None, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, body) = ask("/public", None, Some(("x-jwt-sub", "mallory"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        field(&body, "x-jwt-sub"),
        "",
        "a client cannot forge a claim header"
    );
    // Present and invalid: 401 even on the public path, with the reason.
    for (what, t, reason) in [
        ("expired", &expired, "Jwt is expired"),
        (
            "wrong audience",
            &other_audience,
            "Audiences in Jwt are not allowed",
        ),
        ("signed by another key", &forged, "Jwt verification fails"),
        (
            "unknown issuer",
            &unknown_issuer,
            "Jwt issuer is not configured",
        ),
        (
            "garbage",
            &"not-a-jwt".to_owned(),
            "Jwt is not in the form of Header.Payload.Signature",
        ),
    ] {
        let (status, challenge, body) = ask("/public", Some(t), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body, reason, "{what}");
        assert!(challenge.unwrap().starts_with("Bearer"), "{what}");
    }
    let line = logs::wait_access("a 401", |v| v["status"] == 401).await;
    assert!(
        line["authz"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{line}"
    );
}

/// Envoy's ext-authz gRPC API, answered by what the request's `x-authz` header asks
/// for: `allow` (setting `x-authz-user`, removing `x-secret`, adding `x-authz-checked`
/// to the response), `slow` (allows after 3 s), anything else denies with 401. Records
/// each check's path and source principal.
#[derive(Clone, Default)]
struct GrpcAuthorizer {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl ambit_proto::ext_authz::authorization_server::Authorization for GrpcAuthorizer {
    async fn check(
        &self,
        request: tonic::Request<ambit_proto::ext_authz::CheckRequest>,
    ) -> Result<tonic::Response<ambit_proto::ext_authz::CheckResponse>, tonic::Status> {
        use ambit_proto::ext_authz as pb;
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let principal = attributes.source.map(|s| s.principal).unwrap_or_default();
        self.seen
            .lock()
            .unwrap()
            .push((http.path.clone(), principal));
        let header = |k: &str, v: &str| pb::HeaderValueOption {
            header: Some(pb::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: Vec::new(),
            }),
            append: None,
        };
        let ask = http.headers.get("x-authz").cloned().unwrap_or_default();
        if ask == "slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let response = if ask == "allow" || ask == "slow" {
            pb::CheckResponse {
                status: Some(pb::RpcStatus::default()),
                http_response: Some(pb::check_response::HttpResponse::OkResponse(
                    pb::OkHttpResponse {
                        headers: vec![header("x-authz-user", "alice")],
                        headers_to_remove: vec!["x-secret".into()],
                        response_headers_to_add: vec![header("x-authz-checked", "yes")],
                    },
                )),
            }
        } else {
            pb::CheckResponse {
                status: Some(pb::RpcStatus {
                    code: 7,
                    message: "denied".into(),
                }),
                http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                    pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: 401 }),
                        headers: vec![header("x-why", "no x-authz: allow")],
                        body: "denied by the authorizer".into(),
                    },
                )),
            }
        };
        Ok(tonic::Response::new(response))
    }
}

/// The HTTP variant: 200 with `x-authz-user: bob` when `x-authz: allow`, 500 when
/// `x-authz: boom`, else 403 `nope` with `x-why`. Records each check's path.
fn http_authorizer(mesh: &Mesh, port: u16) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let listener = mesh.pod("echo-1").listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        record.lock().unwrap().push(req.uri().path().to_owned());
                        let ask = req
                            .headers()
                            .get("x-authz")
                            .map(|v| v.to_str().unwrap_or("").to_owned())
                            .unwrap_or_default();
                        let resp = match ask.as_str() {
                            "allow" => Response::builder()
                                .header("x-authz-user", "bob")
                                .body(full(""))
                                .unwrap(),
                            "boom" => Response::builder().status(500).body(full("")).unwrap(),
                            _ => Response::builder()
                                .status(403)
                                .header("x-why", "not allowed")
                                .body(full("nope"))
                                .unwrap(),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policies_ask_an_external_authorizer_and_fail_closed() {
    let s = setup().await;
    let grpc = GrpcAuthorizer::default();
    let grpc_seen = grpc.seen.clone();
    let listener = s.mesh.pod("echo-1").listen(9191).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                ambit_proto::ext_authz::authorization_server::AuthorizationServer::new(grpc),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let http_seen = http_authorizer(&s.mesh, 8181);
    std::fs::write(
        s.mesh.dir.path().join("manifests/authz.yaml"),
        "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    defaultConfig: {discoveryAddress: istiod.istio-system.svc:15012}
    extensionProviders:
    - name: grpc-authz
      envoyExtAuthzGrpc: {service: authz.demo.svc.cluster.local, port: 9000, timeout: 500ms}
    - name: http-authz
      envoyExtAuthzHttp:
        service: authz.demo.svc.cluster.local
        port: 8000
        pathPrefix: /check
        includeRequestHeadersInCheck: [x-authz]
        headersToUpstreamOnAllow: [x-authz-user]
        headersToDownstreamOnDeny: [x-why]
    - name: nobody-home
      envoyExtAuthzGrpc: {service: authz.demo.svc.cluster.local, port: 7000, timeout: 1s, failOpen: true}
    - name: nobody-home-closed
      envoyExtAuthzGrpc: {service: authz.demo.svc.cluster.local, port: 7000, timeout: 1s, statusOnError: '503'}
---
apiVersion: v1
kind: Service
metadata: {name: authz, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 198.19.0.13
  ports: [{name: grpc, port: 9000, targetPort: 9191, appProtocol: grpc}, {name: http, port: 8000, targetPort: 8181}, {name: dead, port: 7000, targetPort: 7171}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-check, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: CUSTOM
  provider: {name: grpc-authz}
  rules: [{to: [{operation: {paths: ['/grpc/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http-check, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: CUSTOM
  provider: {name: http-authz}
  rules: [{to: [{operation: {paths: ['/http/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: open-check, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: CUSTOM
  provider: {name: nobody-home}
  rules: [{to: [{operation: {paths: ['/open/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: closed-check, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: CUSTOM
  provider: {name: nobody-home-closed}
  rules: [{to: [{operation: {paths: ['/closed/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: missing-check, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: CUSTOM
  provider: {name: no-such-provider}
  rules: [{to: [{operation: {paths: ['/missing/*']}}]}]
",
    )
    .unwrap();
    eventually(
        "the CUSTOM policies and the authorizer's service at the waypoint",
        || {
            let state = s.waypoint.state();
            state.targeted_policies().count() == 5
                && state.services().any(|s| s.name.as_ref() == "authz")
        },
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut ask = async |path: &str, authz: Option<&str>| {
        send.ready().await.unwrap();
        let mut req = Request::get(path)
            .header("host", "echo.demo")
            .header("x-secret", "s3cret");
        if let Some(a) = authz {
            req = req.header("x-authz", a);
        }
        let resp = send
            .send_request(req.body(full("")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, text(resp).await)
    };
    // gRPC: allowed, with the authorizer's changes to the request and the response.
    let (status, headers, body) = ask("/grpc/items?x=1", Some("allow")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(field(&body, "x-authz-user"), "alice");
    assert_eq!(field(&body, "x-secret"), "", "removed by the authorizer");
    assert_eq!(headers["x-authz-checked"], "yes");
    {
        let seen = grpc_seen.lock().unwrap();
        assert_eq!(seen[0].0, "/grpc/items?x=1");
        assert_eq!(seen[0].1, SLEEP_ID, "the caller's SPIFFE ID");
    }
    // gRPC: denied with the authorizer's status, headers and body.
    let (status, headers, body) = ask("/grpc/items", Some("no")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "denied by the authorizer");
    assert_eq!(headers["x-why"], "no x-authz: allow");
    // gRPC: slower than the provider's 500 ms: 403, fail closed.
    let started = std::time::Instant::now();
    let (status, _, _) = ask("/grpc/items", Some("slow")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the timeout applied"
    );
    // Paths no CUSTOM policy matches are not checked.
    let before = grpc_seen.lock().unwrap().len();
    let (status, _, _) = ask("/other", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(grpc_seen.lock().unwrap().len(), before);
    // HTTP: allowed (the authorizer's header copied on), denied (its status, body and
    // chosen headers), and a 5xx is a failure: 403.
    let (status, _, body) = ask("/http/a", Some("allow")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(field(&body, "x-authz-user"), "bob");
    let (status, headers, body) = ask("/http/a", Some("no")).await;
    assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "nope"));
    assert_eq!(headers["x-why"], "not allowed");
    let (status, _, _) = ask("/http/a", Some("boom")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        http_seen.lock().unwrap()[0],
        "/check/http/a",
        "pathPrefix + path"
    );
    // An authorizer nobody answers: failOpen lets it through; otherwise statusOnError.
    let (status, _, _) = ask("/open/a", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = ask("/closed/a", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // A provider the mesh config does not have: denied.
    let (status, _, _) = ask("/missing/a", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let line =
        logs::wait_access("a request denied by the authorizer", |v| v["status"] == 401).await;
    assert_eq!(line["flags"], "UAEX", "{line}");
    assert!(
        line["authz"].as_str().unwrap().contains("demo/grpc-check"),
        "{line}"
    );
    let page = s.waypoint.metrics_text();
    for want in [
        "ambit_waypoint_ext_authz_checks_total{provider=\"grpc-authz\",result=\"allowed\"} 1",
        "ambit_waypoint_ext_authz_checks_total{provider=\"grpc-authz\",result=\"denied\"} 1",
        "ambit_waypoint_ext_authz_checks_total{provider=\"grpc-authz\",result=\"failed\"} 1",
        "ambit_waypoint_ext_authz_checks_total{provider=\"nobody-home\",result=\"failed_open\"} 1",
    ] {
        assert!(page.contains(want), "{want}\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_attached_to_the_waypoint_gateway_routes_its_services() {
    let s = setup().await;
    apply_routes(
        &s,
        None,
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: through-gateway, namespace: demo}
spec:
  parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  hostnames: [echo.demo.svc.cluster.local]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    backendRefs: [{name: echo, port: 80}]
",
    )
    .await;
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/old/page")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(field(&text(resp).await, "path"), "/new/page");
    // The route's rules are the service's now: a path none matches is 404.
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/elsewhere")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinationrule_subsets_send_a_virtualservice_route_to_their_endpoints() {
    let s = setup_with_pods("service", false, vec![echo_2()]).await;
    status_server(
        &s.mesh,
        "echo-1",
        8084,
        StatusCode::OK,
        "one",
        Duration::ZERO,
    );
    status_server(
        &s.mesh,
        "echo-2",
        8084,
        StatusCode::OK,
        "two",
        Duration::ZERO,
    );
    // Version labels on the two endpoints.
    let path = s.mesh.dir.path().join("manifests/mesh.yaml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let labelled = manifest
        .replace(
            "metadata: {name: echo-1, namespace: demo, labels: {app: echo}}",
            "metadata: {name: echo-1, namespace: demo, labels: {app: echo, version: v1}}",
        )
        .replace(
            "metadata: {name: echo-2, namespace: demo, labels: {app: echo}}",
            "metadata: {name: echo-2, namespace: demo, labels: {app: echo, version: v2}}",
        );
    assert_eq!(labelled.matches("version: v").count(), 2);
    std::fs::write(&path, labelled).unwrap();
    let vs = |subset: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: versions, namespace: demo, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  selector: {{app: echo}}
  clusterIP: 198.19.0.14
  ports: [{{name: http, port: 80, targetPort: 8084}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: versions, namespace: demo}}
spec:
  host: versions
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: versions, namespace: demo}}
spec:
  hosts: [versions]
  http: [{{route: [{{destination: {{host: versions, subset: {subset}}}}}]}}]
"
        )
    };
    let vip: SocketAddr = "198.19.0.14:80".parse().unwrap();
    apply_traffic(&s, &vs("v2"), 1, 1).await;
    eventually("both subsets resolved at the waypoint", || {
        let state = s.waypoint.state();
        state
            .backend_policy("demo/versions.demo.svc.cluster.local")
            .and_then(|p| p.backend.clone())
            .is_some_and(|b| {
                b.subsets.len() == 2 && b.subsets.iter().all(|s| s.workloads.len() == 1)
            })
    })
    .await;
    eventually("the service bound to the waypoint at node-a", || {
        s.mesh
            .node("node-a")
            .store()
            .load()
            .services()
            .any(|svc| svc.name.as_ref() == "versions" && svc.waypoint.is_some())
    })
    .await;
    let answers = async |n: usize| {
        let mut send = h1(&s.mesh, vip).await;
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            send.ready().await.unwrap();
            let resp = send
                .send_request(
                    Request::get("/")
                        .header("host", "versions.demo")
                        .body(full(""))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status();
            *seen
                .entry(format!("{} {}", status.as_u16(), text(resp).await))
                .or_default() += 1;
        }
        seen
    };
    let only = |label: &str, n: usize| std::collections::BTreeMap::from([(label.to_owned(), n)]);
    assert_eq!(
        answers(20).await,
        only("200 two", 20),
        "every request to subset v2"
    );
    std::fs::write(s.mesh.dir.path().join("manifests/traffic.yaml"), vs("v1")).unwrap();
    eventually("the route to v1", || {
        s.waypoint
            .state()
            .http_routes()
            .any(|r| r.rules[0].backends[0].subset.as_deref() == Some("v1"))
    })
    .await;
    assert_eq!(
        answers(20).await,
        only("200 one", 20),
        "every request to subset v1"
    );
    // A subset the DestinationRule does not define: 503 NC, as Envoy answers it.
    std::fs::write(s.mesh.dir.path().join("manifests/traffic.yaml"), vs("v3")).unwrap();
    eventually("the route to v3", || {
        s.waypoint
            .state()
            .http_routes()
            .any(|r| r.rules[0].backends[0].subset.as_deref() == Some("v3"))
    })
    .await;
    let got = answers(3).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got.keys().next().unwrap().starts_with("503 "), "{got:?}");
    let line = logs::wait_access("a request to an undefined subset", |v| v["status"] == 503).await;
    assert_eq!(line["flags"], "NC", "{line}");
}

/// The HTTPRoute conformance table (its own file).
#[path = "waypoint/conformance.rs"]
mod conformance;

/// Every metric the Grafana dashboard (`dashboards/ambit.json`) queries is one a node
/// proxy, a waypoint or the control plane really exports, under that exact name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_ambit_emits() {
    let s = setup().await;
    // Some traffic, so every labelled family has samples too.
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            Request::get("/")
                .header("host", "echo.demo")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let _ = text(resp).await;
    let (status, control) = ambit_admin::get(s.mesh.cp.monitoring_addr(), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let pages = [
        s.mesh.metrics("node-a").await,
        s.mesh.metrics("node-b").await,
        s.waypoint.metrics_text(),
        control,
    ];
    let mut emitted = std::collections::BTreeSet::new();
    for page in &pages {
        for line in page.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                emitted.insert(format!("{name}{s}"));
            }
        }
    }
    // A labelled family appears on a page only once it has a sample (a rate limit that
    // never limited has none): names the code registers count too, read from the
    // sources that register them (with each registry's prefix).
    let registered = regex::Regex::new(r#"register\(\s*"([a-z_]+)""#).unwrap();
    for (source, prefix) in [
        (include_str!("../../ambit-waypoint/src/metrics.rs"), ""),
        (
            include_str!("../../ambit-node/src/metrics.rs"),
            "ambit_node_",
        ),
        (include_str!("../../ambit-control/src/metrics.rs"), "ambit_"),
    ] {
        for c in registered.captures_iter(source) {
            let name = format!("{prefix}{}", &c[1]);
            // The node proxy's Istio families are registered without its prefix.
            let name = name.replace("ambit_node_istio_", "istio_");
            for suffix in ["", "_total", "_bucket", "_sum", "_count"] {
                emitted.insert(format!("{name}{suffix}"));
            }
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../dashboards/ambit.json")).unwrap();
    let mut exprs = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(e)) => {
                            out.push(e.clone())
                        }
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let names = regex::Regex::new(r"\b(?:istio|ambit)_[a-z0-9_]+").unwrap();
    let mut missing = Vec::new();
    for e in &exprs {
        for m in names.find_iter(e) {
            if !emitted.contains(m.as_str()) {
                missing.push(format!("{} (in {e})", m.as_str()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not emitted: {missing:#?}\nemitted: {emitted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_exports_spans_with_the_callers_span_as_parent() {
    let (collector, endpoint) = Collector::start().await;
    // Traces started at the waypoint are never sampled here: only the caller decides.
    // The node proxies export to the same collector, with request metrics on in `demo`.
    let s = setup_full(
        "service",
        false,
        Vec::new(),
        |c| {
            c.otlp_endpoint = Some(endpoint.clone());
            c.trace_sampling = 0.0;
        },
        |n| n.otlp_endpoint = Some(endpoint.clone()),
    )
    .await;
    let path = s.mesh.dir.path().join("manifests/mesh.yaml");
    let manifests = std::fs::read_to_string(&path).unwrap();
    let on = manifests.replace(
        "metadata: {name: demo, labels:",
        "metadata: {name: demo, annotations: {ambit.io/l7-metrics: enabled}, labels:",
    );
    assert_ne!(manifests, on);
    std::fs::write(&path, on).unwrap();
    for node in ["node-a", "node-b"] {
        let proxy = s.mesh.node(node);
        eventually("request metrics on at the node proxies", || {
            let state = proxy.store().load();
            state
                .workloads()
                .any(|w| w.name.as_ref() == "echo-1" && w.profile.l7_metrics)
                && state
                    .workloads()
                    .any(|w| w.name.as_ref() == "sleep" && w.profile.l7_metrics)
        })
        .await;
    }
    let mut send = h1(&s.mesh, ECHO_VIP).await;
    let mut ask = async |traceparent: Option<&str>| {
        send.ready().await.unwrap();
        let mut req = Request::get("/traced?x=1").header("host", "echo.demo");
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        let resp = send
            .send_request(req.body(full("")).unwrap())
            .await
            .unwrap();
        text(resp).await
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    // Sampled by the caller: one span, child of the caller's, parent of the backend's.
    let body = ask(Some(&format!("00-{trace}-{caller}-01"))).await;
    let seen = field(&body, "traceparent").to_owned();
    // Not sampled by the caller, and a trace started here (sampling 0%): no span.
    ask(Some(&format!("00-{trace}-{caller}-00"))).await;
    ask(None).await;
    eventually("the spans at the collector", || {
        collector.spans.lock().unwrap().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = collector.spans.lock().unwrap().clone();
    let scopes = collector.scopes.lock().unwrap().clone();
    let of = |scope: &str| -> Vec<ambit_proto::otlp::Span> {
        all.iter()
            .zip(&scopes)
            .filter(|(_, s)| *s == scope)
            .map(|(span, _)| span.clone())
            .collect()
    };
    let spans = of("ambit-waypoint");
    assert_eq!(spans.len(), 1, "only the sampled request: {all:?}");
    let span = &spans[0];
    // Across the waypoint and the node proxies: node-a (the client's side) is a child of
    // the caller, like the waypoint; node-b (the backend's side) of the waypoint.
    let nodes = of("ambit-node");
    assert_eq!(nodes.len(), 2, "one span per node proxy: {nodes:#?}");
    for n in &nodes {
        assert_eq!(hex(&n.trace_id), trace);
        match span_tag(n, "reporter").as_str() {
            "source" => assert_eq!(hex(&n.parent_span_id), caller),
            "destination" => assert_eq!(
                hex(&n.parent_span_id),
                hex(&span.span_id),
                "the backend's node proxy sees the waypoint's span as the parent"
            ),
            other => panic!("reporter {other:?}"),
        }
    }
    assert_eq!(hex(&span.trace_id), trace);
    assert_eq!(
        hex(&span.parent_span_id),
        caller,
        "the caller's span is the parent"
    );
    assert_eq!(
        seen,
        format!("00-{trace}-{}-01", hex(&span.span_id)),
        "the backend's parent is the waypoint's span, still sampled"
    );
    assert_eq!(span.name, "echo.demo/traced");
    assert_eq!(span.kind, ambit_proto::otlp::span::SpanKind::Server as i32);
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0);
    let tag = |k: &str| span_tag(span, k);
    assert_eq!(tag("http.method"), "GET");
    assert_eq!(tag("http.status_code"), "200");
    assert_eq!(tag("http.url"), "http://echo.demo/traced?x=1");
    assert_eq!(tag("upstream_cluster"), "echo.demo.svc.cluster.local");
    assert_eq!(tag("peer.address"), SLEEP_ID);
    assert_eq!(tag("component"), "proxy");
    assert!(!tag("guid:x-request-id").is_empty());
    let resources = collector.resources.lock().unwrap().clone();
    assert!(
        resources[0]
            .attributes
            .iter()
            .any(|a| a.key == "service.name")
    );
    // The console lists the traced request on the workload behind the service.
    let console = s.mesh.cp.console_addr().unwrap();
    eventually_async("the trace on the console's workload page", || async {
        let (_, body) = ambit_admin::get(console, "/api/workload?namespace=demo&name=echo-1")
            .await
            .unwrap();
        let w: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        w["traces"].as_array().is_some_and(|t| {
            t.len() == 1 && t[0]["trace_id"] == trace && t[0]["path"] == "/traced?x=1"
        })
    })
    .await;
}
