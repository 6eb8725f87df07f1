//! Traffic policies at the waypoint: how a service's endpoints are balanced, limited and
//! ejected (Istio's DestinationRule `trafficPolicy`), and how many requests it takes
//! (Ambit's LocalRateLimit).
//!
//! The types here are what the control plane resolved and sent; the mechanisms that act
//! on them without I/O live here too, so they are tested in isolation:
//! [`TokenBucket`] (lock-free, one atomic word) and [`rendezvous`] (consistent hashing
//! that moves only the keys of an endpoint that comes or goes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::discovery::Str;

/// One traffic policy as the waypoint uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficPolicy {
    /// `<namespace>/dr:<name>` (a DestinationRule), `<namespace>/rl:<name>` (a
    /// LocalRateLimit) or `<namespace>/ra:<name>` (a RequestAuthentication).
    pub key: Str,
    /// The services it applies to (`<namespace>/<hostname>`).
    pub services: Vec<Str>,
    /// The waypoints (`<namespace>/<name>` of their Gateway) it applies to as a whole:
    /// every service they serve (a LocalRateLimit aimed at a Gateway).
    pub gateways: Vec<Str>,
    /// Seconds since the epoch of its creation: the oldest of two policies of one kind
    /// on one service wins.
    pub created: i64,
    pub backend: Option<BackendPolicy>,
    pub rate_limit: Option<RateLimit>,
    /// A RequestAuthentication's rules (`<namespace>/ra:<name>`).
    pub authentication: Option<Vec<crate::jwt::JwtRule>>,
}

/// DestinationRule `trafficPolicy`: settings for every port, and some ports' own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendPolicy {
    pub default: Settings,
    /// `portLevelSettings`: by service port; they replace the defaults as a whole.
    pub ports: Vec<(u16, Settings)>,
    /// `subsets`: named groups of the service's endpoints.
    pub subsets: Vec<Subset>,
}

/// A DestinationRule subset, resolved by the control plane to workloads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subset {
    pub name: Str,
    /// Workload uids, sorted.
    pub workloads: Vec<Str>,
    /// Its own `trafficPolicy`, replacing the rule's.
    pub settings: Option<Settings>,
}

impl Subset {
    pub fn contains(&self, uid: &str) -> bool {
        self.workloads
            .binary_search_by(|w| w.as_ref().cmp(uid))
            .is_ok()
    }
}

impl BackendPolicy {
    /// The settings for requests to service port `port`.
    pub fn for_port(&self, port: u16) -> &Settings {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(&self.default, |(_, s)| s)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub balance: Balance,
    pub pool: Pool,
    pub outlier: Option<Outlier>,
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Balance {
    /// The less loaded of two endpoints drawn at random (Envoy's default for Istio).
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// `consistentHash`: requests with the same key go to the same endpoint while it is
    /// there.
    Hash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// Lower case.
    Header(String),
    Cookie(String),
    SourceIp,
}

/// `connectionPool`, per waypoint replica and service (as Envoy counts per cluster).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pool {
    /// `tcp.maxConnections`: connections open to the service's endpoints at once.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection; one more is
    /// answered 503 `UO`.
    pub max_pending: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight to the service; one more is answered
    /// 503 `UO`.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is closed after this many.
    pub max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout`: an idle connection is closed after this long.
    pub idle_timeout: Option<Duration>,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
}

/// `outlierDetection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// Ejected after this many 5xx answers (or failures to reach it) in a row; 0: never.
    pub consecutive_5xx: u32,
    /// Ejected after this many 502/503/504 answers (or failures) in a row; 0: never.
    pub consecutive_gateway: u32,
    /// How often ejections are looked at again (Envoy's sweep).
    pub interval: Duration,
    /// An endpoint is ejected for this long times the number of times it was ejected.
    pub base_ejection: Duration,
    /// At most this share of the service's endpoints are ejected at once (at least one
    /// is always allowed, as in Envoy).
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    /// Istio's defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// Envoy's cap on one ejection's length (`max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Outlier {
    /// Whether `status` (or `None`: the endpoint could not be reached or reset) counts
    /// against the endpoint, as (5xx, gateway error).
    pub fn classify(status: Option<u16>) -> (bool, bool) {
        match status {
            None => (true, true),
            Some(s) => ((500..600).contains(&s), matches!(s, 502..=504)),
        }
    }

    /// How long the `times`-th ejection lasts.
    pub fn ejection(&self, times: u32) -> Duration {
        self.base_ejection
            .saturating_mul(times.max(1))
            .min(MAX_EJECTION.max(self.base_ejection))
    }

    /// Whether one more endpoint may be ejected when `ejected` of `total` are.
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        if ejected == 0 {
            return total > 0;
        }
        (ejected + 1) * 100 <= total * self.max_ejection_percent as usize
    }
}

/// A LocalRateLimit: a token bucket for all requests of the services it applies to,
/// and descriptors with buckets of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// `None`: only descriptors limit.
    pub bucket: Option<BucketSpec>,
    pub descriptors: Vec<Descriptor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub key: DescriptorKey,
    /// Only requests with this value; `None`: each distinct value has its own bucket.
    pub value: Option<String>,
    pub bucket: BucketSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DescriptorKey {
    /// A request header (lower case).
    Header(String),
    /// The caller's SPIFFE identity, as the waypoint authenticated it.
    SourcePrincipal,
}

/// Distinct values a descriptor keeps buckets for; further values share one bucket, so
/// a caller inventing values cannot grow the waypoint's memory or escape the limit.
pub const MAX_DESCRIPTOR_VALUES: usize = 10_000;
/// Longer values share that bucket too (memory stays bounded by both).
pub const MAX_DESCRIPTOR_VALUE_LEN: usize = 256;

/// A token bucket in one atomic word: the tokens left (high 32 bits) and the fill tick
/// they were counted at (low 32 bits). Taking a token is a compare-and-swap; no lock.
#[derive(Debug)]
pub struct TokenBucket {
    spec: BucketSpec,
    state: AtomicU64,
}

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub allowed: bool,
    /// Tokens left after this request.
    pub remaining: u32,
    /// Until the next fill.
    pub reset: Duration,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(spec: BucketSpec) -> Self {
        Self {
            spec,
            state: AtomicU64::new(u64::from(spec.max_tokens) << 32),
        }
    }

    pub fn spec(&self) -> BucketSpec {
        self.spec
    }

    fn tick(&self, now: Duration) -> u64 {
        let interval = self.spec.fill_interval.as_nanos().max(1);
        (now.as_nanos() / interval) as u64
    }

    /// Whether the bucket is full at `now` (nothing taken for at least a fill): it can be
    /// forgotten and made anew without changing any answer.
    pub fn is_full(&self, now: Duration) -> bool {
        let current = self.state.load(Ordering::Acquire);
        let tokens = (current >> 32) as u32;
        let last = current & 0xffff_ffff;
        let elapsed = (self.tick(now) & 0xffff_ffff).wrapping_sub(last) & 0xffff_ffff;
        u64::from(tokens)
            .saturating_add(elapsed.saturating_mul(u64::from(self.spec.tokens_per_fill)))
            >= u64::from(self.spec.max_tokens)
    }

    /// Takes a token at time `now` (since a fixed epoch), if there is one.
    pub fn take(&self, now: Duration) -> Taken {
        let tick = self.tick(now);
        let interval = self.spec.fill_interval.as_nanos().max(1);
        let into = now.as_nanos() % interval;
        let reset = Duration::from_nanos((interval - into).min(u64::MAX as u128) as u64);
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let tokens = (current >> 32) as u32;
            let last = current & 0xffff_ffff;
            let now_tick = tick & 0xffff_ffff;
            // Ticks wrap at 2^32 fill intervals; the difference is taken modulo that.
            let elapsed = now_tick.wrapping_sub(last) & 0xffff_ffff;
            let filled = u64::from(tokens)
                .saturating_add(elapsed.saturating_mul(u64::from(self.spec.tokens_per_fill)))
                .min(u64::from(self.spec.max_tokens)) as u32;
            let (allowed, left) = if filled > 0 {
                (true, filled - 1)
            } else {
                (false, 0)
            };
            let next = (u64::from(left) << 32) | now_tick;
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Taken {
                        allowed,
                        remaining: left,
                        reset,
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }
}

/// Consistent hashing by highest random weight: the endpoint (of `ids`) whose hash with
/// `key` is highest. An endpoint leaving moves only its own keys; one arriving takes
/// only its share.
pub fn rendezvous<'a>(key: u64, ids: impl Iterator<Item = (usize, &'a str)>) -> Option<usize> {
    ids.map(|(i, id)| (mix(key ^ fnv(id.as_bytes())), i))
        .max()
        .map(|(_, i)| i)
}

/// FNV-1a, 64 bits: a stable hash (the same in every replica and release).
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A finalizer (SplitMix64's) so that near keys spread.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: u32, per_fill: u32, ms: u64) -> BucketSpec {
        BucketSpec {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(ms),
        }
    }

    #[test]
    fn a_bucket_gives_its_tokens_then_refuses_until_the_next_fill() {
        let b = TokenBucket::new(spec(3, 2, 1000));
        let t = Duration::from_millis(100);
        let taken: Vec<bool> = (0..5).map(|_| b.take(t).allowed).collect();
        assert_eq!(taken, [true, true, true, false, false]);
        assert_eq!(b.take(t).reset, Duration::from_millis(900));
        // One fill later: two tokens, not three.
        let t = Duration::from_millis(1100);
        let taken: Vec<bool> = (0..3).map(|_| b.take(t).allowed).collect();
        assert_eq!(taken, [true, true, false]);
        assert!(!b.is_full(Duration::from_millis(1100)));
        assert!(b.is_full(Duration::from_millis(3000)));
        // Long idle: full again, never above the maximum.
        let t = Duration::from_secs(100);
        let r = b.take(t);
        assert!(r.allowed);
        assert_eq!(r.remaining, 2);
    }

    #[test]
    fn a_bucket_shared_by_threads_gives_exactly_its_tokens() {
        let b = std::sync::Arc::new(TokenBucket::new(spec(1000, 1, 3_600_000)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|_| b.take(Duration::from_millis(1)).allowed)
                        .count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_leaving_endpoint() {
        let ids = ["a", "b", "c", "d"];
        fn pick(key: u64, ids: &[&'static str]) -> Option<&'static str> {
            rendezvous(key, ids.iter().enumerate().map(|(i, s)| (i, *s))).map(|i| ids[i])
        }
        let mut moved = 0;
        let mut spread = std::collections::HashMap::new();
        for key in 0..4000u64 {
            let before = pick(key, &ids).unwrap();
            *spread.entry(before).or_insert(0) += 1;
            let after = pick(key, &["a", "b", "d"]).unwrap();
            if before != "c" {
                assert_eq!(before, after, "key {key} moved though its endpoint stayed");
            } else {
                moved += 1;
            }
        }
        assert!((700..1300).contains(&moved), "{moved}");
        for (id, n) in spread {
            assert!((700..1300).contains(&n), "{id}: {n}");
        }
        assert_eq!(rendezvous(1, std::iter::empty()), None);
    }

    #[test]
    fn outlier_ejection_grows_and_is_capped_and_limited_by_share() {
        let o = Outlier {
            base_ejection: Duration::from_secs(30),
            ..Outlier::default()
        };
        assert_eq!(o.ejection(1), Duration::from_secs(30));
        assert_eq!(o.ejection(3), Duration::from_secs(90));
        assert_eq!(o.ejection(100), MAX_EJECTION);
        // 10%: one of two may go (at least one always may), not a second.
        assert!(o.may_eject(0, 2));
        assert!(!o.may_eject(1, 2));
        assert!(o.may_eject(1, 20));
        assert!(!o.may_eject(0, 0));
        assert_eq!(Outlier::classify(Some(503)), (true, true));
        assert_eq!(Outlier::classify(Some(500)), (true, false));
        assert_eq!(Outlier::classify(Some(404)), (false, false));
        assert_eq!(Outlier::classify(None), (true, true));
    }
}
