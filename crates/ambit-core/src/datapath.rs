//! Which threads carry traffic, and the work that must not run on them.
//!
//! A data-path thread runs every connection it was given, one task after another:
//! anything slow it does in between (signing a certificate request, generating a key,
//! returning the allocator's free pages to the system) is latency for all of them. The
//! proxies keep such work elsewhere; this module lets that promise be checked rather
//! than assumed. A data-path thread declares itself with [`enter_data_thread`], handing
//! over the count of connections it carries; work that must stay off the data path
//! calls [`check`] first, which counts a violation when the rule is broken. The node
//! proxy exports the counts (`ambit_node_data_path_violations_total`) and the tests
//! assert them zero.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Work kept off the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OffPathWork {
    /// Key generation, certificate requests, chain checks: never on a data-path thread.
    Certificate,
    /// Returning free memory to the system: only on a data-path thread that carries no
    /// connection (the allocator's heaps are per thread, so an idle data thread after a
    /// burst must do it itself, but never while it serves anyone).
    AllocatorCollection,
}

impl OffPathWork {
    pub const ALL: [OffPathWork; 2] = [OffPathWork::Certificate, OffPathWork::AllocatorCollection];

    pub fn as_str(self) -> &'static str {
        match self {
            OffPathWork::Certificate => "certificate",
            OffPathWork::AllocatorCollection => "allocator_collection",
        }
    }
}

thread_local! {
    /// On a data-path thread: the number of connections it carries.
    static DATA_THREAD: RefCell<Option<Arc<AtomicUsize>>> = const { RefCell::new(None) };
}

static VIOLATIONS: [AtomicU64; OffPathWork::ALL.len()] = [const { AtomicU64::new(0) }; 2];

/// Declares the calling thread a data-path thread carrying `connections` (kept current
/// by whoever hands it connections).
pub fn enter_data_thread(connections: Arc<AtomicUsize>) {
    DATA_THREAD.with(|d| *d.borrow_mut() = Some(connections));
}

/// Whether the calling thread is a data-path thread.
pub fn on_data_thread() -> bool {
    DATA_THREAD.with(|d| d.borrow().is_some())
}

/// The connections the calling thread carries (zero off the data path).
pub fn carried_connections() -> usize {
    DATA_THREAD.with(|d| d.borrow().as_ref().map_or(0, |c| c.load(Ordering::Relaxed)))
}

/// Call before doing `work`: returns whether it may run here, and counts a violation
/// when it may not (the caller logs it). Callers run the work either way (refusing a
/// certificate would be worse than the delay); the count is how a regression is caught.
pub fn check(work: OffPathWork) -> bool {
    let allowed = match work {
        OffPathWork::Certificate => !on_data_thread(),
        OffPathWork::AllocatorCollection => carried_connections() == 0,
    };
    if !allowed {
        VIOLATIONS[work as usize].fetch_add(1, Ordering::Relaxed);
    }
    allowed
}

/// Violations of `work`'s rule in this process so far.
pub fn violations(work: OffPathWork) -> u64 {
    VIOLATIONS[work as usize].load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test, so nothing else in this process runs checks meanwhile.
    #[test]
    fn rules_are_checked_per_thread_and_counted() {
        let before = OffPathWork::ALL.map(violations);
        // Off the data path everything is allowed.
        assert!(!on_data_thread());
        assert!(check(OffPathWork::Certificate));
        assert!(check(OffPathWork::AllocatorCollection));
        let carried = Arc::new(AtomicUsize::new(0));
        let on_thread = carried.clone();
        std::thread::spawn(move || {
            enter_data_thread(on_thread.clone());
            assert!(on_data_thread());
            // Idle: collection allowed, certificates never.
            assert!(check(OffPathWork::AllocatorCollection));
            assert!(!check(OffPathWork::Certificate));
            on_thread.store(3, Ordering::Relaxed);
            assert_eq!(carried_connections(), 3);
            assert!(!check(OffPathWork::AllocatorCollection));
        })
        .join()
        .unwrap();
        // The mark is the thread's own.
        assert!(!on_data_thread());
        assert_eq!(carried.load(Ordering::Relaxed), 3);
        let after = OffPathWork::ALL.map(violations);
        assert_eq!(after[0] - before[0], 1);
        assert_eq!(after[1] - before[1], 1);
    }
}
