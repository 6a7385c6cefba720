//! The daily VA assignment: start a campaign, then its job types `daily_select`,
//! `daily_distribute`, `daily_sync` (one per batch of at most 10 records of one table) and the
//! rolling-window `daily_cleanup` with its Airtable follow-ups (`daily_airtable_cleanup`).
//!
//! Every stage change and the jobs it creates are written in one transaction (the outbox), and
//! every handler is idempotent: a job that runs twice finds its stage already passed, its batch
//! already recorded, its Airtable records merged on `profile_id`. Provider pacing is decided by
//! the fleet-wide limiter before each request; a handler never sleeps for its turn.
//!
//! Each handler is a thin wrapper over a `run_*` function taking the tenant explicitly, which
//! tests and tools call directly.

use std::collections::BTreeMap;
use std::time::Duration;

use apalis_core::task::data::Data;
use chrono::NaiveDate;
use herald_admission::Admission;
use herald_connectors::airtable::Error as AirtableError;
use herald_core::{JobError, JobPayload, TenantId};
use herald_queue::JobMeta;
use herald_store::daily::{
    self, AirtableRef, BatchRef, BatchStatus, Campaign, CampaignId, Placement, Shape, Stage,
};
use herald_store::outbox::{self, NewOutboxJob};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Deps;
use crate::airtable::Airtable;

/// The Airtable field sync upserts merge on.
pub const MERGE_FIELD: &str = "profile_id";

/// The Airtable table of VA table `table_no`: `Daily_Outreach_Table_01` … `_99`.
pub fn table_name(table_no: u32) -> String {
    format!("Daily_Outreach_Table_{table_no:02}")
}

/// Select the day's profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailySelect {
    pub campaign_id: CampaignId,
}

impl JobPayload for DailySelect {
    const QUEUE: &'static str = "daily_select";
    const TIMEOUT: Duration = Duration::from_secs(120);
}

/// Shuffle the selection into tables and positions, and fan out the sync batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyDistribute {
    pub campaign_id: CampaignId,
}

impl JobPayload for DailyDistribute {
    const QUEUE: &'static str = "daily_distribute";
    const TIMEOUT: Duration = Duration::from_secs(120);
}

/// Push one batch (at most 10 records of one table) to Airtable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailySync {
    pub campaign_id: CampaignId,
    pub table_no: u32,
    pub batch_no: u32,
}

impl JobPayload for DailySync {
    const QUEUE: &'static str = "daily_sync";
    const MAX_ATTEMPTS: u32 = 8;
    const TIMEOUT: Duration = Duration::from_secs(60);
}

/// Keep the rolling 7-day window for one tenant, as of `date` (default: today in the tenant's
/// time zone).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyCleanup {
    #[serde(default)]
    pub date: Option<NaiveDate>,
}

impl JobPayload for DailyCleanup {
    const QUEUE: &'static str = "daily_cleanup";
    const TIMEOUT: Duration = Duration::from_secs(300);
}

/// What cleanup does to Airtable records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupAction {
    /// Set `status` to `unfollow` (7-day-old assignments).
    Unfollow,
    /// Delete the records (8+ days old).
    Delete,
}

/// Apply a cleanup action to at most 10 records of one table. The records travel in the payload
/// because the Postgres rows behind a deletion are already gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AirtableCleanup {
    pub action: CleanupAction,
    pub table_no: u32,
    pub records: Vec<AirtableRef>,
}

impl JobPayload for AirtableCleanup {
    const QUEUE: &'static str = "daily_airtable_cleanup";
    const MAX_ATTEMPTS: u32 = 8;
}

impl AirtableCleanup {
    pub fn validate_value(v: &Value) -> Result<(), String> {
        let job: AirtableCleanup = serde_json::from_value(v.clone())
            .map_err(|e| format!("payload does not match job type {}: {e}", Self::QUEUE))?;
        if job.records.is_empty() || job.records.len() > daily::BATCH_SIZE as usize {
            return Err(format!(
                "records must hold 1 to {} entries",
                daily::BATCH_SIZE
            ));
        }
        Ok(())
    }
}

fn store_error(e: herald_store::Error) -> JobError {
    match e {
        herald_store::Error::Database(_) => JobError::retry(format!("database: {e}")),
        other => JobError::permanent(other.to_string()),
    }
}

fn outbox_job<P: JobPayload>(payload: &P) -> Result<NewOutboxJob, JobError> {
    NewOutboxJob::for_payload(payload).map_err(store_error)
}

// ---------------------------------------------------------------------------------------------
// Starting, resuming, cleanup on demand: library calls for the API and the CLI.

/// A campaign and whether this call created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub campaign: Campaign,
    pub created: bool,
}

/// Starts the tenant's daily campaign for `date` (default: today in the tenant's time zone):
/// the campaign row (stage `selecting`) and its select job are written in one transaction. The
/// same (tenant, date) always gives the same campaign, whatever shape the later calls ask for.
pub async fn start_daily(
    pool: &PgPool,
    tenant: TenantId,
    date: Option<NaiveDate>,
    shape: Shape,
) -> Result<Started, herald_store::Error> {
    let date = match date {
        Some(date) => date,
        None => daily::tenant_today(pool, tenant).await?,
    };
    let mut tx = pool.begin().await?;
    let (campaign, created) = daily::insert_campaign(&mut tx, tenant, date, shape).await?;
    if created {
        let job = NewOutboxJob::for_payload(&DailySelect {
            campaign_id: campaign.id,
        })?;
        outbox::insert(&mut tx, tenant, &job).await?;
    }
    tx.commit().await?;
    Ok(Started { campaign, created })
}

/// Resumes a failed campaign from the stage that failed, re-running only that stage's
/// unfinished work (for the sync stage: the failed batches). A campaign that is not failed is
/// `Error::Conflict`.
pub async fn resume(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
) -> Result<Campaign, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let resumed = daily::resume(&mut tx, tenant, id).await?;
    let jobs = match resumed.stage {
        Stage::Selecting => vec![NewOutboxJob::for_payload(&DailySelect { campaign_id: id })?],
        Stage::Distributing => {
            vec![NewOutboxJob::for_payload(&DailyDistribute {
                campaign_id: id,
            })?]
        }
        Stage::Syncing => resumed
            .batches
            .iter()
            .map(|&(table_no, batch_no)| {
                NewOutboxJob::for_payload(&DailySync {
                    campaign_id: id,
                    table_no,
                    batch_no,
                })
            })
            .collect::<Result<_, _>>()?,
        Stage::Complete | Stage::Failed => Vec::new(),
    };
    outbox::insert_many(&mut tx, tenant, &jobs).await?;
    let campaign = daily::fetch(&mut tx, tenant, id, false).await?;
    tx.commit().await?;
    Ok(campaign)
}

/// Enqueues a cleanup for the tenant (as of `date`, default today in its time zone); returns
/// the outbox id, which is the job id.
pub async fn enqueue_cleanup(
    pool: &PgPool,
    tenant: TenantId,
    date: Option<NaiveDate>,
) -> Result<Uuid, herald_store::Error> {
    let mut conn = pool.acquire().await?;
    outbox::insert(
        &mut conn,
        tenant,
        &NewOutboxJob::for_payload(&DailyCleanup { date })?,
    )
    .await
}

/// Cross-tenant, for the daily schedule: enqueues a cleanup for every tenant with assignments,
/// each as of today in its own time zone. Returns how many were enqueued.
pub async fn enqueue_cleanup_for_all(pool: &PgPool) -> Result<usize, herald_store::Error> {
    let tenants = daily::tenants_with_assignments(pool).await?;
    let now = chrono::Utc::now();
    for (tenant, zone) in &tenants {
        let today = daily::today_in(zone, now).unwrap_or_else(|_| now.date_naive());
        enqueue_cleanup(pool, *tenant, Some(today)).await?;
    }
    Ok(tenants.len())
}

// ---------------------------------------------------------------------------------------------
// Failure bookkeeping shared by the handlers

/// Marks the campaign failed in `stage` when `result` is a failure the engine will not retry
/// (permanent, or a retry on the last attempt), so progress shows it and a resume can restart it.
async fn fail_if_final(
    deps: &Deps,
    meta: &JobMeta,
    campaign: CampaignId,
    stage: Stage,
    result: Result<(), JobError>,
) -> Result<(), JobError> {
    let final_failure = match &result {
        Err(JobError::Permanent { .. }) => true,
        Err(JobError::Retry { .. }) => meta.is_last_attempt(),
        _ => false,
    };
    if final_failure && let Err(e) = &result {
        let marked = async {
            let mut conn = deps.pool.acquire().await?;
            daily::fail(&mut conn, meta.tenant, campaign, stage, &e.to_string()).await
        }
        .await;
        if let Err(db) = marked {
            tracing::warn!(campaign = %campaign, error = %db, "recording the failed stage failed");
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// select

pub async fn select(job: DailySelect, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    let result = run_select(&deps, meta.tenant, &job).await;
    fail_if_final(&deps, &meta, job.campaign_id, Stage::Selecting, result).await
}

/// In one transaction: takes up to the target of unused profiles (`SKIP LOCKED`), marks them
/// used, creates their assignments at table 0, records any shortfall, moves the campaign to
/// `distributing` and writes the distribute job. No unused profile at all fails the campaign
/// with "no unused profiles" and marks nothing. A campaign past `selecting` is left alone.
pub async fn run_select(deps: &Deps, tenant: TenantId, job: &DailySelect) -> Result<(), JobError> {
    let mut tx = deps.pool.begin().await.map_err(db_error)?;
    let campaign = daily::fetch(&mut tx, tenant, job.campaign_id, true)
        .await
        .map_err(store_error)?;
    if campaign.stage != Stage::Selecting {
        return Ok(());
    }
    let taken = daily::take_unused_profiles(&mut tx, tenant, &campaign)
        .await
        .map_err(store_error)?;
    if taken == 0 {
        daily::fail(
            &mut tx,
            tenant,
            campaign.id,
            Stage::Selecting,
            "no unused profiles",
        )
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(db_error)?;
        return Ok(());
    }
    let shortfall = campaign.shape.target().saturating_sub(taken);
    daily::finish_selecting(&mut tx, tenant, campaign.id, taken, shortfall)
        .await
        .map_err(store_error)?;
    let next = outbox_job(&DailyDistribute {
        campaign_id: campaign.id,
    })?;
    outbox::insert(&mut tx, tenant, &next)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(db_error)?;
    tracing::info!(campaign = %campaign.id, %tenant, taken, shortfall, "daily selection done");
    Ok(())
}

fn db_error(e: sqlx::Error) -> JobError {
    JobError::retry(format!("database: {e}"))
}

// ---------------------------------------------------------------------------------------------
// distribute

/// How many profiles each table gets: `selected` spread evenly over `tables`, the first
/// `selected % tables` tables taking one more, never more than `per_table` (see
/// `docs/decisions/0003-daily-distribution.md`).
pub fn table_sizes(selected: u32, tables: u32, per_table: u32) -> Vec<u32> {
    let tables = tables.max(1);
    let base = selected / tables;
    let extra = selected % tables;
    (0..tables)
        .map(|i| (base + u32::from(i < extra)).min(per_table))
        .collect()
}

/// Deals `profiles` (already shuffled) into tables 1.. by [`table_sizes`], positions 1.. in
/// each table, in order.
pub fn lay_out(profiles: &[Uuid], tables: u32, per_table: u32) -> Vec<Placement> {
    let sizes = table_sizes(
        u32::try_from(profiles.len()).unwrap_or(u32::MAX),
        tables,
        per_table,
    );
    let mut placements = Vec::with_capacity(profiles.len());
    let mut next = profiles.iter();
    for (index, size) in sizes.iter().enumerate() {
        for position in 1..=*size {
            let Some(profile_id) = next.next() else { break };
            placements.push(Placement {
                profile_id: *profile_id,
                table_no: index as u32 + 1,
                position,
            });
        }
    }
    placements
}

pub async fn distribute(
    job: DailyDistribute,
    meta: JobMeta,
    deps: Data<Deps>,
) -> Result<(), JobError> {
    let result = run_distribute(&deps, meta.tenant, &job).await;
    fail_if_final(&deps, &meta, job.campaign_id, Stage::Distributing, result).await
}

/// In one transaction: shuffles the selected profiles, places them by [`lay_out`], creates the
/// sync batches, moves the campaign to `syncing` and writes one sync job per batch. A campaign
/// past `distributing` is left alone, so a re-run changes nothing.
pub async fn run_distribute(
    deps: &Deps,
    tenant: TenantId,
    job: &DailyDistribute,
) -> Result<(), JobError> {
    let mut tx = deps.pool.begin().await.map_err(db_error)?;
    let campaign = daily::fetch(&mut tx, tenant, job.campaign_id, true)
        .await
        .map_err(store_error)?;
    if campaign.stage != Stage::Distributing {
        return Ok(());
    }
    let mut profiles = daily::unplaced_profiles(&mut tx, tenant, campaign.id)
        .await
        .map_err(store_error)?;
    profiles.shuffle(&mut rand::thread_rng());
    let placements = lay_out(
        &profiles,
        campaign.shape.tables(),
        campaign.shape.per_table(),
    );
    let batches = daily::place(&mut tx, tenant, campaign.id, &placements)
        .await
        .map_err(store_error)?;
    let jobs = batches
        .iter()
        .map(|(batch, _)| {
            outbox_job(&DailySync {
                campaign_id: campaign.id,
                table_no: batch.table_no,
                batch_no: batch.batch_no,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    outbox::insert_many(&mut tx, tenant, &jobs)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(db_error)?;
    tracing::info!(campaign = %campaign.id, %tenant, placed = placements.len(), batches = batches.len(), "daily distribution done");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sync

fn airtable(deps: &Deps) -> Result<&Airtable, JobError> {
    deps.airtable.as_deref().ok_or_else(|| {
        JobError::retry(
            "Airtable is not configured on this worker (AIRTABLE_TOKEN, AIRTABLE_BASE_ID)",
        )
    })
}

/// Asks the fleet-wide limiter for a request slot; a refusal defers the job to the instant the
/// limiter names without spending an attempt. (Reserving that slot keeps later slots from
/// drifting, but collapsed a day's 1,440-batch fan-out: docs/decisions/0007.) `request` names
/// what the job sends, for the trace.
async fn admit(airtable: &Airtable, request: &str) -> Result<(), JobError> {
    tracing::trace!(request, "asking the Airtable rate limiter");
    match airtable.admit().await {
        Ok(Admission::Admitted) => Ok(()),
        Ok(Admission::WaitUntil(until_ms)) => Err(JobError::defer_until(
            format!(
                "rate limit: Airtable base {} is at its request rate",
                airtable.base_id()
            ),
            until_ms,
        )),
        Err(e) => Err(JobError::retry(format!("rate limiter unavailable: {e}"))),
    }
}

/// After a 429: holds the whole base back and defers this job to the end of the hold.
async fn defer_after_429(airtable: &Airtable, retry_after: Option<Duration>) -> JobError {
    match airtable.hold_base(retry_after).await {
        Ok(until_ms) => JobError::defer_until(
            format!(
                "rate limit: Airtable answered 429; base {} held back",
                airtable.base_id()
            ),
            until_ms,
        ),
        Err(e) => JobError::retry_after(
            format!("Airtable answered 429 and the hold could not be recorded: {e}"),
            retry_after.unwrap_or(herald_connectors::airtable::RATE_LIMIT_LOCKOUT),
        ),
    }
}

pub async fn sync(job: DailySync, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    run_sync(&deps, meta.tenant, &job, meta.is_last_attempt()).await
}

fn sync_fields(record: &daily::SyncRecord) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert(MERGE_FIELD.into(), json!(record.profile_id.to_string()));
    fields.insert("username".into(), json!(record.username));
    if let Some(name) = &record.full_name {
        fields.insert("full_name".into(), json!(name));
    }
    fields.insert("position".into(), json!(record.position));
    fields.insert(
        "campaign_date".into(),
        json!(record.campaign_date.format("%Y-%m-%d").to_string()),
    );
    fields.insert("status".into(), json!(record.status));
    fields
}

/// Pushes one batch to `Daily_Outreach_Table_NN` as an upsert merged on `profile_id`, once the
/// limiter admits it, and records the outcome:
/// - success: each assignment's Airtable record id and sync time, then the fan-in (the last
///   batch completes the campaign, once);
/// - 429: the base is held back for `Retry-After` (else the lock-out) and the job deferred;
/// - 5xx or no answer: retried with backoff; on the last attempt the batch and the campaign
///   are marked failed (resumable);
/// - 422: the batch's records carry Airtable's error, the batch counts as done, and the job is
///   dead-lettered (permanent) while the other batches go on;
/// - 401/403/404: permanent, and the campaign fails (the configuration needs fixing).
///
/// `last_attempt` tells whether a retryable failure now would dead-letter the job.
pub async fn run_sync(
    deps: &Deps,
    tenant: TenantId,
    job: &DailySync,
    last_attempt: bool,
) -> Result<(), JobError> {
    let batch = BatchRef {
        table_no: job.table_no,
        batch_no: job.batch_no,
    };
    let result = sync_batch(deps, tenant, job, batch).await;
    if let Err(JobError::Retry { reason, .. }) = &result
        && last_attempt
    {
        daily::record_batch_failed(&deps.pool, tenant, job.campaign_id, batch, reason)
            .await
            .map_err(store_error)?;
    }
    result
}

async fn sync_batch(
    deps: &Deps,
    tenant: TenantId,
    job: &DailySync,
    batch: BatchRef,
) -> Result<(), JobError> {
    let (status, records) = daily::batch(&deps.pool, tenant, job.campaign_id, batch)
        .await
        .map_err(store_error)?;
    if matches!(status, BatchStatus::Synced | BatchStatus::Rejected) {
        return Ok(());
    }
    let airtable = airtable(deps)?;
    let request = format!(
        "daily_sync:{}:{}:{}",
        job.campaign_id, job.table_no, job.batch_no
    );
    admit(airtable, &request).await?;
    let fields: Vec<Map<String, Value>> = records.iter().map(sync_fields).collect();
    let table = table_name(job.table_no);
    match airtable
        .client
        .upsert(&table, &[MERGE_FIELD], &fields)
        .await
    {
        Ok(result) => {
            let by_profile: BTreeMap<String, String> = result
                .records
                .into_iter()
                .filter_map(|(id, fields)| {
                    fields
                        .get(MERGE_FIELD)
                        .and_then(Value::as_str)
                        .map(|p| (p.to_owned(), id))
                })
                .collect();
            let ledger: Vec<(Uuid, String)> = records
                .iter()
                .filter_map(|r| {
                    by_profile
                        .get(&r.profile_id.to_string())
                        .map(|id| (r.profile_id, id.clone()))
                })
                .collect();
            if ledger.len() != records.len() {
                return Err(JobError::retry(format!(
                    "Airtable answered {} of {} records for {table}",
                    ledger.len(),
                    records.len()
                )));
            }
            let fan_in = daily::record_synced(&deps.pool, tenant, job.campaign_id, batch, &ledger)
                .await
                .map_err(store_error)?;
            if fan_in.completed_campaign {
                tracing::info!(campaign = %job.campaign_id, %tenant, "daily campaign complete");
            }
            Ok(())
        }
        Err(AirtableError::RateLimited { retry_after }) => {
            Err(defer_after_429(airtable, retry_after).await)
        }
        Err(error @ AirtableError::Rejected { .. }) => {
            let reason = error.to_string();
            daily::record_rejected(&deps.pool, tenant, job.campaign_id, batch, &reason)
                .await
                .map_err(store_error)?;
            Err(JobError::permanent(reason))
        }
        Err(error) if error.is_retryable() => Err(JobError::retry(error.to_string())),
        Err(error) => {
            let reason = error.to_string();
            daily::record_batch_failed(&deps.pool, tenant, job.campaign_id, batch, &reason)
                .await
                .map_err(store_error)?;
            Err(JobError::permanent(reason))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cleanup

/// What a cleanup run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CleanupSummary {
    pub date: Option<NaiveDate>,
    pub unfollowed: u64,
    pub deleted: u64,
    /// Airtable follow-up jobs written (at most 10 records each).
    pub airtable_jobs: usize,
}

pub async fn cleanup(job: DailyCleanup, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    run_cleanup(&deps, meta.tenant, &job).await.map(|_| ())
}

fn cleanup_jobs(
    action: CleanupAction,
    refs: Vec<AirtableRef>,
) -> Result<Vec<NewOutboxJob>, JobError> {
    let mut by_table: BTreeMap<u32, Vec<AirtableRef>> = BTreeMap::new();
    for r in refs.into_iter().filter(|r| r.table_no > 0) {
        by_table.entry(r.table_no).or_default().push(r);
    }
    let mut jobs = Vec::new();
    for (table_no, refs) in by_table {
        for chunk in refs.chunks(daily::BATCH_SIZE as usize) {
            jobs.push(outbox_job(&AirtableCleanup {
                action,
                table_no,
                records: chunk.to_vec(),
            })?);
        }
    }
    Ok(jobs)
}

/// In one transaction: marks 7-day-old assignments `unfollow`, deletes those 8 or more days
/// old, and writes the Airtable follow-up jobs (status update, record deletion), which go
/// through the same rate limiter. A second run the same day changes nothing.
pub async fn run_cleanup(
    deps: &Deps,
    tenant: TenantId,
    job: &DailyCleanup,
) -> Result<CleanupSummary, JobError> {
    let today = match job.date {
        Some(date) => date,
        None => daily::tenant_today(&deps.pool, tenant)
            .await
            .map_err(store_error)?,
    };
    let mut tx = deps.pool.begin().await.map_err(db_error)?;
    let done = daily::cleanup(&mut tx, tenant, today)
        .await
        .map_err(store_error)?;
    let mut jobs = cleanup_jobs(CleanupAction::Unfollow, done.to_unfollow)?;
    jobs.extend(cleanup_jobs(CleanupAction::Delete, done.to_delete)?);
    outbox::insert_many(&mut tx, tenant, &jobs)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(CleanupSummary {
        date: Some(today),
        unfollowed: done.unfollowed,
        deleted: done.deleted,
        airtable_jobs: jobs.len(),
    })
}

pub async fn airtable_cleanup(
    job: AirtableCleanup,
    meta: JobMeta,
    deps: Data<Deps>,
) -> Result<(), JobError> {
    run_airtable_cleanup(&deps, meta.tenant, &job).await
}

/// Applies one cleanup action to at most 10 Airtable records, once the limiter admits it. A
/// delete that finds a record already gone (a re-run, or a human) is done; with several
/// records it is split into one job per record, so the others still go.
pub async fn run_airtable_cleanup(
    deps: &Deps,
    tenant: TenantId,
    job: &AirtableCleanup,
) -> Result<(), JobError> {
    if job.records.is_empty() {
        return Ok(());
    }
    if job.records.len() > daily::BATCH_SIZE as usize {
        return Err(JobError::permanent(format!(
            "at most {} records per cleanup job",
            daily::BATCH_SIZE
        )));
    }
    let airtable = airtable(deps)?;
    // Cleanup chunks never share a record, so the first record names the chunk.
    let request = format!(
        "airtable_cleanup:{}:{}:{}:{}",
        match job.action {
            CleanupAction::Unfollow => "unfollow",
            CleanupAction::Delete => "delete",
        },
        job.table_no,
        job.records[0].profile_id,
        job.records.len()
    );
    admit(airtable, &request).await?;
    let table = table_name(job.table_no);
    let outcome = match job.action {
        CleanupAction::Unfollow => {
            let fields: Vec<Map<String, Value>> = job
                .records
                .iter()
                .map(|r| {
                    let mut fields = Map::new();
                    fields.insert(MERGE_FIELD.into(), json!(r.profile_id.to_string()));
                    fields.insert("status".into(), json!("unfollow"));
                    fields
                })
                .collect();
            airtable
                .client
                .upsert(&table, &[MERGE_FIELD], &fields)
                .await
                .map(|_| ())
        }
        CleanupAction::Delete => {
            let ids: Vec<String> = job.records.iter().map(|r| r.record_id.clone()).collect();
            airtable.client.delete(&table, &ids).await.map(|_| ())
        }
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(AirtableError::RateLimited { retry_after }) => {
            Err(defer_after_429(airtable, retry_after).await)
        }
        Err(AirtableError::Rejected { kind, .. })
            if job.action == CleanupAction::Delete && kind == "ROW_DOES_NOT_EXIST" =>
        {
            if job.records.len() == 1 {
                return Ok(());
            }
            let singles = job
                .records
                .iter()
                .map(|r| {
                    outbox_job(&AirtableCleanup {
                        action: CleanupAction::Delete,
                        table_no: job.table_no,
                        records: vec![r.clone()],
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut conn = deps.pool.acquire().await.map_err(db_error)?;
            outbox::insert_many(&mut conn, tenant, &singles)
                .await
                .map_err(store_error)?;
            Ok(())
        }
        Err(error) if error.is_retryable() => Err(JobError::retry(error.to_string())),
        Err(error) => Err(JobError::permanent(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_selections_spread_evenly_with_the_remainder_first() {
        assert_eq!(table_sizes(14_400, 80, 180), vec![180; 80]);
        assert_eq!(table_sizes(7, 3, 180), vec![3, 2, 2]);
        assert_eq!(table_sizes(2, 4, 180), vec![1, 1, 0, 0]);
        let sizes = table_sizes(14_399, 80, 180);
        assert_eq!(sizes.iter().sum::<u32>(), 14_399);
        assert_eq!(sizes.iter().max(), Some(&180));
        assert_eq!(sizes.iter().min(), Some(&179));
    }

    #[test]
    fn lay_out_fills_positions_from_one_without_gaps() {
        let ids: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
        let placed = lay_out(&ids, 3, 10);
        assert_eq!(placed.len(), 25);
        for table in 1..=3 {
            let mut positions: Vec<u32> = placed
                .iter()
                .filter(|p| p.table_no == table)
                .map(|p| p.position)
                .collect();
            positions.sort_unstable();
            let expected: Vec<u32> = (1..=positions.len() as u32).collect();
            assert_eq!(positions, expected);
        }
    }

    #[test]
    fn table_names_have_two_digits() {
        assert_eq!(table_name(1), "Daily_Outreach_Table_01");
        assert_eq!(table_name(80), "Daily_Outreach_Table_80");
    }
}
