//! Bounded logging of refusals: anyone can make the control plane refuse a request, so
//! refusals are logged at most [`BURST`] per [`WINDOW`]; the rest are counted and the
//! count is logged with the next refusal that is.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BURST: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct LogLimit {
    state: Mutex<(Instant, u32, u64)>,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }
}

impl LogLimit {
    /// Whether to log this one, and how many were suppressed since the last logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let Ok(mut s) = self.state.lock() else {
            return Some(0);
        };
        let (start, used, suppressed) = &mut *s;
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *used = 0;
        }
        if *used < BURST {
            *used += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_counted_then_reported() {
        let l = LogLimit::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit_at(t0), Some(0));
        }
        assert_eq!(l.admit_at(t0), None);
        assert_eq!(l.admit_at(t0 + Duration::from_secs(1)), None);
        // A new window: logged again, with the count of what was not.
        assert_eq!(l.admit_at(t0 + WINDOW), Some(2));
        assert_eq!(l.admit_at(t0 + WINDOW), Some(0));
    }
}
