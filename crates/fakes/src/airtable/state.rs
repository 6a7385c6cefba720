//! The fake's shared state: stored records, rate-limit windows, fault plans and counters.
//!
//! One mutex guards it all; nothing awaits while holding it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::AirtableFakeConfig;
use super::faults::{FailPlan, Faults, InvalidFailPlan};
use super::limits::{Limiter, RateMeter, Verdict};
use super::records::{Record, Rejection, Schema, Table};

/// Request counters, kept for the whole fake and for each base.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Every `/v0` request, whatever its outcome.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 429: limit overflows, lock-out rejections and injected 429s.
    pub rate_limited: u64,
    /// Times a base overflowed its limit and a lock-out began.
    pub lockouts: u64,
    /// Answered 5xx (only injected faults produce these).
    pub errors_5xx: u64,
    /// Answered 401 or 403.
    pub unauthorized: u64,
    /// Answered another 4xx (422, 404, …).
    pub rejected: u64,
    /// Faults answered from a fail plan (a subset of `rate_limited` and `errors_5xx`).
    pub injected: u64,
}

impl Counters {
    fn count(&mut self, status: StatusCode) {
        self.requests += 1;
        match status.as_u16() {
            200..=299 => self.ok += 1,
            429 => self.rate_limited += 1,
            401 | 403 => self.unauthorized += 1,
            400..=499 => self.rejected += 1,
            500..=599 => self.errors_5xx += 1,
            _ => {}
        }
    }
}

/// Counters for one base.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BaseStats {
    #[serde(flatten)]
    pub counters: Counters,
    /// The most requests seen in any one-second window, counting every request.
    pub max_observed_rps: u32,
}

/// Counters for the whole fake, as served at `GET /__fake/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub totals: Counters,
    /// Token lock-outs begun.
    pub token_lockouts: u64,
    pub per_base: BTreeMap<String, BaseStats>,
    pub max_observed_rps_per_base: BTreeMap<String, u32>,
}

/// A table's name and how many records it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableSummary {
    pub name: String,
    pub records: usize,
}

/// Rate limits that can be changed while the fake runs; a zero rate means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub per_base_rps: u32,
    pub per_token_rps: u32,
    pub lockout: Duration,
}

/// How the gate answered a request before it reached the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    Unauthorized,
    Forbidden,
    RateLimited,
    Injected(StatusCode),
}

#[derive(Debug)]
struct Inner {
    config: AirtableFakeConfig,
    schema: Schema,
    bases: HashMap<String, BTreeMap<String, Table>>,
    base_limiter: Limiter,
    token_limiter: Limiter,
    meters: HashMap<String, RateMeter>,
    faults: Faults,
    stats: Stats,
}

impl Inner {
    fn new(config: AirtableFakeConfig) -> Self {
        let mut faults = Faults::default();
        faults.set(config.fail_plan.clone());
        Self {
            schema: Schema::new(config.fields.as_deref(), &config.numeric_fields),
            bases: HashMap::new(),
            base_limiter: Limiter::new(config.per_base_rps, config.lockout),
            token_limiter: Limiter::new(config.per_token_rps, config.lockout),
            meters: HashMap::new(),
            faults,
            stats: Stats::default(),
            config,
        }
    }

    fn base_stats(&mut self, base: &str) -> &mut BaseStats {
        self.stats.per_base.entry(base.to_owned()).or_default()
    }

    fn table_allowed(&self, base: &str, table: &str) -> Result<(), Rejection> {
        match &self.config.tables {
            Some(tables) if !tables.iter().any(|known| known == table) => {
                Err(Rejection::not_found(format!(
                    "Could not find table {table} in application {base}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A handle on the fake's state, shared by the HTTP service and Rust tests.
#[derive(Clone, Debug)]
pub struct AirtableFakeState {
    inner: Arc<Mutex<Inner>>,
}

fn created_time_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl AirtableFakeState {
    pub fn new(config: AirtableFakeConfig) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner::new(config))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters to a fake, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counters since start (or the last reset).
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut stats = inner.stats.clone();
        for (base, meter) in &inner.meters {
            let max = meter.max_per_window();
            stats
                .per_base
                .entry(base.clone())
                .or_default()
                .max_observed_rps = max;
            stats.max_observed_rps_per_base.insert(base.clone(), max);
        }
        stats
    }

    /// The base's tables (every configured table, when the list is fixed) with record counts.
    pub fn tables(&self, base: &str) -> Vec<TableSummary> {
        let inner = self.lock();
        let stored = inner.bases.get(base);
        let count = |name: &str| {
            stored
                .and_then(|tables| tables.get(name))
                .map_or(0, Table::len)
        };
        match &inner.config.tables {
            Some(names) => names
                .iter()
                .map(|name| TableSummary {
                    name: name.clone(),
                    records: count(name),
                })
                .collect(),
            None => stored
                .into_iter()
                .flatten()
                .map(|(name, table)| TableSummary {
                    name: name.clone(),
                    records: table.len(),
                })
                .collect(),
        }
    }

    /// Every record of a table in creation order (empty if the table holds none).
    pub fn records(&self, base: &str, table: &str) -> Vec<Record> {
        self.lock()
            .bases
            .get(base)
            .and_then(|tables| tables.get(table))
            .map(Table::records)
            .unwrap_or_default()
    }

    /// Stores records directly, bypassing authentication, rate limits and validation.
    pub fn seed(&self, base: &str, table: &str, records: Vec<Map<String, Value>>) -> Vec<Record> {
        let created_time = created_time_now();
        let mut inner = self.lock();
        let table = inner
            .bases
            .entry(base.to_owned())
            .or_default()
            .entry(table.to_owned())
            .or_default();
        records
            .into_iter()
            .map(|fields| table.insert_raw(fields, &created_time))
            .collect()
    }

    /// Replaces the plan for `plan.base` (or the plan for every other base).
    pub fn set_fail_plan(&self, plan: FailPlan) -> Result<(), InvalidFailPlan> {
        plan.validate()?;
        self.lock().faults.set(plan);
        Ok(())
    }

    /// The plans in force, with what is left of their bursts.
    pub fn fail_plans(&self) -> Vec<FailPlan> {
        self.lock().faults.plans()
    }

    pub fn clear_fail_plans(&self) {
        self.lock().faults = Faults::default();
    }

    pub fn rate_limits(&self) -> RateLimits {
        let inner = self.lock();
        RateLimits {
            per_base_rps: inner.config.per_base_rps,
            per_token_rps: inner.config.per_token_rps,
            lockout: inner.config.lockout,
        }
    }

    /// Changes the rate limits from the next request on; windows and lock-outs in progress stay.
    pub fn set_rate_limits(&self, limits: RateLimits) {
        let mut inner = self.lock();
        inner.config.per_base_rps = limits.per_base_rps;
        inner.config.per_token_rps = limits.per_token_rps;
        inner.config.lockout = limits.lockout;
        inner
            .base_limiter
            .reconfigure(limits.per_base_rps, limits.lockout);
        inner
            .token_limiter
            .reconfigure(limits.per_token_rps, limits.lockout);
    }

    /// Back to the state at start: no records, zero counters, no windows, the configured fail
    /// plan and the configured limits.
    pub fn reset(&self) {
        let mut inner = self.lock();
        let config = inner.config.clone();
        *inner = Inner::new(config);
    }

    /// Resets with a new configuration, e.g. to change the schema between tests.
    pub fn reset_with(&self, config: AirtableFakeConfig) -> Result<(), InvalidFailPlan> {
        config.fail_plan.validate()?;
        *self.lock() = Inner::new(config);
        Ok(())
    }

    /// Authentication, base access, rate limits and fault plans, in that order.
    pub(crate) fn admit(&self, base: &str, token: Option<&str>) -> Admission {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .meters
            .entry(base.to_owned())
            .or_default()
            .observe(now);

        let Some(token) = token.filter(|token| !token.is_empty()) else {
            return Admission::Unauthorized;
        };
        if !inner.config.tokens.is_empty() && !inner.config.tokens.iter().any(|t| t == token) {
            return Admission::Unauthorized;
        }
        if let Some(bases) = &inner.config.bases
            && !bases.iter().any(|known| known == base)
        {
            return Admission::Forbidden;
        }

        let base_verdict = inner.base_limiter.check(base, now);
        let token_verdict = inner.token_limiter.check(token, now);
        if base_verdict == Verdict::LockedOut || token_verdict == Verdict::LockedOut {
            return Admission::RateLimited;
        }
        let mut tripped = false;
        if base_verdict == Verdict::Tripped {
            inner.base_limiter.trip(base, now);
            inner.stats.totals.lockouts += 1;
            inner.base_stats(base).counters.lockouts += 1;
            tripped = true;
        }
        if token_verdict == Verdict::Tripped {
            inner.token_limiter.trip(token, now);
            inner.stats.token_lockouts += 1;
            tripped = true;
        }
        if tripped {
            return Admission::RateLimited;
        }
        inner.base_limiter.record(base, now);
        inner.token_limiter.record(token, now);

        if let Some(status) = inner.faults.next(base) {
            inner.stats.totals.injected += 1;
            inner.base_stats(base).counters.injected += 1;
            return Admission::Injected(status);
        }
        Admission::Admitted
    }

    /// Counts one answered `/v0` request by its status.
    pub(crate) fn record_outcome(&self, base: &str, status: StatusCode) {
        let mut inner = self.lock();
        inner.stats.totals.count(status);
        inner.base_stats(base).counters.count(status);
    }

    /// Runs a read against a table; a table never written to reads as empty.
    pub(crate) fn read_table<R>(
        &self,
        base: &str,
        table: &str,
        read: impl FnOnce(&Table) -> Result<R, Rejection>,
    ) -> Result<R, Rejection> {
        let inner = self.lock();
        inner.table_allowed(base, table)?;
        let empty = Table::default();
        let stored = inner
            .bases
            .get(base)
            .and_then(|tables| tables.get(table))
            .unwrap_or(&empty);
        read(stored)
    }

    /// Runs a write against a table, creating it on first write unless the table list is fixed.
    pub(crate) fn write_table<R>(
        &self,
        base: &str,
        table: &str,
        write: impl FnOnce(&mut Table, &Schema, &str) -> Result<R, Rejection>,
    ) -> Result<R, Rejection> {
        let created_time = created_time_now();
        let mut inner = self.lock();
        inner.table_allowed(base, table)?;
        let Inner { bases, schema, .. } = &mut *inner;
        let tables = bases.entry(base.to_owned()).or_default();
        match tables.get_mut(table) {
            Some(stored) => write(stored, schema, &created_time),
            None => {
                let mut fresh = Table::default();
                let result = write(&mut fresh, schema, &created_time);
                // A failed first write leaves no empty table behind.
                if result.is_ok() {
                    tables.insert(table.to_owned(), fresh);
                }
                result
            }
        }
    }
}
