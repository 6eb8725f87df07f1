//! Limits on what an HBONE port accepts, shared by every server of a process (the node
//! proxy runs one per pod): open connections, connections still in their TLS handshake,
//! and handshakes per source address.
//!
//! Before its handshake a connection is anonymous, so it is kept cheap and short: a
//! source that opens connections and never finishes a handshake holds at most
//! [`Limits::handshakes_per_source`] of them (more are closed as they arrive, before
//! anything is allocated for them), all sources together at most
//! [`Limits::handshakes`], each for at most the handshake timeout; and one source holds
//! at most [`Limits::connections_per_source`] open connections, authenticated or not.
//! One flooding address cannot take the places other peers need (many addresses
//! together can exhaust the handshake places for a handshake timeout at a time; the
//! limits bound memory either way). An IPv6 source counts by its /64.
//!
//! Counting is lock-free: atomics, the per-source ones in a fixed table of buckets
//! indexed by a hash of the address (two addresses may share a bucket, and then a budget).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// The limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open HBONE connections (handshaking or established).
    pub connections: usize,
    /// Connections in their TLS handshake at once.
    pub handshakes: usize,
    /// Connections in their TLS handshake at once from one source address.
    pub handshakes_per_source: u32,
    /// Open connections from one source address (handshaking or established): one peer,
    /// authenticated or not, cannot hold the node's connection places.
    pub connections_per_source: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 16_384,
            handshakes: 1024,
            handshakes_per_source: 16,
            connections_per_source: 512,
        }
    }
}

/// Why a connection was closed on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`Limits::connections`] reached.
    Connections,
    /// [`Limits::handshakes`] reached.
    Handshakes,
    /// [`Limits::handshakes_per_source`] reached for this source.
    Source,
    /// [`Limits::connections_per_source`] reached for this source.
    SourceConnections,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::Handshakes => "handshakes",
            Refusal::Source => "source_handshakes",
            Refusal::SourceConnections => "source_connections",
        }
    }
}

const BUCKETS: usize = 4096;

/// The shared counters (see the module documentation).
pub struct Admission {
    limits: Limits,
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    per_source: Box<[AtomicU32]>,
    open_per_source: Box<[AtomicU32]>,
    hasher: std::collections::hash_map::RandomState,
    on_refusal: Box<dyn Fn(Refusal) + Send + Sync>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .field("connections", &self.open_connections())
            .field("handshakes", &self.pending_handshakes())
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// `on_refusal` is called for every connection closed on arrival (to count it).
    pub fn new(limits: Limits, on_refusal: impl Fn(Refusal) + Send + Sync + 'static) -> Self {
        Self {
            limits,
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            per_source: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            open_per_source: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            on_refusal: Box::new(on_refusal),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn pending_handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Admits a new connection from `source` into its handshake, or refuses it.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Refusal> {
        let refuse = |r: Refusal| {
            (self.on_refusal)(r);
            Err(r)
        };
        if self.connections.fetch_add(1, Ordering::AcqRel) >= self.limits.connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return refuse(Refusal::Connections);
        }
        let bucket = self.bucket(source);
        if self.open_per_source[bucket].fetch_add(1, Ordering::AcqRel)
            >= self.limits.connections_per_source
        {
            self.open_per_source[bucket].fetch_sub(1, Ordering::AcqRel);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return refuse(Refusal::SourceConnections);
        }
        if self.per_source[bucket].fetch_add(1, Ordering::AcqRel)
            >= self.limits.handshakes_per_source
        {
            self.per_source[bucket].fetch_sub(1, Ordering::AcqRel);
            self.open_per_source[bucket].fetch_sub(1, Ordering::AcqRel);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return refuse(Refusal::Source);
        }
        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= self.limits.handshakes {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            self.per_source[bucket].fetch_sub(1, Ordering::AcqRel);
            self.open_per_source[bucket].fetch_sub(1, Ordering::AcqRel);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return refuse(Refusal::Handshakes);
        }
        Ok(Ticket {
            admission: self.clone(),
            bucket,
            handshaking: true,
        })
    }

    /// The bucket of a source: its IPv4 address, or its IPv6 /64 (one host can hold a
    /// whole /64, so counting its addresses one by one would give it millions of
    /// budgets).
    fn bucket(&self, ip: IpAddr) -> usize {
        let key: u128 = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => (u128::from(v6) >> 64) | (1 << 127),
        };
        (self.hasher.hash_one(key) as usize) % BUCKETS
    }
}

/// One admitted connection; gives its places back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    bucket: usize,
    handshaking: bool,
}

impl Ticket {
    /// The handshake is over: the connection no longer counts against the handshake
    /// limits (it still counts as open).
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let a = &self.admission;
            a.handshakes.fetch_sub(1, Ordering::AcqRel);
            a.per_source[self.bucket].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshake_done();
        self.admission.open_per_source[self.bucket].fetch_sub(1, Ordering::AcqRel);
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_holds_and_places_come_back() {
        let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = refused.clone();
        let a = Arc::new(Admission::new(
            Limits {
                connections: 5,
                handshakes: 4,
                handshakes_per_source: 2,
                connections_per_source: 3,
            },
            move |r| log.lock().unwrap().push(r),
        ));
        let flooder: IpAddr = "198.18.9.9".parse().unwrap();
        let t1 = a.admit(flooder).unwrap();
        let mut t2 = a.admit(flooder).unwrap();
        // A third from the same source waits for nothing: refused at once.
        assert_eq!(a.admit(flooder).unwrap_err(), Refusal::Source);
        // Others (addresses whose bucket is not the flooder's) are still admitted.
        let mut others_ips = (1..=250u8)
            .map(|i| IpAddr::from([198, 18, 1, i]))
            .filter(|ip| a.bucket(*ip) != a.bucket(flooder));
        let mut next = || others_ips.next().unwrap();
        let others: Vec<Ticket> = (0..2).map(|_| a.admit(next()).unwrap()).collect();
        assert_eq!(a.pending_handshakes(), 4);
        assert_eq!(a.admit(next()).unwrap_err(), Refusal::Handshakes);
        // A finished handshake frees its handshake places, not its connection.
        t2.handshake_done();
        assert_eq!(a.pending_handshakes(), 3);
        let t5 = a.admit(next()).unwrap();
        assert_eq!(a.open_connections(), 5);
        assert_eq!(a.admit(next()).unwrap_err(), Refusal::Connections);
        drop((t1, t2, t5, others));
        assert_eq!((a.open_connections(), a.pending_handshakes()), (0, 0));
        assert!(a.per_source.iter().all(|b| b.load(Ordering::Relaxed) == 0));
        assert!(
            a.open_per_source
                .iter()
                .all(|b| b.load(Ordering::Relaxed) == 0)
        );
        assert_eq!(refused.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_source_cannot_hold_more_than_its_open_connections_and_ipv6_counts_by_slash_64() {
        let a = Arc::new(Admission::new(
            Limits {
                connections: 100,
                handshakes: 100,
                handshakes_per_source: 100,
                connections_per_source: 2,
            },
            |_| {},
        ));
        let mut held = Vec::new();
        for last in 1..=2u16 {
            let mut t = a
                .admit(IpAddr::V6(std::net::Ipv6Addr::new(
                    0x2001, 2, 0, 0, 0, 0, 0, last,
                )))
                .unwrap();
            t.handshake_done();
            held.push(t);
        }
        // Another address of the same /64: the same budget, even after the handshakes.
        let same_net = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 9, 9, 9, 9));
        assert_eq!(a.admit(same_net).unwrap_err(), Refusal::SourceConnections);
        drop(held);
        assert!(a.admit(same_net).is_ok());
    }
}
