//! DestinationRule and LocalRateLimit at the waypoint: what each service's requests
//! share (round-robin position, requests in flight, HTTP/1.1 connection slots, the
//! health of each endpoint) and each rate limit's buckets.
//!
//! All of it is per waypoint replica, as Envoy counts per proxy. Maps are copy-on-write
//! (`ArcSwap`): a request reads them without a lock and only the first request of a
//! service, endpoint or descriptor value writes. Counters are atomics.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_core::discovery::Str;
use ambit_core::traffic::{
    BucketSpec, DescriptorKey, MAX_DESCRIPTOR_VALUE_LEN, MAX_DESCRIPTOR_VALUES, Outlier, Pool,
    RateLimit, Taken, TokenBucket, TrafficPolicy,
};
use arc_swap::ArcSwap;
use http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Every service's and rate limit's state.
pub struct Traffic {
    epoch: Instant,
    services: ArcSwap<HashMap<Str, Arc<ServiceTraffic>>>,
    limiters: ArcSwap<HashMap<Str, Arc<Limiter>>>,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            services: ArcSwap::from_pointee(HashMap::new()),
            limiters: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

/// Copy-on-write get-or-insert.
fn get_or_insert<V>(
    map: &ArcSwap<HashMap<Str, Arc<V>>>,
    key: &str,
    fresh: impl Fn(Option<&Arc<V>>) -> Option<V>,
) -> Arc<V> {
    if let Some(v) = map.load().get(key)
        && fresh(Some(v)).is_none()
    {
        return v.clone();
    }
    let mut made: Option<Arc<V>> = None;
    map.rcu(|m| {
        let current = m.get(key);
        match fresh(current) {
            None => m.clone(),
            Some(v) => {
                let v = made.get_or_insert_with(|| Arc::new(v)).clone();
                let mut m = HashMap::clone(m);
                m.insert(Str::from(key), v);
                Arc::new(m)
            }
        }
    });
    map.load()
        .get(key)
        .cloned()
        .expect("the entry was just inserted")
}

impl Traffic {
    /// Milliseconds since the waypoint started.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn elapsed(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn service(&self, key: &str) -> Arc<ServiceTraffic> {
        get_or_insert(&self.services, key, |v| {
            v.is_none().then(ServiceTraffic::default)
        })
    }

    /// The buckets of `policy` (made anew when its settings changed).
    pub fn limiter(&self, policy: &TrafficPolicy) -> Option<Arc<Limiter>> {
        let spec = policy.rate_limit.as_ref()?;
        Some(get_or_insert(&self.limiters, &policy.key, |v| match v {
            Some(l) if &l.spec == spec => None,
            _ => Some(Limiter::new(spec.clone())),
        }))
    }

    /// Forgets rate limits no longer configured, descriptor values whose bucket is full
    /// again (idle: a new one answers the same), and endpoints nothing counts against.
    pub fn sweep(&self, live: impl Fn(&str) -> bool) {
        self.limiters.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|k, _| live(k));
            Arc::new(m)
        });
        let elapsed = self.elapsed();
        for l in self.limiters.load().values() {
            for d in &l.descriptors {
                if d.per_value.load().values().any(|b| b.is_full(elapsed)) {
                    d.per_value.rcu(|m| {
                        let mut m = HashMap::clone(m);
                        m.retain(|_, b| !b.is_full(elapsed));
                        Arc::new(m)
                    });
                }
            }
        }
        let now = self.now_ms();
        for s in self.services.load().values() {
            s.health.rcu(|m| {
                let mut m = HashMap::clone(m);
                m.retain(|_, h| h.matters(now));
                Arc::new(m)
            });
        }
    }
}

/// What one service's requests share.
#[derive(Default)]
pub struct ServiceTraffic {
    /// Round-robin position.
    pub turn: AtomicUsize,
    requests: Arc<AtomicUsize>,
    /// HTTP/1.1 connections in use (`maxConnections`), with the limit they were made for.
    slots: ArcSwap<Option<(u32, Arc<Semaphore>)>>,
    waiting: Arc<AtomicUsize>,
    health: ArcSwap<HashMap<Str, Arc<Health>>>,
}

/// One endpoint's record for outlier detection.
#[derive(Default)]
struct Health {
    five: AtomicU32,
    gateway: AtomicU32,
    /// Milliseconds since the waypoint's epoch; 0: not ejected.
    ejected_until: AtomicU64,
    times: AtomicU32,
    /// When the ejection multiplier last went down.
    last_decay: AtomicU64,
}

impl Health {
    fn ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    fn matters(&self, now: u64) -> bool {
        self.ejected(now)
            || self.times.load(Ordering::Relaxed) > 0
            || self.five.load(Ordering::Relaxed) > 0
            || self.gateway.load(Ordering::Relaxed) > 0
    }
}

/// The service's connection pool is full: answered 503 `UO`.
#[derive(Debug)]
pub struct Overflow(pub &'static str);

/// One request counted against the service's `http2MaxRequests`.
pub struct RequestSlot(Arc<AtomicUsize>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServiceTraffic {
    /// Counts a request against `http2MaxRequests`.
    pub fn admit(&self, pool: &Pool) -> Result<Option<RequestSlot>, Overflow> {
        let Some(max) = pool.max_requests else {
            return Ok(None);
        };
        let before = self.requests.fetch_add(1, Ordering::Relaxed);
        let slot = RequestSlot(self.requests.clone());
        if before >= max as usize {
            return Err(Overflow("the service's http2MaxRequests are in flight"));
        }
        Ok(Some(slot))
    }

    /// An HTTP/1.1 connection slot (`maxConnections`), waited for as one of at most
    /// `http1MaxPendingRequests` pending requests.
    pub async fn connection(&self, pool: &Pool) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(max) = pool.max_connections else {
            return Ok(None);
        };
        // One semaphore per limit, even when the first requests race to make it.
        let semaphore = loop {
            let current = self.slots.load_full();
            if let Some((m, s)) = current.as_ref()
                && *m == max
            {
                break s.clone();
            }
            let s = Arc::new(Semaphore::new(max as usize));
            let previous = self
                .slots
                .compare_and_swap(&current, Arc::new(Some((max, s.clone()))));
            if Arc::ptr_eq(&previous, &current) {
                break s;
            }
        };
        if let Ok(p) = semaphore.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(self.waiting.clone());
        if pool.max_pending.is_some_and(|m| before >= m as usize) {
            return Err(Overflow(
                "the service's maxConnections are in use and http1MaxPendingRequests are waiting",
            ));
        }
        semaphore
            .acquire_owned()
            .await
            .map(Some)
            .map_err(|_| Overflow("the connection pool was closed"))
    }

    /// Whether the endpoint `uid` is ejected now.
    pub fn is_ejected(&self, uid: &str, now: u64) -> bool {
        self.health.load().get(uid).is_some_and(|h| h.ejected(now))
    }

    /// Records an answer of endpoint `uid` (`None`: it could not be reached or reset);
    /// true when this ejected it.
    pub fn record(
        &self,
        outlier: &Outlier,
        uid: &str,
        status: Option<u16>,
        endpoints: impl FnOnce() -> usize,
        now: u64,
    ) -> bool {
        let (is_5xx, is_gateway) = Outlier::classify(status);
        let h = if is_5xx {
            get_or_insert(&self.health, uid, |v| v.is_none().then(Health::default))
        } else {
            match self.health.load().get(uid) {
                Some(h) => h.clone(),
                None => return false,
            }
        };
        if !is_5xx {
            h.five.store(0, Ordering::Relaxed);
            h.gateway.store(0, Ordering::Relaxed);
            // A healthy interval after an ejection brings the multiplier down.
            let until = h.ejected_until.load(Ordering::Relaxed);
            let interval = outlier.interval.as_millis() as u64;
            let last = h.last_decay.load(Ordering::Relaxed).max(until);
            if h.times.load(Ordering::Relaxed) > 0 && now >= last.saturating_add(interval) {
                h.times
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1))
                    .ok();
                h.last_decay.store(now, Ordering::Relaxed);
            }
            return false;
        }
        if h.ejected(now) {
            return false;
        }
        let five = h.five.fetch_add(1, Ordering::Relaxed) + 1;
        let gateway = if is_gateway {
            h.gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            h.gateway.store(0, Ordering::Relaxed);
            0
        };
        let trips = (outlier.consecutive_5xx > 0 && five >= outlier.consecutive_5xx)
            || (outlier.consecutive_gateway > 0 && gateway >= outlier.consecutive_gateway);
        if !trips {
            return false;
        }
        let ejected = self
            .health
            .load()
            .values()
            .filter(|h| h.ejected(now))
            .count();
        if !outlier.may_eject(ejected, endpoints()) {
            return false;
        }
        let times = h.times.fetch_add(1, Ordering::Relaxed) + 1;
        let length = outlier.ejection(times).as_millis() as u64;
        h.ejected_until
            .store(now.saturating_add(length).max(1), Ordering::Relaxed);
        h.five.store(0, Ordering::Relaxed);
        h.gateway.store(0, Ordering::Relaxed);
        true
    }
}

/// One LocalRateLimit's buckets.
pub struct Limiter {
    spec: RateLimit,
    bucket: Option<TokenBucket>,
    descriptors: Vec<DescriptorBuckets>,
}

struct DescriptorBuckets {
    key: DescriptorKey,
    value: Option<String>,
    spec: BucketSpec,
    /// With a value: the one bucket; without: the bucket of values past the cap.
    shared: TokenBucket,
    per_value: ArcSwap<HashMap<Str, Arc<TokenBucket>>>,
}

/// What a request asks of rate limits: its headers and its caller.
pub struct LimitFacts<'a> {
    pub headers: &'a HeaderMap,
    pub principal: &'a str,
}

/// The verdict of the buckets a request counted against: refused if any refused; the
/// numbers of the most restrictive, for `x-ratelimit-*`.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

impl Verdict {
    fn merge(a: Option<Verdict>, spec: BucketSpec, t: Taken) -> Verdict {
        let v = Verdict {
            allowed: t.allowed,
            limit: spec.max_tokens,
            remaining: t.remaining,
            reset: t.reset,
        };
        match a {
            None => v,
            Some(a) => {
                let tighter = if (!v.allowed, std::cmp::Reverse(v.remaining))
                    > (!a.allowed, std::cmp::Reverse(a.remaining))
                {
                    v
                } else {
                    a
                };
                Verdict {
                    allowed: a.allowed && v.allowed,
                    ..tighter
                }
            }
        }
    }
}

impl Limiter {
    fn new(spec: RateLimit) -> Self {
        Self {
            bucket: spec.bucket.map(TokenBucket::new),
            descriptors: spec
                .descriptors
                .iter()
                .map(|d| DescriptorBuckets {
                    key: d.key.clone(),
                    value: d.value.clone(),
                    spec: d.bucket,
                    shared: TokenBucket::new(d.bucket),
                    per_value: ArcSwap::from_pointee(HashMap::new()),
                })
                .collect(),
            spec,
        }
    }

    /// Takes a token from every bucket the request counts against; `None` when none
    /// applies.
    pub fn check(&self, facts: &LimitFacts<'_>, now: Duration) -> Option<Verdict> {
        let mut verdict = None;
        if let Some(b) = &self.bucket {
            verdict = Some(Verdict::merge(verdict, b.spec(), b.take(now)));
        }
        for d in &self.descriptors {
            let value = match &d.key {
                DescriptorKey::Header(h) => {
                    match facts.headers.get(h.as_str()).and_then(|v| v.to_str().ok()) {
                        Some(v) => v,
                        None => continue,
                    }
                }
                DescriptorKey::SourcePrincipal => facts.principal,
            };
            let taken = match &d.value {
                Some(wanted) if wanted != value => continue,
                Some(_) => d.shared.take(now),
                None => {
                    let found = d.per_value.load().get(value).cloned();
                    let bucket = match found {
                        Some(b) => b,
                        None if d.per_value.load().len() >= MAX_DESCRIPTOR_VALUES
                            || value.len() > MAX_DESCRIPTOR_VALUE_LEN =>
                        {
                            verdict = Some(Verdict::merge(verdict, d.spec, d.shared.take(now)));
                            continue;
                        }
                        None => get_or_insert(&d.per_value, value, |v| {
                            v.is_none().then(|| TokenBucket::new(d.spec))
                        }),
                    };
                    bucket.take(now)
                }
            };
            verdict = Some(Verdict::merge(verdict, d.spec, taken));
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_core::traffic::Descriptor;

    fn spec(max: u32) -> BucketSpec {
        BucketSpec {
            max_tokens: max,
            tokens_per_fill: max,
            fill_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn descriptors_count_per_value_and_with_the_shared_bucket() {
        let limiter = Limiter::new(RateLimit {
            bucket: Some(spec(5)),
            descriptors: vec![
                Descriptor {
                    key: DescriptorKey::Header("x-user".into()),
                    value: None,
                    bucket: spec(2),
                },
                Descriptor {
                    key: DescriptorKey::SourcePrincipal,
                    value: Some("spiffe://td/ns/a/sa/vip".into()),
                    bucket: spec(1),
                },
            ],
        });
        let mut alice = HeaderMap::new();
        alice.insert("x-user", "alice".parse().unwrap());
        let mut bob = HeaderMap::new();
        bob.insert("x-user", "bob".parse().unwrap());
        let none = HeaderMap::new();
        let t = Duration::from_secs(1);
        let ask = |h: &HeaderMap, p: &str| {
            limiter
                .check(
                    &LimitFacts {
                        headers: h,
                        principal: p,
                    },
                    t,
                )
                .unwrap()
        };
        let p = "spiffe://td/ns/a/sa/other";
        assert!(ask(&alice, p).allowed);
        let v = ask(&alice, p);
        assert!(v.allowed);
        assert_eq!((v.limit, v.remaining), (2, 0));
        let v = ask(&alice, p);
        assert!(!v.allowed, "alice's own bucket is empty");
        assert!(ask(&bob, p).allowed, "bob has his own");
        // The shared bucket of 5 is now empty (four taken above, one here).
        assert!(ask(&none, p).allowed);
        let v = ask(&none, p);
        assert!(!v.allowed);
        assert_eq!((v.limit, v.remaining), (5, 0));
    }

    #[test]
    fn descriptor_values_stay_bounded_and_idle_ones_are_forgotten() {
        let traffic = Traffic::default();
        let policy = TrafficPolicy {
            key: "demo/rl:x".into(),
            services: vec![],
            gateways: vec![],
            created: 0,
            backend: None,
            authentication: None,
            rate_limit: Some(RateLimit {
                bucket: None,
                descriptors: vec![Descriptor {
                    key: DescriptorKey::Header("x-user".into()),
                    value: None,
                    bucket: BucketSpec {
                        max_tokens: 1,
                        tokens_per_fill: 1,
                        fill_interval: Duration::from_millis(1),
                    },
                }],
            }),
        };
        let limiter = traffic.limiter(&policy).unwrap();
        let ask = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-user", v.parse().unwrap());
            limiter.check(
                &LimitFacts {
                    headers: &h,
                    principal: "p",
                },
                traffic.elapsed(),
            )
        };
        ask("alice");
        // A value longer than the cap shares the overflow bucket: not remembered.
        ask(&"x".repeat(MAX_DESCRIPTOR_VALUE_LEN + 1));
        assert_eq!(limiter.descriptors[0].per_value.load().len(), 1);
        std::thread::sleep(Duration::from_millis(5));
        traffic.sweep(|k| k == "demo/rl:x");
        assert_eq!(
            limiter.descriptors[0].per_value.load().len(),
            0,
            "alice's bucket is full again: forgotten"
        );
        traffic.sweep(|_| false);
        assert!(traffic.limiters.load().is_empty());
    }

    #[test]
    fn outlier_detection_ejects_after_consecutive_failures_and_lets_it_return() {
        let s = ServiceTraffic::default();
        let o = Outlier {
            consecutive_5xx: 3,
            base_ejection: Duration::from_millis(1000),
            max_ejection_percent: 50,
            ..Outlier::default()
        };
        assert!(!s.record(&o, "a", Some(503), || 2, 10));
        assert!(!s.record(&o, "a", Some(200), || 2, 11), "a success resets");
        assert!(!s.record(&o, "a", Some(500), || 2, 12));
        assert!(!s.record(&o, "a", None, || 2, 13));
        assert!(s.record(&o, "a", Some(502), || 2, 14));
        assert!(s.is_ejected("a", 500));
        // 50% of two: b may not go as well.
        for now in 20..30 {
            assert!(!s.record(&o, "b", Some(500), || 2, now));
        }
        assert!(!s.is_ejected("b", 30));
        assert!(!s.is_ejected("a", 1014), "back after the ejection time");
        // A second ejection lasts twice as long.
        for now in 1100..1103 {
            s.record(&o, "a", Some(500), || 2, now);
        }
        assert!(s.is_ejected("a", 3000));
        assert!(!s.is_ejected("a", 3103));
    }

    /// Racing first requests share one semaphore: with one connection allowed, one
    /// gets it (two had, each from a semaphore of its own).
    #[test]
    fn racing_first_requests_share_one_connection_limit() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .unwrap();
        for _ in 0..200 {
            let s = Arc::new(ServiceTraffic::default());
            let pool = Pool {
                max_connections: Some(1),
                max_pending: Some(0),
                ..Pool::default()
            };
            let got: usize = rt.block_on(async {
                let start = Arc::new(tokio::sync::Barrier::new(4));
                let tried = Arc::new(tokio::sync::Barrier::new(4));
                let tasks: Vec<_> = (0..4)
                    .map(|_| {
                        let (s, pool) = (s.clone(), pool.clone());
                        let (start, tried) = (start.clone(), tried.clone());
                        tokio::spawn(async move {
                            start.wait().await;
                            let p = s.connection(&pool).await;
                            // Held until all have tried.
                            tried.wait().await;
                            usize::from(p.is_ok_and(|p| p.is_some()))
                        })
                    })
                    .collect();
                let mut n = 0;
                for t in tasks {
                    n += t.await.unwrap();
                }
                n
            });
            assert_eq!(got, 1);
        }
    }

    #[tokio::test]
    async fn the_pool_overflows_past_its_connections_and_pending_requests() {
        let s = Arc::new(ServiceTraffic::default());
        let pool = Pool {
            max_connections: Some(1),
            max_pending: Some(1),
            max_requests: Some(3),
            ..Pool::default()
        };
        let first = s.connection(&pool).await.unwrap();
        assert!(first.is_some());
        let waiter = {
            let s = s.clone();
            let pool = pool.clone();
            tokio::spawn(async move { s.connection(&pool).await.map(|p| p.is_some()) })
        };
        while s.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(s.connection(&pool).await.is_err(), "one pending already");
        drop(first);
        assert!(
            waiter.await.unwrap().unwrap(),
            "the pending one gets the slot"
        );
        let held: Vec<_> = (0..3).map(|_| s.admit(&pool).unwrap()).collect();
        assert!(s.admit(&pool).is_err());
        drop(held);
        assert!(s.admit(&pool).is_ok());
    }
}
