//! Retry delays: exponential backoff with full jitter, pure so it can be tested at any attempt.

use std::time::Duration;

/// `delay = random(0 ..= min(cap, base * 2^(attempt-1)))` ("full jitter"): retries of many jobs
/// that failed together spread out instead of returning in a herd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(3600),
        }
    }
}

impl Backoff {
    /// The ceiling of the delay after the given attempt (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(40);
        let ms = (self.base.as_millis() as u64).saturating_mul(1u64 << exp);
        Duration::from_millis(ms.min(self.cap.as_millis() as u64))
    }

    /// A delay for the given attempt, with `unit` in `[0, 1)` as the random draw.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as f64;
        Duration::from_millis((ceiling * unit.clamp(0.0, 1.0)) as u64)
    }

    pub fn random_delay(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(1000), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        let b = Backoff::default();
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(2));
        for attempt in 1..20 {
            assert!(b.random_delay(attempt) <= b.ceiling(attempt));
        }
    }
}
