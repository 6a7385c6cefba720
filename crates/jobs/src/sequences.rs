//! Multichannel sequences: the `sequence_step` job (one per lead and step) and the library calls
//! the API uses to create, start, pause and stop a sequence, add leads and apply inbound signals.
//!
//! A lead walks its steps one job at a time through the outbox: a step's job, once the step is
//! executed, writes the next step's job in the same transaction. A `delay` writes the next job
//! with its `run_at` in the future (no handler sleeps); a `condition` reads the lead's recorded
//! signals and picks its branch. Every executed step is an activity, unique per (lead, step):
//! a job that runs twice finds the activity (or the lead moved on) and does nothing.
//!
//! Action steps obey the sequence's sending rules before anything is recorded: outside the
//! sending window, or with a sender account's daily or weekly cap reached, the job is deferred
//! (no attempt spent) to the window's opening or the next local day or week. An action records
//! its activity and an `attempting` send in one transaction, then calls the channel, then records
//! the answer; a job re-delivered between the two marks the send `unknown` instead of acting
//! again. Jitter is added to the due time of each action step's job.
//!
//! Channels: WhatsApp goes through the real WhatsApp connector (`Deps::whatsapp`, the tenant's
//! account); email, LinkedIn and Instagram go through a [`ChannelConnector`] registered in
//! [`Connectors`] (the HTTP providers of [`crate::channels`] in the worker). A channel without a
//! connector, or one not ready for the tenant (no provider account), retries with a reason
//! before anything is recorded. Provider events about a send (delivered, opened, connected,
//! replied…) come back through [`crate::sequence_events`].
//!
//! A `voice_agent_call` step goes through the call-campaign machinery ([`crate::calls`]): the
//! step's own call campaign (created on first use, with the sequence's window and time zone),
//! the lead as a contact, one queued call, and a dispatch. The slots per user, per tenant and
//! fleet-wide, the calling window and the release all apply as to any call. The step's activity
//! stays `calling` until the call ends; the call's end ([`on_call_ended`]) records its outcome,
//! records the `connected` signal for a completed call, and moves the lead on, in the
//! transaction that ends the call.
//!
//! A `lead_generation` first step is the `lead_generation` job ([`LeadGeneration`]): once per
//! local day while the sequence is active it draws up to its daily limit of people from the
//! sequence's lead pool who are not yet its leads, starts them at step 1 and writes itself for
//! the next local midnight. The day's draw is a row inserted in the transaction that adds the
//! leads, so a day is drawn at most once however often the job runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apalis_core::task::data::Data;
use chrono::{DateTime, NaiveTime, Utc};
use futures::future::BoxFuture;
use herald_admission::Window;
use herald_connectors::whatsapp::{self as meta, TemplateMessage};
use herald_core::{JobError, JobPayload, TenantId};
use herald_queue::JobMeta;
use herald_store::calls::{self as call_store, CampaignStatus, NewCampaign, NewContact};
use herald_store::outbox::{self, NewOutboxJob};
use herald_store::sends::{self, SendStatus, StatusChange};
use herald_store::sequences::pools::{self, Draw};
use herald_store::sequences::steps::{self, Action, Channel, Rules, Signal, Step};
use herald_store::sequences::{self, LeadState, NewActivity, NewLead, Outcome, Sequence, Status};
use herald_store::{PgPool, messages};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::Deps;

/// Run one step of one lead's sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceStep {
    pub sequence_id: Uuid,
    pub lead_id: Uuid,
    pub step: u32,
}

impl JobPayload for SequenceStep {
    const QUEUE: &'static str = "sequence_step";
    const MAX_ATTEMPTS: u32 = 8;
    const TIMEOUT: Duration = Duration::from_secs(60);
}

/// Draw the day's leads of a sequence whose first step is `lead_generation` (the tenant is the
/// job's). Written when the sequence starts or resumes and, by each run, for the next local
/// midnight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadGeneration {
    pub sequence_id: Uuid,
}

impl JobPayload for LeadGeneration {
    const QUEUE: &'static str = "lead_generation";
    const MAX_ATTEMPTS: u32 = 8;
    const TIMEOUT: Duration = Duration::from_secs(120);
}

/// One action for a channel connector: who it goes to and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundAction {
    /// Whose action it is (the connector finds the tenant's provider account by it).
    pub tenant: TenantId,
    pub send_id: Uuid,
    pub channel: Channel,
    pub step_type: &'static str,
    /// The sender account's name.
    pub sender: String,
    /// The lead's address on the channel (email, profile URL, handle).
    pub to: String,
    pub subject: Option<String>,
    pub text: Option<String>,
}

/// How a channel call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The provider refused the action; doing it again cannot help. Recorded as failed.
    #[error("refused ({code}): {message}")]
    Refused { code: String, message: String },
    /// The provider throttled the call; nothing happened. Deferred.
    #[error("throttled; retry after {wait:?}")]
    Throttled { wait: Duration },
    /// The call never reached the provider (or it failed before acting); retried.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The call may have reached the provider; no answer. Recorded as unknown, never repeated.
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
}

/// A provider for one channel's actions. Returns the provider's id for the action.
pub trait ChannelConnector: Send + Sync {
    /// Whether the connector can act for `tenant` at all (a provider account is configured);
    /// `Err` says what is missing. Asked before anything is recorded: the step retries.
    fn ready<'a>(&'a self, tenant: TenantId) -> BoxFuture<'a, Result<(), String>> {
        let _ = tenant;
        Box::pin(async { Ok(()) })
    }

    fn act<'a>(&'a self, action: &'a OutboundAction)
    -> BoxFuture<'a, Result<String, ChannelError>>;
}

/// The channel connectors a worker has (email, LinkedIn, Instagram).
#[derive(Clone, Default)]
pub struct Connectors {
    by_channel: HashMap<Channel, Arc<dyn ChannelConnector>>,
}

impl Connectors {
    pub fn with(mut self, channel: Channel, connector: Arc<dyn ChannelConnector>) -> Self {
        self.by_channel.insert(channel, connector);
        self
    }

    fn get(&self, channel: Channel) -> Option<&Arc<dyn ChannelConnector>> {
        self.by_channel.get(&channel)
    }
}

fn store_error(e: herald_store::Error) -> JobError {
    match e {
        herald_store::Error::Database(_) => JobError::retry(format!("database: {e}")),
        other => JobError::permanent(other.to_string()),
    }
}

fn millis(at: DateTime<Utc>) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

/// The sending window of `rules`, if any (open every day).
pub fn window(rules: &Rules) -> Option<Window> {
    let (start, end) = rules.window?;
    let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)?;
    Window::new(start, end, rules.zone(), epoch).ok()
}

/// When the job of `step` should run if it is due at `due`: action steps get the rules' jitter.
fn with_jitter(steps: &[Step], step: u32, due: DateTime<Utc>, rules: &Rules) -> DateTime<Utc> {
    let is_action = matches!(steps.get(step as usize), Some(Step::Action(_)));
    let (min, max) = rules.jitter_secs;
    if !is_action || max == 0 {
        return due;
    }
    let secs = rand::thread_rng().gen_range(min..=max);
    due + chrono::Duration::seconds(i64::from(secs))
}

fn step_job(
    sequence: Uuid,
    lead: Uuid,
    step: u32,
    run_at: DateTime<Utc>,
) -> Result<NewOutboxJob, herald_store::Error> {
    let mut job = NewOutboxJob::for_payload(&SequenceStep {
        sequence_id: sequence,
        lead_id: lead,
        step,
    })?;
    job.run_at = Some(run_at);
    Ok(job)
}

pub async fn step(job: SequenceStep, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    run_step(
        &deps,
        meta.tenant,
        meta.id.as_str(),
        &job,
        meta.is_last_attempt(),
        Utc::now(),
    )
    .await
}

/// Moves the lead from `job.step` to `next` (due at `due`) and writes the next step's job, in
/// the caller's transaction, after recording `activity`. Nothing happens if the activity was
/// already recorded.
async fn record_and_advance(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    job: &SequenceStep,
    activity: &NewActivity<'_>,
    advance_to: Option<(u32, DateTime<Utc>, &[Step], &Rules)>,
) -> Result<bool, herald_store::Error> {
    if !sequences::record_activity(tx, tenant, activity).await? {
        return Ok(false);
    }
    if let Some((next, due, steps, rules)) = advance_to {
        advance(tx, tenant, job, next, due, steps, rules).await?;
    }
    Ok(true)
}

async fn advance(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    job: &SequenceStep,
    next: u32,
    due: DateTime<Utc>,
    steps: &[Step],
    rules: &Rules,
) -> Result<(), herald_store::Error> {
    let run_at = with_jitter(steps, next, due, rules);
    let moved =
        sequences::advance(tx, tenant, job.lead_id, job.step, next, steps.len(), run_at).await?;
    if moved && (next as usize) < steps.len() {
        outbox::insert(
            tx,
            tenant,
            &step_job(job.sequence_id, job.lead_id, next, run_at)?,
        )
        .await?;
    }
    Ok(())
}

/// One step of one lead, `job_id` being the job's id (re-deliveries share it), at `now`:
/// - the lead is not active, or has moved past this step: nothing to do;
/// - the sequence is paused or stopped: nothing now (resume writes the lead's job again);
/// - the step was already recorded: if its send is still `attempting` under this job, the job
///   died between the attempt and its record, so the send becomes `unknown` and the lead moves
///   on (never acted on twice);
/// - the step no longer validates: the lead fails with the step's error (permanent);
/// - `delay`: recorded, next step due after the delay; `condition`: recorded with its answer,
///   next step is the branch's;
/// - an action: window and caps first (deferred when closed or reached), then the activity and
///   an `attempting` send in one transaction, then the channel, then the answer.
pub async fn run_step(
    deps: &Deps,
    tenant: TenantId,
    job_id: &str,
    job: &SequenceStep,
    last_attempt: bool,
    now: DateTime<Utc>,
) -> Result<(), JobError> {
    let pool = &deps.pool;
    let lead = match sequences::lead(pool, tenant, job.lead_id).await {
        Ok(lead) => lead,
        Err(herald_store::Error::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(store_error(e)),
    };
    if lead.state != LeadState::Active
        || lead.current_step != job.step
        || lead.sequence_id != job.sequence_id
    {
        return Ok(());
    }
    let sequence = sequences::get(pool, tenant, job.sequence_id)
        .await
        .map_err(store_error)?;
    if sequence.status != Status::Active {
        return Ok(());
    }
    let (steps, rules) = match (sequence.parsed_steps(), sequence.parsed_rules()) {
        (Ok(steps), Ok(rules)) => (steps, rules),
        (Err(e), _) => return fail(pool, tenant, job, e.to_string()).await,
        (_, Err(e)) => return fail(pool, tenant, job, format!("sending rules: {e}")).await,
    };
    let Some(current) = steps.get(job.step as usize).cloned() else {
        return fail(
            pool,
            tenant,
            job,
            format!("step {} does not exist", job.step),
        )
        .await;
    };
    if let Step::VoiceAgentCall {
        user_id, agent_id, ..
    } = &current
    {
        let call = CallStep {
            user: *user_id,
            agent: *agent_id,
        };
        return run_call_step(
            deps, tenant, job_id, job, &sequence, &lead, call, &steps, &rules, now,
        )
        .await;
    }
    if let Some((send_id, status, send_job)) =
        sequences::activity_send(pool, tenant, job.lead_id, job.step)
            .await
            .map_err(store_error)?
    {
        // Already executed. Only a send left `attempting` by this very job needs settling.
        if let (Some(send_id), Some("attempting"), Some(send_job)) =
            (send_id, status.as_deref(), send_job.as_deref())
        {
            if send_job != job_id {
                return Ok(());
            }
            sends::mark_unknown(pool, tenant, send_id)
                .await
                .map_err(store_error)?;
            tracing::warn!(%tenant, lead = %job.lead_id, step = job.step, send = %send_id,
                "sequence step re-delivered after its attempt: marked unknown, not repeated");
        }
        let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
        advance(&mut tx, tenant, job, job.step + 1, now, &steps, &rules)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(|e| store_error(e.into()))?;
        return Ok(());
    }
    let base = NewActivity {
        sequence: job.sequence_id,
        lead: job.lead_id,
        step: job.step,
        step_type: current.step_type(),
        channel: None,
        outcome: Outcome::Executed,
        sender_account: None,
        send_id: None,
        call_id: None,
        job_id,
        at: now,
    };
    match &current {
        Step::LeadGeneration { .. } | Step::VoiceAgentCall { .. } => {
            // A lead added by hand to a sequence that generates its leads passes the generation
            // step (generated leads start after it). Calls were handled above.
            let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
            record_and_advance(
                &mut tx,
                tenant,
                job,
                &base,
                Some((job.step + 1, now, &steps, &rules)),
            )
            .await
            .map_err(store_error)?;
            tx.commit().await.map_err(|e| store_error(e.into()))?;
            Ok(())
        }
        Step::Delay { days, hours, .. } => {
            let wait = chrono::Duration::hours(
                i64::try_from(days * 24 + hours).unwrap_or(i64::MAX / 4_000_000),
            );
            let activity = NewActivity {
                outcome: Outcome::Waited,
                ..base
            };
            let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
            record_and_advance(
                &mut tx,
                tenant,
                job,
                &activity,
                Some((job.step + 1, now + wait, &steps, &rules)),
            )
            .await
            .map_err(store_error)?;
            tx.commit().await.map_err(|e| store_error(e.into()))?;
            Ok(())
        }
        Step::Condition {
            signal, yes, no, ..
        } => {
            let held = sequences::has_signal(pool, tenant, job.lead_id, *signal)
                .await
                .map_err(store_error)?;
            let (outcome, next) = if held {
                (Outcome::Yes, *yes)
            } else {
                (Outcome::No, *no)
            };
            let activity = NewActivity { outcome, ..base };
            let next = u32::try_from(next).unwrap_or(u32::MAX);
            let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
            record_and_advance(
                &mut tx,
                tenant,
                job,
                &activity,
                Some((next, now, &steps, &rules)),
            )
            .await
            .map_err(store_error)?;
            tx.commit().await.map_err(|e| store_error(e.into()))?;
            Ok(())
        }
        Step::Action(action) => {
            run_action(
                deps,
                tenant,
                job_id,
                job,
                &sequence,
                &lead,
                action,
                &steps,
                &rules,
                last_attempt,
                now,
                base,
            )
            .await
        }
    }
}

async fn fail(
    pool: &PgPool,
    tenant: TenantId,
    job: &SequenceStep,
    reason: String,
) -> Result<(), JobError> {
    sequences::fail_lead(pool, tenant, job.lead_id, &reason)
        .await
        .map_err(store_error)?;
    tracing::warn!(%tenant, lead = %job.lead_id, step = job.step, %reason, "sequence step cannot run; lead failed");
    Err(JobError::permanent(reason))
}

/// What an action says to its lead.
fn outbound(
    tenant: TenantId,
    action: &Action,
    lead: &sequences::Lead,
    sender: &str,
    send_id: Uuid,
) -> OutboundAction {
    let vars = &lead.variables;
    let (subject, text) = match action {
        Action::EmailSend { subject, body } => {
            (Some(subject.render(vars)), Some(body.render(vars)))
        }
        Action::EmailFollowup { body } => (None, Some(body.render(vars))),
        Action::LinkedinConnect { note } => (None, note.as_ref().map(|n| n.render(vars))),
        Action::LinkedinMessage { message } | Action::InstagramDm { message } => {
            (None, Some(message.render(vars)))
        }
        Action::WhatsappSend { params, .. } => (
            None,
            Some(
                params
                    .iter()
                    .map(|p| p.render(vars))
                    .collect::<Vec<_>>()
                    .join("\u{1f}"),
            ),
        ),
        Action::LinkedinVisit
        | Action::LinkedinFollow
        | Action::InstagramFollow
        | Action::InstagramLike => (None, None),
    };
    OutboundAction {
        tenant,
        send_id,
        channel: action.channel(),
        step_type: action.step_type(),
        sender: sender.to_owned(),
        to: vars
            .get(action.channel().address_variable())
            .cloned()
            .unwrap_or_default(),
        subject,
        text,
    }
}

/// The WhatsApp answer in the channel-neutral terms.
fn from_meta(error: meta::Error) -> ChannelError {
    match error {
        meta::Error::Throttled { wait, .. } => ChannelError::Throttled { wait },
        e @ (meta::Error::Rejected { .. } | meta::Error::Unauthorized { .. }) => {
            ChannelError::Refused {
                code: e.code().unwrap_or_default(),
                message: e.to_string(),
            }
        }
        e @ (meta::Error::NotSent(_) | meta::Error::Server { .. }) => {
            ChannelError::NotSent(e.to_string())
        }
        e @ meta::Error::Ambiguous(_) => ChannelError::Ambiguous(e.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_action(
    deps: &Deps,
    tenant: TenantId,
    job_id: &str,
    job: &SequenceStep,
    sequence: &Sequence,
    lead: &sequences::Lead,
    action: &Action,
    steps: &[Step],
    rules: &Rules,
    last_attempt: bool,
    now: DateTime<Utc>,
    base: NewActivity<'_>,
) -> Result<(), JobError> {
    let pool = &deps.pool;
    let channel = action.channel();
    let address = channel.address_variable();
    if lead
        .variables
        .get(address)
        .is_none_or(|a| a.trim().is_empty())
    {
        return fail(
            pool,
            tenant,
            job,
            format!(
                "step {} ({}): the lead has no {address}",
                job.step,
                action.step_type()
            ),
        )
        .await;
    }
    if let Some(window) = window(rules)
        && !window.is_open(now)
    {
        let opens = window.next_open(now);
        return Err(JobError::defer_until(
            format!(
                "window: sequence {} sends from {} ({})",
                sequence.id,
                opens.to_rfc3339(),
                rules.time_zone
            ),
            millis(opens),
        ));
    }
    // Where the effect goes, checked before anything is recorded.
    enum Via<'a> {
        WhatsApp(&'a crate::whatsapp::WhatsApp, messages::WhatsAppSettings),
        Connector(&'a Arc<dyn ChannelConnector>),
    }
    let via = match channel {
        Channel::Whatsapp => {
            let whatsapp = deps.whatsapp.as_deref().ok_or_else(|| {
                JobError::retry("WhatsApp is not configured on this worker (WHATSAPP_API_URL)")
            })?;
            let settings = messages::settings(pool, tenant)
                .await
                .map_err(store_error)?
                .ok_or_else(|| {
                    JobError::retry(
                        "WhatsApp is not configured for this tenant (PUT /v1/providers/whatsapp)",
                    )
                })?;
            Via::WhatsApp(whatsapp, settings)
        }
        other => {
            let connector = deps
                .sequences
                .as_deref()
                .and_then(|c| c.get(other))
                .ok_or_else(|| {
                    JobError::retry(format!("no {other} provider is configured on this worker"))
                })?;
            connector.ready(tenant).await.map_err(JobError::retry)?;
            Via::Connector(connector)
        }
    };
    let sender_name = sequence.sender(channel).to_owned();
    let periods = steps::cap_periods(rules.zone(), now);
    // Caps and the claim in one transaction under the sender account's lock, so two jobs
    // cannot both take the last unit of a cap.
    let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
    let sender = sequences::sender_account(&mut tx, tenant, channel, &sender_name)
        .await
        .map_err(store_error)?;
    sequences::lock_sender(&mut tx, tenant, sender)
        .await
        .map_err(store_error)?;
    for cap in rules.caps_for(action) {
        for (limit, since, until, period) in [
            (cap.daily, periods.day_start, periods.next_day, "daily"),
            (cap.weekly, periods.week_start, periods.next_week, "weekly"),
        ] {
            let Some(limit) = limit else { continue };
            let used = sequences::count_actions(&mut tx, tenant, sender, &cap.action, since)
                .await
                .map_err(store_error)?;
            if used >= u64::from(limit) {
                return Err(JobError::defer_until(
                    format!(
                        "cap: sender account {sender_name:?} reached its {period} {} cap of {limit}",
                        cap.action
                    ),
                    millis(until),
                ));
            }
        }
    }
    let send_id = sends::begin(&mut tx, tenant, channel.as_str(), job_id)
        .await
        .map_err(store_error)?;
    let activity = NewActivity {
        channel: Some(channel),
        sender_account: Some(sender),
        send_id: Some(send_id),
        ..base
    };
    if !sequences::record_activity(&mut tx, tenant, &activity)
        .await
        .map_err(store_error)?
    {
        // Another run of this step claimed it first; the transaction (and its send) roll back.
        return Ok(());
    }
    tx.commit().await.map_err(|e| store_error(e.into()))?;

    let message = outbound(tenant, action, lead, &sender_name, send_id);
    let outcome = match (&via, action) {
        (
            Via::WhatsApp(whatsapp, settings),
            Action::WhatsappSend {
                template,
                language,
                params,
            },
        ) => {
            let template_message = TemplateMessage {
                to: message.to.chars().filter(char::is_ascii_digit).collect(),
                template: template.clone(),
                language: language.clone(),
                header: Vec::new(),
                body: params.iter().map(|p| p.render(&lead.variables)).collect(),
                url_buttons: Vec::new(),
                callback_data: send_id.to_string(),
            };
            whatsapp
                .send_from(settings, &template_message)
                .await
                .map_err(from_meta)
        }
        (Via::Connector(connector), _) => connector.act(&message).await,
        (Via::WhatsApp(..), _) => Err(ChannelError::Refused {
            code: "unsupported".into(),
            message: format!("{} is not a WhatsApp action", action.step_type()),
        }),
    };
    let settle = |status: SendStatus, change: StatusChange| async move {
        let change = StatusChange {
            send_id: Some(send_id),
            ..change
        };
        sends::apply(pool, tenant, channel.as_str(), status, &change)
            .await
            .map_err(store_error)
    };
    let undo = || async {
        let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
        sequences::undo_action(&mut tx, tenant, job.lead_id, job.step, send_id)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(|e| store_error(e.into()))
    };
    match outcome {
        Ok(provider_id) => {
            settle(
                SendStatus::Sent,
                StatusChange {
                    provider_message_id: Some(provider_id),
                    ..StatusChange::default()
                },
            )
            .await?;
        }
        Err(ChannelError::Refused { code, message }) => {
            settle(
                SendStatus::Failed,
                StatusChange {
                    error_code: Some(code),
                    error: Some(message),
                    ..StatusChange::default()
                },
            )
            .await?;
        }
        Err(error @ ChannelError::Ambiguous(_)) => {
            sends::mark_unknown(pool, tenant, send_id)
                .await
                .map_err(store_error)?;
            tracing::warn!(%tenant, send = %send_id, %error, "sequence action outcome unknown; not repeated");
        }
        Err(ChannelError::Throttled { wait }) => {
            undo().await?;
            let until =
                now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60));
            return Err(JobError::defer_until(
                format!("rate limit: {channel} throttled the action"),
                millis(until),
            ));
        }
        Err(error @ ChannelError::NotSent(_)) => {
            if !last_attempt {
                undo().await?;
                return Err(JobError::retry(error.to_string()));
            }
            settle(
                SendStatus::Failed,
                StatusChange {
                    error: Some(error.to_string()),
                    ..StatusChange::default()
                },
            )
            .await?;
        }
    }
    let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
    advance(&mut tx, tenant, job, job.step + 1, now, steps, rules)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(|e| store_error(e.into()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sequence control: library calls for the API

/// Writes one step job for each of the sequence's active leads at its current step, due at its
/// due instant (or now).
async fn schedule_active(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    sequence: &Sequence,
) -> Result<usize, herald_store::Error> {
    let steps = sequence
        .parsed_steps()
        .map_err(|e| herald_store::Error::Invalid {
            field: "steps",
            reason: e.to_string(),
        })?;
    let rules = sequence
        .parsed_rules()
        .map_err(|e| herald_store::Error::Invalid {
            field: "rules",
            reason: e.to_string(),
        })?;
    let now = Utc::now();
    let leads = sequences::active_leads(tx, tenant, sequence.id).await?;
    let jobs = leads
        .iter()
        .map(|(lead, step, due)| {
            let due = due.map_or(now, |d| d.max(now));
            step_job(
                sequence.id,
                *lead,
                *step,
                with_jitter(&steps, *step, due, &rules),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    outbox::insert_many(tx, tenant, &jobs).await?;
    Ok(jobs.len())
}

/// Starts a draft sequence (or resumes a paused one): every active lead's current step job.
pub async fn start(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Sequence, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let sequence = sequences::transition(
        &mut tx,
        tenant,
        id,
        &[Status::Draft, Status::Paused],
        Status::Active,
    )
    .await?;
    schedule_active(&mut tx, tenant, &sequence).await?;
    // The call steps' campaigns go on (the sequence's pause paused them).
    let (resumed, _) = call_store::follow_sequence(
        &mut tx,
        tenant,
        id,
        &[CampaignStatus::Paused],
        CampaignStatus::Active,
        None,
    )
    .await?;
    if resumed > 0 {
        crate::calls::enqueue_dispatch(&mut tx, tenant, None).await?;
    }
    schedule_generation(&mut tx, tenant, &sequence, Utc::now()).await?;
    tx.commit().await?;
    Ok(sequence)
}

/// Pauses an active sequence: its step jobs end without acting; start resumes every lead at the
/// step it was on.
pub async fn pause(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Sequence, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let sequence =
        sequences::transition(&mut tx, tenant, id, &[Status::Active], Status::Paused).await?;
    // Queued calls wait with the sequence; calls in progress finish (and their leads move on,
    // to a step job that finds the sequence paused).
    call_store::follow_sequence(
        &mut tx,
        tenant,
        id,
        &[CampaignStatus::Active],
        CampaignStatus::Paused,
        Some("its sequence is paused"),
    )
    .await?;
    tx.commit().await?;
    Ok(sequence)
}

/// Stops a sequence for good: every active lead becomes `stopped`.
pub async fn stop(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Sequence, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let sequence = sequences::transition(
        &mut tx,
        tenant,
        id,
        &[Status::Draft, Status::Active, Status::Paused],
        Status::Stopped,
    )
    .await?;
    sequences::stop_leads(&mut tx, tenant, id).await?;
    // Queued calls are cancelled (calls in progress finish); their steps record `cancelled`.
    let (_, cancelled) = call_store::follow_sequence(
        &mut tx,
        tenant,
        id,
        &[CampaignStatus::Active, CampaignStatus::Paused],
        CampaignStatus::Cancelled,
        None,
    )
    .await?;
    for call in cancelled {
        on_call_ended(
            &mut tx,
            tenant,
            call,
            call_store::Outcome::Cancelled,
            Utc::now(),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(sequence)
}

/// Adds leads; in an active sequence each new lead's first step job is written at once.
pub async fn add_leads(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    leads: &[NewLead],
) -> Result<sequences::AddedLeads, herald_store::Error> {
    let sequence = sequences::get(pool, tenant, id).await?;
    if sequence.status == Status::Stopped {
        return Err(herald_store::Error::Conflict {
            what: format!("sequence {id} is stopped"),
        });
    }
    let steps = sequence
        .parsed_steps()
        .map_err(|e| herald_store::Error::Invalid {
            field: "steps",
            reason: e.to_string(),
        })?;
    let rules = sequence
        .parsed_rules()
        .map_err(|e| herald_store::Error::Invalid {
            field: "rules",
            reason: e.to_string(),
        })?;
    let mut tx = pool.begin().await?;
    // Lock the sequence so a concurrent start or stop sees these leads or none of them.
    let current = sequences::transition(
        &mut tx,
        tenant,
        id,
        &[Status::Draft, Status::Active, Status::Paused],
        sequence.status,
    )
    .await?;
    let added = sequences::add_leads(&mut tx, tenant, id, leads).await?;
    if current.status == Status::Active {
        let now = Utc::now();
        let jobs = added
            .added
            .iter()
            .map(|lead| step_job(id, *lead, 0, with_jitter(&steps, 0, now, &rules)))
            .collect::<Result<Vec<_>, _>>()?;
        outbox::insert_many(&mut tx, tenant, &jobs).await?;
    }
    tx.commit().await?;
    Ok(added)
}

/// Records an inbound signal for a lead (a reply stops its sequence).
pub async fn apply_signal(
    pool: &PgPool,
    tenant: TenantId,
    lead: Uuid,
    signal: Signal,
) -> Result<bool, herald_store::Error> {
    sequences::record_signal(pool, tenant, lead, signal).await
}

// ---------------------------------------------------------------------------------------------
// voice_agent_call: one call through the call-campaign slots

/// A call step's configuration.
#[derive(Debug, Clone, Copy)]
struct CallStep {
    user: Uuid,
    agent: Uuid,
}

/// Closes at the last instant of the day: a sequence without a sending window may call at any
/// hour (a call campaign's window cannot be empty, so it ends a microsecond before midnight).
fn last_instant_of_day() -> NaiveTime {
    NaiveTime::from_hms_micro_opt(23, 59, 59, 999_999).unwrap_or(NaiveTime::MIN)
}

/// The call campaign a sequence's call step places its calls through: the sequence's window
/// and zone, the step's user and agent.
fn call_campaign(
    sequence: &Sequence,
    step: u32,
    call: CallStep,
    rules: &Rules,
    now: DateTime<Utc>,
) -> NewCampaign {
    let (first, last) = rules
        .window
        .unwrap_or((NaiveTime::MIN, last_instant_of_day()));
    let short: String = sequence.name.chars().take(150).collect();
    NewCampaign {
        name: format!("{short} (sequence step {step})"),
        user_id: call.user,
        agent_id: call.agent,
        next_action: None,
        first_call_time: first,
        last_call_time: last,
        time_zone: rules.time_zone.clone(),
        // Yesterday: a window crossing midnight has its early hours belong to the day before.
        start_date: now.with_timezone(&rules.zone()).date_naive() - chrono::Duration::days(1),
    }
}

/// The contact a call step calls: the lead's phone and name, and its variables (with the
/// sequence and lead) as the call's context.
fn lead_contact(sequence: Uuid, lead: &sequences::Lead, phone: &str) -> Result<NewContact, String> {
    let mut context = Map::new();
    for (key, value) in &lead.variables {
        context.insert(key.clone(), Value::String(value.clone()));
    }
    context.insert("sequence_id".into(), Value::String(sequence.to_string()));
    context.insert("lead_id".into(), Value::String(lead.id.to_string()));
    let name = [
        lead.variables.get("first_name"),
        lead.variables.get("last_name"),
    ]
    .into_iter()
    .flatten()
    .map(|s| s.trim())
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    let name: String = name.chars().take(call_store::MAX_TEXT_LEN).collect();
    NewContact::new(phone, Some(name.as_str()), context)
}

/// A `voice_agent_call` step:
/// - already queued: nothing (the call's end moves the lead on); already ended: the lead moves
///   on (a no-op when the end did it);
/// - the user or agent is gone, or the lead has no E.164 phone: the lead fails with the reason;
/// - otherwise, in one transaction: the step's call campaign (created on first use), the lead as
///   a contact, one queued call, the activity (`calling`, naming the call) and a dispatch job.
///   The activity is unique per lead and step, so a second run queues nothing.
#[allow(clippy::too_many_arguments)]
async fn run_call_step(
    deps: &Deps,
    tenant: TenantId,
    job_id: &str,
    job: &SequenceStep,
    sequence: &Sequence,
    lead: &sequences::Lead,
    call: CallStep,
    steps: &[Step],
    rules: &Rules,
    now: DateTime<Utc>,
) -> Result<(), JobError> {
    let pool = &deps.pool;
    match sequences::call_activity(pool, tenant, job.lead_id, job.step)
        .await
        .map_err(store_error)?
    {
        Some((_, outcome)) if outcome == Outcome::Calling.as_str() => return Ok(()),
        Some(_) => {
            let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
            advance(&mut tx, tenant, job, job.step + 1, now, steps, rules)
                .await
                .map_err(store_error)?;
            tx.commit().await.map_err(|e| store_error(e.into()))?;
            return Ok(());
        }
        None => {}
    }
    let step = Step::voice_agent_call(call.user, call.agent);
    let mut conn = pool.acquire().await.map_err(|e| store_error(e.into()))?;
    let checked = sequences::check_call_step(&mut conn, tenant, job.step as usize, &step)
        .await
        .map_err(store_error)?;
    drop(conn);
    if let Err(e) = checked {
        return fail(pool, tenant, job, e.to_string()).await;
    }
    let phone = lead.variables.get("phone").map_or("", String::as_str);
    let contact = match lead_contact(sequence.id, lead, phone) {
        Ok(contact) => contact,
        Err(reason) if phone.trim().is_empty() => {
            let _ = reason;
            return fail(
                pool,
                tenant,
                job,
                format!(
                    "step {} (voice_agent_call): the lead has no phone",
                    job.step
                ),
            )
            .await;
        }
        Err(reason) => {
            return fail(
                pool,
                tenant,
                job,
                format!("step {} (voice_agent_call): the lead's {reason}", job.step),
            )
            .await;
        }
    };
    if call_store::voice_provider(pool, tenant)
        .await
        .map_err(store_error)?
        .is_none()
    {
        return Err(JobError::retry(
            "voice calls are not configured for this tenant (PUT /v1/providers/voice)",
        ));
    }
    let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
    let campaign = call_store::sequence_campaign(
        &mut tx,
        tenant,
        sequence.id,
        job.step,
        &call_campaign(sequence, job.step, call, rules, now),
    )
    .await
    .map_err(store_error)?;
    let contact_id = call_store::upsert_contacts(&mut tx, tenant, std::slice::from_ref(&contact))
        .await
        .map_err(store_error)?
        .into_iter()
        .next()
        .ok_or_else(|| JobError::retry("the lead's contact was not stored"))?;
    let Some(call_id) = call_store::queue_call(&mut tx, tenant, campaign, contact_id)
        .await
        .map_err(store_error)?
    else {
        drop(tx);
        // A run of this step racing this one queued the call first (its activity is there).
        if sequences::call_activity(pool, tenant, job.lead_id, job.step)
            .await
            .map_err(store_error)?
            .is_some()
        {
            return Ok(());
        }
        // Another lead of this step has the same phone: the campaign calls a number once.
        return fail(
            pool,
            tenant,
            job,
            format!(
                "step {} (voice_agent_call): another lead of this step already has a call to {}",
                job.step, contact.phone
            ),
        )
        .await;
    };
    let activity = NewActivity {
        sequence: job.sequence_id,
        lead: job.lead_id,
        step: job.step,
        step_type: "voice_agent_call",
        channel: None,
        outcome: Outcome::Calling,
        sender_account: None,
        send_id: None,
        call_id: Some(call_id),
        job_id,
        at: now,
    };
    if !sequences::record_activity(&mut tx, tenant, &activity)
        .await
        .map_err(store_error)?
    {
        // Another run of this step queued its call first; this one's call rolls back.
        return Ok(());
    }
    crate::calls::enqueue_dispatch(&mut tx, tenant, None)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(|e| store_error(e.into()))?;
    Ok(())
}

/// A call ended (released, failed, expired or cancelled), inside the transaction that ended it.
/// If it was a sequence's call step still `calling`, the step records `outcome`, a completed
/// call records the lead's `connected` signal (a `condition` on `connected` after the call asks
/// "did they pick up and talk?"), and the lead moves on to the next step. Returns whether a step
/// was settled; a second end of the same call settles nothing.
pub async fn on_call_ended(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    call: Uuid,
    outcome: call_store::Outcome,
    now: DateTime<Utc>,
) -> Result<bool, herald_store::Error> {
    let Some((sequence_id, lead_id, step)) =
        sequences::settle_call_activity(conn, tenant, call, outcome.as_str()).await?
    else {
        return Ok(false);
    };
    if outcome == call_store::Outcome::Completed {
        sequences::record_signal_in(conn, tenant, lead_id, Signal::Connected).await?;
    }
    let sequence = sequences::get_in(conn, tenant, sequence_id).await?;
    let job = SequenceStep {
        sequence_id,
        lead_id,
        step,
    };
    match (sequence.parsed_steps(), sequence.parsed_rules()) {
        (Ok(steps), Ok(rules)) => {
            advance(conn, tenant, &job, step + 1, now, &steps, &rules).await?;
        }
        (Err(e), _) => sequences::fail_lead_in(conn, tenant, lead_id, &e.to_string()).await?,
        (_, Err(e)) => {
            sequences::fail_lead_in(conn, tenant, lead_id, &format!("sending rules: {e}")).await?
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// lead_generation: a daily draw from the sequence's lead pool

/// What one `lead_generation` run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generation {
    /// The sequence is not active (paused, stopped, gone) or draws from no pool: nothing, and
    /// no next run (starting or resuming it writes one).
    Idle,
    /// The local day `day` was drawn by this run (`added` leads; fewer than the limit when the
    /// pool ran short) or had been already (`added` empty, `already_drawn`); the next run is due
    /// at `next_at`, the next local midnight.
    Ran {
        day: chrono::NaiveDate,
        added: Vec<Uuid>,
        already_drawn: bool,
        next_at: DateTime<Utc>,
    },
}

pub async fn generate(
    job: LeadGeneration,
    meta: JobMeta,
    deps: Data<Deps>,
) -> Result<(), JobError> {
    run_lead_generation(&deps.pool, meta.tenant, &job, Utc::now())
        .await
        .map(|_| ())
}

/// The generation job for the local day of `at` (due then), unless one for that day is still
/// pending: at most one waiting job per sequence and day.
async fn write_generation_job(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    sequence: Uuid,
    day: chrono::NaiveDate,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), herald_store::Error> {
    let mut job = NewOutboxJob::for_payload(&LeadGeneration {
        sequence_id: sequence,
    })?;
    job.run_at = Some(at);
    job.job_key = Some(format!("lead_generation:{sequence}:{day}"));
    // Only a pending job holds the key: a day's job that already ran (while the sequence was
    // paused, say) must not stop a resume from drawing that day.
    outbox::insert_unless_key_taken(conn, tenant, &job, now).await?;
    Ok(())
}

/// On start or resume: the generation job for today (if the sequence generates its leads).
async fn schedule_generation(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    sequence: &Sequence,
    now: DateTime<Utc>,
) -> Result<(), herald_store::Error> {
    let (Ok(steps), Ok(rules)) = (sequence.parsed_steps(), sequence.parsed_rules()) else {
        return Ok(());
    };
    if steps::lead_generation(&steps).is_none() {
        return Ok(());
    }
    let today = now.with_timezone(&rules.zone()).date_naive();
    write_generation_job(conn, tenant, sequence.id, today, now, now).await
}

/// One `lead_generation` run at `now`: the sequence's local day is claimed (a row unique per
/// sequence and day) and, if this run claimed it, up to the daily limit of pool people who are
/// not yet leads of the sequence are added at step 1 with their step jobs; then the job for the
/// next local midnight is written. All in one transaction: a run that fails adds nothing, a
/// second run for the same day (or one racing it) adds nothing.
pub async fn run_lead_generation(
    pool: &PgPool,
    tenant: TenantId,
    job: &LeadGeneration,
    now: DateTime<Utc>,
) -> Result<Generation, JobError> {
    let sequence = match sequences::get(pool, tenant, job.sequence_id).await {
        Ok(sequence) => sequence,
        Err(herald_store::Error::NotFound { .. }) => return Ok(Generation::Idle),
        Err(e) => return Err(store_error(e)),
    };
    if sequence.status != Status::Active {
        return Ok(Generation::Idle);
    }
    let (steps, rules) = match (sequence.parsed_steps(), sequence.parsed_rules()) {
        (Ok(steps), Ok(rules)) => (steps, rules),
        (Err(e), _) => return Err(JobError::permanent(e.to_string())),
        (_, Err(e)) => return Err(JobError::permanent(format!("sending rules: {e}"))),
    };
    let Some((limit, pool_name)) = steps::lead_generation(&steps) else {
        return Ok(Generation::Idle);
    };
    let zone = rules.zone();
    let day = now.with_timezone(&zone).date_naive();
    let next_at = steps::cap_periods(zone, now).next_day;
    let needed = steps::needed_variables(&steps);
    let mut tx = pool.begin().await.map_err(|e| store_error(e.into()))?;
    let claimed = pools::claim_day(&mut tx, tenant, sequence.id, day, pool_name)
        .await
        .map_err(store_error)?;
    let added = if claimed {
        pools::draw(
            &mut tx,
            tenant,
            &Draw {
                sequence: sequence.id,
                day,
                pool: pool_name,
                limit,
                needed: &needed,
                first_step: 1,
                due: now,
            },
        )
        .await
        .map_err(store_error)?
    } else {
        Vec::new()
    };
    let jobs = added
        .iter()
        .map(|lead| step_job(sequence.id, *lead, 1, with_jitter(&steps, 1, now, &rules)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(store_error)?;
    outbox::insert_many(&mut tx, tenant, &jobs)
        .await
        .map_err(store_error)?;
    let next_day = next_at.with_timezone(&zone).date_naive();
    write_generation_job(&mut tx, tenant, sequence.id, next_day, next_at, now)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(|e| store_error(e.into()))?;
    tracing::info!(%tenant, sequence = %sequence.id, %day, added = added.len(), already_drawn = !claimed,
        "lead generation ran");
    Ok(Generation::Ran {
        day,
        added,
        already_drawn: !claimed,
        next_at,
    })
}
