//! WhatsApp template campaigns: the `whatsapp_send` job (one send step per recipient) and the
//! library calls the API uses to start, pause, resume, stop and retry a campaign and to apply
//! Meta's status webhooks.
//!
//! A send step is admitted by the fleet-wide rate limiter (per tenant and sender number, at the
//! campaign's rate) and never sleeps: a refusal defers the job without spending an attempt.
//! It records the send as `attempting` (with its send id, see `herald_store::sends`) before it
//! calls Meta and the message id after; a job re-delivered between the two marks the send
//! `unknown` instead of sending again, and the status webhooks (which carry the send id in
//! `biz_opaque_callback_data`) settle it. Throttling answers (130429, 131056, HTTP 429) undo
//! the attempt and defer the job: they are never failures.
//!
//! The handler is a thin wrapper over [`run_send`], which tests call directly.

use std::time::Duration;

use apalis_core::task::data::Data;
use herald_admission::{Admission, Connection, Limit, LimitKey, RateLimiter};
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
use sqlx::PgPool;
use uuid::Uuid;

use crate::Deps;

/// How long a send step waits when its campaign already has `concurrency` sends in flight.
pub const BUSY_WAIT: Duration = Duration::from_millis(50);

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

/// WhatsApp for the handlers: the client, the default API URL and the fleet-wide limiter.
#[derive(Clone, Debug)]
pub struct WhatsApp {
    client: WhatsAppClient,
    limiter: RateLimiter,
    default_api_url: String,
    /// An `attempting` send older than this no longer counts against the campaign's
    /// concurrency: its job died and its re-delivery will mark it unknown.
    stale: Duration,
}

impl WhatsApp {
    /// `limiter`'s hash tag should be [`WhatsAppSend::QUEUE`] (see [`WhatsApp::connect`]).
    pub fn new(http: reqwest::Client, settings: &WhatsAppSettings, limiter: RateLimiter) -> Self {
        Self {
            client: WhatsAppClient::new(http, settings.timeout),
            limiter,
            default_api_url: settings.api_url.clone(),
            stale: WhatsAppSend::TIMEOUT * 2,
        }
    }

    /// Connects the limiter to Redis (`REDIS_URL`) under the queues' `namespace`.
    pub async fn connect(
        http: reqwest::Client,
        settings: &WhatsAppSettings,
        redis_url: &str,
        namespace: &str,
    ) -> Result<Self, herald_admission::Error> {
        let conn = Connection::connect(redis_url).await?;
        let limiter = RateLimiter::new(conn, namespace, WhatsAppSend::QUEUE)?;
        Ok(Self::new(http, settings, limiter))
    }

    /// Sends one template message from the tenant's account, outside any campaign (a
    /// sequence's `whatsapp_send` step); the caller records the attempt first.
    pub(crate) async fn send_from(
        &self,
        settings: &messages::WhatsAppSettings,
        message: &TemplateMessage,
    ) -> Result<String, meta::Error> {
        let account = Account {
            api_url: settings
                .api_url
                .clone()
                .unwrap_or_else(|| self.default_api_url.clone()),
            token: SecretString::from(settings.token.clone()),
            phone_number_id: settings.phone_number_id.clone(),
        };
        self.client.send_template(&account, message).await
    }

    /// The rate limit of one tenant's sender number at `rate_per_sec`.
    fn sender_key(
        &self,
        tenant: TenantId,
        phone_number_id: &str,
        rate_per_sec: u32,
    ) -> Result<LimitKey, herald_admission::Error> {
        self.limiter.key(
            &format!("whatsapp:{tenant}:{phone_number_id}"),
            Limit::per_second(f64::from(rate_per_sec))?,
        )
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
    run_send(
        &deps,
        meta.tenant,
        meta.id.as_str(),
        &job,
        meta.is_last_attempt(),
    )
    .await
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
    pool: &PgPool,
    tenant: TenantId,
    send_id: Uuid,
    status: SendStatus,
    change: StatusChange,
) -> Result<(), JobError> {
    let change = StatusChange {
        send_id: Some(send_id),
        ..change
    };
    sends::apply(pool, tenant, messages::CHANNEL, status, &change)
        .await
        .map_err(store_error)?;
    Ok(())
}

/// One send step, `job_id` being the job's id (re-deliveries share it):
/// - the recipient already has a send: if it is this job's and still `attempting`, the job died
///   between the attempt and its record, so the send becomes `unknown` (never sent again);
///   otherwise there is nothing to do;
/// - the campaign is paused or stopped: the recipient stays pending (resuming writes new jobs);
/// - the limiter refuses (tenant and sender number at the campaign's rate) or the campaign has
///   `concurrency` sends in flight: deferred, no attempt spent;
/// - otherwise the send is recorded `attempting`, Meta is called, and the answer recorded:
///   accepted → `sent` with Meta's message id; throttled → attempt undone, the number held back
///   (130429, 429) and the job deferred; refused → `failed` with Meta's code; no answer →
///   `unknown`; Meta unreachable or 5xx → attempt undone and retried (recorded `failed` on the
///   last attempt).
pub async fn run_send(
    deps: &Deps,
    tenant: TenantId,
    job_id: &str,
    job: &WhatsAppSend,
    last_attempt: bool,
) -> Result<(), JobError> {
    let pool = &deps.pool;
    let ctx = messages::send_context(pool, tenant, job.campaign_id, job.recipient_id)
        .await
        .map_err(store_error)?;
    if let Some(send) = &ctx.send {
        if send.status == SendStatus::Attempting && send.job_id == job_id {
            sends::mark_unknown(pool, tenant, send.id)
                .await
                .map_err(store_error)?;
            tracing::warn!(%tenant, campaign = %job.campaign_id, recipient = %job.recipient_id,
                send = %send.id, "send step re-delivered after its attempt: marked unknown, not resent");
            complete_if_done(pool, tenant, job.campaign_id).await?;
        }
        return Ok(());
    }
    if !matches!(
        ctx.campaign_status,
        CampaignStatus::Sending | CampaignStatus::Completed
    ) {
        return Ok(());
    }
    let Some(settings) = ctx.settings.clone() else {
        return Err(JobError::retry(
            "WhatsApp is not configured for this tenant (PUT /v1/providers/whatsapp)",
        ));
    };
    let whatsapp = deps.whatsapp.as_deref().ok_or_else(|| {
        JobError::retry("WhatsApp is not configured on this worker (WHATSAPP_API_URL)")
    })?;
    let key = whatsapp
        .sender_key(tenant, &settings.phone_number_id, ctx.rate_per_sec)
        .map_err(|e| JobError::permanent(format!("rate limit: {e}")))?;
    match whatsapp.limiter.admit(std::slice::from_ref(&key)).await {
        Ok(Admission::Admitted) => {}
        Ok(Admission::WaitUntil(until_ms)) => {
            return Err(JobError::defer_until(
                format!(
                    "rate limit: WhatsApp number {} is at {} msg/s",
                    settings.phone_number_id, ctx.rate_per_sec
                ),
                until_ms,
            ));
        }
        Err(e) => return Err(JobError::retry(format!("rate limiter unavailable: {e}"))),
    }
    let send_id = match messages::begin_send(
        pool,
        tenant,
        job.campaign_id,
        job.recipient_id,
        job_id,
        whatsapp.stale,
    )
    .await
    .map_err(store_error)?
    {
        Begin::Started(send_id) => send_id,
        Begin::Busy => {
            return Err(JobError::defer_until(
                format!(
                    "concurrency: campaign {} has {} sends in flight",
                    job.campaign_id, ctx.concurrency
                ),
                until(BUSY_WAIT),
            ));
        }
        Begin::Taken | Begin::NotSending(_) => return Ok(()),
    };
    let account = Account {
        api_url: settings
            .api_url
            .clone()
            .unwrap_or_else(|| whatsapp.default_api_url.clone()),
        token: SecretString::from(settings.token.clone()),
        phone_number_id: settings.phone_number_id.clone(),
    };
    let message = message_for(&ctx, send_id);
    let outcome = whatsapp.client.send_template(&account, &message).await;
    let undo = || async {
        messages::abandon_send(pool, tenant, job.recipient_id, send_id)
            .await
            .map_err(store_error)
    };
    match outcome {
        Ok(wamid) => {
            settle(
                pool,
                tenant,
                send_id,
                SendStatus::Sent,
                StatusChange {
                    provider_message_id: Some(wamid),
                    ..StatusChange::default()
                },
            )
            .await?;
        }
        Err(meta::Error::Throttled { kind, wait, code }) => {
            undo().await?;
            let until_ms = until(wait);
            if kind != Throttle::Pair
                && let Err(e) = whatsapp.limiter.hold(&key, until_ms).await
            {
                tracing::warn!(error = %e, "holding a throttled WhatsApp number back failed");
            }
            return Err(JobError::defer_until(
                format!("rate limit: WhatsApp throttled the send ({kind:?}, code {code:?})"),
                until_ms,
            ));
        }
        Err(error @ (meta::Error::Rejected { .. } | meta::Error::Unauthorized { .. })) => {
            settle(
                pool,
                tenant,
                send_id,
                SendStatus::Failed,
                StatusChange {
                    error_code: error.code(),
                    error: Some(error.to_string()),
                    ..StatusChange::default()
                },
            )
            .await?;
        }
        Err(error @ meta::Error::Ambiguous(_)) => {
            sends::mark_unknown(pool, tenant, send_id)
                .await
                .map_err(store_error)?;
            tracing::warn!(%tenant, send = %send_id, %error, "WhatsApp send outcome unknown; left to status webhooks");
        }
        Err(error @ (meta::Error::NotSent(_) | meta::Error::Server { .. })) => {
            if last_attempt {
                settle(
                    pool,
                    tenant,
                    send_id,
                    SendStatus::Failed,
                    StatusChange {
                        error_code: error.code(),
                        error: Some(error.to_string()),
                        ..StatusChange::default()
                    },
                )
                .await?;
                complete_if_done(pool, tenant, job.campaign_id).await?;
            } else {
                undo().await?;
            }
            return Err(JobError::retry(error.to_string()));
        }
    }
    complete_if_done(pool, tenant, job.campaign_id).await
}

async fn complete_if_done(pool: &PgPool, tenant: TenantId, campaign: Uuid) -> Result<(), JobError> {
    if messages::complete_if_done(pool, tenant, campaign)
        .await
        .map_err(store_error)?
    {
        tracing::info!(%tenant, %campaign, "message campaign complete");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Campaign control: library calls for the API

fn send_jobs(
    campaign: Uuid,
    recipients: &[Uuid],
) -> Result<Vec<NewOutboxJob>, herald_store::Error> {
    recipients
        .iter()
        .map(|recipient_id| {
            NewOutboxJob::for_payload(&WhatsAppSend {
                campaign_id: campaign,
                recipient_id: *recipient_id,
            })
        })
        .collect()
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
    outbox::insert_many(&mut tx, tenant, &send_jobs(id, &recipients)?).await?;
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

/// Resumes a paused campaign and writes a send step for each pending recipient.
pub async fn resume(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Campaign, herald_store::Error> {
    let mut tx = pool.begin().await?;
    let (campaign, pending) = messages::resume(&mut tx, tenant, id).await?;
    outbox::insert_many(&mut tx, tenant, &send_jobs(id, &pending)?).await?;
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
    outbox::insert_many(&mut tx, tenant, &send_jobs(id, &to_send)?).await?;
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
}
