//! External authorization (AuthorizationPolicy action CUSTOM): a request a CUSTOM policy
//! matches is described to the policy's authorizer, and goes on only if it allows.
//!
//! Both of Istio's provider kinds are spoken:
//! - `envoyExtAuthzGrpc`: Envoy's `envoy.service.auth.v3.Authorization/Check` over
//!   HTTP/2, the request's method, path, host and headers in a `CheckRequest`, the peers'
//!   addresses and SPIFFE IDs; a `CheckResponse` with status 0 allows (its headers are
//!   set on the request, its `headers_to_remove` removed, its response headers added to
//!   the answer), any other denies with its `denied_response` (status, headers, body).
//! - `envoyExtAuthzHttp`: the request's method with `pathPrefix` + its path, and the
//!   headers Envoy sends by default (`authorization`, `host`, `method`, `path`... see
//!   [`HTTP_DEFAULT_HEADERS`]) plus the configured ones, no body; 200 allows (copying
//!   `headersToUpstreamOnAllow` onto the request), any other status denies with that
//!   status, body and `headersToDownstreamOnDeny`; a 5xx is a failure.
//!
//! The authorizer is a Service of the mesh, reached like any backend (HBONE, mutual
//! TLS). No answer within the provider's timeout, a connection failure, a malformed
//! answer or a 5xx is a failure: the request is answered `statusOnError` (403 by
//! default) unless `failOpen` lets it through. Answers are read up to
//! [`MAX_ANSWER_BYTES`].

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use ambit_core::policy::ExtAuthz;
use ambit_proto::ext_authz as pb;
use ambit_proto::prost::Message;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::Shared;
use crate::http::RequestBody;
use crate::serve::{Client, Target};
use crate::upstream::{self, Protocol};

/// The largest authorizer answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Request headers the HTTP variant always sends, as Envoy does.
pub const HTTP_DEFAULT_HEADERS: [&str; 4] = ["authorization", "host", "x-request-id", "cookie"];

/// What the authorizer said.
#[derive(Debug)]
pub(crate) enum Outcome {
    Allow {
        /// Set on the request (`true`: appended).
        request_headers: Vec<(HeaderName, HeaderValue, bool)>,
        remove: Vec<HeaderName>,
        /// Added to the response the client gets.
        response_headers: Vec<(HeaderName, HeaderValue)>,
    },
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
    /// The authorizer could not be asked or answered nonsense.
    Failed(String),
}

/// The facts of the request the authorizer is told.
pub(crate) struct Ask<'a> {
    pub method: &'a Method,
    /// Path and query, as routed.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub protocol: Protocol,
    pub request_id: &'a str,
}

/// Asks `ext` about a request, within its timeout.
pub(crate) async fn check(
    shared: &Arc<Shared>,
    client: &Client,
    target: &Target,
    ext: &ExtAuthz,
    ask: &Ask<'_>,
) -> Outcome {
    if let Some(e) = &ext.error {
        return Outcome::Failed(format!("provider {} cannot be used: {e}", ext.provider));
    }
    let Some(route) = crate::routing::service_target(shared, client, &ext.service, ext.port) else {
        return Outcome::Failed(format!(
            "the authorizer's service {} is not known to this waypoint",
            ext.service
        ));
    };
    let call = async {
        if ext.grpc {
            grpc(shared, &route, client, target, ext, ask).await
        } else {
            http_check(shared, &route, ext, ask).await
        }
    };
    match tokio::time::timeout(ext.timeout, call).await {
        Ok(o) => o,
        Err(_) => Outcome::Failed(format!(
            "the authorizer {} did not answer within {:?}",
            ext.service, ext.timeout
        )),
    }
}

fn authority(ext: &ExtAuthz) -> String {
    let host = ext
        .service
        .split_once('/')
        .map_or(&*ext.service, |(_, h)| h);
    format!("{host}:{}", ext.port)
}

async fn grpc(
    shared: &Arc<Shared>,
    route: &ambit_core::route::Route,
    client: &Client,
    target: &Target,
    ext: &ExtAuthz,
    ask: &Ask<'_>,
) -> Outcome {
    let mut headers = std::collections::HashMap::new();
    for name in ask.headers.keys() {
        let joined: Vec<String> = ask
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.as_str().to_owned(), joined.join(","));
    }
    headers.insert(":method".into(), ask.method.as_str().to_owned());
    headers.insert(":path".into(), ask.path.to_owned());
    headers.insert(":authority".into(), ask.host.to_owned());
    let query = ask.path.split_once('?').map_or("", |(_, q)| q);
    let peer = |addr: std::net::SocketAddr, principal: String| pb::attribute_context::Peer {
        address: Some(pb::Address {
            socket_address: Some(pb::SocketAddress {
                protocol: 0,
                address: addr.ip().to_string(),
                port_value: u32::from(addr.port()),
            }),
        }),
        principal,
        ..Default::default()
    };
    let request = pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(peer(client.peer.addr, client.peer.identity.to_string())),
            destination: Some(peer(target.authority, String::new())),
            request: Some(pb::attribute_context::Request {
                http: Some(pb::attribute_context::HttpRequest {
                    id: ask.request_id.to_owned(),
                    method: ask.method.as_str().to_owned(),
                    headers,
                    path: ask.path.to_owned(),
                    host: ask.host.to_owned(),
                    scheme: "http".into(),
                    query: query.to_owned(),
                    protocol: match ask.protocol {
                        Protocol::Http1 => "HTTP/1.1".into(),
                        Protocol::Http2 => "HTTP/2".into(),
                    },
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    let message = request.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    let mut req = http::Request::new(RequestBody::full(
        framed.freeze(),
        Arc::new(AtomicU64::new(0)),
    ));
    *req.method_mut() = Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    let uri = format!("http://{}{}", authority(ext), pb::CHECK_PATH);
    match uri.parse() {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => return Outcome::Failed(format!("authorizer address: {e}")),
    }
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let sent = upstream::send(
        shared,
        route,
        Protocol::Http2,
        req,
        &ambit_core::traffic::Pool::default(),
    )
    .await;
    let (resp, _lease) = match sent {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("calling the authorizer: {e}")),
    };
    if resp.status() != StatusCode::OK {
        return Outcome::Failed(format!("the authorizer answered HTTP {}", resp.status()));
    }
    let (parts, body) = resp.into_parts();
    let collected = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("reading the authorizer's answer: {e}")),
    };
    // Trailers, or the headers of a trailers-only answer.
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    if status != Some(0) {
        return Outcome::Failed(format!(
            "the authorizer's Check failed with gRPC status {}",
            status.map_or_else(|| "(none)".to_owned(), |s| s.to_string())
        ));
    }
    let mut bytes = collected.to_bytes();
    if bytes.len() < 5 || bytes[0] != 0 {
        return Outcome::Failed(
            "the authorizer's answer is not one uncompressed gRPC message".into(),
        );
    }
    bytes.advance(1);
    let len = bytes.get_u32() as usize;
    if bytes.len() != len {
        return Outcome::Failed("the authorizer's answer is not one gRPC message".into());
    }
    let answer = match pb::CheckResponse::decode(bytes) {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(format!("the authorizer's answer does not decode: {e}")),
    };
    read_check_response(answer)
}

/// A `CheckResponse` as an outcome.
fn read_check_response(answer: pb::CheckResponse) -> Outcome {
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    let options = |list: &[pb::HeaderValueOption]| -> Vec<(HeaderName, HeaderValue, bool)> {
        list.iter()
            .filter_map(|o| {
                let h = o.header.as_ref()?;
                let value = if h.raw_value.is_empty() {
                    HeaderValue::from_str(&h.value).ok()?
                } else {
                    HeaderValue::from_bytes(&h.raw_value).ok()?
                };
                Some((
                    HeaderName::from_bytes(h.key.as_bytes()).ok()?,
                    value,
                    o.append.as_ref().is_some_and(|a| a.value),
                ))
            })
            .collect()
    };
    if code == 0 {
        let ok = match answer.http_response {
            Some(pb::check_response::HttpResponse::OkResponse(ok)) => ok,
            _ => pb::OkHttpResponse::default(),
        };
        return Outcome::Allow {
            request_headers: options(&ok.headers),
            remove: ok
                .headers_to_remove
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                // Pseudo-headers and the host are not the authorizer's to remove.
                .filter(|h| *h != http::header::HOST)
                .collect(),
            response_headers: options(&ok.response_headers_to_add)
                .into_iter()
                .map(|(n, v, _)| (n, v))
                .collect(),
        };
    }
    let (status, headers, body) = match answer.http_response {
        Some(pb::check_response::HttpResponse::DeniedResponse(d)) => (
            d.status
                .and_then(|s| u16::try_from(s.code).ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .filter(|s| s.as_u16() >= 200)
                .unwrap_or(StatusCode::FORBIDDEN),
            options(&d.headers)
                .into_iter()
                .map(|(n, v, _)| (n, v))
                .collect(),
            Bytes::from(d.body),
        ),
        _ => (StatusCode::FORBIDDEN, Vec::new(), Bytes::new()),
    };
    Outcome::Deny {
        status,
        headers,
        body,
    }
}

async fn http_check(
    shared: &Arc<Shared>,
    route: &ambit_core::route::Route,
    ext: &ExtAuthz,
    ask: &Ask<'_>,
) -> Outcome {
    let mut req = http::Request::new(RequestBody::full(Bytes::new(), Arc::new(AtomicU64::new(0))));
    *req.method_mut() = ask.method.clone();
    let path = format!("{}{}", ext.path_prefix, ask.path);
    match path.parse() {
        Ok(p) => *req.uri_mut() = p,
        Err(e) => return Outcome::Failed(format!("the check path {path:?}: {e}")),
    }
    let h = req.headers_mut();
    let wanted = HTTP_DEFAULT_HEADERS
        .iter()
        .copied()
        .chain(ext.include_request_headers.iter().map(|s| &**s));
    for name in wanted {
        if name == "host" {
            continue;
        }
        for v in ask.headers.get_all(name) {
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                h.append(n, v.clone());
            }
        }
    }
    for (k, v) in &ext.include_additional_headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(n, v);
        }
    }
    // The authorizer sees the request's own host, as Envoy sends it.
    if let Ok(v) = HeaderValue::from_str(ask.host) {
        h.insert(http::header::HOST, v);
    }
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    let sent = upstream::send(
        shared,
        route,
        Protocol::Http1,
        req,
        &ambit_core::traffic::Pool::default(),
    )
    .await;
    let (resp, lease) = match sent {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("calling the authorizer: {e}")),
    };
    let (parts, body) = resp.into_parts();
    let body = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Outcome::Failed(format!("reading the authorizer's answer: {e}")),
    };
    if let Some(l) = lease {
        l.give_back();
    }
    let pick = |names: &[ambit_core::discovery::Str]| -> Vec<(HeaderName, HeaderValue)> {
        names
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .flat_map(|n| {
                parts
                    .headers
                    .get_all(&n)
                    .iter()
                    .map(|v| (n.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    if parts.status.is_server_error() {
        return Outcome::Failed(format!("the authorizer answered HTTP {}", parts.status));
    }
    if parts.status == StatusCode::OK {
        return Outcome::Allow {
            request_headers: pick(&ext.headers_to_upstream_on_allow)
                .into_iter()
                .map(|(n, v)| (n, v, false))
                .collect(),
            remove: Vec::new(),
            response_headers: pick(&ext.headers_to_downstream_on_allow),
        };
    }
    Outcome::Deny {
        status: parts.status,
        headers: pick(&ext.headers_to_downstream_on_deny),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(k: &str, v: &str, append: bool) -> pb::HeaderValueOption {
        pb::HeaderValueOption {
            header: Some(pb::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: Vec::new(),
            }),
            append: Some(pb::BoolValue { value: append }),
        }
    }

    #[test]
    fn check_responses_allow_or_deny_as_envoy_reads_them() {
        let ok = pb::CheckResponse {
            status: Some(pb::RpcStatus::default()),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![
                        option("x-user", "alice", false),
                        option("bad name", "x", false),
                    ],
                    headers_to_remove: vec!["authorization".into(), "host".into()],
                    response_headers_to_add: vec![option("x-checked", "yes", false)],
                },
            )),
        };
        match read_check_response(ok) {
            Outcome::Allow {
                request_headers,
                remove,
                response_headers,
            } => {
                assert_eq!(request_headers.len(), 1, "invalid names are dropped");
                assert_eq!(request_headers[0].0, "x-user");
                assert_eq!(remove, [http::header::AUTHORIZATION], "never the host");
                assert_eq!(response_headers[0].1, "yes");
            }
            other => panic!("{other:?}"),
        }
        let denied = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                message: "no".into(),
            }),
            http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                pb::DeniedHttpResponse {
                    status: Some(pb::HttpStatus { code: 401 }),
                    headers: vec![option("www-authenticate", "Basic", false)],
                    body: "who are you".into(),
                },
            )),
        };
        match read_check_response(denied) {
            Outcome::Deny {
                status,
                headers,
                body,
            } => {
                assert_eq!(status, 401);
                assert_eq!(headers[0].0, "www-authenticate");
                assert_eq!(body, "who are you");
            }
            other => panic!("{other:?}"),
        }
        // A denial without a response, or with a status that is not a final one: 403.
        for code in [None, Some(100), Some(-1), Some(70000)] {
            let r = pb::CheckResponse {
                status: Some(pb::RpcStatus {
                    code: 16,
                    message: String::new(),
                }),
                http_response: code.map(|c| {
                    pb::check_response::HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: c }),
                        ..Default::default()
                    })
                }),
            };
            assert!(
                matches!(read_check_response(r), Outcome::Deny { status, .. } if status == 403),
                "{code:?}"
            );
        }
    }
}
