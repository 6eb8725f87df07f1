//! HTTP inside a tunnel: each request forwarded to an endpoint of its service, bodies
//! streamed both ways (hyper's frames, HTTP/2 flow control and HTTP/1.1 backpressure
//! bound what is held), then reported: metrics and one access-log line when the
//! response has ended.
//!
//! Errors map as Envoy's do, so Istio users read them the same way: no ready endpoint
//! 503 `UH`; the endpoint could not be reached 503 `UF`; reset before the response
//! started 503 `UR`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use ambit_core::route::Route;
use ambit_core::telemetry::{ConnLabels, RequestLabels, Value};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, EXPECT, HOST, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Shared;
use crate::headers::{is_upgrade, remove_hop_by_hop};
use crate::routing::{self, Choice};
use crate::serve::{Client, Target, facts, pick};
use crate::upstream::{self, Lease, Protocol, UpstreamError};

/// One HTTP connection inside a tunnel.
struct Conn {
    shared: Arc<Shared>,
    client: Client,
    target: Target,
    protocol: Protocol,
}

/// Serves HTTP/1.1 or HTTP/2 (prior knowledge) on `io` until the client is done.
pub(crate) async fn serve<S>(
    shared: Arc<Shared>,
    client: Client,
    target: Target,
    protocol: Protocol,
    io: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.config.limits.clone();
    let conn = Arc::new(Conn {
        shared,
        client,
        target,
        protocol,
    });
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http1 => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192));
            b.serve_connection(io, service).with_upgrades().await
        }
        Protocol::Http2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
            b.serve_connection(io, service).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection in a tunnel ended with an error");
    }
}

/// The request body, counted as it streams upstream: none (a request without one, which
/// can be sent again when retried), the client's (copied to its mirrors as it goes), or
/// a mirror's copy.
pub struct RequestBody {
    inner: Source,
    counted: Arc<AtomicU64>,
}

enum Source {
    Empty,
    /// A body made here (an external authorization check).
    Full(Option<Bytes>),
    Client {
        body: Incoming,
        tee: Option<crate::tee::Tee>,
    },
    Mirror(crate::tee::MirrorBody),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl RequestBody {
    fn empty(counted: Arc<AtomicU64>) -> Self {
        Self {
            inner: Source::Empty,
            counted,
        }
    }

    /// A body of `bytes`, sent at once.
    pub(crate) fn full(bytes: Bytes, counted: Arc<AtomicU64>) -> Self {
        Self {
            inner: Source::Full((!bytes.is_empty()).then_some(bytes)),
            counted,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Source::Empty => Poll::Ready(None),
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| {
                this.counted.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Frame::data(b))
            })),
            Source::Mirror(m) => Pin::new(m).poll_frame(cx).map_err(BoxError::from),
            Source::Client { body, tee } => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            this.counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        if let Some(t) = tee.as_mut() {
                            t.frame(frame);
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(t) = tee.as_mut() {
                            t.end();
                        }
                    }
                    // The mirrors' bodies fail with it.
                    Poll::Ready(Some(Err(_))) => *tee = None,
                    Poll::Pending => {}
                }
                polled.map_err(BoxError::from)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Empty => true,
            Source::Full(bytes) => bytes.is_none(),
            Source::Client { body, .. } => body.is_end_stream(),
            Source::Mirror(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Empty => SizeHint::with_exact(0),
            Source::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Source::Client { body, .. } => body.size_hint(),
            Source::Mirror(_) => SizeHint::default(),
        }
    }
}

/// What is reported when a response has ended (or was abandoned).
struct Report {
    shared: Arc<Shared>,
    labels: ConnLabels,
    /// `None` until there is a response.
    status: Option<StatusCode>,
    flags: &'static str,
    grpc_status: Option<Value>,
    started: Instant,
    /// From the request's arrival to the endpoint's response head.
    upstream_time: Option<std::time::Duration>,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    method: http::Method,
    authority: String,
    path: String,
    protocol: &'static str,
    request_id: String,
    trace_id: String,
    /// This hop's span (exported when sampled and traces are on).
    span: crate::headers::SpanIds,
    upstream: String,
    source: String,
    source_workload: String,
    destination: String,
    destination_workload: String,
    service: String,
    /// The HTTPRoute (`<namespace>/<name>`) and rule that routed the request, if any.
    route: String,
    rule: String,
    /// Times the request was sent again under the route's retry policy.
    retries: u32,
    error: Option<String>,
    /// What the policies said, when it is worth a line: a denial, a dry-run verdict, a
    /// matching AUDIT policy.
    authz: String,
    /// Recorded already (metrics and the access-log line are written once).
    finished: bool,
    /// Counts the request against its endpoint until the report goes.
    _in_flight: Option<crate::upstream::InFlightGuard>,
    /// Counts it against its service's connection pool (DestinationRule) until then.
    _request_slot: Option<crate::traffic::RequestSlot>,
    _connection_slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Report {
    /// A request dropped before it has a response (the client went away while the
    /// endpoint was being reached or answering) is still counted, as Envoy does: response
    /// code 0, flag `DC`.
    fn drop(&mut self) {
        if !self.finished {
            self.flags = "DC";
            self.status = None;
            if self.error.is_none() {
                self.error = Some("the client went away before the response".into());
            }
            self.record();
        }
    }
}

impl Report {
    fn finish(mut self) {
        self.record();
    }

    fn record(&mut self) {
        self.finished = true;
        let m = &self.shared.metrics;
        m.active_requests.dec();
        let mut conn = self.labels.clone();
        conn.response_flags = self.flags;
        let grpc = self.grpc_status.clone().unwrap_or_else(|| {
            Value::from(if self.protocol == "grpc" {
                "unknown"
            } else {
                "-"
            })
        });
        let labels = RequestLabels {
            conn,
            response_code: self.status.map_or(0, |s| s.as_u16()),
            grpc_response_status: grpc.clone(),
        };
        let duration = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        m.request(&labels, duration, request_bytes, self.response_bytes);
        tracing::info!(
            target: "ambit::access",
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            protocol = self.protocol,
            status = self.status.map_or(0, |s| s.as_u16()),
            grpc_status = %grpc.0,
            flags = self.flags,
            duration_ms = duration.as_millis() as u64,
            duration_us = duration.as_micros() as u64,
            upstream_us = self.upstream_time.map_or(0, |d| d.as_micros() as u64),
            request_bytes,
            response_bytes = self.response_bytes,
            upstream = %self.upstream,
            src.identity = %self.source,
            src.workload = %self.source_workload,
            dst.identity = %self.destination,
            dst.workload = %self.destination_workload,
            dst.service = %self.service,
            route = %self.route,
            route_rule = %self.rule,
            retries = self.retries,
            request_id = %self.request_id,
            trace_id = %self.trace_id,
            authz = %self.authz,
            error = self.error.as_deref().unwrap_or(""),
            "request"
        );
        if self.span.sampled
            && let Some(tracer) = &self.shared.tracer
        {
            let span = self.otlp_span(duration, request_bytes, &grpc.0);
            tracer.record(
                span,
                ambit_proto::telemetry::TracedRequest {
                    trace_id: self.trace_id.clone(),
                    source: self.source.clone(),
                    service: self.service.clone(),
                    method: self.method.to_string(),
                    path: self.path.clone(),
                    status: u32::from(self.status.map_or(0, |s| s.as_u16())),
                    duration_ms: duration.as_millis() as u64,
                    at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                },
            );
        }
    }

    /// This request as an OTLP span, with Istio's span tags.
    fn otlp_span(
        &self,
        duration: std::time::Duration,
        request_bytes: u64,
        grpc: &str,
    ) -> ambit_proto::otlp::Span {
        use crate::trace::attr;
        use ambit_proto::otlp::{Span, Status, span, status};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let end = now.as_nanos() as u64;
        let start = end.saturating_sub(duration.as_nanos() as u64);
        let code = self.status.map_or(0, |s| s.as_u16());
        let config = &self.shared.config;
        let mut attributes = vec![
            attr("component", "proxy"),
            attr(
                "node_id",
                format!("waypoint~{}/{}", config.namespace, config.name),
            ),
            attr("guid:x-request-id", self.request_id.clone()),
            attr("http.method", self.method.as_str()),
            attr(
                "http.url",
                format!("http://{}{}", self.authority, self.path),
            ),
            attr("http.protocol", self.protocol),
            attr("http.status_code", code.to_string()),
            attr("response_flags", self.flags),
            attr("request_size", request_bytes.to_string()),
            attr("response_size", self.response_bytes.to_string()),
            attr("upstream_cluster", self.service.clone()),
            attr("upstream_cluster.name", self.service.clone()),
            attr("peer.address", self.source.clone()),
            attr("istio.namespace", config.namespace.clone()),
            attr("istio.canonical_service", config.name.clone()),
            attr("istio.mesh_id", config.trust_domain.clone()),
        ];
        if grpc != "-" {
            attributes.push(attr("grpc.status_code", grpc));
        }
        if !self.route.is_empty() {
            attributes.push(attr("route_name", self.route.clone()));
        }
        let failed = code >= 500 || code == 0;
        Span {
            trace_id: self.span.trace_id.to_vec(),
            span_id: self.span.span_id.to_vec(),
            parent_span_id: self.span.parent_id.map_or_else(Vec::new, |p| p.to_vec()),
            name: format!(
                "{}{}",
                self.authority,
                self.path.split('?').next().unwrap_or("")
            ),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: Some(Status {
                message: self.error.clone().unwrap_or_default(),
                code: if failed {
                    status::StatusCode::Error
                } else {
                    status::StatusCode::Unset
                } as i32,
            }),
            flags: 0x100 | u32::from(self.span.parent_id.is_some()) << 9,
            trace_state: String::new(),
        }
    }
}

enum Inner {
    Proxied(Incoming),
    Local(Option<Bytes>),
}

/// A response body going back to the client: the endpoint's, streamed, or the
/// waypoint's own (an error). Reports the request when it ends or is dropped.
pub struct ResponseBody {
    inner: Inner,
    report: Option<Report>,
    lease: Option<Lease>,
}

impl ResponseBody {
    fn end(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.give_back();
        }
        if let Some(r) = self.report.take() {
            r.finish();
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let complete = match &self.inner {
            Inner::Local(d) => d.is_none(),
            Inner::Proxied(b) => b.is_end_stream(),
        };
        if !complete {
            // Dropped before its end (the client went away): the connection is not
            // reused, and the request is still reported.
            self.lease = None;
            if let Some(r) = self.report.as_mut()
                && r.error.is_none()
            {
                r.error = Some("the response did not finish (the client went away)".into());
            }
        }
        self.end();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Proxied(body) => Pin::new(body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = this.report.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        r.response_bytes += d.len() as u64;
                    } else if let Some(s) = frame.trailers_ref().and_then(grpc_status) {
                        r.grpc_status = Some(s);
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(r) = this.report.as_mut() {
                    r.error = Some(format!("response body: {e}"));
                    r.flags = "UR";
                }
                this.lease = None;
                this.end();
            }
            Poll::Ready(None) => this.end(),
            Poll::Pending => {}
        }
        if matches!(&this.inner, Inner::Proxied(b) if b.is_end_stream()) {
            this.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Local(d) => d.is_none(),
            Inner::Proxied(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Local(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Proxied(b) => b.size_hint(),
        }
    }
}

fn workload_name(w: Option<&ambit_core::discovery::Workload>) -> String {
    w.map_or_else(String::new, |w| {
        format!("{}/{}", w.profile.namespace, w.name)
    })
}

fn grpc_status(headers: &HeaderMap) -> Option<Value> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(Value::from)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Envoy's words for a local reply, so the body says what the flag says.
fn local_body(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::NoHealthy => "no healthy upstream",
        UpstreamError::NoSubset(_) => "no cluster for the route's subset",
        UpstreamError::Reset(_) => {
            "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
        }
        _ => {
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
        }
    }
}

async fn handle(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let shared = conn.shared.clone();
    shared.metrics.active_requests.inc();
    let grpc = is_grpc(req.headers());
    let protocol = if grpc { "grpc" } else { "http" };
    let upgrade = conn.protocol == Protocol::Http1 && is_upgrade(req.headers());
    // First, before the waypoint adds its own headers (a `Connection` header naming them
    // must not remove them).
    remove_hop_by_hop(req.headers_mut(), upgrade);
    let sent_path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.to_string());
    // Routes, policies and the endpoint see the same, normalized path.
    let normalized = crate::headers::normalize_path(&sent_path);
    let path = normalized.clone().unwrap_or_else(|_| sent_path.clone());
    let request_host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let choice = if normalized.is_ok() {
        routing::choose(
            &shared,
            &conn.client,
            &conn.target,
            &request_host,
            &ambit_core::http_route::RequestFacts {
                method: req.method().as_str(),
                path_and_query: &path,
                headers: req.headers(),
            },
        )
    } else {
        Choice::AsAddressed
    };
    // A request the routes refuse is still reported against the service addressed.
    let mut refusal = None;
    let (routed, route) = match choice {
        Choice::Backend(r) => {
            let path = r.path.clone();
            (Some(r), path)
        }
        other => {
            if !matches!(other, Choice::AsAddressed) {
                refusal = Some(other);
            }
            (
                None,
                pick(
                    &shared,
                    &conn.target,
                    conn.client.peer.local,
                    &crate::serve::PickKey {
                        headers: Some(req.headers()),
                        source: conn.client.peer.addr.ip(),
                    },
                ),
            )
        }
    };
    let target = routed.as_ref().map_or(&conn.target, |r| &r.target);
    let (destination, upstream_addr) = match &route {
        Route::Hbone {
            workload, target, ..
        } => (Some(workload.clone()), target.to_string()),
        Route::Direct {
            workload, target, ..
        } => (workload.clone(), target.to_string()),
        _ => (None, "-".to_owned()),
    };
    let labels = ConnLabels::new(
        &facts(&conn.client, target, destination.as_deref(), protocol),
        "-",
    );
    let authority = request_host.clone();
    // One host: the request target's authority when it has one, else `Host`; the
    // endpoint gets the same.
    if let Some(a) = req.uri().authority().cloned() {
        match conn.protocol {
            Protocol::Http1 => {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    req.headers_mut().insert(HOST, v);
                }
            }
            Protocol::Http2 => {
                if req
                    .headers()
                    .get(HOST)
                    .is_some_and(|h| h.as_bytes() != a.as_str().as_bytes())
                {
                    req.headers_mut().remove(HOST);
                }
            }
        }
    }
    let (request_id, span) = crate::headers::annotate_request_traced(
        req.headers_mut(),
        Some(conn.client.peer.addr.ip()),
        shared.sample_per_million,
    );
    let trace_id = span.trace_hex();
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let request_bytes = Arc::new(AtomicU64::new(0));
    let mut report = Report {
        shared: shared.clone(),
        labels,
        status: None,
        flags: "-",
        grpc_status: None,
        started,
        request_bytes: request_bytes.clone(),
        response_bytes: 0,
        method: req.method().clone(),
        authority: authority.clone(),
        path: path.clone(),
        protocol,
        request_id,
        trace_id,
        span,
        upstream: upstream_addr,
        source: conn.client.peer.identity.to_string(),
        source_workload: workload_name(conn.client.workload.as_deref()),
        destination_workload: workload_name(destination.as_deref()),
        service: target
            .service
            .as_ref()
            .map_or_else(String::new, |s| s.hostname.to_string()),
        route: routed
            .as_ref()
            .map_or_else(String::new, |r| r.route.clone()),
        rule: routed.as_ref().map_or_else(String::new, |r| r.rule.clone()),
        retries: 0,
        destination: destination
            .as_ref()
            .and_then(|w| w.identity())
            .map_or_else(|| "-".to_owned(), |id| id.to_string()),
        error: None,
        authz: String::new(),
        finished: false,
        upstream_time: None,
        _in_flight: destination.as_ref().map(|w| shared.in_flight.enter(&w.uid)),
        _request_slot: None,
        _connection_slot: None,
    };
    if let Err(e) = &normalized {
        return local(
            report,
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "-",
            Some(e.to_string()),
        );
    }

    // RequestAuthentication, before authorization reads what it established.
    let query = req.uri().query().map(str::to_owned);
    let auth = match crate::authn::check(&shared, &conn.target, req.headers_mut(), query.as_deref())
    {
        Ok(auth) => auth,
        Err(e) => {
            report.authz = format!("authentication failed: {e}");
            let mut resp = local(
                report,
                StatusCode::UNAUTHORIZED,
                e.reason(),
                "-",
                Some(e.to_string()),
            );
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return resp;
        }
    };
    let decision = {
        let state = shared.store.load();
        crate::authz::decide(
            &state,
            (&shared.config.namespace, &shared.config.name),
            &shared.trust_domains,
            &conn.client,
            &conn.target,
            Some(crate::authz::RequestFacts {
                method: req.method().as_str(),
                host: &authority,
                path: &path,
                headers: req.headers(),
                auth: auth.as_ref(),
            }),
        )
    };
    shared.metrics.decided(&decision.counted);
    let mut notes = Vec::new();
    if let Some(d) = &decision.dry_run {
        notes.push(format!("dry-run: {d}"));
    }
    if let Some(a) = &decision.audit {
        notes.push(format!("audit: {a}"));
    }
    if !decision.allowed {
        notes.insert(0, decision.reason.clone());
    }
    report.authz = notes.join("; ");
    // CUSTOM: the external authorizer decides first (as Istio orders CUSTOM before DENY
    // and ALLOW); what it adds to the response is kept for the response.
    let mut authorizer_response_headers = Vec::new();
    if let Some((policy, ext)) = &decision.custom {
        let request_id = report.request_id.clone();
        let outcome = crate::extauthz::check(
            &shared,
            &conn.client,
            &conn.target,
            ext,
            &crate::extauthz::Ask {
                method: req.method(),
                path: &path,
                host: &authority,
                headers: req.headers(),
                protocol: conn.protocol,
                request_id: &request_id,
            },
        )
        .await;
        use crate::extauthz::Outcome;
        shared.metrics.ext_authz(
            &ext.provider,
            match &outcome {
                Outcome::Allow { .. } => "allowed",
                Outcome::Deny { .. } => "denied",
                Outcome::Failed(_) if ext.fail_open => "failed_open",
                Outcome::Failed(_) => "failed",
            },
        );
        let said = |what: &str| {
            if report.authz.is_empty() {
                what.to_owned()
            } else {
                format!("{what}; {}", report.authz)
            }
        };
        match outcome {
            Outcome::Allow {
                request_headers,
                remove,
                response_headers,
            } => {
                let h = req.headers_mut();
                for name in remove {
                    h.remove(name);
                }
                for (name, value, append) in request_headers {
                    if append {
                        h.append(name, value);
                    } else {
                        h.insert(name, value);
                    }
                }
                authorizer_response_headers = response_headers;
                report.authz = said(&format!(
                    "allowed by {policy} (authorizer {})",
                    ext.provider
                ));
            }
            Outcome::Deny {
                status,
                headers,
                body,
            } => {
                report.authz = said(&format!("denied by {policy} (authorizer {})", ext.provider));
                let mut resp = local_with_body(report, status, body, "UAEX", None);
                for (name, value) in headers {
                    if name == CONTENT_TYPE {
                        resp.headers_mut().insert(name, value);
                    } else {
                        resp.headers_mut().append(name, value);
                    }
                }
                return resp;
            }
            Outcome::Failed(why) if ext.fail_open => {
                report.authz = said(&format!("allowed by failOpen of {policy}: {why}"));
            }
            Outcome::Failed(why) => {
                report.authz = said(&format!("denied by {policy}: {why}"));
                let status =
                    StatusCode::from_u16(ext.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
                return local_with_body(report, status, Bytes::new(), "UAEX", Some(why));
            }
        }
    }
    if !decision.allowed {
        // Envoy's RBAC answer, as Istio users know it.
        return local(
            report,
            StatusCode::FORBIDDEN,
            "RBAC: access denied",
            "-",
            None,
        );
    }

    match refusal {
        Some(Choice::NoMatch) => {
            return local(
                report,
                StatusCode::NOT_FOUND,
                "",
                "NR",
                Some("no rule of the service's routes matches the request".into()),
            );
        }
        Some(Choice::Redirect {
            route,
            rule,
            status,
            location,
        }) => {
            report.route = route;
            report.rule = rule;
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
            let mut resp = local(report, status, "", "-", None);
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    resp.headers_mut().insert(http::header::LOCATION, v);
                }
                Err(_) => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            }
            return resp;
        }
        Some(Choice::Invalid { route, rule, why }) => {
            report.route = route;
            report.rule = rule;
            return local(
                report,
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                "-",
                Some(why),
            );
        }
        _ => {}
    }

    // LocalRateLimit: of the service addressed, and of the waypoint as a whole.
    let rate = rate_limit(&shared, &conn, req.headers());
    if let Some((verdict, policy)) = &rate
        && !verdict.allowed
    {
        shared.metrics.rate_limited(policy);
        let mut resp = local(
            report,
            StatusCode::TOO_MANY_REQUESTS,
            "local_rate_limited",
            "RL",
            Some(format!("over the rate limit of {policy}")),
        );
        ratelimit_headers(resp.headers_mut(), verdict);
        return resp;
    }

    // CORS: a preflight is answered here; an allowed origin's response gets the headers.
    let mut cors_reply: Option<(ambit_core::http_route::Cors, String)> = None;
    if let Some(cors) = routed.as_ref().and_then(|r| r.cors.clone())
        && let Some(origin) = req
            .headers()
            .get(http::header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_owned)
    {
        let requested_method = req
            .headers()
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| m.to_str().ok())
            .map(str::to_owned);
        let allowed = cors.allows(&origin);
        if req.method() == http::Method::OPTIONS
            && let Some(method) = requested_method
        {
            let mut resp = local(report, StatusCode::OK, "", "-", None);
            if allowed {
                let requested_headers = req
                    .headers()
                    .get(http::header::ACCESS_CONTROL_REQUEST_HEADERS)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let h = resp.headers_mut();
                cors_headers(h, &cors, &origin);
                let methods = if cors.allow_methods.iter().any(|m| m == "*") {
                    method
                } else {
                    cors.allow_methods.join(", ")
                };
                let headers = if cors.allow_headers.iter().any(|m| m == "*") {
                    requested_headers
                } else {
                    cors.allow_headers.join(", ")
                };
                for (name, value) in [
                    (http::header::ACCESS_CONTROL_ALLOW_METHODS, methods),
                    (http::header::ACCESS_CONTROL_ALLOW_HEADERS, headers),
                ] {
                    if !value.is_empty()
                        && let Ok(v) = HeaderValue::from_str(&value)
                    {
                        h.insert(name, v);
                    }
                }
                if cors.max_age > 0 {
                    h.insert(
                        http::header::ACCESS_CONTROL_MAX_AGE,
                        HeaderValue::from(cors.max_age),
                    );
                }
            }
            return resp;
        }
        if allowed {
            cors_reply = Some((cors, origin));
        }
    }

    // Fault injection: a share of requests delayed, a share answered with an error.
    if let Some(fault) = routed.as_ref().and_then(|r| r.fault.clone()) {
        use ambit_core::http_route::{Abort, Fault};
        if let Some((delay, share)) = fault.delay
            && Fault::hits(share, fastrand::u32(..1_000_000))
        {
            tokio::time::sleep(delay).await;
            report.flags = "DI";
        }
        if let Some((abort, share)) = fault.abort
            && Fault::hits(share, fastrand::u32(..1_000_000))
        {
            let why = Some("fault injection: aborted by the route".to_owned());
            return match abort {
                Abort::Http(code) => local(
                    report,
                    StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "fault filter abort",
                    "FI",
                    why,
                ),
                Abort::Grpc(code) => {
                    report.grpc_status = Some(Value::from(code.to_string().as_str()));
                    let mut resp = local(report, StatusCode::OK, "", "FI", why);
                    let headers = resp.headers_mut();
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    if let Ok(v) = HeaderValue::from_str(&code.to_string()) {
                        headers.insert("grpc-status", v);
                    }
                    headers.insert(
                        "grpc-message",
                        HeaderValue::from_static("fault filter abort"),
                    );
                    resp
                }
            };
        }
    }

    // DestinationRule: the connection pool of the service the request goes to.
    let target = routed.as_ref().map_or(&conn.target, |r| &r.target);
    let backend_key = target.service.as_ref().map(|s| s.key());
    let dr = backend_key
        .as_deref()
        .and_then(|k| shared.store.load().backend_policy(k).cloned());
    let settings = dr
        .as_ref()
        .and_then(|p| p.backend.as_ref())
        .map(|b| b.for_port(target.authority.port()));
    let no_pool = ambit_core::traffic::Pool::default();
    let pool = settings.map_or(&no_pool, |s| &s.pool);
    let service_traffic = backend_key
        .as_deref()
        .filter(|_| settings.is_some())
        .map(|k| shared.traffic.service(k));
    if let (Some(t), Some(key)) = (&service_traffic, &backend_key) {
        let admitted = match t.admit(pool) {
            Ok(slot) => {
                report._request_slot = slot;
                if conn.protocol == Protocol::Http1 {
                    t.connection(pool)
                        .await
                        .map(|p| report._connection_slot = p)
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        if let Err(crate::traffic::Overflow(why)) = admitted {
            shared.metrics.overflowed(key);
            return local(
                report,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                "UO",
                Some(format!("{why} (DestinationRule of {key})")),
            );
        }
    }
    // Outlier detection: each endpoint's answer counts for or against it.
    let outlier = settings.and_then(|s| s.outlier.as_ref());
    let observe = |route: &Route, status: Option<Option<u16>>| {
        let (Some(outlier), Some(t), Some(key), Some(status)) =
            (outlier, &service_traffic, &backend_key, status)
        else {
            return;
        };
        let uid = match route {
            Route::Hbone { workload, .. } => &workload.uid,
            Route::Direct {
                workload: Some(w), ..
            } => &w.uid,
            _ => return,
        };
        let endpoints = || shared.store.load().endpoints(key).count();
        if t.record(outlier, uid, status, endpoints, shared.traffic.now_ms()) {
            shared.metrics.ejected(key);
            tracing::warn!(service = %key, endpoint = %uid, "outlier detection ejected an endpoint");
        }
    };
    let outcome = |r: &Result<(Response<Incoming>, Option<Lease>), UpstreamError>| match r {
        Ok((resp, _)) => Some(Some(resp.status().as_u16())),
        // Nothing was tried.
        Err(UpstreamError::NoHealthy) => None,
        Err(_) => Some(None),
    };

    let (mut parts, body) = req.into_parts();
    // URLRewrite: the backend sees the rewritten host and path.
    let path = routed
        .as_ref()
        .and_then(|r| r.path_and_query.clone())
        .unwrap_or(path);
    if let Some(r) = &routed {
        for m in &r.request_headers {
            m.apply(&mut parts.headers);
        }
        if let Some(h) = &r.host
            && let Ok(v) = HeaderValue::from_str(h)
        {
            match conn.protocol {
                Protocol::Http1 => {
                    parts.headers.insert(HOST, v);
                }
                Protocol::Http2 => {
                    parts.headers.remove(HOST);
                    let mut uri = std::mem::take(&mut parts.uri).into_parts();
                    uri.authority = h.parse().ok();
                    if uri.scheme.is_none() {
                        uri.scheme = Some(http::uri::Scheme::HTTP);
                    }
                    parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
                }
            }
        }
    }
    // The waypoint answers `Expect: 100-continue` itself (hyper sends the 100 when the
    // body is first read, that is when the endpoint is ready to take it).
    parts.headers.remove(EXPECT);
    match conn.protocol {
        Protocol::Http1 => {
            // Origin form toward the endpoint, with the one host checked above.
            parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(HOST)
                && let Ok(v) = HeaderValue::from_str(&authority)
                && !authority.is_empty()
            {
                parts.headers.insert(HOST, v);
            }
        }
        Protocol::Http2 => {
            parts.version = Version::HTTP_2;
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = path.parse().ok();
            parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
        }
    }
    // RequestMirror: a copy of the request to each mirror, in the background, its
    // answer dropped; never waited for. A body is copied as it streams (`tee`).
    let mut tee: Option<crate::tee::Tee> = None;
    if let Some(r) = &routed
        && !r.mirrors.is_empty()
    {
        for m in &r.mirrors {
            if !ambit_core::http_route::Fault::hits(m.per_million, fastrand::u32(..1_000_000)) {
                continue;
            }
            let Some(to) = routing::mirror_target(&shared, &conn.client, m) else {
                shared.metrics.mirrored("failed");
                continue;
            };
            let counted = Arc::new(AtomicU64::new(0));
            let mut copy = Request::new(if body.is_end_stream() {
                RequestBody::empty(counted)
            } else {
                RequestBody {
                    inner: Source::Mirror(tee.get_or_insert_with(Default::default).mirror()),
                    counted,
                }
            });
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = parts.uri.clone();
            *copy.version_mut() = parts.version;
            *copy.headers_mut() = parts.headers.clone();
            // As Envoy marks a shadow: the host with `-shadow`.
            if let Some(h) = copy.headers().get(HOST).and_then(|h| h.to_str().ok())
                && let Ok(v) = HeaderValue::from_str(&format!("{h}-shadow"))
            {
                copy.headers_mut().insert(HOST, v);
            }
            let shared = shared.clone();
            let protocol = conn.protocol;
            tokio::spawn(async move {
                let sent = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    upstream::send(
                        &shared,
                        &to,
                        protocol,
                        copy,
                        &ambit_core::traffic::Pool::default(),
                    ),
                )
                .await;
                shared.metrics.mirrored(match sent {
                    Ok(Ok(_)) => "sent",
                    _ => "failed",
                });
            });
        }
    }
    // A request without a body can be sent again: a route's retry applies to it.
    let retry = routed
        .as_ref()
        .and_then(|r| r.retry.clone())
        .filter(|_| body.is_end_stream() && downstream_upgrade.is_none());
    let template = retry.as_ref().map(|_| {
        let mut again = Request::new(());
        *again.method_mut() = parts.method.clone();
        *again.uri_mut() = parts.uri.clone();
        *again.version_mut() = parts.version;
        *again.headers_mut() = parts.headers.clone();
        again.into_parts().0
    });
    let first = Request::from_parts(
        parts,
        RequestBody {
            inner: Source::Client { body, tee },
            counted: request_bytes.clone(),
        },
    );
    let limit = routed.as_ref().and_then(|r| r.timeout);
    let attempts = async {
        let mut result = upstream::send(&shared, &route, conn.protocol, first, pool).await;
        observe(&route, outcome(&result));
        let (Some(policy), Some(template)) = (&retry, &template) else {
            return (result, 0);
        };
        let method_is_idempotent = matches!(
            template.method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::PUT
                | http::Method::DELETE
        );
        let mut retried = 0;
        while retried < policy.attempts {
            let again = match &result {
                Ok((resp, _)) => policy.codes.contains(&resp.status().as_u16()),
                // Never reached: safe to try elsewhere.
                Err(UpstreamError::NoHealthy)
                | Err(UpstreamError::Connect(_))
                | Err(UpstreamError::Refused(_))
                | Err(UpstreamError::Timeout(_)) => true,
                // The endpoint may have acted on it: only what is safe to repeat.
                Err(UpstreamError::Reset(_)) => method_is_idempotent,
                // Configuration, not chance: another try gives the same.
                Err(UpstreamError::NoSubset(_)) => false,
            };
            if !again {
                break;
            }
            retried += 1;
            drop(result);
            tokio::time::sleep(policy.wait(retried)).await;
            let target = routed.as_ref().map_or(&conn.target, |r| &r.target);
            let next = crate::serve::pick(
                &shared,
                target,
                conn.client.peer.local,
                &crate::serve::PickKey {
                    headers: Some(&template.headers),
                    source: conn.client.peer.addr.ip(),
                },
            );
            let mut req = Request::new(RequestBody::empty(request_bytes.clone()));
            *req.method_mut() = template.method.clone();
            *req.uri_mut() = template.uri.clone();
            *req.version_mut() = template.version;
            *req.headers_mut() = template.headers.clone();
            result = upstream::send(&shared, &next, conn.protocol, req, pool).await;
            observe(&next, outcome(&result));
        }
        (result, retried)
    };
    let (sent, retried) = match limit {
        Some(limit) => match tokio::time::timeout(limit, attempts).await {
            Ok(r) => r,
            Err(_) => {
                return local(
                    report,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    "UT",
                    Some(format!(
                        "no response within the route's timeout ({limit:?})"
                    )),
                );
            }
        },
        None => attempts.await,
    };
    if retried > 0 {
        report.retries = retried;
    }
    match sent {
        Ok((mut resp, lease)) => {
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let mut lease = lease;
            if switching && let Some(down) = downstream_upgrade {
                // The connection now belongs to the upgraded protocol, not the pool.
                lease = None;
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    match tokio::try_join!(down, up) {
                        Ok((down, up)) => {
                            let mut down = TokioIo::new(down);
                            let mut up = TokioIo::new(up);
                            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await
                                && !ambit_hbone::stream::is_reset(&e)
                            {
                                tracing::debug!(error = %e, "upgraded connection ended");
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
                    }
                });
            }
            let (mut parts, body) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers, switching);
            if let Some(r) = &routed {
                for m in &r.response_headers {
                    m.apply(&mut parts.headers);
                }
            }
            if let Some((cors, origin)) = &cors_reply {
                cors_headers(&mut parts.headers, cors, origin);
                if !cors.expose_headers.is_empty()
                    && let Ok(v) = HeaderValue::from_str(&cors.expose_headers.join(", "))
                {
                    parts
                        .headers
                        .insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
                }
            }
            if let Some((verdict, _)) = &rate {
                ratelimit_headers(&mut parts.headers, verdict);
            }
            for (name, value) in &authorizer_response_headers {
                parts.headers.append(name.clone(), value.clone());
            }
            report.status = Some(parts.status);
            report.upstream_time = Some(started.elapsed());
            report.grpc_status = grpc_status(&parts.headers);
            Response::from_parts(
                parts,
                ResponseBody {
                    inner: Inner::Proxied(body),
                    report: Some(report),
                    lease,
                },
            )
        }
        Err(e) => local(
            report,
            StatusCode::SERVICE_UNAVAILABLE,
            local_body(&e),
            e.flags(),
            Some(e.to_string()),
        ),
    }
}

/// The LocalRateLimits of the service addressed and of the waypoint itself: the
/// verdict (refused if any bucket refused) and the policy that decided.
fn rate_limit(
    shared: &Shared,
    conn: &Conn,
    headers: &HeaderMap,
) -> Option<(crate::traffic::Verdict, String)> {
    let state = shared.store.load();
    // Most waypoints have no rate limit: nothing is formatted or looked up for them.
    if !state.has_rate_limits() {
        return None;
    }
    let waypoint = format!("{}/{}", shared.config.namespace, shared.config.name);
    let service = conn.target.service.as_ref().map(|s| s.key());
    let principal = conn.client.peer.identity.to_string();
    let facts = crate::traffic::LimitFacts {
        headers,
        principal: &principal,
    };
    let now = shared.traffic.elapsed();
    let mut out: Option<(crate::traffic::Verdict, String)> = None;
    let policies = service
        .as_deref()
        .into_iter()
        .chain(std::iter::once(waypoint.as_str()))
        .flat_map(|t| state.traffic_for(t));
    for p in policies {
        let Some(limiter) = shared.traffic.limiter(p) else {
            continue;
        };
        let Some(v) = limiter.check(&facts, now) else {
            continue;
        };
        let replace = match &out {
            None => true,
            Some((o, _)) => {
                (!v.allowed, std::cmp::Reverse(v.remaining))
                    > (!o.allowed, std::cmp::Reverse(o.remaining))
            }
        };
        if replace {
            out = Some((v, p.key.to_string()));
        }
    }
    out
}

/// `x-ratelimit-limit`, `-remaining` and `-reset` (seconds, rounded up), as Envoy's
/// local rate limit writes them.
fn ratelimit_headers(h: &mut HeaderMap, v: &crate::traffic::Verdict) {
    let reset = v.reset.as_millis().div_ceil(1000) as u64;
    h.insert("x-ratelimit-limit", HeaderValue::from(v.limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(v.remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(reset));
}

/// `Access-Control-Allow-Origin` (and `Vary: Origin` when it names the origin) and
/// `Access-Control-Allow-Credentials` for an allowed origin.
fn cors_headers(h: &mut HeaderMap, cors: &ambit_core::http_route::Cors, origin: &str) {
    let value = cors.allow_origin_value(origin);
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    if value != "*" {
        h.append(http::header::VARY, HeaderValue::from_static("Origin"));
    }
    if cors.allow_credentials {
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// The waypoint's own answer with a body made at run time (an authorizer's denial).
fn local_with_body(
    report: Report,
    status: StatusCode,
    body: Bytes,
    flags: &'static str,
    error: Option<String>,
) -> Response<ResponseBody> {
    let mut resp = local(report, status, "", flags, error);
    resp.body_mut().inner = Inner::Local(Some(body));
    resp
}

/// The waypoint's own answer (an error or a denial), reported like any response.
fn local(
    mut report: Report,
    status: StatusCode,
    text: &'static str,
    flags: &'static str,
    error: Option<String>,
) -> Response<ResponseBody> {
    report.status = Some(status);
    report.flags = flags;
    report.error = error;
    report.response_bytes = 0;
    let mut resp = Response::new(ResponseBody {
        inner: Inner::Local(Some(Bytes::from_static(text.as_bytes()))),
        report: Some(report),
        lease: None,
    });
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
