//! A fixed-rate HTTP/1.1 load generator that does not hide stalls: request `k` is due at
//! `start + k / rate`, and its latency counts from then, not from when it could finally
//! be sent. A proxy that stalls for 50 ms therefore shows 50 ms of latency on every
//! request that fell due during the stall, not on the one request that was waiting
//! (the "coordinated omission" of closed-loop clients, wrk's fixed-rate mode included).
//!
//! Run it inside the client's network namespace; it prints one JSON object:
//!
//! ```sh
//! ip netns exec CLIENT fixed-rate --addr 198.18.2.10:8080 --rate 1000 --seconds 8
//! ```
//!
//! The requests are spread over `--connections` connections, one thread each, in turn;
//! with `--close` each request opens its own connection (and the connect counts). The
//! output has the latency quantiles (µs), the per-100 ms maxima and counts by due time
//! (the timeline, starting at `start_unix_ns`), the client's own lateness (how late the
//! threads woke up to send: if that is large, the client machine was starved, not the
//! path) and the errors.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// The HTTP server (or the address the client pod reaches it by).
    #[arg(long)]
    addr: SocketAddr,
    /// Requests per second, all connections together.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long to send.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Connections (one thread each) the requests are spread over.
    #[arg(long, default_value_t = 10)]
    connections: u32,
    /// A new connection per request, closed by the server after its answer.
    #[arg(long)]
    close: bool,
}

/// Timeline resolution.
const SLOT: Duration = Duration::from_millis(100);
/// No single request may take longer than this (it then counts as an error).
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// One request's outcome: when it was due (from start), its latency from then, and how
/// late its thread started sending it.
struct Done {
    due: Duration,
    latency: Duration,
    late: Duration,
    ok: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate == 0 || args.connections == 0 || args.seconds == 0 {
        bail!("--rate, --connections and --seconds must be at least 1");
    }
    // Every due time and result is kept: bound what the flags can ask for.
    if u64::from(args.rate) * args.seconds > 100_000_000 || args.connections > 10_000 {
        bail!("at most 100 million requests (--rate x --seconds) and 10,000 --connections");
    }
    let total = u64::from(args.rate) * args.seconds;
    let interval = Duration::from_secs(1) / args.rate;
    let request: &'static [u8] = if args.close {
        b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    };
    // Open the keep-alive connections before the clock starts.
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        conns.push(if args.close {
            None
        } else {
            Some(connect(args.addr)?)
        });
    }
    let start = Instant::now() + Duration::from_millis(100);
    let start_unix = SystemTime::now() + Duration::from_millis(100);
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let (addr, n) = (args.addr, u64::from(args.connections));
            std::thread::spawn(move || {
                let mut out = Vec::with_capacity((total / n + 1) as usize);
                let mut buf = vec![0u8; 64 * 1024];
                let mut k = i as u64;
                while k < total {
                    let due_at = start + interval * k as u32;
                    let now = Instant::now();
                    // Behind (the previous request was slow): send now; the wait is
                    // part of this request's latency. Ahead: sleep, and how late the
                    // thread woke is the client's own delay.
                    let slept = now < due_at;
                    if slept {
                        std::thread::sleep(due_at - now);
                    }
                    let sent = Instant::now();
                    let ok = one(&mut conn, addr, request, &mut buf).is_ok();
                    if !ok {
                        // Start afresh on the next request.
                        conn = None;
                    }
                    let end = Instant::now();
                    out.push(Done {
                        due: due_at - start,
                        latency: end.saturating_duration_since(due_at),
                        late: if slept {
                            sent.saturating_duration_since(due_at)
                        } else {
                            Duration::ZERO
                        },
                        ok,
                    });
                    k += n;
                }
                out
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total as usize);
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?,
        );
    }
    println!("{}", summary(&all, start_unix, args.seconds));
    Ok(())
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let c = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(TIMEOUT))?;
    c.set_write_timeout(Some(TIMEOUT))?;
    Ok(c)
}

/// Sends one request and reads its whole answer (by Content-Length, or to the close).
fn one(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    request: &[u8],
    buf: &mut [u8],
) -> anyhow::Result<()> {
    let close = conn.is_none() || request.ends_with(b"close\r\n\r\n");
    if conn.is_none() {
        *conn = Some(connect(addr)?);
    }
    let Some(c) = conn.as_mut() else {
        bail!("no connection");
    };
    c.write_all(request)?;
    let mut have = 0;
    let limit = buf.len().min(MAX_HEAD);
    let head_end = loop {
        if have >= limit {
            bail!("response head larger than {MAX_HEAD} bytes");
        }
        let n = c.read(&mut buf[have..limit])?;
        if n == 0 {
            bail!("closed before the response head");
        }
        have += n;
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head not UTF-8")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("not a 200: {}", head.lines().next().unwrap_or_default());
    }
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = have - head_end;
    match length {
        Some(len) => {
            while body < len {
                let n = c.read(buf)?;
                if n == 0 {
                    bail!("closed inside the body");
                }
                body += n;
            }
            if body > len {
                bail!("more bytes than the Content-Length");
            }
        }
        None if close => while c.read(buf)? > 0 {},
        None => bail!("a keep-alive answer without Content-Length"),
    }
    if close {
        *conn = None;
    }
    Ok(())
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(all: &[Done], start: SystemTime, seconds: u64) -> String {
    let mut lat: Vec<u64> = all
        .iter()
        .filter(|d| d.ok)
        .map(|d| d.latency.as_micros() as u64)
        .collect();
    lat.sort_unstable();
    let mut late: Vec<u64> = all.iter().map(|d| d.late.as_micros() as u64).collect();
    late.sort_unstable();
    let slots = (Duration::from_secs(seconds).as_millis() / SLOT.as_millis()) as usize;
    let mut max = vec![0u64; slots];
    let mut count = vec![0u64; slots];
    for d in all.iter().filter(|d| d.ok) {
        let s = ((d.due.as_millis() / SLOT.as_millis()) as usize).min(slots - 1);
        max[s] = max[s].max(d.latency.as_micros() as u64);
        count[s] += 1;
    }
    let errors = all.iter().filter(|d| !d.ok).count();
    let start_ns = start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    format!(
        "{{\"requests\":{},\"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"late_p99_us\":{},\"late_max_us\":{},\"start_unix_ns\":{start_ns},\"slot_ms\":{},\"slot_max_us\":[{}],\"slot_count\":[{}]}}",
        all.len(),
        quantile(&lat, 0.50),
        quantile(&lat, 0.90),
        quantile(&lat, 0.99),
        quantile(&lat, 0.999),
        lat.last().copied().unwrap_or(0),
        quantile(&late, 0.99),
        late.last().copied().unwrap_or(0),
        SLOT.as_millis(),
        list(&max),
        list(&count),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection: reads one request head per answer, sends each answer.
    fn server(answers: Vec<&'static [u8]>, close_after: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            for answer in answers {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = c.write_all(answer);
            }
            if !close_after {
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        addr
    }

    fn ask(addr: SocketAddr, close: bool) -> anyhow::Result<()> {
        let request: &[u8] = if close {
            b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        };
        let mut conn = Some(connect(addr)?);
        let mut buf = vec![0u8; 64 * 1024];
        one(&mut conn, addr, request, &mut buf)?;
        one(&mut conn, addr, request, &mut buf)
    }

    #[test]
    fn answers_are_read_whole_by_length_on_a_kept_connection() {
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert!(ask(server(vec![ok, ok], false), false).is_ok());
    }

    #[test]
    fn bad_answers_are_errors_not_successes() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
                "not a 200",
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nbody", "without Content-Length"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhalf",
                "closed inside the body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\ntoo long",
                "more bytes",
            ),
        ];
        for (answer, why) in cases {
            let e = ask(server(vec![answer], true), false).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
        let huge: &'static [u8] = Box::leak(
            [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &[b'a'; 20_000]]
                .concat()
                .into_boxed_slice(),
        );
        let e = ask(server(vec![huge], true), false).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn quantiles_pick_the_rank_not_past_the_end() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500);
        assert_eq!(quantile(&v, 0.99), 990);
        assert_eq!(quantile(&v, 0.999), 999);
        assert_eq!(quantile(&v, 1.0), 1000);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
