//! Periodic jobs from cron expressions. Every worker may run the scheduler; each period's job is
//! enqueued under a dedupe key naming the period, so the fleet runs it once per period.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cron::Schedule;

use crate::Error;
use crate::client::{Client, NewJob, Queue};

/// A job enqueued once per period of a cron schedule.
#[derive(Clone)]
pub struct Periodic {
    pub name: String,
    pub schedule: Schedule,
    pub queue: Queue,
    /// The job for one period (its key is set by the scheduler).
    pub job: NewJob,
}

impl Periodic {
    /// `expr` is a cron expression with seconds: `sec min hour day-of-month month day-of-week`.
    pub fn new(
        name: impl Into<String>,
        expr: &str,
        queue: Queue,
        job: NewJob,
    ) -> Result<Self, Error> {
        let schedule = Schedule::from_str(expr)
            .map_err(|e| Error::Config(format!("invalid cron expression {expr:?}: {e}")))?;
        Ok(Self {
            name: name.into(),
            schedule,
            queue,
            job,
        })
    }

    /// The dedupe key of the period that starts at `at`.
    pub fn period_key(&self, at: DateTime<Utc>) -> String {
        format!("periodic:{}:{}", self.name, at.timestamp())
    }

    /// Enqueues the period starting at `at`; returns whether this call created it.
    pub async fn enqueue_period(&self, at: DateTime<Utc>) -> Result<bool, Error> {
        let job = self
            .job
            .clone()
            .key(self.period_key(at))
            .run_at_ms(at.timestamp_millis().max(0) as u64);
        Ok(!self.queue.enqueue(job).await?.duplicate)
    }

    /// Runs until the task is dropped: at each period start, enqueue it (once across the fleet).
    pub async fn run(self) {
        loop {
            let Some(next) = self.schedule.upcoming(Utc).next() else {
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            for attempt in 0..5u64 {
                match self.enqueue_period(next).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(name = %self.name, error = %e, "periodic enqueue failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                    }
                }
            }
        }
    }
}

/// Claims the current period of a fixed-interval task (maintenance, the reconciler) for this
/// process: of all the processes that call it during one period of `every`, exactly one gets
/// `true`. Periods are aligned on the Unix epoch, so every process agrees on where they start.
pub async fn claim_period(client: &Client, name: &str, every: Duration) -> Result<bool, Error> {
    let every_ms = (every.as_millis() as u64).max(1);
    let period = herald_core::now_ms() / every_ms;
    let key = format!(
        "{}:{}:periodic:{name}:{period}",
        client.settings.namespace,
        crate::LAYOUT_VERSION
    );
    let mut conn = client.conn.clone();
    let claimed: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("NX")
        .arg("PX")
        .arg(every_ms.saturating_mul(2))
        .query_async(&mut conn)
        .await?;
    Ok(claimed.is_some())
}
