//! herald's Redis backend for apalis: leased, retried, delayed, prioritised, de-duplicated jobs
//! with bounded work per Redis call, on a standalone Redis or a cluster.
//!
//! Producers use [`Client`] and [`Queue`]; workers build an apalis worker over a
//! [`RedisBackend`]. Lua scripts live in `lua/`; every key of a queue shares its hash tag.
//! This crate knows nothing of Postgres or of any job type.

mod backend;
mod backoff;
mod client;
mod conn;
mod error;
mod keys;
mod layer;
pub mod periodic;
mod scripts;

pub use backend::{DrainHandle, JobMeta, NotAHeraldTask, RedisBackend, Stats, WorkerOptions};
pub use backoff::Backoff;
pub use client::{
    Client, Counts, ENQUEUE_CHUNK, Enqueued, JobInfo, JobState, MemoryStatus, NewJob, Queue,
    QueueSettings, WorkerInfo,
};
pub use conn::RedisTarget;
pub use error::Error;
pub use keys::LAYOUT_VERSION;
pub use layer::{HeraldLayer, HeraldService};
