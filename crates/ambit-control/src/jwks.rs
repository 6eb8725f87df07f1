//! JSON Web Key Sets named by RequestAuthentication `jwksUri`, fetched by the control
//! plane and pushed inline to waypoints (as istiod does by default): waypoints need no
//! route to identity providers, and every replica checks tokens with the same keys.
//!
//! Translation asks [`JwksCache::lookup`]; a URI seen for the first time is fetched in
//! the background by [`JwksCache::run`], and the translator is woken (the `changed`
//! watch) when a key set arrives or changes. Until a set has been fetched, and after a
//! fetch fails with no earlier set, the rule carries the reason and the waypoint refuses
//! that issuer's tokens (fail closed). A set fetched once is kept through later failures
//! and refreshed every [`REFRESH`].
//!
//! Schemes: `https://` (the system's roots), `http://`, and `file://` (a path on the
//! control plane's machine, for one-machine meshes). A response is bounded by
//! [`MAX_JWKS_BYTES`] and a fetch by [`FETCH_TIMEOUT`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use tokio::sync::watch;

/// How often a fetched key set is fetched again.
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// The longest a fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set accepted.
pub const MAX_JWKS_BYTES: usize = 512 * 1024;
/// At most this many distinct URIs are fetched (each RequestAuthentication names a few).
pub const MAX_URIS: usize = 1024;

#[derive(Debug, Clone)]
struct Entry {
    /// The last key set fetched, if any.
    jwks: Option<String>,
    /// Why the last fetch failed (cleared by a success).
    error: Option<String>,
    /// When to fetch next.
    due: Instant,
    failures: u32,
    /// Still named by some rule at the last translation (unused URIs are dropped).
    used: bool,
}

/// The key sets of every `jwksUri`, shared by the translator and the fetcher.
#[derive(Clone)]
pub struct JwksCache {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache").finish_non_exhaustive()
    }
}

impl Default for JwksCache {
    fn default() -> Self {
        Self {
            entries: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl JwksCache {
    /// The key set fetched from `uri`, or why there is none yet. A new URI is queued for
    /// fetching.
    pub fn lookup(&self, uri: &str) -> Result<String, String> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(uri) {
            e.used = true;
            return match (&e.jwks, &e.error) {
                (Some(j), _) => Ok(j.clone()),
                (None, Some(why)) => Err(format!("fetching {uri} failed: {why}")),
                (None, None) => Err(format!("the keys at {uri} are being fetched")),
            };
        }
        if entries.len() >= MAX_URIS {
            return Err(format!(
                "more than {MAX_URIS} jwksUri values; {uri} is not fetched"
            ));
        }
        entries.insert(
            uri.to_owned(),
            Entry {
                jwks: None,
                error: None,
                due: Instant::now(),
                failures: 0,
                used: true,
            },
        );
        // Wake the fetcher.
        self.changed.send_modify(|_| {});
        Err(format!("the keys at {uri} are being fetched"))
    }

    /// Wakes when a key set arrived, changed, or a fetch newly failed: translations that
    /// read the cache are then out of date.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn generation_bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Fetches what is due, forever (until `stop`).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut wake = self.changed.subscribe();
        loop {
            let now = Instant::now();
            let due: Vec<String> = {
                let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                entries
                    .iter()
                    .filter(|(_, e)| e.used && e.due <= now)
                    .map(|(k, _)| k.clone())
                    .collect()
            };
            for uri in due {
                let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&uri))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")))
                    .and_then(|body| {
                        ambit_core::jwt::Jwks::parse(&body)
                            .map(|_| body)
                            .map_err(|e| e.to_string())
                    });
                let changed;
                {
                    let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(e) = entries.get_mut(&uri) else {
                        continue;
                    };
                    match result {
                        Ok(body) => {
                            changed = e.jwks.as_ref() != Some(&body) || e.error.is_some();
                            if e.error.is_some() {
                                tracing::info!(%uri, "JWKS fetched again");
                            }
                            e.jwks = Some(body);
                            e.error = None;
                            e.failures = 0;
                            e.due = Instant::now() + REFRESH;
                        }
                        Err(why) => {
                            tracing::warn!(%uri, error = %why, kept_previous = e.jwks.is_some(), "JWKS fetch failed; retrying");
                            changed = e.error.is_none() && e.jwks.is_none();
                            e.error = Some(why);
                            e.failures += 1;
                            let backoff = Duration::from_secs(1 << e.failures.min(6));
                            e.due = Instant::now() + backoff;
                        }
                    }
                }
                if changed {
                    self.generation_bump();
                }
            }
            let next = {
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                entries.retain(|_, e| e.used);
                entries.values().map(|e| e.due).min()
            };
            let sleep = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                r = wake.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    }
}

/// One fetch of `uri`'s body.
async fn fetch(uri: &str) -> Result<String, String> {
    if let Some(path) = uri.strip_prefix("file://") {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| format!("reading {path}: {e}"))?;
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!("more than {MAX_JWKS_BYTES} bytes"));
        }
        return String::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned());
    }
    let parsed: http::Uri = uri.parse().map_err(|e| format!("not a URI: {e}"))?;
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => {
            return Err(format!(
                "scheme {other:?} is not fetched; use https://, http:// or file://"
            ));
        }
    };
    let host = parsed.host().ok_or("no host")?.to_owned();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let request = http::Request::get(parsed.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            parsed.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if https {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err("no system root certificates to verify the server with".into());
        }
        let config = rustls::ClientConfig::builder_with_provider(
            ambit_tls::config::default_crypto_provider(),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(bare.clone())
            .map_err(|e| format!("server name {bare:?}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(tls, request).await?
    } else {
        send(tcp, request).await?
    };
    Ok(response)
}

async fn send<S>(io: S, request: http::Request<Empty<bytes::Bytes>>) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("the server answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_sets_are_fetched_from_files_and_http_and_failures_are_reported() {
        let signer = ambit_core::jwt::Jwks::parse(SET).unwrap();
        assert_eq!(signer.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, SET).unwrap();
        let file = format!("file://{}", path.display());
        // A loopback HTTP server answering the set once, then 500.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_uri = format!("http://{}/keys", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply = if n == 0 {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{SET}",
                        SET.len()
                    )
                } else {
                    "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n".to_owned()
                };
                n += 1;
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let cache = JwksCache::default();
        let mut changed = cache.subscribe();
        let missing = "file:///nonexistent/keys.json";
        for uri in [&file, &http_uri, &missing.to_owned()] {
            assert!(cache.lookup(uri).unwrap_err().contains("being fetched"));
        }
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(cache.clone().run(stop));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = cache.lookup(&file).is_ok()
                && cache.lookup(&http_uri).is_ok()
                && cache.lookup(missing).unwrap_err().contains("failed");
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "fetches did not finish");
            tokio::time::timeout(Duration::from_secs(1), changed.changed())
                .await
                .ok();
        }
        assert_eq!(cache.lookup(&file).unwrap(), SET);
        assert_eq!(cache.lookup(&http_uri).unwrap(), SET);
        let why = cache.lookup(missing).unwrap_err();
        assert!(why.contains("No such file"), "{why}");
        assert!(
            fetch("ftp://x/keys").await.unwrap_err().contains("scheme"),
            "other schemes are refused"
        );
    }

    const SET: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
}
