//! What the TLS provider costs per byte: ring (Ambit's provider) against aws-lc-rs, in
//! the same run, on the path every tunnelled byte takes: TLS 1.3 AES-256-GCM records
//! (Istio's first suite) encrypted by one rustls connection and decrypted by its peer,
//! in memory, so nothing but the provider and rustls' record layer is measured.
//!
//! ```sh
//! cargo run --release -p ambit-crypto-bench --features aws-lc
//! ```
//!
//! Five rounds, providers alternating; prints ns per byte (one thread, in memory: CPU
//! time) per direction, medians with min and max, and the ratio aws-lc-rs/ring.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// Bytes per measurement.
const TOTAL: usize = 512 << 20;
/// What the application hands rustls at a time (the node proxy's copy buffer grows to
/// 256 KiB; rustls cuts it into 16 KiB records).
const CHUNK: usize = 256 << 10;
const ROUNDS: usize = 5;

fn only_aes256(p: CryptoProvider, suite: rustls::SupportedCipherSuite) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..p
    })
}

fn providers() -> Vec<(&'static str, Arc<CryptoProvider>)> {
    vec![
        (
            "ring",
            only_aes256(
                rustls::crypto::ring::default_provider(),
                rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ),
        ),
        (
            "aws-lc-rs",
            only_aes256(
                rustls::crypto::aws_lc_rs::default_provider(),
                rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ),
        ),
    ]
}

/// A connected client/server pair over memory.
fn pair(
    provider: &Arc<CryptoProvider>,
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
) -> anyhow::Result<(rustls::ClientConnection, rustls::ServerConnection)> {
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone())?;
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("bench.local")?.to_owned(),
    )?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    // A whole chunk is encrypted at once, as the proxy's batched writer does.
    c.set_buffer_limit(None);
    s.set_buffer_limit(None);
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        wire.clear();
        c.write_tls(&mut wire)?;
        s.read_tls(&mut wire.as_slice())?;
        s.process_new_packets()?;
        wire.clear();
        s.write_tls(&mut wire)?;
        c.read_tls(&mut wire.as_slice())?;
        c.process_new_packets()?;
    }
    Ok((c, s))
}

/// Moves TOTAL bytes from `tx` to `rx`; returns seconds.
fn transfer(
    tx: &mut dyn rustls_like::Conn,
    rx: &mut dyn rustls_like::Conn,
    data: &[u8],
) -> anyhow::Result<f64> {
    let mut wire = Vec::with_capacity(CHUNK + 4096);
    let mut sink = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut moved = 0;
    while moved < TOTAL {
        tx.write_plain(data)?;
        wire.clear();
        while tx.wants_out() {
            tx.tls_out(&mut wire)?;
        }
        let mut rest = wire.as_slice();
        let mut got = 0;
        while !rest.is_empty() || got < data.len() {
            if !rest.is_empty() {
                rx.tls_in(&mut rest)?;
                rx.process()?;
            }
            let n = rx.read_plain(&mut sink)?;
            if n == 0 && rest.is_empty() {
                break;
            }
            got += n;
        }
        anyhow::ensure!(got == data.len(), "lost bytes: {got} of {}", data.len());
        moved += got;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The two connection types behind one interface.
mod rustls_like {
    use super::*;

    pub trait Conn {
        fn write_plain(&mut self, b: &[u8]) -> std::io::Result<()>;
        fn wants_out(&self) -> bool;
        fn tls_out(&mut self, w: &mut Vec<u8>) -> std::io::Result<usize>;
        fn tls_in(&mut self, r: &mut &[u8]) -> std::io::Result<usize>;
        fn process(&mut self) -> anyhow::Result<()>;
        fn read_plain(&mut self, b: &mut [u8]) -> std::io::Result<usize>;
    }

    macro_rules! conn {
        ($t:ty) => {
            impl Conn for $t {
                fn write_plain(&mut self, b: &[u8]) -> std::io::Result<()> {
                    self.writer().write_all(b)
                }
                fn wants_out(&self) -> bool {
                    self.wants_write()
                }
                fn tls_out(&mut self, w: &mut Vec<u8>) -> std::io::Result<usize> {
                    self.write_tls(w)
                }
                fn tls_in(&mut self, r: &mut &[u8]) -> std::io::Result<usize> {
                    self.read_tls(r)
                }
                fn process(&mut self) -> anyhow::Result<()> {
                    self.process_new_packets()?;
                    Ok(())
                }
                fn read_plain(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                    match self.reader().read(b) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                        r => r,
                    }
                }
            }
        };
    }
    conn!(rustls::ClientConnection);
    conn!(rustls::ServerConnection);
}

fn main() -> anyhow::Result<()> {
    let made = rcgen::generate_simple_self_signed(vec!["bench.local".to_owned()])
        .context("making a certificate")?;
    let cert = made.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let providers = providers();
    // [provider][direction] -> ns per byte
    let mut results = vec![[Vec::new(), Vec::new()]; providers.len()];
    for round in 0..ROUNDS {
        for k in 0..providers.len() {
            let i = (k + round) % providers.len();
            let (name, p) = &providers[i];
            let (mut c, mut s) = pair(p, &cert, &key)?;
            for (dir, label) in ["client -> server", "server -> client"].iter().enumerate() {
                let secs = if dir == 0 {
                    transfer(&mut c, &mut s, &data)?
                } else {
                    transfer(&mut s, &mut c, &data)?
                };
                // One thread, in memory, never waiting: its wall time is its CPU time.
                let ns = secs * 1e9 / TOTAL as f64;
                eprintln!(
                    "round {} {name} {label}: {:.2} GB/s, {ns:.3} ns per byte",
                    round + 1,
                    TOTAL as f64 / secs / 1e9
                );
                results[i][dir].push(ns);
            }
        }
    }
    let stats = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!(
        "\n| TLS 1.3 AES-256-GCM, encrypt + decrypt, in memory | ring | aws-lc-rs | aws-lc-rs/ring |\n|---|---|---|---|"
    );
    for (dir, label) in ["client -> server", "server -> client"].iter().enumerate() {
        let (r, rlo, rhi) = stats(&results[0][dir]);
        let (a, alo, ahi) = stats(&results[1][dir]);
        println!(
            "| {label}: time per byte (GB/s on one core) | {r:.3} ns ({rlo:.3}–{rhi:.3}; {:.2} GB/s) | {a:.3} ns ({alo:.3}–{ahi:.3}; {:.2} GB/s) | {:.2}x |",
            1.0 / r,
            1.0 / a,
            a / r
        );
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or_default();
    println!("\nOne thread; CPU:{model}.");
    Ok(())
}
