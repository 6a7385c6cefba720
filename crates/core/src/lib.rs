//! Domain types shared by every herald crate: identifiers, queue names, priorities, the job
//! payload contract and the job error that carries the retry decision.
//!
//! This crate does no IO: no Redis, no Postgres, no HTTP, no clock reads outside `now_ms`.

mod error;
mod ids;
mod job;

pub use error::JobError;
pub use ids::{IdError, JobId, QueueName, TenantId};
pub use job::{JobPayload, Priority, PriorityError};

/// Milliseconds since the Unix epoch, the one time unit herald stores in Redis.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
