//! Call campaigns' job types: `call_dispatch` (admit and place the tenant's next calls) and
//! `call_release_slot` (a call ended: record it, free its slot, admit the next call), plus the
//! library calls the API uses (start a campaign, take a provider's server message).
//!
//! Admission is decided in Redis before each call (`herald-admission`'s slots: the user's limit,
//! the tenant's system limit and, when set, the tenant's fair share of the fleet-wide cap,
//! together, with a lease), never by sleeping: a dispatcher that finds no free slot or no open
//! window ends, leaving a wake-up dispatch at the instant that can change the answer (a lease
//! running out, a window opening). A slot freed under a fleet cap also wakes the tenant the
//! fleet owes it to (docs/decisions/0008-fleet-call-sharing.md). The provider takes no idempotency
//! key, so a call is recorded `dialing` (an attempt) before it is placed and is never placed
//! again once that is recorded, except when the provider said it did not place it.
//!
//! Each handler is a thin wrapper over a `run_*` function taking the tenant explicitly, which
//! tests call directly.

use std::collections::BTreeMap;
use std::time::Duration;

use apalis_core::task::data::Data;
use chrono::{DateTime, Utc};
use herald_admission::{Connection, SlotAdmission, SlotRequest, Slots, Window, fleet, round_robin};
use herald_connectors::voice::{self, EndedAs, NewCall, ServerEvent, VoiceClient, VoiceConfig};
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_queue::JobMeta;
use herald_store::calls::{self, FleetWaitRecord, NextCall, Outcome, VoiceProvider};
use herald_store::outbox::{self, NewOutboxJob};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Deps;

/// The longest plausible call unless configured: a slot whose call-ended signal never comes is
/// free again after this.
pub const DEFAULT_SLOT_LEASE: Duration = Duration::from_secs(60 * 60);
/// How many calls one dispatch run places at most before handing over to a fresh run, so one
/// tenant's backlog does not hold the dispatch queue (other tenants' runs interleave).
pub const DEFAULT_MAX_PER_RUN: usize = 20;
/// How long to wait before asking again when the provider says the account is at its limit
/// (herald's own count disagreed: calls placed outside herald, or a slot lost with Redis data).
pub const PROVIDER_FULL_RETRY: Duration = Duration::from_secs(2);
/// How long the slot id of a call that is over stays refused: longer than any dispatch run
/// (`CallDispatch::TIMEOUT`), so a run acting on a view of the call from before it ended cannot
/// take a slot, and a round-robin turn, for it.
pub const RETIRED_FOR: Duration = Duration::from_secs(10 * 60);
/// Wake-up dispatches are rounded up to this granularity so a tenant has at most one pending
/// wake-up per instant.
const WAKE_GRANULARITY_MS: u64 = 250;

/// Dispatch the tenant's next calls (the tenant is the job's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallDispatch {}

impl JobPayload for CallDispatch {
    const QUEUE: &'static str = "call_dispatch";
    const MAX_ATTEMPTS: u32 = 10;
    const TIMEOUT: Duration = Duration::from_secs(120);
}

/// A call ended at the provider: record it and free its slot. Keyed by the provider's call id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSlot {
    pub provider_call_id: String,
    #[serde(default)]
    pub ended_reason: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<i64>,
}

impl JobPayload for ReleaseSlot {
    const QUEUE: &'static str = "call_release_slot";
    const MAX_ATTEMPTS: u32 = 10;
}

/// Where and how to place calls.
#[derive(Clone, Debug)]
pub struct VoiceSettings {
    /// `VOICE_API_URL`: the API URL of a tenant that does not name its own.
    pub default_api_url: String,
    /// `HERALD_CALL_SLOT_LEASE_MS`: the longest plausible call.
    pub slot_lease: Duration,
    /// `HERALD_CALL_DISPATCH_BATCH`: calls placed per dispatch run at most.
    pub max_per_run: usize,
    /// `HERALD_CALL_FLEET_LIMIT`: the most calls in progress across every tenant, shared fairly
    /// between the tenants that have calls to place; `None` (unset) for no fleet-wide cap.
    /// Every worker of a fleet must use the same value.
    pub fleet_limit: Option<u32>,
    pub timeout: Duration,
}

impl Default for VoiceSettings {
    fn default() -> Self {
        Self {
            default_api_url: voice::DEFAULT_API_URL.to_owned(),
            slot_lease: DEFAULT_SLOT_LEASE,
            max_per_run: DEFAULT_MAX_PER_RUN,
            fleet_limit: None,
            timeout: voice::DEFAULT_TIMEOUT,
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("call slots: {0}")]
    Admission(#[from] herald_admission::Error),
    #[error("call slots cannot reach Redis: {0}")]
    Redis(#[from] herald_admission::RedisError),
}

impl VoiceSettings {
    /// Reads `VOICE_API_URL`, `HERALD_CALL_SLOT_LEASE_MS`, `HERALD_CALL_DISPATCH_BATCH` and
    /// `HERALD_CALL_FLEET_LIMIT` through `var`; unset (or empty) ones keep their defaults.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let mut settings = Self::default();
        if let Some(url) = var("VOICE_API_URL") {
            settings.default_api_url = url.trim_end_matches('/').to_owned();
        }
        let whole = |name: &'static str| -> Result<Option<u64>, SettingsError> {
            var(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| SettingsError::Invalid {
                            name,
                            reason: format!("{v:?} is not a positive whole number"),
                        })
                })
                .transpose()
        };
        if let Some(ms) = whole("HERALD_CALL_SLOT_LEASE_MS")? {
            settings.slot_lease = Duration::from_millis(ms);
        }
        if let Some(n) = whole("HERALD_CALL_DISPATCH_BATCH")? {
            settings.max_per_run = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(n) = whole("HERALD_CALL_FLEET_LIMIT")? {
            let limit = u32::try_from(n).map_err(|_| SettingsError::Invalid {
                name: "HERALD_CALL_FLEET_LIMIT",
                reason: format!("{n} is above {}", u32::MAX),
            })?;
            settings.fleet_limit = Some(limit);
        }
        Ok(settings)
    }

    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// Calls as the handlers use them: the fleet-wide slots and the HTTP client.
#[derive(Clone, Debug)]
pub struct Voice {
    pub slots: Slots,
    pub http: reqwest::Client,
    pub settings: VoiceSettings,
}

impl Voice {
    /// Slots under the `call_dispatch` queue's hash tag in `namespace`.
    pub async fn connect(
        http: reqwest::Client,
        settings: VoiceSettings,
        redis_url: &str,
        namespace: &str,
    ) -> Result<Self, SettingsError> {
        let conn = Connection::connect(redis_url).await?;
        Ok(Self::new(
            http,
            settings,
            Slots::new(conn, namespace, CallDispatch::QUEUE)?,
        ))
    }

    pub fn new(http: reqwest::Client, settings: VoiceSettings, slots: Slots) -> Self {
        Self {
            slots,
            http,
            settings,
        }
    }
}

fn store_error(e: herald_store::Error) -> JobError {
    match e {
        herald_store::Error::Database(_) => JobError::retry(format!("database: {e}")),
        other => JobError::permanent(other.to_string()),
    }
}

fn slot_error(e: herald_admission::Error) -> JobError {
    JobError::retry(format!("call slots unavailable: {e}"))
}

fn voice(deps: &Deps) -> Result<&Voice, JobError> {
    deps.voice
        .as_deref()
        .ok_or_else(|| JobError::retry("voice calls are not configured on this worker"))
}

/// The slot id of a call: herald's call id (known before the provider's).
fn slot_id(call: Uuid) -> String {
    call.simple().to_string()
}

fn user_slot_name(user: Uuid) -> String {
    user.simple().to_string()
}

/// Writes a dispatch job for the tenant in the caller's transaction, to run at once or at
/// `at_ms`. A wake-up (`at_ms` set) is de-duplicated per tenant and instant.
pub async fn enqueue_dispatch(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    at_ms: Option<u64>,
) -> Result<(), herald_store::Error> {
    let mut job = NewOutboxJob::for_payload(&CallDispatch {})?;
    match at_ms {
        None => {
            outbox::insert(conn, tenant, &job).await?;
        }
        Some(at) => {
            let at = at.div_ceil(WAKE_GRANULARITY_MS) * WAKE_GRANULARITY_MS;
            job.run_at = DateTime::<Utc>::from_timestamp_millis(at as i64);
            job.job_key = Some(format!("wake:{at}"));
            outbox::insert_unless_key_taken(conn, tenant, &job, Utc::now()).await?;
        }
    }
    Ok(())
}

/// Creates a campaign with its queued calls and, in the same transaction, the dispatch job
/// that starts calling.
pub async fn start_campaign(
    pool: &PgPool,
    tenant: TenantId,
    campaign: &calls::NewCampaign,
    contact_ids: &[Uuid],
) -> Result<(calls::Campaign, u64), herald_store::Error> {
    let mut tx = pool.begin().await?;
    let created = calls::create_campaign(&mut tx, tenant, campaign, contact_ids).await?;
    enqueue_dispatch(&mut tx, tenant, None).await?;
    tx.commit().await?;
    Ok(created)
}

/// Resumes a paused campaign and dispatches at once.
pub async fn resume_campaign(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<calls::Campaign, herald_store::Error> {
    let campaign = calls::resume_campaign(pool, tenant, id).await?;
    let mut conn = pool.acquire().await?;
    enqueue_dispatch(&mut conn, tenant, None).await?;
    Ok(campaign)
}

/// Deletes the tenant's contact and cancels its queued calls; a cancelled call that was a
/// sequence's call step settles it (`cancelled`) and moves its lead on, in the same transaction.
/// Returns how many calls were cancelled.
pub async fn delete_contact(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<u64, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let cancelled = calls::delete_contact(&mut tx, tenant, id).await?;
    for call in &cancelled {
        crate::sequences::on_call_ended(&mut tx, tenant, *call, Outcome::Cancelled, Utc::now())
            .await?;
    }
    tx.commit().await?;
    Ok(cancelled.len() as u64)
}

/// What a provider's server message led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageEffect {
    /// A release job was written (or was already pending for this call).
    ReleaseQueued {
        duplicate: bool,
    },
    InCall,
    Ignored,
}

/// Takes one server message for the tenant (already authenticated): a call-ended event writes a
/// `call_release_slot` job keyed by the provider's call id, so duplicates within a day make one
/// job (and the handler frees the slot once whatever happens).
pub async fn on_server_message(
    pool: &PgPool,
    tenant: TenantId,
    event: ServerEvent,
) -> Result<MessageEffect, herald_store::Error> {
    match event {
        ServerEvent::Ended {
            call_id,
            ended_reason,
            duration_ms,
        } => {
            if let Some(duration) = duration_ms {
                calls::fill_duration(pool, tenant, &call_id, duration).await?;
            }
            let mut job = NewOutboxJob::for_payload(&ReleaseSlot {
                provider_call_id: call_id.clone(),
                ended_reason,
                duration_ms,
            })?;
            job.job_key = Some(format!("release:{call_id}"));
            let mut tx = pool.begin().await?;
            let since = Utc::now() - chrono::Duration::days(1);
            let (_, duplicate) =
                outbox::insert_unless_key_taken(&mut tx, tenant, &job, since).await?;
            tx.commit().await?;
            Ok(MessageEffect::ReleaseQueued { duplicate })
        }
        ServerEvent::InProgress { call_id } => {
            calls::mark_in_call(pool, tenant, &call_id).await?;
            Ok(MessageEffect::InCall)
        }
        ServerEvent::Other => Ok(MessageEffect::Ignored),
    }
}

// ---------------------------------------------------------------------------------------------
// dispatch

/// What one dispatch run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchSummary {
    /// Calls placed at the provider.
    pub placed: Vec<Uuid>,
    /// When another dispatch was scheduled to run (a lease expiry, a window opening).
    pub wake_at_ms: Option<u64>,
    /// Whether a follow-up dispatch was written to carry on at once.
    pub continued: bool,
    /// The fleet cap's refusal that ended the run, if one did.
    pub fleet_wait: Option<FleetWaitRecord>,
    /// Another tenant woken to take fleet capacity this run freed or gave up.
    pub woke: Option<TenantId>,
}

pub async fn dispatch(job: CallDispatch, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    let _ = job;
    run_dispatch(&deps, meta.tenant, Utc::now())
        .await
        .map(|_| ())
}

fn earliest(a: Option<u64>, b: u64) -> Option<u64> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Places the tenant's next calls while slots and windows allow, at most `max_per_run`:
/// 1. ends calls whose lease ran out without a call-ended signal (failed; never re-dialled);
/// 2. finds the active campaigns with queued calls whose window is open at `now` (a campaign
///    outside its window defers only its own calls), and each user's next call among them
///    (named contacts first, then FIFO);
/// 3. offers a slot to those users round-robin after the user served last; a user at its limit
///    is skipped, a tenant at its limit ends the run;
/// 4. records the call `dialing` and places it; the provider's "at concurrency limit" puts it
///    back in the queue (no failure) and ends the run.
///
/// Then it schedules a wake-up at the first instant that can change the answer.
pub async fn run_dispatch(
    deps: &Deps,
    tenant: TenantId,
    now: DateTime<Utc>,
) -> Result<DispatchSummary, JobError> {
    let voice = voice(deps)?;
    let pool = &deps.pool;
    let Some(provider) = calls::voice_provider(pool, tenant)
        .await
        .map_err(store_error)?
    else {
        return Err(JobError::permanent(
            "the tenant has no voice provider (PUT /v1/providers/voice)",
        ));
    };
    let lease = voice.settings.slot_lease;
    let tenant_name = tenant.0.simple().to_string();
    let lease_chrono = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::hours(1));
    // Whether this run freed a slot (a lease that ran out, a call not placed): under a fleet
    // cap another tenant may be owed it.
    let mut freed_any = false;
    // Ending a call and moving on the sequence lead it was for (if any) commit together.
    let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
    let expired = calls::expire_live_calls(&mut tx, tenant, now - lease_chrono)
        .await
        .map_err(store_error)?;
    for ended in &expired {
        crate::sequences::on_call_ended(&mut tx, tenant, ended.id, Outcome::Failed, now)
            .await
            .map_err(store_error)?;
    }
    tx.commit().await.map_err(|e| store_error(e.into()))?;
    for ended in expired {
        tracing::warn!(%tenant, call = %ended.id, "call lease expired without a call-ended signal");
        freed_any = true;
        retire(voice, &tenant_name, ended.user_id, ended.id).await?;
    }
    let client = VoiceClient::new(
        voice.http.clone(),
        VoiceConfig {
            api_url: provider.api_url.clone(),
            api_key: SecretString::from(provider.api_key.clone()),
            timeout: voice.settings.timeout,
        },
    );
    let system_limit = u32::try_from(provider.system_limit).unwrap_or(1).max(1);
    let fleet_limit = voice.settings.fleet_limit;
    let mut summary = DispatchSummary::default();
    let mut wake: Option<u64> = None;
    let mut more_work = false;
    // Requests found stale (another dispatcher of the tenant served first), and whether the run
    // handed over to a fresh one because of them.
    let mut stale_reads = 0usize;
    let mut gave_way = false;
    'runs: while summary.placed.len() < voice.settings.max_per_run {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| JobError::retry(e.to_string()))?;
        let campaigns = calls::runnable_campaigns(&mut conn, tenant)
            .await
            .map_err(store_error)?;
        let mut open = Vec::new();
        for campaign in &campaigns {
            match Window::parse(
                campaign.first_call_time,
                campaign.last_call_time,
                &campaign.time_zone,
                campaign.start_date,
            ) {
                Ok(window) => {
                    let next = window.next_open(now);
                    if next <= now {
                        open.push(campaign.id);
                    } else {
                        wake = earliest(wake, next.timestamp_millis().max(0) as u64);
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, campaign = %campaign.id, error = %e, "campaign window is unusable");
                }
            }
        }
        let candidates = calls::next_call_per_user(&mut conn, tenant, &open)
            .await
            .map_err(store_error)?;
        drop(conn);
        if candidates.is_empty() {
            break;
        }
        let by_user: BTreeMap<Uuid, NextCall> =
            candidates.into_iter().map(|c| (c.user_id, c)).collect();
        let users: Vec<Uuid> = by_user.keys().copied().collect();
        // Offers on this view of the queue. A stale answer re-reads the cursor and the turn and
        // offers again (a call another dispatcher took meanwhile is refused as already held),
        // a few times, before reading the queue again.
        let mut fresh_turns = 0;
        'offers: loop {
            // The cursor and the turn together: a grant to another dispatcher after this read makes
            // this run's requests stale, so it reads again instead of serving out of turn.
            let (last, turn) = voice.slots.turn(&tenant_name).await.map_err(slot_error)?;
            let last = last.and_then(|s| Uuid::parse_str(&s).ok());
            for user in round_robin(&users, last.as_ref()) {
                let Some(call) = by_user.get(&user) else {
                    continue;
                };
                let user_limit = u32::try_from(call.concurrent_calls_limit)
                    .unwrap_or(1)
                    .max(1);
                let slot = slot_id(call.id);
                let user_name = user_slot_name(user);
                let admission = voice
                    .slots
                    .acquire(&SlotRequest {
                        tenant: &tenant_name,
                        user: &user_name,
                        slot: &slot,
                        user_limit,
                        tenant_limit: system_limit,
                        lease,
                        fleet_limit,
                        expected_turn: Some(turn),
                    })
                    .await
                    .map_err(slot_error)?;
                let granted = match admission {
                    SlotAdmission::Acquired { .. } | SlotAdmission::AlreadyHeld { .. } => Granted {
                        at: admission
                            .granted_at_ms(lease)
                            .and_then(|ms| DateTime::<Utc>::from_timestamp_millis(ms as i64))
                            .unwrap_or(now),
                        turn: admission
                            .turn()
                            .filter(|turn| *turn > 0)
                            .and_then(|turn| i64::try_from(turn).ok()),
                    },
                    SlotAdmission::Stale | SlotAdmission::Retired => {
                        // Another dispatcher of this tenant was served meanwhile, or the call ended
                        // since this run read it as waiting: read again. Each such answer means
                        // someone else made progress, but a run gives up after a while and hands
                        // over to a fresh run.
                        stale_reads += 1;
                        if stale_reads > voice.settings.max_per_run.max(1) * 4 {
                            gave_way = true;
                            break 'runs;
                        }
                        if admission == SlotAdmission::Stale && fresh_turns < 4 {
                            fresh_turns += 1;
                            continue 'offers;
                        }
                        continue 'runs;
                    }
                    SlotAdmission::UserFull { until_ms } => {
                        wake = earliest(wake, until_ms);
                        more_work = true;
                        continue;
                    }
                    SlotAdmission::TenantFull { until_ms } => {
                        wake = earliest(wake, until_ms);
                        more_work = true;
                        break 'runs;
                    }
                    SlotAdmission::FleetFull {
                        until_ms,
                        share,
                        held,
                    }
                    | SlotAdmission::FleetShare {
                        until_ms,
                        share,
                        held,
                    } => {
                        // The tenant waits for its share of the fleet: a release anywhere in the
                        // fleet wakes it when it is owed the freed slot, the first lease end at the
                        // latest.
                        wake = earliest(wake, until_ms);
                        more_work = true;
                        summary.fleet_wait = fleet_limit.map(|limit| FleetWaitRecord {
                            fleet_limit: i32::try_from(limit).unwrap_or(i32::MAX),
                            share: i32::try_from(share).unwrap_or(i32::MAX),
                            held: i32::try_from(held).unwrap_or(i32::MAX),
                        });
                        break 'runs;
                    }
                };
                match place(deps, &client, tenant, call, granted).await? {
                    Placed::Yes => {
                        summary.placed.push(call.id);
                        // Re-read: this user's next call, and the round-robin cursor, changed.
                        continue 'runs;
                    }
                    Placed::Skipped => {
                        // Two dispatch runs may offer the same call at once: the slot id is the
                        // call's, so one acquires it and the other finds it held. Only the run that
                        // records `dialing` places the call; the other must not free the slot the
                        // call now holds. A call no longer live (cancelled, ended) frees it.
                        if !calls::is_live(pool, tenant, call.id)
                            .await
                            .map_err(store_error)?
                        {
                            release(voice, &tenant_name, user, call.id).await?;
                        }
                        continue 'runs;
                    }
                    Placed::ProviderFull => {
                        freed_any |= release(voice, &tenant_name, user, call.id).await?;
                        wake = earliest(wake, now_ms() + PROVIDER_FULL_RETRY.as_millis() as u64);
                        more_work = true;
                        break 'runs;
                    }
                    Placed::Failed => {
                        freed_any |= retire(voice, &tenant_name, user, call.id).await?;
                        continue 'runs;
                    }
                }
            }
            // Every user was offered a slot and none could take one.
            break 'runs;
        }
    }
    // A call whose end is never signalled must still be ended when its lease runs out.
    if let Some(dialed_at) = calls::oldest_live_dialed_at(pool, tenant)
        .await
        .map_err(store_error)?
    {
        let expires = (dialed_at + lease_chrono).timestamp_millis().max(0) as u64 + 1;
        wake = earliest(wake, expires);
    }
    // One connection at a time: a run holding one while waiting for another can starve the
    // pool when every connection is held by such a run.
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| JobError::retry(e.to_string()))?;
    if (summary.placed.len() >= voice.settings.max_per_run || gave_way) && !more_work {
        // The run's budget is spent with slots possibly still free: carry on in a fresh run so
        // other tenants' dispatches interleave.
        enqueue_dispatch(&mut conn, tenant, None)
            .await
            .map_err(store_error)?;
        summary.continued = true;
    } else if let Some(at) = wake {
        enqueue_dispatch(&mut conn, tenant, Some(at))
            .await
            .map_err(store_error)?;
        summary.wake_at_ms = Some(at);
    }
    // What the call views show as the fleet's reason to wait; cleared by any run the fleet did
    // not refuse (also once the cap is removed).
    calls::record_fleet_wait(&mut conn, tenant, summary.fleet_wait)
        .await
        .map_err(store_error)?;
    if fleet_limit.is_some() {
        let mut gave_up = false;
        if summary.fleet_wait.is_none() && !summary.continued {
            // Nothing this tenant could place now is held back by the fleet: it stops
            // competing, and its share goes to the others.
            voice
                .slots
                .withdraw_from_fleet(&tenant_name)
                .await
                .map_err(slot_error)?;
            gave_up = true;
        }
        if gave_up || freed_any {
            summary.woke = wake_owed_tenant(voice, &mut conn, tenant).await?;
        }
    }
    drop(conn);
    calls::complete_finished_campaigns(pool, tenant)
        .await
        .map_err(store_error)?;
    Ok(summary)
}

/// Under a fleet cap, writes a dispatch for the tenant a free fleet slot is owed to
/// ([`fleet::next_to_serve`]), unless that is `tenant` itself (whose own dispatch is already
/// written). Returns the tenant woken.
async fn wake_owed_tenant(
    voice: &Voice,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
) -> Result<Option<TenantId>, JobError> {
    let Some(limit) = voice.settings.fleet_limit else {
        return Ok(None);
    };
    let (state, now) = voice.slots.fleet_state(limit).await.map_err(slot_error)?;
    let Some(next) = fleet::next_to_serve(&state, now) else {
        return Ok(None);
    };
    let Ok(next) = Uuid::parse_str(&next).map(TenantId) else {
        tracing::warn!(tenant = %next, "fleet slot owed to a tenant that is not a tenant id");
        return Ok(None);
    };
    if next == tenant {
        return Ok(None);
    }
    enqueue_dispatch(conn, next, None)
        .await
        .map_err(store_error)?;
    tracing::debug!(%tenant, woke = %next, "fleet slot offered to the tenant owed it");
    Ok(Some(next))
}

/// Frees the slot of a call that goes back to waiting (or never left it).
async fn release(voice: &Voice, tenant: &str, user: Uuid, call: Uuid) -> Result<bool, JobError> {
    voice
        .slots
        .release(tenant, &user_slot_name(user), &slot_id(call))
        .await
        .map_err(slot_error)
}

/// Frees the slot of a call that is over, and keeps its id from being taken again.
async fn retire(voice: &Voice, tenant: &str, user: Uuid, call: Uuid) -> Result<bool, JobError> {
    voice
        .slots
        .retire(tenant, &user_slot_name(user), &slot_id(call), RETIRED_FOR)
        .await
        .map_err(slot_error)
}

enum Placed {
    Yes,
    /// The call was no longer queued (another dispatcher took it, or it was cancelled).
    Skipped,
    /// The provider's account is at its limit: the call is queued again.
    ProviderFull,
    /// The provider refused it for good, or may have placed it without telling us: failed.
    Failed,
}

fn metadata(tenant: TenantId, call: &NextCall) -> Map<String, Value> {
    let mut metadata = Map::new();
    metadata.insert("tenant_id".into(), json!(tenant.to_string()));
    metadata.insert("call_id".into(), json!(call.id.to_string()));
    metadata.insert("campaign_id".into(), json!(call.campaign_id.to_string()));
    metadata.insert("user_id".into(), json!(call.user_id.to_string()));
    if let Some(next) = &call.next_action {
        metadata.insert("next_action".into(), json!(next));
    }
    metadata.insert("context".into(), call.context.clone());
    metadata
}

/// A slot granted to a call: when (its lease starts then) and at which of the tenant's turns.
#[derive(Debug, Clone, Copy)]
struct Granted {
    at: DateTime<Utc>,
    turn: Option<i64>,
}

async fn place(
    deps: &Deps,
    client: &VoiceClient,
    tenant: TenantId,
    call: &NextCall,
    granted: Granted,
) -> Result<Placed, JobError> {
    let pool = &deps.pool;
    if !calls::mark_dialing(pool, tenant, call.id, granted.at, granted.turn)
        .await
        .map_err(store_error)?
    {
        return Ok(Placed::Skipped);
    }
    let request = NewCall {
        assistant_id: call.assistant_id.clone(),
        phone_number_id: call.phone_number_id.clone(),
        customer: voice::Customer {
            number: call.phone.clone(),
            name: call.name.clone(),
        },
        metadata: metadata(tenant, call),
    };
    match client.create_call(&request).await {
        Ok(placed) => {
            calls::set_provider_call_id(pool, tenant, call.id, &placed.id)
                .await
                .map_err(store_error)?;
            tracing::debug!(%tenant, call = %call.id, provider_call = %placed.id, "call placed");
            Ok(Placed::Yes)
        }
        Err(
            e @ (voice::Error::AtConcurrencyLimit
            | voice::Error::RateLimited
            | voice::Error::Server { .. }),
        ) => {
            // The provider answered that it did not place the call: it keeps its place.
            tracing::info!(%tenant, call = %call.id, error = %e, "call not placed; queued again");
            calls::requeue(pool, tenant, call.id)
                .await
                .map_err(store_error)?;
            Ok(Placed::ProviderFull)
        }
        Err(e) => {
            // Refused for good, or no answer (it may have been placed): never dialled twice.
            tracing::warn!(%tenant, call = %call.id, error = %e, "call failed");
            let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
            if calls::fail_dialing(&mut tx, tenant, call.id, &e.to_string())
                .await
                .map_err(store_error)?
            {
                crate::sequences::on_call_ended(
                    &mut tx,
                    tenant,
                    call.id,
                    Outcome::Failed,
                    Utc::now(),
                )
                .await
                .map_err(store_error)?;
            }
            tx.commit().await.map_err(|e| store_error(e.into()))?;
            Ok(Placed::Failed)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// release slot

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// This run ended the call, freed its slot and wrote the next dispatch.
    Ended { call: Uuid, slot_freed: bool },
    /// The call had already ended (a duplicate or late signal); its slot is certainly free.
    AlreadyEnded { call: Uuid },
}

pub async fn release_slot(
    job: ReleaseSlot,
    meta: JobMeta,
    deps: Data<Deps>,
) -> Result<(), JobError> {
    let released = run_release_slot(&deps, meta.tenant, &job, meta.is_last_attempt()).await?;
    if let Released::Ended {
        slot_freed: true, ..
    } = released
    {
        // The freed slot goes to the next call now, in this job, instead of after the dispatch
        // job just written has crossed the outbox and the queue (two hops fewer between the
        // webhook and the next call). That job stays the guarantee: it runs anyway and finds
        // the slot taken or the queue empty. Concurrent dispatch runs are safe (ADR 0004), and
        // a failure here is the dispatch job's to repeat, not the release's.
        if let Err(e) = run_dispatch(&deps, meta.tenant, Utc::now()).await {
            tracing::debug!(tenant = %meta.tenant, error = %e, "dispatch after a release failed; the dispatch job will run");
        }
    }
    Ok(())
}

fn outcome_of(reason: Option<&str>) -> Outcome {
    match voice::classify_ended_reason(reason) {
        EndedAs::Completed => Outcome::Completed,
        EndedAs::Busy => Outcome::Busy,
        EndedAs::NoAnswer => Outcome::NoAnswer,
        EndedAs::Failed => Outcome::Failed,
        EndedAs::Cancelled => Outcome::Cancelled,
    }
}

/// Ends the call the provider knows by `job.provider_call_id` (at most once: only a call still
/// dialing or in a call changes), records its outcome and duration, moves on the sequence lead
/// the call was for (if any), frees its slot and writes a dispatch job in the same transaction, so the next call is admitted at once. A call not
/// recorded yet (the signal overtook the dispatcher's write of the provider's id) is retried
/// shortly; on the last attempt the job ends without effect.
pub async fn run_release_slot(
    deps: &Deps,
    tenant: TenantId,
    job: &ReleaseSlot,
    last_attempt: bool,
) -> Result<Released, JobError> {
    let voice = voice(deps)?;
    let pool = &deps.pool;
    let tenant_name = tenant.0.simple().to_string();
    // Twice at most: the dispatcher may record the provider's id between this job's update
    // (which then finds no call) and its look-up (which finds the call still in progress).
    let outcome = outcome_of(job.ended_reason.as_deref());
    for round in 0..2 {
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| JobError::retry(e.to_string()))?;
        let ended = calls::end_by_provider_id(
            &mut tx,
            tenant,
            &job.provider_call_id,
            outcome,
            job.ended_reason.as_deref(),
            job.duration_ms,
        )
        .await
        .map_err(store_error)?;
        if let Some(ended) = ended {
            // A sequence's call: its lead moves on in the same transaction as the call's end.
            crate::sequences::on_call_ended(&mut tx, tenant, ended.id, outcome, Utc::now())
                .await
                .map_err(store_error)?;
            // The provider has ended the call, so its slot is free now: free it before the
            // commit makes the next dispatch visible, or that dispatch could find the tenant
            // still full. A failed commit re-runs the job; freeing again is a no-op.
            let slot_freed = retire(voice, &tenant_name, ended.user_id, ended.id).await?;
            enqueue_dispatch(&mut tx, tenant, None)
                .await
                .map_err(store_error)?;
            // Under a fleet cap the freed slot may be owed to another tenant: wake it too.
            if slot_freed {
                wake_owed_tenant(voice, &mut tx, tenant).await?;
            }
            tx.commit()
                .await
                .map_err(|e| JobError::retry(e.to_string()))?;
            return Ok(Released::Ended {
                call: ended.id,
                slot_freed,
            });
        }
        drop(tx);
        match calls::call_by_provider_id(pool, tenant, &job.provider_call_id)
            .await
            .map_err(store_error)?
        {
            Some(call) if calls::is_live_state(&call.state) => {
                // Recorded just now, still in progress: end it (once more, then by a retry).
                if round == 0 {
                    continue;
                }
                return Err(JobError::retry_after(
                    format!("call {} recorded just now", job.provider_call_id),
                    Duration::from_millis(50),
                ));
            }
            Some(call) => {
                // Already ended (this job re-run after a crash, or a duplicate): freeing again
                // is a no-op when the slot is already free.
                retire(voice, &tenant_name, call.user_id, call.id).await?;
                return Ok(Released::AlreadyEnded { call: call.id });
            }
            None if last_attempt => {
                return Err(JobError::permanent(format!(
                    "no call with provider id {} for this tenant",
                    job.provider_call_id
                )));
            }
            None => {
                return Err(JobError::retry_after(
                    format!("call {} not recorded yet", job.provider_call_id),
                    Duration::from_millis(200),
                ));
            }
        }
    }
    Err(JobError::retry_after(
        format!("call {} still in progress", job.provider_call_id),
        Duration::from_millis(50),
    ))
}

/// The tenant's provider settings, for the webhook's secret check.
pub async fn provider(
    pool: &PgPool,
    tenant: TenantId,
) -> Result<Option<VoiceProvider>, herald_store::Error> {
    calls::voice_provider(pool, tenant).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<VoiceSettings, SettingsError> {
        VoiceSettings::from_vars(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn the_fleet_limit_is_unset_unless_given_a_positive_number() {
        assert_eq!(settings(&[]).unwrap().fleet_limit, None);
        assert_eq!(
            settings(&[("HERALD_CALL_FLEET_LIMIT", "")])
                .unwrap()
                .fleet_limit,
            None
        );
        assert_eq!(
            settings(&[("HERALD_CALL_FLEET_LIMIT", " 40 ")])
                .unwrap()
                .fleet_limit,
            Some(40)
        );
        for bad in ["0", "-3", "many", "99999999999"] {
            assert!(
                settings(&[("HERALD_CALL_FLEET_LIMIT", bad)]).is_err(),
                "{bad}"
            );
        }
        let other = settings(&[
            ("HERALD_CALL_SLOT_LEASE_MS", "1500"),
            ("HERALD_CALL_DISPATCH_BATCH", "5"),
        ])
        .unwrap();
        assert_eq!(
            (other.slot_lease, other.max_per_run, other.fleet_limit),
            (Duration::from_millis(1500), 5, None)
        );
    }
}
