//! Airtable's rate limits: a sliding one-second window per key, and a lock-out once a key overflows it.
//!
//! Pure bookkeeping over instants passed in by the caller; it never reads a clock itself.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// The span over which requests are counted.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// What the limiter says about one more request for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the limit; call [`Limiter::record`] once the request is admitted.
    Admitted,
    /// The key is serving a lock-out.
    LockedOut,
    /// This request would overflow the window; call [`Limiter::trip`] to start the lock-out.
    Tripped,
}

/// A sliding-window limiter for one kind of key (bases, or tokens).
#[derive(Debug)]
pub(crate) struct Limiter {
    /// Requests per second; 0 means unlimited.
    limit: u32,
    lockout: Duration,
    keys: HashMap<String, KeyWindow>,
}

#[derive(Debug, Default)]
struct KeyWindow {
    admitted: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

impl KeyWindow {
    fn evict(&mut self, now: Instant) {
        while let Some(&oldest) = self.admitted.front() {
            if now.saturating_duration_since(oldest) >= WINDOW {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
    }
}

impl Limiter {
    pub(crate) fn new(limit: u32, lockout: Duration) -> Self {
        Self {
            limit,
            lockout,
            keys: HashMap::new(),
        }
    }

    /// Changes the limit and lock-out; windows and lock-outs already running are kept.
    pub(crate) fn reconfigure(&mut self, limit: u32, lockout: Duration) {
        self.limit = limit;
        self.lockout = lockout;
    }

    pub(crate) fn check(&mut self, key: &str, now: Instant) -> Verdict {
        if self.limit == 0 {
            return Verdict::Admitted;
        }
        let window = self.keys.entry(key.to_owned()).or_default();
        if let Some(until) = window.locked_until {
            if now < until {
                return Verdict::LockedOut;
            }
            window.locked_until = None;
        }
        window.evict(now);
        if window.admitted.len() >= self.limit as usize {
            Verdict::Tripped
        } else {
            Verdict::Admitted
        }
    }

    /// Starts the lock-out after an overflow (a zero lock-out only rejects the overflowing request).
    pub(crate) fn trip(&mut self, key: &str, now: Instant) {
        if self.lockout.is_zero() {
            return;
        }
        let window = self.keys.entry(key.to_owned()).or_default();
        window.locked_until = Some(now + self.lockout);
    }

    pub(crate) fn record(&mut self, key: &str, now: Instant) {
        if self.limit == 0 {
            return;
        }
        self.keys
            .entry(key.to_owned())
            .or_default()
            .admitted
            .push_back(now);
    }
}

/// Measures the busiest one-second window seen, counting every request whatever its outcome.
#[derive(Debug, Default)]
pub(crate) struct RateMeter {
    recent: VecDeque<Instant>,
    max_per_window: u32,
}

impl RateMeter {
    pub(crate) fn observe(&mut self, now: Instant) {
        self.recent.push_back(now);
        while let Some(&oldest) = self.recent.front() {
            if now.saturating_duration_since(oldest) >= WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        let current = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        self.max_per_window = self.max_per_window.max(current);
    }

    pub(crate) fn max_per_window(&self) -> u32 {
        self.max_per_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(limiter: &mut Limiter, key: &str, now: Instant) -> Verdict {
        let verdict = limiter.check(key, now);
        match verdict {
            Verdict::Admitted => limiter.record(key, now),
            Verdict::Tripped => limiter.trip(key, now),
            Verdict::LockedOut => {}
        }
        verdict
    }

    #[test]
    fn overflow_locks_the_key_out_for_the_lockout_then_recovers() {
        let start = Instant::now();
        let mut limiter = Limiter::new(5, Duration::from_secs(30));
        for i in 0..5 {
            assert_eq!(
                admit(&mut limiter, "app1", start + Duration::from_millis(i)),
                Verdict::Admitted
            );
        }
        assert_eq!(
            admit(&mut limiter, "app1", start + Duration::from_millis(10)),
            Verdict::Tripped
        );
        // Another key is unaffected.
        assert_eq!(admit(&mut limiter, "app2", start), Verdict::Admitted);
        // Even after the window has slid, the lock-out holds.
        assert_eq!(
            admit(&mut limiter, "app1", start + Duration::from_secs(5)),
            Verdict::LockedOut
        );
        assert_eq!(
            admit(&mut limiter, "app1", start + Duration::from_secs(31)),
            Verdict::Admitted
        );
    }

    #[test]
    fn window_slides_rather_than_resetting_on_second_boundaries() {
        let start = Instant::now();
        let mut limiter = Limiter::new(2, Duration::ZERO);
        assert_eq!(admit(&mut limiter, "k", start), Verdict::Admitted);
        let later = start + Duration::from_millis(900);
        assert_eq!(admit(&mut limiter, "k", later), Verdict::Admitted);
        // 1.0 s after the first request it has left the window, but the second has not.
        let edge = start + Duration::from_millis(1000);
        assert_eq!(admit(&mut limiter, "k", edge), Verdict::Admitted);
        assert_eq!(
            admit(&mut limiter, "k", edge + Duration::from_millis(1)),
            Verdict::Tripped
        );
        // A zero lock-out rejects only the overflowing request.
        assert_eq!(
            admit(&mut limiter, "k", later + Duration::from_millis(1000)),
            Verdict::Admitted
        );
    }

    #[test]
    fn zero_limit_is_unlimited() {
        let now = Instant::now();
        let mut limiter = Limiter::new(0, Duration::from_secs(30));
        for _ in 0..1000 {
            assert_eq!(admit(&mut limiter, "k", now), Verdict::Admitted);
        }
    }

    #[test]
    fn meter_keeps_the_busiest_window() {
        let start = Instant::now();
        let mut meter = RateMeter::default();
        for i in 0..7 {
            meter.observe(start + Duration::from_millis(i * 100));
        }
        meter.observe(start + Duration::from_secs(10));
        assert_eq!(meter.max_per_window(), 7);
    }
}
