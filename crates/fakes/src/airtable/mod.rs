//! A local Airtable Web API fake that follows Airtable's documented behaviour (see DESIGN.md,
//! "Providers: facts the fakes must follow"), not any client's code.
//!
//! What it does, like Airtable:
//! - `/v0/{base}/{table}`: list (pages of at most 100 with an `offset` cursor), create, update
//!   (`PATCH` merges, `PUT` replaces), upsert (`performUpsert.fieldsToMergeOn`, answering
//!   `createdRecords`/`updatedRecords`) and delete (`records[]=…`); at most 10 records per write;
//!   `/v0/{base}/{table}/{record}` for single records.
//! - errors in `{"error":{"type":..,"message":..}}`: 422 `INVALID_REQUEST_BODY`,
//!   `UNKNOWN_FIELD_NAME`, `INVALID_VALUE_FOR_COLUMN`, `ROW_DOES_NOT_EXIST`; 404 `NOT_FOUND` for
//!   a table outside a fixed table list; 401 `AUTHENTICATION_REQUIRED`; 403 for a base outside
//!   a fixed base list.
//! - a sliding one-second window per base (5 req/s) and per token (50 req/s); overflowing one
//!   answers 429 `RATE_LIMIT_REACHED` without `Retry-After` and locks the base (or token) out
//!   for 30 s, during which every request gets 429. Requests refused by a lock-out do not count
//!   in the window.
//! - empty cells (`null`, `""`, `false`) are not returned; writing one clears the cell.
//!
//! Where it is simpler: `filterByFormula`, `sort` and `view` are accepted and ignored; tables
//! appear on first write unless [`AirtableFakeConfig::tables`] fixes the list; only fields named in
//! [`AirtableFakeConfig::numeric_fields`] have a type.
//!
//! For tests: fault plans ([`FailPlan`]) and the `/__fake/…` routes (`stats`,
//! `bases/{base}/tables`, `bases/{base}/tables/{table}/records`, `faults`, `limits`, `reset`),
//! also reachable from Rust through [`AirtableFake::state`].

mod faults;
mod limits;
mod records;
mod routes;
mod state;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{FailPlan, InvalidFailPlan};
pub use records::{MAX_PAGE_SIZE, MAX_RECORDS_PER_REQUEST, Record};
pub use routes::router;
pub use state::{AirtableFakeState, BaseStats, Counters, RateLimits, Stats, TableSummary};

/// How the fake behaves; the defaults are Airtable's.
#[derive(Clone, Debug)]
pub struct AirtableFakeConfig {
    /// Requests per second per base; 0 means unlimited.
    pub per_base_rps: u32,
    /// Requests per second per token; 0 means unlimited.
    pub per_token_rps: u32,
    /// How long a base or token that overflowed its window gets 429s; zero refuses only the
    /// overflowing request.
    pub lockout: Duration,
    /// Accepted bearer tokens; empty accepts any non-empty token.
    pub tokens: Vec<String>,
    /// Bases the tokens may use (others get 403); `None` allows any base.
    pub bases: Option<Vec<String>>,
    /// Tables that exist in every base (others get 404); `None` creates tables on first write.
    pub tables: Option<Vec<String>>,
    /// Known field names (others get 422 `UNKNOWN_FIELD_NAME`); `None` accepts any name.
    pub fields: Option<Vec<String>>,
    /// Fields holding numbers: other values get 422 `INVALID_VALUE_FOR_COLUMN`, unless
    /// `typecast` is set and the value is a numeric string. Always known field names.
    pub numeric_fields: Vec<String>,
    /// Faults to inject from the start.
    pub fail_plan: FailPlan,
}

impl Default for AirtableFakeConfig {
    fn default() -> Self {
        Self {
            per_base_rps: 5,
            per_token_rps: 50,
            lockout: Duration::from_secs(30),
            tokens: Vec::new(),
            bases: None,
            tables: None,
            fields: None,
            numeric_fields: Vec::new(),
            fail_plan: FailPlan::default(),
        }
    }
}

impl AirtableFakeConfig {
    /// Airtable's behaviour without rate limits, for tests that are not about them.
    pub fn unlimited() -> Self {
        Self {
            per_base_rps: 0,
            per_token_rps: 0,
            ..Self::default()
        }
    }
}

/// A running fake; dropping it (or calling [`AirtableFake::shutdown`]) stops the server.
#[derive(Debug)]
pub struct AirtableFake {
    addr: SocketAddr,
    state: AirtableFakeState,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

/// Starts the fake on `127.0.0.1` on a free port.
pub async fn spawn(config: AirtableFakeConfig) -> anyhow::Result<AirtableFake> {
    spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
}

/// Starts the fake on `addr` (port 0 picks a free port).
pub async fn spawn_on(
    addr: SocketAddr,
    config: AirtableFakeConfig,
) -> anyhow::Result<AirtableFake> {
    config.fail_plan.validate()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the Airtable fake to {addr}"))?;
    let addr = listener.local_addr()?;
    let state = AirtableFakeState::new(config);
    let app = router(state.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                // A dropped sender stops the server too.
                let _ = stopped.await;
            })
            .await
    });
    tracing::debug!(%addr, "Airtable fake listening");
    Ok(AirtableFake {
        addr,
        state,
        stop: Some(stop),
        server: Some(server),
    })
}

impl AirtableFake {
    /// The URL to use as `AIRTABLE_API_URL`, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Inspection and control without HTTP.
    pub fn state(&self) -> &AirtableFakeState {
        &self.state
    }

    /// Stops accepting connections and waits for requests in flight to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .context("the Airtable fake's server task failed")?
                .context("the Airtable fake's server failed")?;
        }
        Ok(())
    }
}

impl Drop for AirtableFake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
