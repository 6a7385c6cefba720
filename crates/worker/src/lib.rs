//! herald-worker: apalis workers over herald's Redis queues, plus the outbox relay, the
//! reconciler, periodic maintenance and a Prometheus endpoint.
//!
//! The binary is a thin `main`; everything it does lives here so tests can drive it:
//! [`config`] turns flags into a [`config::Plan`], [`runtime::run`] runs that plan until a
//! shutdown signal, [`metrics`] renders the `/metrics` page.

pub mod config;
pub mod metrics;
pub mod runtime;
