//! The error a job handler returns. The variant is the retry decision; the engine never has to
//! guess from a message.

use std::time::Duration;

/// What went wrong in a job run, and what the engine should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// A failed attempt: retried with exponential backoff and jitter, or after `after` when the
    /// handler knows better (a provider's `Retry-After`). Counts against `max_attempts`.
    #[error("{reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Not a failure: the job cannot run yet (a throttle, a closed window, a full slot). It is
    /// re-scheduled for `until_ms` (Unix milliseconds) without spending an attempt.
    #[error("deferred: {reason}")]
    Defer { reason: String, until_ms: u64 },
    /// The job can never succeed (bad payload, a provider's 4xx): dead-lettered at once.
    #[error("{reason}")]
    Permanent { reason: String },
}

impl JobError {
    pub fn retry(reason: impl Into<String>) -> Self {
        JobError::Retry {
            reason: reason.into(),
            after: None,
        }
    }

    pub fn retry_after(reason: impl Into<String>, after: Duration) -> Self {
        JobError::Retry {
            reason: reason.into(),
            after: Some(after),
        }
    }

    pub fn defer_until(reason: impl Into<String>, until_ms: u64) -> Self {
        JobError::Defer {
            reason: reason.into(),
            until_ms,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        JobError::Permanent {
            reason: reason.into(),
        }
    }
}
