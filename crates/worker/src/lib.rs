//! herald-worker.
