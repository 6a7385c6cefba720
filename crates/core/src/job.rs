//! The contract between a job type and the engine: a versioned payload that names its queue,
//! its attempt budget and its execution timeout.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A job type's payload. One struct per job type; the handler is a separate `async fn`.
///
/// `VERSION` is stored beside every enqueued payload. A worker that meets a payload newer than
/// the one it was built with leaves it for a newer worker instead of misreading it, which is
/// what makes rolling deploys safe.
pub trait JobPayload: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The queue this job type runs on.
    const QUEUE: &'static str;
    /// The payload's schema version; bump it when the shape changes incompatibly.
    const VERSION: u32 = 1;
    /// How many deliveries a job gets before it is dead-lettered (overridable per job).
    const MAX_ATTEMPTS: u32 = 5;
    /// How long one run may take before it is cancelled and counted as a failed attempt.
    const TIMEOUT: Duration = Duration::from_secs(60);
    /// Whether a job must start when it is due, not merely soon after: a deferred send step
    /// comes back to a rate-limit slot reserved for it, which it loses if it starts too late.
    /// A worker never fetches such a queue's jobs ahead of a free handler (no prefetch): one
    /// fetched ahead waits in the worker's buffer behind the others, however due it was.
    const PUNCTUAL: bool = false;
}

/// Scheduling priority inside a queue: every `High` job ready to run is handed out before any
/// `Normal` one, and those before any `Low` one. Within a priority, first in first out.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority must be one of high, normal, low; got {0:?}")]
pub struct PriorityError(pub String);

impl Priority {
    /// The band used in the ready set's score: lower runs first.
    pub fn band(self) -> u8 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub fn from_band(band: u8) -> Self {
        match band {
            0 => Priority::High,
            1 => Priority::Normal,
            _ => Priority::Low,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl FromStr for Priority {
    type Err = PriorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(PriorityError(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_bands_order_high_first() {
        assert!(Priority::High.band() < Priority::Normal.band());
        assert!(Priority::Normal.band() < Priority::Low.band());
        for p in [Priority::High, Priority::Normal, Priority::Low] {
            assert_eq!(Priority::from_band(p.band()), p);
            assert_eq!(p.as_str().parse::<Priority>().unwrap(), p);
        }
        assert!("urgent".parse::<Priority>().is_err());
    }
}
