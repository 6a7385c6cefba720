//! Multichannel sequences in Postgres: sequences (validated steps and sending rules), sender
//! accounts, leads and where each stands, the activities each executed step leaves (one per lead
//! and step, whatever happens to the job that runs it), and the signals inbound webhooks record.
//!
//! Every function is scoped by tenant. The step model itself is pure and lives in [`steps`];
//! the tenant's email, LinkedIn and Instagram provider accounts in [`providers`]; lead pools and
//! the daily draw of a `lead_generation` step in [`pools`].

pub mod pools;
pub mod providers;
pub mod steps;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use herald_core::TenantId;
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::error;
use steps::{Channel, Rules, Signal, Step};

/// The most leads one request may add.
pub const MAX_LEADS_PER_REQUEST: usize = 10_000;

/// Where a sequence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Draft,
    Active,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Active => "active",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        [
            Status::Draft,
            Status::Active,
            Status::Paused,
            Status::Stopped,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// Where a lead stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeadState {
    Active,
    Stopped,
    Replied,
    Completed,
    Failed,
}

impl LeadState {
    pub const ALL: [LeadState; 5] = [
        LeadState::Active,
        LeadState::Stopped,
        LeadState::Replied,
        LeadState::Completed,
        LeadState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LeadState::Active => "active",
            LeadState::Stopped => "stopped",
            LeadState::Replied => "replied",
            LeadState::Completed => "completed",
            LeadState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<LeadState> {
        LeadState::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A sequence as stored; its steps and rules were validated when it was saved.
#[derive(Debug, Clone, Serialize)]
pub struct Sequence {
    pub id: Uuid,
    pub name: String,
    pub status: Status,
    pub steps: Value,
    pub rules: Value,
    /// Channel → sender account name.
    pub senders: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
}

impl Sequence {
    /// The steps, validated again (before a step runs).
    pub fn parsed_steps(&self) -> Result<Vec<Step>, steps::StepError> {
        steps::parse_steps(&self.steps)
    }

    pub fn parsed_rules(&self) -> Result<Rules, steps::RuleError> {
        steps::parse_rules(Some(&self.rules))
    }

    /// The sender account name for `channel` (`default` when the sequence names none).
    pub fn sender(&self, channel: Channel) -> &str {
        self.senders
            .get(channel.as_str())
            .map_or("default", String::as_str)
    }
}

#[derive(sqlx::FromRow)]
struct SequenceRecord {
    id: Uuid,
    name: String,
    status: String,
    steps: Value,
    rules: Value,
    senders: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
}

const SEQUENCE_COLUMNS: &str =
    "id, name, status, steps, rules, senders, created_at, updated_at, started_at";

impl TryFrom<SequenceRecord> for Sequence {
    type Error = Error;
    fn try_from(r: SequenceRecord) -> Result<Self, Error> {
        let corrupt = |reason: String| Error::Corrupt {
            what: "sequence",
            reason: format!("{}: {reason}", r.id),
        };
        let status = Status::parse(&r.status).ok_or_else(|| corrupt(r.status.clone()))?;
        let senders = serde_json::from_value(r.senders.clone())
            .map_err(|e| corrupt(format!("senders: {e}")))?;
        Ok(Sequence {
            id: r.id,
            name: r.name,
            status,
            steps: r.steps,
            rules: r.rules,
            senders,
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
        })
    }
}

/// A sequence to save: steps and rules already validated.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub name: String,
    pub steps: Vec<Step>,
    pub rules: Rules,
    /// Channel → sender account name; channels the steps use and this omits get `default`.
    pub senders: BTreeMap<Channel, String>,
}

/// Finds or creates the tenant's sender account `name` on `channel`; returns its id.
pub async fn sender_account(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: Channel,
    name: &str,
) -> Result<Uuid, Error> {
    let id: Uuid = sqlx::query_scalar(
        "with inserted as (
             insert into sender_accounts (tenant_id, id, channel, name) values ($1, $2, $3, $4)
             on conflict (tenant_id, channel, name) do nothing
             returning id
         )
         select id from inserted
         union all
         select id from sender_accounts where tenant_id = $1 and channel = $3 and name = $4
         limit 1",
    )
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(channel.as_str())
    .bind(name)
    .fetch_one(conn)
    .await
    .map_err(error::tenant_must_exist)?;
    Ok(id)
}

/// Saves a draft sequence, creating the sender accounts it names.
pub async fn create(pool: &PgPool, tenant: TenantId, new: &NewSequence) -> Result<Sequence, Error> {
    let name = new.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(Error::invalid("name", "must be 1 to 200 characters"));
    }
    let mut senders = BTreeMap::new();
    for channel in steps::channels(&new.steps) {
        let account = new
            .senders
            .get(&channel)
            .map_or("default", String::as_str)
            .trim();
        if account.is_empty() || account.len() > 200 {
            return Err(Error::invalid(
                "senders",
                "a sender account name must be 1 to 200 characters",
            ));
        }
        senders.insert(channel.as_str().to_owned(), account.to_owned());
    }
    let mut tx = pool.begin().await?;
    for (channel, account) in &senders {
        if let Some(channel) = Channel::parse(channel) {
            sender_account(&mut tx, tenant, channel, account).await?;
        }
    }
    let record: SequenceRecord = sqlx::query_as(&format!(
        "insert into sequences (tenant_id, id, name, steps, rules, senders)
         values ($1, $2, $3, $4, $5, $6) returning {SEQUENCE_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(steps::steps_json(&new.steps))
    .bind(new.rules.to_json())
    .bind(serde_json::to_value(&senders).unwrap_or_default())
    .fetch_one(&mut *tx)
    .await
    .map_err(error::tenant_must_exist)?;
    tx.commit().await?;
    record.try_into()
}

/// Whether the users and agents the steps' calls name are the tenant's (and the agents not
/// removed): the part of a step's validation that needs the database. Runs when a sequence is
/// saved; the error names the step and the field.
pub async fn check_step_references(
    conn: &mut PgConnection,
    tenant: TenantId,
    steps: &[Step],
) -> Result<Result<(), steps::StepError>, Error> {
    for (index, step) in steps.iter().enumerate() {
        if let Err(e) = check_call_step(conn, tenant, index, step).await? {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// [`check_step_references`] for the step at `index` alone (before a call step runs).
pub async fn check_call_step(
    conn: &mut PgConnection,
    tenant: TenantId,
    index: usize,
    step: &Step,
) -> Result<Result<(), steps::StepError>, Error> {
    let Step::VoiceAgentCall {
        user_id, agent_id, ..
    } = step
    else {
        return Ok(Ok(()));
    };
    let (user, agent): (bool, bool) = sqlx::query_as(
        "select exists (select 1 from call_users where tenant_id = $1 and id = $2),
                exists (select 1 from call_agents
                        where tenant_id = $1 and id = $3 and removed_at is null)",
    )
    .bind(tenant.0)
    .bind(user_id)
    .bind(agent_id)
    .fetch_one(&mut *conn)
    .await?;
    let error = |field: &str, reason: String| steps::StepError {
        index,
        step_type: step.step_type().to_owned(),
        field: field.to_owned(),
        reason,
    };
    if !user {
        return Ok(Err(error(
            "user_id",
            format!("{user_id} is not one of this tenant's call users"),
        )));
    }
    if !agent {
        return Ok(Err(error(
            "agent_id",
            format!("{agent_id} is not one of this tenant's agents (or it was removed)"),
        )));
    }
    Ok(Ok(()))
}

pub async fn get(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Sequence, Error> {
    let mut conn = pool.acquire().await?;
    get_in(&mut conn, tenant, id).await
}

/// [`get`] inside the caller's transaction.
pub async fn get_in(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Sequence, Error> {
    let record: Option<SequenceRecord> = sqlx::query_as(&format!(
        "select {SEQUENCE_COLUMNS} from sequences where tenant_id = $1 and id = $2"
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    record
        .ok_or_else(|| Error::not_found(format!("sequence {id}")))?
        .try_into()
}

/// The tenant's sequences, newest first.
pub async fn list(pool: &PgPool, tenant: TenantId, limit: u32) -> Result<Vec<Sequence>, Error> {
    let records: Vec<SequenceRecord> = sqlx::query_as(&format!(
        "select {SEQUENCE_COLUMNS} from sequences where tenant_id = $1
         order by created_at desc limit $2"
    ))
    .bind(tenant.0)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    records.into_iter().map(Sequence::try_from).collect()
}

/// Moves the sequence to `to` if it is in one of `from` (locking it); the error names the
/// state it is in otherwise.
pub async fn transition(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    from: &[Status],
    to: Status,
) -> Result<Sequence, Error> {
    let current: Option<String> = sqlx::query_scalar(
        "select status from sequences where tenant_id = $1 and id = $2 for update",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let current = current.ok_or_else(|| Error::not_found(format!("sequence {id}")))?;
    if !from.iter().any(|s| s.as_str() == current) {
        return Err(Error::Conflict {
            what: format!(
                "sequence {id} is {current}: it cannot become {}",
                to.as_str()
            ),
        });
    }
    let record: SequenceRecord = sqlx::query_as(&format!(
        "update sequences set status = $3, updated_at = now(),
             started_at = case when $3 = 'active' then coalesce(started_at, now()) else started_at end
         where tenant_id = $1 and id = $2 returning {SEQUENCE_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(id)
    .bind(to.as_str())
    .fetch_one(&mut *conn)
    .await?;
    record.try_into()
}

/// A lead as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Lead {
    pub id: Uuid,
    pub sequence_id: Uuid,
    pub external_id: Option<String>,
    pub variables: BTreeMap<String, String>,
    pub state: LeadState,
    pub current_step: u32,
    pub next_run_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct LeadRecord {
    id: Uuid,
    sequence_id: Uuid,
    external_id: Option<String>,
    variables: Value,
    state: String,
    current_step: i32,
    next_run_at: Option<DateTime<Utc>>,
    error: Option<String>,
    created_at: DateTime<Utc>,
}

const LEAD_COLUMNS: &str =
    "id, sequence_id, external_id, variables, state, current_step, next_run_at, error, created_at";

impl TryFrom<LeadRecord> for Lead {
    type Error = Error;
    fn try_from(r: LeadRecord) -> Result<Self, Error> {
        let corrupt = |reason: String| Error::Corrupt {
            what: "sequence lead",
            reason: format!("{}: {reason}", r.id),
        };
        Ok(Lead {
            id: r.id,
            sequence_id: r.sequence_id,
            external_id: r.external_id,
            variables: serde_json::from_value(r.variables.clone())
                .map_err(|e| corrupt(format!("variables: {e}")))?,
            state: LeadState::parse(&r.state).ok_or_else(|| corrupt(r.state.clone()))?,
            current_step: u32::try_from(r.current_step)
                .map_err(|_| corrupt(format!("current_step {}", r.current_step)))?,
            next_run_at: r.next_run_at,
            error: r.error,
            created_at: r.created_at,
        })
    }
}

/// A lead to add: its variables (each one of [`steps::VARIABLES`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLead {
    pub external_id: Option<String>,
    pub variables: BTreeMap<String, String>,
}

/// What adding leads did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AddedLeads {
    /// The new leads' ids, in request order.
    pub added: Vec<Uuid>,
    /// Leads whose external id the sequence already had.
    pub duplicates: u64,
}

/// Adds leads to a sequence that is not stopped, inside the caller's transaction; a lead whose
/// external id the sequence already holds is skipped. New leads start at step 0, due now.
pub async fn add_leads(
    conn: &mut PgConnection,
    tenant: TenantId,
    sequence: Uuid,
    leads: &[NewLead],
) -> Result<AddedLeads, Error> {
    if leads.len() > MAX_LEADS_PER_REQUEST {
        return Err(Error::invalid(
            "leads",
            format!("at most {MAX_LEADS_PER_REQUEST} leads per request"),
        ));
    }
    let mut added = AddedLeads::default();
    for lead in leads {
        let id: Option<Uuid> = sqlx::query_scalar(
            "insert into sequence_leads (tenant_id, id, sequence_id, external_id, variables, next_run_at)
             values ($1, $2, $3, $4, $5, now())
             on conflict (tenant_id, sequence_id, external_id) do nothing
             returning id",
        )
        .bind(tenant.0)
        .bind(Uuid::now_v7())
        .bind(sequence)
        .bind(lead.external_id.as_deref())
        .bind(serde_json::to_value(&lead.variables).unwrap_or_default())
        .fetch_optional(&mut *conn)
        .await?;
        match id {
            Some(id) => added.added.push(id),
            None => added.duplicates += 1,
        }
    }
    Ok(added)
}

pub async fn lead(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Lead, Error> {
    let record: Option<LeadRecord> = sqlx::query_as(&format!(
        "select {LEAD_COLUMNS} from sequence_leads where tenant_id = $1 and id = $2"
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    record
        .ok_or_else(|| Error::not_found(format!("lead {id}")))?
        .try_into()
}

/// The sequence's active leads with their current step and due instant (start and resume
/// write one step job for each).
pub async fn active_leads(
    conn: &mut PgConnection,
    tenant: TenantId,
    sequence: Uuid,
) -> Result<Vec<(Uuid, u32, Option<DateTime<Utc>>)>, Error> {
    let rows: Vec<(Uuid, i32, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select id, current_step, next_run_at from sequence_leads
         where tenant_id = $1 and sequence_id = $2 and state = 'active' order by id",
    )
    .bind(tenant.0)
    .bind(sequence)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, step, at)| (id, u32::try_from(step).unwrap_or(0), at))
        .collect())
}

/// Every active lead of a stopped sequence becomes `stopped`.
pub async fn stop_leads(
    conn: &mut PgConnection,
    tenant: TenantId,
    sequence: Uuid,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "update sequence_leads set state = 'stopped', updated_at = now()
         where tenant_id = $1 and sequence_id = $2 and state = 'active'",
    )
    .bind(tenant.0)
    .bind(sequence)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Moves an active lead on from step `from` (only if it is still there): to `next`, due at
/// `run_at`, or `completed` when `next` is past the last step. Returns whether it moved; the
/// caller writes the next step's job in the same transaction when it did.
pub async fn advance(
    conn: &mut PgConnection,
    tenant: TenantId,
    lead: Uuid,
    from: u32,
    next: u32,
    steps_len: usize,
    run_at: DateTime<Utc>,
) -> Result<bool, Error> {
    let completed = next as usize >= steps_len;
    let moved = sqlx::query(
        "update sequence_leads set current_step = $4,
             state = case when $5 then 'completed' else state end,
             next_run_at = case when $5 then null else $6 end,
             updated_at = now()
         where tenant_id = $1 and id = $2 and current_step = $3 and state = 'active'",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(i64::from(from) as i32)
    .bind(i64::from(next) as i32)
    .bind(completed)
    .bind(run_at)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(moved == 1)
}

/// An active lead that cannot go on (its step no longer validates, it lacks an address).
pub async fn fail_lead(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
    reason: &str,
) -> Result<(), Error> {
    let mut conn = pool.acquire().await?;
    fail_lead_in(&mut conn, tenant, lead, reason).await
}

/// What an executed step recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// An action ran (its send says how it went).
    Executed,
    /// A delay scheduled the next step.
    Waited,
    /// A condition held.
    Yes,
    /// A condition did not hold.
    No,
    /// A call step queued its call; the call's outcome replaces this once it ends.
    Calling,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Waited => "waited",
            Outcome::Yes => "yes",
            Outcome::No => "no",
            Outcome::Calling => "calling",
        }
    }
}

/// An activity to record.
#[derive(Debug, Clone)]
pub struct NewActivity<'a> {
    pub sequence: Uuid,
    pub lead: Uuid,
    pub step: u32,
    pub step_type: &'a str,
    pub channel: Option<Channel>,
    pub outcome: Outcome,
    pub sender_account: Option<Uuid>,
    pub send_id: Option<Uuid>,
    /// The call a call step queued.
    pub call_id: Option<Uuid>,
    pub job_id: &'a str,
    /// When the step ran, by the handler's clock: caps count activities by this instant, in the
    /// same clock their periods are computed in.
    pub at: DateTime<Utc>,
}

/// Records an executed step unless the lead already has one for that step; returns whether
/// this call recorded it (`false`: the step was already executed, do nothing).
pub async fn record_activity(
    conn: &mut PgConnection,
    tenant: TenantId,
    activity: &NewActivity<'_>,
) -> Result<bool, Error> {
    let inserted = sqlx::query(
        "insert into sequence_activities (tenant_id, id, sequence_id, lead_id, step, step_type,
             channel, outcome, sender_account_id, send_id, job_id, created_at, call_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         on conflict (tenant_id, lead_id, step) do nothing",
    )
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(activity.sequence)
    .bind(activity.lead)
    .bind(i64::from(activity.step) as i32)
    .bind(activity.step_type)
    .bind(activity.channel.map(Channel::as_str))
    .bind(activity.outcome.as_str())
    .bind(activity.sender_account)
    .bind(activity.send_id)
    .bind(activity.job_id)
    .bind(activity.at)
    .bind(activity.call_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// The send an activity recorded, if any: `(send id, its status, the job that attempted it)`.
pub async fn activity_send(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
    step: u32,
) -> Result<Option<(Option<Uuid>, Option<String>, Option<String>)>, Error> {
    Ok(sqlx::query_as(
        "select a.send_id, s.status, s.job_id from sequence_activities a
         left join sends s on s.tenant_id = a.tenant_id and s.id = a.send_id
         where a.tenant_id = $1 and a.lead_id = $2 and a.step = $3",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(i64::from(step) as i32)
    .fetch_optional(pool)
    .await?)
}

/// A call step's activity, if recorded: `(its call, the activity's outcome)` — `calling` until
/// the call ends, then the call's outcome.
pub async fn call_activity(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
    step: u32,
) -> Result<Option<(Option<Uuid>, String)>, Error> {
    Ok(sqlx::query_as(
        "select call_id, outcome from sequence_activities
         where tenant_id = $1 and lead_id = $2 and step = $3",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(i64::from(step) as i32)
    .fetch_optional(pool)
    .await?)
}

/// The call step a call served, settled with the call's `outcome` (`completed`, `busy`,
/// `no-answer`, `failed`, `cancelled`) if it was still `calling`: returns `(sequence, lead,
/// step)` when this call settled it, `None` when the call is not a sequence's or its step was
/// already settled (a second end of the same call changes nothing).
pub async fn settle_call_activity(
    conn: &mut PgConnection,
    tenant: TenantId,
    call: Uuid,
    outcome: &str,
) -> Result<Option<(Uuid, Uuid, u32)>, Error> {
    let row: Option<(Uuid, Uuid, i32)> = sqlx::query_as(
        "update sequence_activities set outcome = $3
         where tenant_id = $1 and call_id = $2 and outcome = 'calling'
         returning sequence_id, lead_id, step",
    )
    .bind(tenant.0)
    .bind(call)
    .bind(outcome)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(sequence, lead, step)| (sequence, lead, u32::try_from(step).unwrap_or(0))))
}

/// Records `signal` for the lead inside the caller's transaction (no reply handling: use
/// [`record_signal`] for inbound events). Returns whether it is new.
pub async fn record_signal_in(
    conn: &mut PgConnection,
    tenant: TenantId,
    lead: Uuid,
    signal: Signal,
) -> Result<bool, Error> {
    Ok(sqlx::query(
        "insert into sequence_signals (tenant_id, lead_id, signal) values ($1, $2, $3)
         on conflict do nothing",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(signal.as_str())
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// An active lead that cannot go on, inside the caller's transaction.
pub async fn fail_lead_in(
    conn: &mut PgConnection,
    tenant: TenantId,
    lead: Uuid,
    reason: &str,
) -> Result<(), Error> {
    sqlx::query(
        "update sequence_leads set state = 'failed', error = $3, updated_at = now()
         where tenant_id = $1 and id = $2 and state = 'active'",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(reason.chars().take(1_000).collect::<String>())
    .execute(conn)
    .await?;
    Ok(())
}

/// The lead an action's send belongs to, and the send's channel: how a provider's event, which
/// names only the send id, finds its lead.
pub async fn send_lead(
    pool: &PgPool,
    tenant: TenantId,
    send_id: Uuid,
) -> Result<Option<(Uuid, String)>, Error> {
    Ok(sqlx::query_as(
        "select a.lead_id, s.channel from sequence_activities a
         join sends s on s.tenant_id = a.tenant_id and s.id = a.send_id
         where a.tenant_id = $1 and a.send_id = $2",
    )
    .bind(tenant.0)
    .bind(send_id)
    .fetch_optional(pool)
    .await?)
}

/// Undoes an action step the provider certainly did not act on (refused before sending, or
/// unreachable): the activity and its `attempting` send go, so the step can run again.
pub async fn undo_action(
    conn: &mut PgConnection,
    tenant: TenantId,
    lead: Uuid,
    step: u32,
    send_id: Uuid,
) -> Result<(), Error> {
    sqlx::query(
        "delete from sequence_activities where tenant_id = $1 and lead_id = $2 and step = $3
           and send_id = $4",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(i64::from(step) as i32)
    .bind(send_id)
    .execute(&mut *conn)
    .await?;
    crate::sends::abandon(conn, tenant, send_id).await?;
    Ok(())
}

/// Serialises a sender account's cap checks and claims (transaction-scoped).
pub async fn lock_sender(
    conn: &mut PgConnection,
    tenant: TenantId,
    sender: Uuid,
) -> Result<(), Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("sequence-sender:{tenant}:{sender}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// How many actions of `cap_action` (a step type or a channel) the sender account executed
/// since `since`, over every sequence.
pub async fn count_actions(
    conn: &mut PgConnection,
    tenant: TenantId,
    sender: Uuid,
    cap_action: &str,
    since: DateTime<Utc>,
) -> Result<u64, Error> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from sequence_activities
         where tenant_id = $1 and sender_account_id = $2 and created_at >= $4
           and (step_type = $3 or channel = $3)",
    )
    .bind(tenant.0)
    .bind(sender)
    .bind(cap_action)
    .bind(since)
    .fetch_one(conn)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Records what an inbound webhook said about a lead; a reply also ends the lead's walk
/// (state `replied`). Returns whether the signal is new.
pub async fn record_signal(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
    signal: Signal,
) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from sequence_leads where tenant_id = $1 and id = $2)",
    )
    .bind(tenant.0)
    .bind(lead)
    .fetch_one(&mut *tx)
    .await?;
    if !exists {
        return Err(Error::not_found(format!("lead {lead}")));
    }
    let new = sqlx::query(
        "insert into sequence_signals (tenant_id, lead_id, signal) values ($1, $2, $3)
         on conflict do nothing",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(signal.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if signal == Signal::Replied {
        sqlx::query(
            "update sequence_leads set state = 'replied', next_run_at = null, updated_at = now()
             where tenant_id = $1 and id = $2 and state = 'active'",
        )
        .bind(tenant.0)
        .bind(lead)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(new)
}

/// Whether the lead has received `signal`.
pub async fn has_signal(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
    signal: Signal,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from sequence_signals
                        where tenant_id = $1 and lead_id = $2 and signal = $3)",
    )
    .bind(tenant.0)
    .bind(lead)
    .bind(signal.as_str())
    .fetch_one(pool)
    .await?)
}

/// One entry of a lead's timeline.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TimelineEntry {
    pub step: i32,
    pub step_type: String,
    pub channel: Option<String>,
    pub outcome: String,
    pub send_id: Option<Uuid>,
    pub send_status: Option<String>,
    pub provider_message_id: Option<String>,
    /// The call a call step placed (its outcome is the activity's).
    pub call_id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

/// The lead's executed steps in order, with their sends' statuses.
pub async fn timeline(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
) -> Result<Vec<TimelineEntry>, Error> {
    Ok(sqlx::query_as(
        "select a.step, a.step_type, a.channel, a.outcome, a.send_id, s.status as send_status,
                s.provider_message_id, a.call_id, a.created_at as at
         from sequence_activities a
         left join sends s on s.tenant_id = a.tenant_id and s.id = a.send_id
         where a.tenant_id = $1 and a.lead_id = $2 order by a.created_at, a.step",
    )
    .bind(tenant.0)
    .bind(lead)
    .fetch_all(pool)
    .await?)
}

/// The signals the lead received, oldest first.
pub async fn signals(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
) -> Result<Vec<(String, DateTime<Utc>)>, Error> {
    Ok(sqlx::query_as(
        "select signal, received_at from sequence_signals where tenant_id = $1 and lead_id = $2
         order by received_at",
    )
    .bind(tenant.0)
    .bind(lead)
    .fetch_all(pool)
    .await?)
}

/// Counts for one step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub step: u32,
    pub step_type: String,
    /// Leads that executed it.
    pub executed: u64,
    pub yes: u64,
    pub no: u64,
    /// Its sends by status (`attempting`, `unknown`, `sent`, `delivered`, `read`, `failed`).
    pub sends: BTreeMap<String, u64>,
    /// A call step's calls by outcome (`calling` while not ended, then `completed`, `busy`,
    /// `no-answer`, `failed`, `cancelled`); empty for other steps.
    pub calls: BTreeMap<String, u64>,
}

/// A sequence's live counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Leads by state.
    pub leads: BTreeMap<String, u64>,
    pub steps: Vec<StepStats>,
    /// Leads that received each signal.
    pub signals: BTreeMap<String, u64>,
}

pub async fn stats(pool: &PgPool, tenant: TenantId, sequence: &Sequence) -> Result<Stats, Error> {
    let mut stats = Stats::default();
    for state in LeadState::ALL {
        stats.leads.insert(state.as_str().to_owned(), 0);
    }
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "select state, count(*) from sequence_leads where tenant_id = $1 and sequence_id = $2
         group by state",
    )
    .bind(tenant.0)
    .bind(sequence.id)
    .fetch_all(pool)
    .await?;
    for (state, n) in by_state {
        stats.leads.insert(state, u64::try_from(n).unwrap_or(0));
    }
    let step_types: Vec<String> = sequence
        .steps
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|s| s["type"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    stats.steps = step_types
        .into_iter()
        .enumerate()
        .map(|(i, step_type)| StepStats {
            step: i as u32,
            step_type,
            ..StepStats::default()
        })
        .collect();
    let rows: Vec<(i32, String, Option<String>, i64)> = sqlx::query_as(
        "select a.step, a.outcome, s.status, count(*) from sequence_activities a
         left join sends s on s.tenant_id = a.tenant_id and s.id = a.send_id
         where a.tenant_id = $1 and a.sequence_id = $2
         group by a.step, a.outcome, s.status",
    )
    .bind(tenant.0)
    .bind(sequence.id)
    .fetch_all(pool)
    .await?;
    for (step, outcome, send_status, n) in rows {
        let n = u64::try_from(n).unwrap_or(0);
        let Some(entry) = usize::try_from(step)
            .ok()
            .and_then(|i| stats.steps.get_mut(i))
        else {
            continue;
        };
        entry.executed += n;
        match outcome.as_str() {
            "yes" => entry.yes += n,
            "no" => entry.no += n,
            "executed" | "waited" => {}
            call => *entry.calls.entry(call.to_owned()).or_default() += n,
        }
        if let Some(status) = send_status {
            *entry.sends.entry(status).or_default() += n;
        }
    }
    let signals: Vec<(String, i64)> = sqlx::query_as(
        "select g.signal, count(*) from sequence_signals g
         join sequence_leads l on l.tenant_id = g.tenant_id and l.id = g.lead_id
         where g.tenant_id = $1 and l.sequence_id = $2 group by g.signal",
    )
    .bind(tenant.0)
    .bind(sequence.id)
    .fetch_all(pool)
    .await?;
    for signal in Signal::ALL {
        stats.signals.insert(signal.as_str().to_owned(), 0);
    }
    for (signal, n) in signals {
        stats.signals.insert(signal, u64::try_from(n).unwrap_or(0));
    }
    Ok(stats)
}
