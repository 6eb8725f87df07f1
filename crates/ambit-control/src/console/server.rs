//! The console's HTTP port: the page (`/`, `/app.js`, `/app.css`, all built into the
//! binary; nothing is loaded from anywhere else) and the JSON API (`/api/graph`,
//! `/api/workload?namespace=&name=`, `/api/policies`, `/api/waypoints`,
//! `/api/search?q=`). Read-only: GET only.
//!
//! Bound to loopback (the default) it needs no credential, like the other local admin
//! ports. Bound anywhere else it requires a bearer token (`--console-token-file`): an
//! API client sends `Authorization: Bearer <token>`; a browser opens
//! `/login?token=<token>` once, which sets an HttpOnly, SameSite=Strict cookie. Tokens are
//! compared in constant time and never logged.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_admin::{Page, RequestHandler};
use http::StatusCode;
use http::header::{self, HeaderName, HeaderValue};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Console;

/// The cookie a browser keeps the token in.
pub const COOKIE: &str = "ambit_console";

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Whether `addr` is a loopback address (no token needed).
pub fn is_local(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serves the console on `listener` until `stop`; `token` is required when set.
pub async fn serve(
    listener: TcpListener,
    console: Arc<Console>,
    token: Option<String>,
    stop: watch::Receiver<bool>,
) {
    let handler: RequestHandler =
        Arc::new(move |req| Some(respond(&console, token.as_deref(), req)));
    ambit_admin::serve_requests(listener, handler, stop).await
}

fn with_headers(mut page: Page, extra: &[(&'static str, &str)]) -> Page {
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(v) {
            page.headers.push((HeaderName::from_static(k), v));
        }
    }
    page
}

fn asset(content_type: &'static str, body: &str) -> Page {
    with_headers(
        Page {
            status: StatusCode::OK,
            content_type,
            body: body.to_owned(),
            headers: Vec::new(),
        },
        &[
            // Only this origin's own files; no inline script, no framing.
            (
                "content-security-policy",
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            ("x-content-type-options", "nosniff"),
            ("cache-control", "no-store"),
        ],
    )
}

/// Constant-time equality (the comparison does not stop at the first difference).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented(req: &http::request::Parts) -> Option<String> {
    if let Some(v) = req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_owned());
    }
    ambit_core::http_route::cookies(&req.headers)
        .find_map(|(k, v)| (k == COOKIE).then(|| v.to_owned()))
}

/// A query parameter, percent-decoded.
fn param(req: &http::request::Parts, name: &str) -> Option<String> {
    req.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(console: &Console, token: Option<&str>, req: &http::request::Parts) -> Page {
    let path = req.uri.path();
    if let Some(expected) = token {
        if path == "/login" {
            let given = param(req, "token").unwrap_or_default();
            if !same(given.as_bytes(), expected.as_bytes()) {
                return Page::text(StatusCode::UNAUTHORIZED, "the token is not the console's\n");
            }
            let mut page = Page::text(StatusCode::SEE_OTHER, "signed in\n");
            page = with_headers(
                page,
                &[
                    ("location", "/"),
                    (
                        "set-cookie",
                        &format!("{COOKIE}={expected}; HttpOnly; SameSite=Strict; Path=/"),
                    ),
                ],
            );
            return page;
        }
        let ok = presented(req).is_some_and(|t| same(t.as_bytes(), expected.as_bytes()));
        if !ok {
            return Page::text(
                StatusCode::UNAUTHORIZED,
                "the console needs its token: send `Authorization: Bearer <token>`, or open /login?token=<token> in the browser\n",
            );
        }
    }
    match path {
        "/" | "/index.html" => asset("text/html; charset=utf-8", INDEX),
        "/app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "/app.css" => asset("text/css; charset=utf-8", APP_CSS),
        "/api/graph" => Page::json(&console.graph()),
        "/api/policies" => Page::json(&console.policies()),
        "/api/waypoints" => Page::json(&console.waypoints()),
        "/api/search" => Page::json(&console.search(&param(req, "q").unwrap_or_default())),
        "/api/workload" => {
            let ns = param(req, "namespace").unwrap_or_default();
            let name = param(req, "name").unwrap_or_default();
            match console.workload(&ns, &name) {
                Some(w) => Page::json(&w),
                None => Page::text(
                    StatusCode::NOT_FOUND,
                    format!("no workload {ns}/{name} in the mesh\n"),
                ),
            }
        }
        _ => Page::text(StatusCode::NOT_FOUND, "no such page\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_in_full_and_queries_decode() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert_eq!(decode("a%20b+c%2Fd%zz%"), "a b c/d%zz%");
        assert_eq!(decode("é%C3%A9%"), "éé%");
    }
}
