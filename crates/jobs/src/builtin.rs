//! Built-in diagnostic job types: `noop` (benchmarks) and `probe` (fault tests: one effect row
//! per effect key in Postgres, with a run counter that shows re-deliveries).

use std::time::Duration;

use apalis_core::task::data::Data;
use herald_core::{JobError, JobPayload};
use herald_queue::JobMeta;
use serde::{Deserialize, Serialize};

use crate::Deps;

/// Does nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Noop {}

impl JobPayload for Noop {
    const QUEUE: &'static str = "noop";
}

pub async fn noop(_job: Noop) -> Result<(), JobError> {
    Ok(())
}

/// Records an effect, counting how many times it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub effect_key: String,
    /// Sleep this long before recording (to widen the window for fault tests).
    #[serde(default)]
    pub sleep_ms: u64,
    /// Abort the whole process instead of running (a poison job). Honoured only when the worker
    /// runs with test jobs enabled.
    #[serde(default)]
    pub abort: bool,
}

impl JobPayload for Probe {
    const QUEUE: &'static str = "probe";
    const MAX_ATTEMPTS: u32 = 3;
    const TIMEOUT: Duration = Duration::from_secs(30);
}

pub async fn probe(job: Probe, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    if job.abort {
        if deps.allow_probe_abort {
            tracing::error!(job_id = %meta.id, "probe asked to abort the process");
            std::process::abort();
        }
        return Err(JobError::permanent(
            "probe abort refused: this worker does not run with test jobs enabled",
        ));
    }
    if job.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    herald_store::probe::record(&deps.pool, meta.tenant, &job.effect_key)
        .await
        .map_err(|e| JobError::retry(format!("recording the effect failed: {e}")))?;
    Ok(())
}
