//! WhatsApp template campaigns: the `whatsapp_send` job (one send step per recipient) and the
//! library calls the API uses to start, pause, resume, stop and retry a campaign and to apply
//! Meta's status webhooks.
//!
//! A send step is admitted by the fleet-wide rate limiter (per tenant and sender number, at the
//! campaign's rate) and never sleeps: a refusal defers the job without spending an attempt.
//!
//! Pacing, so that a campaign goes out at its rate, about one run per step: the limiter paces
//! [`RATE_MARGIN`] under the configured rate; the steps are scheduled one turn of that pace
//! apart when the campaign starts, resumes or retries (after a lead for writing and relaying
//! them, [`SCHEDULE_LEAD`]), so they reach the limiter about when their turn comes instead of
//! all at once; no step is fetched ahead of a free handler ([`JobPayload::PUNCTUAL`]); and a
//! step that must wait reserves a slot of its own ([`RateLimiter::admit_reserving_capped`]), so
//! waiting steps never wake together and a late one never pushes the slots after it back.
//!
//! What bounds the rate, by construction. A reserved slot may be taken up to
//! [`RESERVATION_GRACE`] late (a loaded fleet wakes late, and forfeiting would collapse the
//! pace); a slot taken late lands among the slots taken on time meanwhile, so on the slots alone
//! one second of admissions could hold the slots of the grace and that second. Every admission,
//! on a reservation or not, therefore also passes the number's *cap* ([`rate_cap`]): a second
//! limit counted on the instants steps are actually admitted (Redis's clock), which admits at
//! most the configured rate in any one-second window. A late reservation the cap does not allow at that moment keeps its
//! place and moves to the instant the cap names. The cap runs 1 % under the configured rate
//! and the slots 2 %, so the cap catches up with late steps instead of slowing the campaign.
//! What Meta sees in one second is then at most the configured rate plus the steps admitted
//! before that second and not yet arrived (at most the send steps running at once across the
//! fleet); Meta's tier is what must hold that, and its throttling answers are handled below.
//!
//! Concurrency (at most the campaign's `concurrency` sends between their attempt and Meta's
//! answer) is counted in Redis with leased slots ([`Slots`], one per job, the campaign as the
//! slot's user), taken after admission and before the attempt is recorded, and given back once
//! the answer is recorded. A worker that dies holding one gives it back when its job is
//! re-delivered (the slot is named by the job id) or, at worst, when the lease runs out. Postgres
//! records each attempt in one statement, with no per-campaign lock, so concurrent attempts
//! commit in parallel.
//!
//! It records the send as `attempting` (with its send id, see `herald_store::sends`) before it
//! calls Meta and the message id after; a job re-delivered between the two marks the send
//! `unknown` instead of sending again, and the status webhooks (which carry the send id in
//! `biz_opaque_callback_data`) settle it. Throttling answers (130429, 131056, HTTP 429) undo
//! the attempt and defer the job: they are never failures.
//!
//! The handler is a thin wrapper over [`run_send`], which tests call directly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis_core::task::data::Data;
use herald_admission::{
    Admission, BackOff, Connection, Limit, LimitKey, RateLimiter, SlotAdmission, SlotRequest, Slots,
};
use herald_connectors::whatsapp::{
    self as meta, Account, DEFAULT_API_URL, DEFAULT_TIMEOUT, TemplateMessage, Throttle,
    WhatsAppClient,
};
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_queue::JobMeta;
use herald_store::messages::{self, Begin, Campaign, CampaignStatus, SendContext};
use herald_store::outbox::{self, NewOutboxJob};
use herald_store::sends::{self, Applied, SendStatus, StatusChange};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use uuid::Uuid;

use crate::Deps;

/// How long a send step waits when its campaign already has `concurrency` sends in flight.
pub const BUSY_WAIT: Duration = Duration::from_millis(50);

/// How far under the configured rate a campaign's slots are paced, by the limiter and by the
/// schedule of its send steps alike. The number's cap ([`rate_cap`], [`CAP_MARGIN`]) runs
/// half as far under it, so it has room to catch up with steps that took their slots late; the
/// achieved rate is the slots' (49.0 msg/s at 50, 980 at 1,000).
pub const RATE_MARGIN: f64 = 0.02;

/// How far ahead of its slot a send step may run and still go at once: the pacing limit's burst
/// tolerance, in whole intervals (245 at 1,000 msg/s, 12 at 50). The schedule, not the pacing
/// limit, spaces a campaign's steps; the limit catches what the schedule cannot: steps that
/// arrive together after a stall, and several campaigns on one number. Any crowd it lets through
/// spreads the slots ahead of the schedule, and with a tolerance shorter than the crowd every
/// later step of the campaign would arrive before its slot, wait and run twice (measured: 2.1
/// runs per message at 50 msg/s and 2.8–4.7 at 1,000 with 10 ms). The number's cap
/// ([`rate_cap`]) still never admits more than the configured rate in one second.
pub const PACING_TOLERANCE: Duration = Duration::from_millis(250);

/// How late after its reserved slot a send step that had to wait may still take it. One that
/// comes back later gives the slot up and reserves again behind everyone waiting, and its slot
/// goes unused: every give-up pushes the campaign's slots further ahead of its schedule, so the
/// steps after it arrive early, wait, and run twice, which loads the fleet and makes more steps
/// late. A loaded fleet wakes deferred steps hundreds of milliseconds late (measured: up to a
/// third of a second at 700 msg/s on two cores), so the grace is long. It costs nothing in the
/// bound: every admission, late or not, passes the number's cap ([`rate_cap`]), which never
/// admits more than the configured rate in one second.
pub const RESERVATION_GRACE: Duration = Duration::from_secs(5);

/// How long after a campaign starts (or resumes, or retries) its first send step is due, plus
/// [`LEAD_PER_STEP`] per step: the time to write the steps and relay them to Redis. A step
/// due before the steps are in Redis runs late, in a crowd with the others due then; the
/// limiter spreads the crowd over the slots that follow, and that puts every later step of the
/// campaign that far ahead of its slot, to wait and run twice. Starting the schedule after the
/// lead keeps the steps on their slots (measured: the first message reached Meta's fake
/// 0.11 s after the start of 4,000 steps and 0.20–0.25 s after 10,000, two workers on two
/// cores).
pub const SCHEDULE_LEAD: Duration = Duration::from_millis(250);

/// See [`SCHEDULE_LEAD`].
pub const LEAD_PER_STEP: Duration = Duration::from_micros(30);

/// How far under the configured rate the cap on admission instants runs: half of
/// [`RATE_MARGIN`], so the cap is faster than the slots (it catches up with steps that took
/// their slots late) and its slack, `CAP_MARGIN` × 1 s (10 ms), is a burst tolerance that still
/// never admits more than the configured rate in one second.
pub const CAP_MARGIN: f64 = RATE_MARGIN / 2.0;

/// How a sender number is held back after Meta's throughput error (130429) without a
/// `Retry-After`: 25 ms, doubling for each throughput error that comes less than a second
/// after the last hold ended, up to 200 ms (ADR 0015). At a rate the number's tier carries, an
/// error means arrival jitter put a send or two too many in one of Meta's seconds, which a few
/// milliseconds undo, and every millisecond held is a millisecond of the campaign's rate lost
/// (measured at 1,000 msg/s: 916–954 msg/s with a fixed 200 ms, 967–977 with this). A tier
/// below the configured rate throttles again at once, and the hold grows to 200 ms, the fixed
/// hold it replaces (a second idled such a number for most of each second). An error for a
/// step admitted before the last hold began changes nothing: that hold answers it.
pub const THROUGHPUT_BACK_OFF: BackOff = BackOff::new(
    Duration::from_millis(25),
    Duration::from_millis(200),
    Duration::from_secs(1),
);

/// The lease of a campaign's concurrency slot: as long as an `attempting` send of a dead job
/// used to count against the campaign (twice the job's timeout). A slot is given back long
/// before that, when its step ends or its job is re-delivered.
pub const CONCURRENCY_LEASE: Duration = Duration::from_secs(WhatsAppSend::TIMEOUT.as_secs() * 2);

/// The limit a campaign configured at `rate_per_sec` is paced at: [`RATE_MARGIN`] under that
/// rate, with [`PACING_TOLERANCE`].
pub fn paced_limit(rate_per_sec: u32) -> Result<Limit, herald_admission::Error> {
    let limit = Limit::per_second(f64::from(rate_per_sec.max(1)) / (1.0 + RATE_MARGIN))?;
    let intervals = PACING_TOLERANCE.as_micros() / limit.interval().as_micros().max(1);
    let burst = u32::try_from(intervals)
        .unwrap_or(u32::MAX)
        .min(1_000)
        .saturating_add(1);
    limit.with_burst(burst)
}

/// The cap on a number configured at `rate_per_sec`: at most `rate_per_sec` admissions in any
/// one-second window, at one every `(1 + CAP_MARGIN) / rate_per_sec` seconds on average
/// ([`Limit::at_most`]: the slack is the burst tolerance).
pub fn rate_cap(rate_per_sec: u32) -> Result<Limit, herald_admission::Error> {
    let rate = rate_per_sec.max(1);
    let slack_us = (CAP_MARGIN * 1_000_000.0).round() as u64;
    let interval_us = (1_000_000 + slack_us).div_ceil(u64::from(rate));
    Limit::at_most(
        rate,
        Duration::from_secs(1),
        Duration::from_micros(interval_us),
    )
}

/// Send one campaign recipient its template message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhatsAppSend {
    pub campaign_id: Uuid,
    pub recipient_id: Uuid,
}

impl JobPayload for WhatsAppSend {
    const QUEUE: &'static str = "whatsapp_send";
    const MAX_ATTEMPTS: u32 = 8;
    const TIMEOUT: Duration = Duration::from_secs(60);
    /// A deferred step comes back to its reserved slot, which waits [`RESERVATION_GRACE`].
    const PUNCTUAL: bool = true;
}

/// Where the workers reach Meta.
#[derive(Clone, Debug)]
pub struct WhatsAppSettings {
    /// `WHATSAPP_API_URL`: used for tenants whose settings name no `api_url`.
    pub api_url: String,
    /// Per request.
    pub timeout: Duration,
}

impl Default for WhatsAppSettings {
    fn default() -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl WhatsAppSettings {
    /// Reads `WHATSAPP_API_URL` through `var` (default: Meta's Graph API).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut settings = Self::default();
        if let Some(url) = var("WHATSAPP_API_URL").filter(|u| !u.trim().is_empty()) {
            settings.api_url = url.trim().to_owned();
        }
        settings
    }

    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// The most campaigns whose sender a worker remembers (forgotten all at once beyond it).
const REMEMBERED_SENDERS: usize = 10_000;

/// WhatsApp for the handlers: the client, the default API URL and the fleet-wide limiter.
#[derive(Clone, Debug)]
pub struct WhatsApp {
    client: WhatsAppClient,
    limiter: RateLimiter,
    /// Campaigns' sends in flight.
    slots: Slots,
    default_api_url: String,
    /// The sender of each campaign this process has admitted a send step for, so that a step
    /// coming back, and the steps after it, ask the limiter before reading Postgres.
    senders: Arc<Mutex<HashMap<(TenantId, Uuid), Sender>>>,
}

/// A campaign's sender number, the limit its steps are admitted at and the cap on admissions,
/// and the campaign's concurrency when it was remembered.
#[derive(Clone, Debug)]
struct Sender {
    key: LimitKey,
    cap: LimitKey,
    phone_number_id: String,
    rate_per_sec: u32,
    concurrency: u32,
}

impl WhatsApp {
    /// `limiter`'s and `slots`' hash tag should be [`WhatsAppSend::QUEUE`] (see
    /// [`WhatsApp::connect`]).
    pub fn new(
        http: reqwest::Client,
        settings: &WhatsAppSettings,
        limiter: RateLimiter,
        slots: Slots,
    ) -> Self {
        Self {
            client: WhatsAppClient::new(http, settings.timeout),
            limiter,
            slots,
            default_api_url: settings.api_url.clone(),
            senders: Arc::default(),
        }
    }

    /// Connects the limiter and the concurrency slots to Redis (`REDIS_URL`) under the queues'
    /// `namespace`.
    pub async fn connect(
        http: reqwest::Client,
        settings: &WhatsAppSettings,
        redis_url: &str,
        namespace: &str,
    ) -> Result<Self, herald_admission::Error> {
        let conn = Connection::connect(redis_url).await?;
        let limiter = RateLimiter::new(conn.clone(), namespace, WhatsAppSend::QUEUE)?;
        let slots = Slots::new(conn, namespace, WhatsAppSend::QUEUE)?;
        Ok(Self::new(http, settings, limiter, slots))
    }

    /// Sends one template message from the tenant's account, outside any campaign (a
    /// sequence's `whatsapp_send` step); the caller records the attempt first.
    pub(crate) async fn send_from(
        &self,
        settings: &messages::WhatsAppSettings,
        message: &TemplateMessage,
    ) -> Result<String, meta::Error> {
        self.client
            .send_template(&self.account(settings), message)
            .await
    }

    /// The tenant's Meta account: its settings, with this worker's API URL when they name none.
    fn account(&self, settings: &messages::WhatsAppSettings) -> Account {
        Account {
            api_url: settings
                .api_url
                .clone()
                .unwrap_or_else(|| self.default_api_url.clone()),
            token: SecretString::from(settings.token.clone()),
            phone_number_id: settings.phone_number_id.clone(),
        }
    }

    /// The campaign's sender: the tenant's number, limited at `rate_per_sec` (paced under
    /// it), remembered for the campaign.
    fn sender(
        &self,
        tenant: TenantId,
        campaign: Uuid,
        phone_number_id: &str,
        rate_per_sec: u32,
        concurrency: u32,
    ) -> Result<Sender, herald_admission::Error> {
        let name = format!("whatsapp:{tenant}:{phone_number_id}");
        let sender = Sender {
            key: self.limiter.key(&name, paced_limit(rate_per_sec)?)?,
            cap: self
                .limiter
                .key(&format!("{name}:admitted"), rate_cap(rate_per_sec)?)?,
            phone_number_id: phone_number_id.to_owned(),
            rate_per_sec,
            concurrency,
        };
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if senders.len() >= REMEMBERED_SENDERS && !senders.contains_key(&(tenant, campaign)) {
            senders.clear();
        }
        senders.insert((tenant, campaign), sender.clone());
        Ok(sender)
    }

    /// The campaign's sender, if this process has admitted one of its steps before.
    fn remembered_sender(&self, tenant: TenantId, campaign: Uuid) -> Option<Sender> {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.get(&(tenant, campaign)).cloned()
    }

    /// Admits a step under the number's cap, or reserves its slot and says when to come back.
    /// `Ok`: the instant just before the limiter was asked (the admission is no earlier).
    async fn admit(&self, sender: &Sender, reservation: &str) -> Result<Instant, JobError> {
        let asked = Instant::now();
        match self
            .limiter
            .admit_reserving_capped(
                std::slice::from_ref(&sender.key),
                &sender.cap,
                reservation,
                RESERVATION_GRACE,
            )
            .await
        {
            Ok(Admission::Admitted) => Ok(asked),
            Ok(Admission::WaitUntil(until_ms)) => Err(JobError::defer_until(
                format!(
                    "rate limit: WhatsApp number {} is at {} msg/s",
                    sender.phone_number_id, sender.rate_per_sec
                ),
                until_ms,
            )),
            Err(e) => Err(JobError::retry(format!("rate limiter unavailable: {e}"))),
        }
    }

    /// A step of a campaign this process has admitted steps of before asks the limiter first,
    /// before reading anything from Postgres: a step that must wait (most of them, on their
    /// first run, when a campaign is behind its schedule) then costs one Redis call and no
    /// query, and a step coming back to the slot it reserved takes it on time, not as late as
    /// its reads (on a loaded database, enough to bunch two sends). The price: a step that
    /// finds its campaign paused, or its recipient already sent, has used a slot for nothing.
    /// `Ok(Some((sender, at)))`: admitted on `sender` at `at` ([`admit`](Self::admit));
    /// `Ok(None)`: no sender remembered.
    async fn admit_remembered(
        &self,
        tenant: TenantId,
        campaign: Uuid,
        reservation: &str,
    ) -> Result<Option<(Sender, Instant)>, JobError> {
        let Some(sender) = self.remembered_sender(tenant, campaign) else {
            return Ok(None);
        };
        let at = self.admit(&sender, reservation).await?;
        Ok(Some((sender, at)))
    }

    /// Takes one of the campaign's `concurrency` slots for the job, or says when to try again.
    /// A re-delivered job finds the slot its first delivery took (same id) and keeps it.
    async fn take_concurrency_slot(
        &self,
        tenant: TenantId,
        campaign: Uuid,
        job_id: &str,
        concurrency: u32,
    ) -> Result<(), JobError> {
        let tenant_name = tenant.to_string();
        let campaign_name = campaign.to_string();
        let request = SlotRequest {
            tenant: &tenant_name,
            user: &campaign_name,
            slot: job_id,
            user_limit: concurrency.max(1),
            // The tenant's campaigns are limited one by one, not together.
            tenant_limit: u32::MAX,
            lease: CONCURRENCY_LEASE,
            fleet_limit: None,
            expected_turn: None,
        };
        match self.slots.acquire(&request).await {
            Ok(SlotAdmission::Acquired { .. } | SlotAdmission::AlreadyHeld { .. }) => Ok(()),
            Ok(_) => Err(JobError::defer_until(
                format!("concurrency: campaign {campaign} has {concurrency} sends in flight"),
                until(BUSY_WAIT),
            )),
            Err(e) => Err(JobError::retry(format!(
                "concurrency slots unavailable: {e}"
            ))),
        }
    }

    /// Gives the job's concurrency slot back (nothing if it holds none). A failure is logged:
    /// the slot then comes back when its lease runs out.
    async fn release_concurrency_slot(&self, tenant: TenantId, campaign: Uuid, job_id: &str) {
        if let Err(error) = self
            .slots
            .release(&tenant.to_string(), &campaign.to_string(), job_id)
            .await
        {
            tracing::warn!(%tenant, %campaign, job = job_id, %error,
                "giving a WhatsApp concurrency slot back failed; its lease will");
        }
    }
}

fn store_error(e: herald_store::Error) -> JobError {
    match e {
        herald_store::Error::Database(_) => JobError::retry(format!("database: {e}")),
        other => JobError::permanent(other.to_string()),
    }
}

fn until(wait: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
}

pub async fn send(job: WhatsAppSend, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    let finished = run_send(
        &deps,
        meta.tenant,
        meta.id.as_str(),
        crate::durable::outbox_id(&meta),
        &job,
        meta.is_last_attempt(),
    )
    .await?;
    if finished {
        meta.record_outcome();
    }
    Ok(())
}

/// The template message for a recipient: its parameters split by the template's columns.
fn message_for(ctx: &SendContext, send_id: Uuid) -> TemplateMessage {
    let params = &ctx.template.params;
    let header_end = params.header as usize;
    let body_end = header_end + params.body as usize;
    let values = &ctx.params;
    let slice = |from: usize, to: usize| values.get(from..to).unwrap_or_default().to_vec();
    TemplateMessage {
        to: ctx.phone.clone(),
        template: ctx.template.name.clone(),
        language: ctx.template.language.clone(),
        header: slice(0, header_end),
        body: slice(header_end, body_end),
        url_buttons: params
            .url_buttons
            .iter()
            .zip(values.iter().skip(body_end))
            .map(|(index, value)| (*index, value.clone()))
            .collect(),
        callback_data: send_id.to_string(),
    }
}

async fn settle(
    conn: &mut PgConnection,
    tenant: TenantId,
    send_id: Uuid,
    status: SendStatus,
    change: StatusChange,
) -> Result<(), JobError> {
    let change = StatusChange {
        send_id: Some(send_id),
        ..change
    };
    sends::apply(conn, tenant, messages::CHANNEL, status, &change)
        .await
        .map_err(store_error)?;
    Ok(())
}

/// A connection from the pool: the send step runs the statements of each side of Meta's call
/// on one (the pool checks a connection with a round trip each time one comes back to it).
async fn connection(pool: &PgPool) -> Result<PoolConnection<Postgres>, JobError> {
    pool.acquire()
        .await
        .map_err(|e| store_error(herald_store::Error::from(e)))
}

/// One send step, `job_id` being the job's id (re-deliveries share it):
/// - the recipient already has a send: if it is this job's and still `attempting`, the job died
///   between the attempt and its record, so the send becomes `unknown` (never sent again);
///   otherwise there is nothing to do;
/// - the campaign is paused or stopped: the recipient stays pending (resuming writes new jobs);
/// - the limiter refuses (tenant and sender number at the campaign's rate): the job's slot is
///   reserved and the job deferred to it; or the campaign has `concurrency` sends in flight:
///   deferred. No attempt is spent either way;
/// - otherwise the send is recorded `attempting`, Meta is called, and the answer recorded:
///   accepted → `sent` with Meta's message id; throttled → attempt undone, the number held back
///   (130429, 429) and the job deferred; refused → `failed` with Meta's code; no answer →
///   `unknown`; Meta unreachable or 5xx → attempt undone and retried (recorded `failed` on the
///   last attempt).
///
/// `outbox`: the job's outbox row, when it has one. A run that ends by settling a send
/// finishes it in its last statement (with the campaign's completion) and returns `Ok(true)`;
/// `Ok(false)`: the caller still has to.
pub async fn run_send(
    deps: &Deps,
    tenant: TenantId,
    job_id: &str,
    outbox: Option<Uuid>,
    job: &WhatsAppSend,
    last_attempt: bool,
) -> Result<bool, JobError> {
    let pool = &deps.pool;
    // The job names its reservation: a deferred job comes back to its own slot, and a job
    // re-delivered after a crash finds it too.
    let reservation = format!("whatsapp_send:{job_id}");
    let admitted_on = match deps.whatsapp.as_deref() {
        Some(whatsapp) => {
            whatsapp
                .admit_remembered(tenant, job.campaign_id, &reservation)
                .await?
        }
        None => None,
    };
    let step_on = |whatsapp, admitted_at| Step {
        pool,
        whatsapp,
        tenant,
        job_id,
        outbox,
        job,
        last_attempt,
        admitted_at,
    };
    let mut conn = connection(pool).await?;
    let mut claimed_context = None;
    if let (Some(whatsapp), Some((sender, at))) = (deps.whatsapp.as_deref(), admitted_on.as_ref()) {
        match claim_and_send(&step_on(whatsapp, *at), sender, conn).await? {
            Claimed::Sent(finished) => return Ok(finished),
            Claimed::NotBegun(ctx, returned) => {
                claimed_context = Some(*ctx);
                conn = returned;
            }
        }
    }
    let ctx = match claimed_context {
        Some(ctx) => ctx,
        None => messages::send_context(&mut *conn, tenant, job.campaign_id, job.recipient_id)
            .await
            .map_err(store_error)?,
    };
    // A delivery that died may have held a concurrency slot (named by the job id): a
    // re-delivery that ends here gives it back.
    let release_dead_slot = || async {
        if let Some(whatsapp) = deps.whatsapp.as_deref() {
            whatsapp
                .release_concurrency_slot(tenant, job.campaign_id, job_id)
                .await;
        }
    };
    if let Some(send) = &ctx.send {
        if send.job_id == job_id {
            if send.status == SendStatus::Attempting {
                sends::mark_unknown(pool, tenant, send.id)
                    .await
                    .map_err(store_error)?;
                tracing::warn!(%tenant, campaign = %job.campaign_id, recipient = %job.recipient_id,
                    send = %send.id, "send step re-delivered after its attempt: marked unknown, not resent");
            }
            release_dead_slot().await;
            return complete_if_done(&mut *conn, tenant, job.campaign_id, outbox).await;
        }
        return Ok(false);
    }
    if !matches!(
        ctx.campaign_status,
        CampaignStatus::Sending | CampaignStatus::Completed
    ) {
        release_dead_slot().await;
        return Ok(false);
    }
    let Some(settings) = ctx.settings.clone() else {
        return Err(JobError::retry(
            "WhatsApp is not configured for this tenant (PUT /v1/providers/whatsapp)",
        ));
    };
    let whatsapp = deps.whatsapp.as_deref().ok_or_else(|| {
        JobError::retry("WhatsApp is not configured on this worker (WHATSAPP_API_URL)")
    })?;
    let sender = whatsapp
        .sender(
            tenant,
            job.campaign_id,
            &settings.phone_number_id,
            ctx.rate_per_sec,
            ctx.concurrency,
        )
        .map_err(|e| JobError::permanent(format!("rate limit: {e}")))?;
    // Admitted on the remembered sender, unless the tenant's number or the campaign's rate
    // changed since (that slot is then lost, and the step asks the current number).
    let admitted_at = match admitted_on {
        Some((on, at))
            if on.phone_number_id == sender.phone_number_id
                && on.rate_per_sec == sender.rate_per_sec =>
        {
            at
        }
        _ => whatsapp.admit(&sender, &reservation).await?,
    };
    whatsapp
        .take_concurrency_slot(tenant, job.campaign_id, job_id, ctx.concurrency)
        .await?;
    let step = step_on(whatsapp, admitted_at);
    let outcome = attempt(&step, conn, &ctx, &settings, &sender).await;
    whatsapp
        .release_concurrency_slot(tenant, job.campaign_id, job_id)
        .await;
    outcome
}

/// What [`claim_and_send`] did.
enum Claimed {
    /// The send was begun and Meta called: the run's result (`true`: its outbox row finished).
    Sent(bool),
    /// Nothing was begun: the context as read, and the connection, to go on as after a read.
    NotBegun(Box<SendContext>, PoolConnection<Postgres>),
}

/// A step admitted on a sender its worker remembers: takes the campaign's concurrency slot (at
/// the remembered concurrency), claims the recipient and reads its context in one statement
/// ([`messages::claim_send`]), and if a send was begun, gives `conn` back and calls Meta. The
/// slot is given back either way.
async fn claim_and_send(
    step: &Step<'_>,
    sender: &Sender,
    mut conn: PoolConnection<Postgres>,
) -> Result<Claimed, JobError> {
    let Step {
        whatsapp,
        tenant,
        job_id,
        job,
        ..
    } = *step;
    whatsapp
        .take_concurrency_slot(tenant, job.campaign_id, job_id, sender.concurrency)
        .await?;
    let expected = messages::Expected {
        phone_number_id: &sender.phone_number_id,
        rate_per_sec: sender.rate_per_sec,
        concurrency: sender.concurrency,
    };
    let claim = messages::claim_send(
        &mut *conn,
        tenant,
        job.campaign_id,
        job.recipient_id,
        job_id,
        expected,
    )
    .await;
    let outcome = match claim {
        Ok((ctx, Some(send_id))) => {
            drop(conn);
            match &ctx.settings {
                Some(settings) => call_and_record(step, &ctx, settings, sender, send_id)
                    .await
                    .map(Claimed::Sent),
                // The claim matched the tenant's number, so its settings exist.
                None => Err(JobError::retry(
                    "WhatsApp settings vanished during the send",
                )),
            }
        }
        Ok((ctx, None)) => Ok(Claimed::NotBegun(Box::new(ctx), conn)),
        Err(e) => Err(store_error(e)),
    };
    whatsapp
        .release_concurrency_slot(tenant, job.campaign_id, job_id)
        .await;
    outcome
}

/// The send step being run.
struct Step<'a> {
    pool: &'a PgPool,
    whatsapp: &'a WhatsApp,
    tenant: TenantId,
    job_id: &'a str,
    /// The job's outbox row, finished with the campaign's completion check.
    outbox: Option<Uuid>,
    job: &'a WhatsAppSend,
    last_attempt: bool,
    /// When the step was admitted by the number's limiter (no later than this).
    admitted_at: Instant,
}

/// The attempt proper, under the job's concurrency slot: record it on `conn` (given back
/// before Meta is called), call Meta, record the answer and complete the campaign if it was
/// the last (and the job), on one connection. `Ok(true)`: the job's outbox row is finished.
/// A step admitted on a remembered sender begins its send with its read
/// ([`messages::claim_send`]) and goes straight to [`call_and_record`].
async fn attempt(
    step: &Step<'_>,
    mut conn: PoolConnection<Postgres>,
    ctx: &SendContext,
    settings: &messages::WhatsAppSettings,
    sender: &Sender,
) -> Result<bool, JobError> {
    let Step {
        tenant,
        job_id,
        job,
        ..
    } = *step;
    let send_id = match messages::begin_send(
        &mut *conn,
        tenant,
        job.campaign_id,
        job.recipient_id,
        job_id,
    )
    .await
    .map_err(store_error)?
    {
        Begin::Started(send_id) => send_id,
        Begin::Taken | Begin::NotSending(_) => return Ok(false),
    };
    drop(conn);
    call_and_record(step, ctx, settings, sender, send_id).await
}

/// Calls Meta for the send begun as `send_id` and records the answer (see [`attempt`]).
async fn call_and_record(
    step: &Step<'_>,
    ctx: &SendContext,
    settings: &messages::WhatsAppSettings,
    sender: &Sender,
    send_id: Uuid,
) -> Result<bool, JobError> {
    let Step {
        pool,
        whatsapp,
        tenant,
        outbox,
        job,
        last_attempt,
        ..
    } = *step;
    let message = message_for(ctx, send_id);
    let outcome = whatsapp
        .client
        .send_template(&whatsapp.account(settings), &message)
        .await;
    let undo = || async {
        messages::abandon_send(pool, tenant, job.recipient_id, send_id)
            .await
            .map_err(store_error)
    };
    match outcome {
        Ok(wamid) => {
            let mut conn = connection(pool).await?;
            settle(
                &mut conn,
                tenant,
                send_id,
                SendStatus::Sent,
                StatusChange {
                    provider_message_id: Some(wamid),
                    ..StatusChange::default()
                },
            )
            .await?;
            complete_if_done(&mut *conn, tenant, job.campaign_id, outbox).await
        }
        Err(meta::Error::Throttled {
            kind,
            wait,
            code,
            told,
        }) => {
            undo().await?;
            let until_ms = hold_back(whatsapp, sender, kind, wait, told, step.admitted_at).await;
            Err(JobError::defer_until(
                format!("rate limit: WhatsApp throttled the send ({kind:?}, code {code:?})"),
                until_ms,
            ))
        }
        Err(error @ (meta::Error::Rejected { .. } | meta::Error::Unauthorized { .. })) => {
            record_failure(step, send_id, &error, outbox).await
        }
        Err(error @ meta::Error::Ambiguous(_)) => {
            sends::mark_unknown(pool, tenant, send_id)
                .await
                .map_err(store_error)?;
            tracing::warn!(%tenant, send = %send_id, %error, "WhatsApp send outcome unknown; left to status webhooks");
            complete_if_done(pool, tenant, job.campaign_id, outbox).await
        }
        Err(error @ (meta::Error::NotSent(_) | meta::Error::Server { .. })) => {
            if last_attempt {
                // The job fails: its outbox row is the worker's to mark dead.
                record_failure(step, send_id, &error, None).await?;
            } else {
                undo().await?;
            }
            Err(JobError::retry(error.to_string()))
        }
    }
}

/// Holds the number back after Meta throttled a send, and says when the step comes back.
/// Meta's own wait (`Retry-After`) is held as told; a throughput error without one backs the
/// number off ([`THROUGHPUT_BACK_OFF`]); the pair limit holds only the recipient (the step).
async fn hold_back(
    whatsapp: &WhatsApp,
    sender: &Sender,
    kind: Throttle,
    wait: Duration,
    told: bool,
    admitted_at: Instant,
) -> u64 {
    let until_ms = until(wait);
    let held = match kind {
        Throttle::Pair => return until_ms,
        Throttle::Throughput if !told => whatsapp
            .limiter
            .back_off(&sender.key, &THROUGHPUT_BACK_OFF, admitted_at.elapsed())
            .await
            .map(|backed| backed.until_ms),
        Throttle::Throughput | Throttle::Account => whatsapp
            .limiter
            .hold(&sender.key, until_ms)
            .await
            .map(|()| until_ms),
    };
    held.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "holding a throttled WhatsApp number back failed");
        until_ms
    })
}

/// Records the send `failed` with Meta's error, then completes the campaign if it was the last
/// (finishing `outbox` with it), on one connection.
async fn record_failure(
    step: &Step<'_>,
    send_id: Uuid,
    error: &meta::Error,
    outbox: Option<Uuid>,
) -> Result<bool, JobError> {
    let mut conn = connection(step.pool).await?;
    settle(
        &mut conn,
        step.tenant,
        send_id,
        SendStatus::Failed,
        failure(error),
    )
    .await?;
    complete_if_done(&mut *conn, step.tenant, step.job.campaign_id, outbox).await
}

/// A failed send's record: Meta's error code and message.
fn failure(error: &meta::Error) -> StatusChange {
    StatusChange {
        error_code: error.code(),
        error: Some(error.to_string()),
        ..StatusChange::default()
    }
}

/// Completes the campaign if this was its last send, and finishes `job` (the step's outbox row)
/// in the same statement. `Ok(true)`: there was a row to finish.
async fn complete_if_done<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    campaign: Uuid,
    job: Option<Uuid>,
) -> Result<bool, JobError> {
    if messages::complete_if_done(conn, tenant, campaign, job)
        .await
        .map_err(store_error)?
    {
        tracing::info!(%tenant, %campaign, "message campaign complete");
    }
    Ok(job.is_some())
}

// ---------------------------------------------------------------------------------------------
// Campaign control: library calls for the API

/// One send step per recipient, in order, one turn of [`paced_limit`] apart from the end of
/// the lead ([`SCHEDULE_LEAD`]), so they reach the limiter spread out rather than all together,
/// each about when its slot comes. A schedule is a hint, never a promise: the
/// limiter decides, and a step that runs early waits for its slot.
fn send_jobs(
    campaign: Uuid,
    recipients: &[Uuid],
    rate_per_sec: u32,
) -> Result<Vec<NewOutboxJob>, herald_store::Error> {
    let interval = paced_limit(rate_per_sec)
        .map_err(|e| herald_store::Error::Invalid {
            field: "rate_per_sec",
            reason: e.to_string(),
        })?
        .interval();
    let lead = SCHEDULE_LEAD + LEAD_PER_STEP.mul_f64(recipients.len() as f64);
    let start = chrono::Utc::now();
    recipients
        .iter()
        .enumerate()
        .map(|(turn, recipient_id)| {
            let mut job = NewOutboxJob::for_payload(&WhatsAppSend {
                campaign_id: campaign,
                recipient_id: *recipient_id,
            })?;
            let offset = lead + interval.mul_f64(turn as f64);
            job.run_at = chrono::Duration::from_std(offset)
                .ok()
                .and_then(|offset| start.checked_add_signed(offset));
            Ok(job)
        })
        .collect()
}

/// The rate a campaign sends at (set when it started).
fn rate_of(campaign: &Campaign) -> u32 {
    campaign.rate_per_sec.unwrap_or(1)
}

/// Starts sending a draft campaign: status `sending` and one send step per recipient, in one
/// transaction. The tenant must have WhatsApp settings.
pub async fn start_sending(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    rate_per_sec: u32,
    concurrency: u32,
) -> Result<Campaign, herald_store::Error> {
    if messages::settings(pool, tenant).await?.is_none() {
        return Err(herald_store::Error::Conflict {
            what: "WhatsApp is not configured for this tenant; PUT /v1/providers/whatsapp first"
                .into(),
        });
    }
    let mut tx = pool.begin().await?;
    let (campaign, recipients) =
        messages::start_sending(&mut tx, tenant, id, rate_per_sec, concurrency).await?;
    outbox::insert_many(&mut tx, tenant, &send_jobs(id, &recipients, rate_per_sec)?).await?;
    tx.commit().await?;
    Ok(campaign)
}

pub async fn pause(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Campaign, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let campaign = messages::pause(&mut tx, tenant, id).await?;
    tx.commit().await?;
    Ok(campaign)
}

/// Resumes a paused campaign and writes a send step for each pending recipient, paced from now.
pub async fn resume(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Campaign, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let (campaign, pending) = messages::resume(&mut tx, tenant, id).await?;
    outbox::insert_many(
        &mut tx,
        tenant,
        &send_jobs(id, &pending, rate_of(&campaign))?,
    )
    .await?;
    tx.commit().await?;
    Ok(campaign)
}

pub async fn stop(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Campaign, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let campaign = messages::stop(&mut tx, tenant, id).await?;
    tx.commit().await?;
    Ok(campaign)
}

/// Failed recipients back to pending, with their send steps written (unless paused).
/// Returns the campaign and how many recipients were put back.
pub async fn retry_failed(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<(Campaign, usize), herald_store::Error> {
    let mut tx = pool.begin().await?;
    let (campaign, to_send) = messages::retry_failed(&mut tx, tenant, id).await?;
    outbox::insert_many(
        &mut tx,
        tenant,
        &send_jobs(id, &to_send, rate_of(&campaign))?,
    )
    .await?;
    tx.commit().await?;
    Ok((campaign, to_send.len()))
}

// ---------------------------------------------------------------------------------------------
// Status webhooks

/// What a status webhook did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookOutcome {
    /// Events that moved a send forward.
    pub applied: u64,
    /// Events for a send already at or past their status (duplicates, late arrivals) or with a
    /// status herald does not track.
    pub ignored: u64,
    /// Events naming no send of this tenant.
    pub unmatched: u64,
}

fn status_of(name: &str) -> Option<SendStatus> {
    match name {
        "sent" => Some(SendStatus::Sent),
        "delivered" => Some(SendStatus::Delivered),
        "read" => Some(SendStatus::Read),
        "failed" => Some(SendStatus::Failed),
        _ => None,
    }
}

/// Applies the status events of a (verified) webhook body to the tenant's sends, each only
/// forward; the send is found by the send id in `biz_opaque_callback_data`, else by Meta's
/// message id. A body that is not a WhatsApp webhook is `Invalid`.
pub async fn apply_webhook(
    pool: &PgPool,
    tenant: TenantId,
    body: &[u8],
) -> Result<WebhookOutcome, herald_store::Error> {
    let events = meta::status_events(body).map_err(|reason| herald_store::Error::Invalid {
        field: "body",
        reason,
    })?;
    let mut outcome = WebhookOutcome::default();
    for event in events {
        let Some(status) = status_of(&event.status) else {
            outcome.ignored += 1;
            continue;
        };
        let first_error = event.errors.first();
        let change = StatusChange {
            send_id: event
                .biz_opaque_callback_data
                .as_deref()
                .and_then(|d| d.parse().ok()),
            provider_message_id: Some(event.id.clone()),
            error_code: first_error.map(|e| e.code.to_string()),
            error: first_error.map(|e| e.describe()),
        };
        match sends::apply(pool, tenant, messages::CHANNEL, status, &change).await? {
            Applied::Moved => outcome.applied += 1,
            Applied::Ignored => outcome.ignored += 1,
            Applied::NotFound => outcome.unmatched += 1,
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_url_comes_from_the_environment_or_defaults_to_meta() {
        assert_eq!(
            WhatsAppSettings::from_vars(|_| None).api_url,
            DEFAULT_API_URL
        );
        let settings = WhatsAppSettings::from_vars(|k| {
            (k == "WHATSAPP_API_URL").then(|| "http://127.0.0.1:9".to_owned())
        });
        assert_eq!(settings.api_url, "http://127.0.0.1:9");
        assert_eq!(status_of("delivered"), Some(SendStatus::Delivered));
        assert_eq!(status_of("deleted"), None);
    }

    #[test]
    fn campaigns_are_paced_two_percent_under_their_rate() {
        let slow = paced_limit(50).unwrap();
        assert_eq!(slow.interval(), Duration::from_micros(20_400));
        assert_eq!(slow.burst(), 13, "250 ms of tolerance in whole intervals");
        let fast = paced_limit(1_000).unwrap();
        assert_eq!(fast.interval(), Duration::from_micros(1_020));
        assert_eq!(fast.burst(), 246);
        assert_eq!(
            paced_limit(0).unwrap().interval(),
            Duration::from_micros(1_020_000)
        );
    }

    #[test]
    fn the_cap_admits_at_most_the_configured_rate_in_any_second_and_outpaces_the_slots() {
        for rate in [1, 3, 7, 50, 80, 333, 999, 1_000] {
            let cap = rate_cap(rate).unwrap();
            let interval = cap.interval().as_micros() as u64;
            let tolerance =
                interval * u64::from(cap.burst() - 1) + cap.lateness().as_micros() as u64;
            // rate + 1 admissions as close as the cap allows span a whole second.
            assert!(
                u64::from(rate) * interval - tolerance >= 1_000_000,
                "rate {rate}"
            );
            // The cap is faster than the slots, so steps late for their slots catch up.
            assert!(
                cap.interval() < paced_limit(rate).unwrap().interval(),
                "rate {rate}"
            );
        }
        let slow = rate_cap(50).unwrap();
        assert_eq!(slow.interval(), Duration::from_micros(20_200));
        assert_eq!(
            (slow.burst(), slow.lateness()),
            (1, Duration::from_millis(10))
        );
        assert_eq!(rate_cap(1_000).unwrap().burst(), 10);
    }
}
