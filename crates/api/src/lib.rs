//! herald-api: the HTTP service other services enqueue work through, and ops inspect queues
//! with. Everything is JSON under `/v1`; [`router`] is shared by the binary and the tests.
//!
//! The API validates and records work; it never runs a job handler and never waits on a
//! provider.

mod auth;
pub mod calls;
pub mod daily;
pub mod enqueue;
mod error;
mod extract;
mod handlers;
mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod sequences;
pub mod whatsapp;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodFilter, MethodRouter, on};
use herald_queue::Client;
use herald_store::PgPool;

pub use error::ApiError;
pub use metrics::Metrics;

use routes::{Access, Op, ROUTES};

/// How long a client is told to wait when Redis is over its memory high-water mark.
pub const BACKPRESSURE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a backpressure reading is reused, so a burst of enqueues costs one `INFO` call.
const BACKPRESSURE_CHECK_EVERY: Duration = Duration::from_millis(250);
/// The default request body limit.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// The default body limit of a profile import (`POST /v1/profiles`): about 1,000,000 profiles
/// of CSV.
pub const DEFAULT_IMPORT_BODY_LIMIT: usize = 64 * 1024 * 1024;
/// How often a campaign's event stream looks for a change by default.
pub const DEFAULT_EVENTS_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The API's own settings (the binary fills them from flags and the environment).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub body_limit: usize,
    /// A worker whose last heartbeat is older than this is not listed as live.
    pub worker_max_age: Duration,
    /// Largest profile import (`POST /v1/profiles`) accepted, in bytes.
    pub import_body_limit: usize,
    /// How often `GET /v1/campaigns/{id}/events` reads the campaign to see if it changed.
    pub events_poll_interval: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: DEFAULT_BODY_LIMIT,
            worker_max_age: Duration::from_secs(30),
            import_body_limit: DEFAULT_IMPORT_BODY_LIMIT,
            events_poll_interval: DEFAULT_EVENTS_POLL_INTERVAL,
        }
    }
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    queues: Client,
    config: ApiConfig,
    metrics: Metrics,
    /// The last backpressure reading: when it was taken and whether Redis was over the mark.
    backpressure: Mutex<Option<(Instant, bool)>>,
    /// Requests holding an idempotency lock: each holds one pooled connection for its whole
    /// run and needs another for its work, so at most half the pool may be held this way.
    idempotency_slots: tokio::sync::Semaphore,
}

impl AppState {
    pub fn new(pool: PgPool, queues: Client, config: ApiConfig) -> Self {
        let lock_slots = (pool.options().get_max_connections() / 2).max(1) as usize;
        Self {
            inner: Arc::new(Inner {
                idempotency_slots: tokio::sync::Semaphore::new(lock_slots),
                pool,
                queues,
                config,
                metrics: Metrics::new(),
                backpressure: Mutex::new(None),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn queues(&self) -> &Client {
        &self.inner.queues
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn idempotency_slots(&self) -> &tokio::sync::Semaphore {
        &self.inner.idempotency_slots
    }

    /// `Err(Backpressure)` while Redis memory is above the high-water mark. Readings are
    /// reused for a short while so a burst of enqueues does not ask Redis each time.
    pub async fn check_backpressure(&self) -> Result<(), ApiError> {
        let cached = self
            .inner
            .backpressure
            .lock()
            .ok()
            .and_then(|guard| *guard)
            .filter(|(at, _)| at.elapsed() < BACKPRESSURE_CHECK_EVERY)
            .map(|(_, over)| over);
        let over = match cached {
            Some(over) => over,
            None => {
                let over = match self.inner.queues.check_backpressure().await {
                    Ok(()) => false,
                    Err(herald_queue::Error::Backpressure { .. }) => true,
                    Err(other) => return Err(other.into()),
                };
                if let Ok(mut guard) = self.inner.backpressure.lock() {
                    *guard = Some((Instant::now(), over));
                }
                over
            }
        };
        if over {
            self.inner.metrics.backpressure_rejected();
            return Err(ApiError::Backpressure {
                retry_after: BACKPRESSURE_RETRY_AFTER,
            });
        }
        Ok(())
    }
}

/// The whole HTTP service: every route of [`routes::ROUTES`], JSON errors for unknown routes,
/// wrong methods and oversized bodies, request metrics.
pub fn router(state: AppState) -> Router {
    let mut public = Router::new();
    let mut protected = Router::new();
    // Profile imports take larger bodies than the rest of the API.
    let mut imports = Router::new();
    let mut mounted = HashSet::new();
    for route in ROUTES {
        let mount = route.mount_path();
        // Action routes share a mount (`{queue}:pause`, `{queue}:resume`); one handler
        // dispatches on the suffix, so it is mounted once.
        if !mounted.insert((mount.clone(), route.method)) {
            continue;
        }
        let method = MethodFilter::try_from(route.method()).unwrap_or(MethodFilter::GET);
        let handler = method_router(route.op, method);
        match route.access {
            Access::Public => public = public.route(&mount, handler),
            Access::Token
                if matches!(
                    route.op,
                    Op::ImportProfiles
                        | Op::ImportContacts
                        | Op::UploadCallCampaign
                        | Op::CreateMessageCampaign
                ) =>
            {
                imports = imports.route(&mount, handler)
            }
            Access::Token => protected = protected.route(&mount, handler),
        }
    }
    let body_limit = state.config().body_limit;
    let import_body_limit = state.config().import_body_limit;
    // The import router's own limit is set outside its idempotency layer, so a recorded
    // import reads its body under the same limit as the handler does.
    let imports =
        with_token_layers(imports, &state).layer(DefaultBodyLimit::max(import_body_limit));
    let protected = with_token_layers(protected, &state);
    Router::new()
        .merge(public)
        .merge(protected)
        .merge(imports)
        .fallback(handlers::route_not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track_request,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Authentication, then `Idempotency-Key` handling, around every route of `router`.
fn with_token_layers(router: Router<AppState>, state: &AppState) -> Router<AppState> {
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::replay_or_record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
}

fn method_router(op: Op, method: MethodFilter) -> MethodRouter<AppState> {
    use handlers as h;
    match op {
        Op::Healthz => on(method, h::healthz),
        Op::Readyz => on(method, h::readyz),
        Op::Metrics => on(method, h::metrics),
        Op::OpenApi => on(method, h::openapi),
        Op::ListQueues => on(method, h::list_queues),
        Op::GetQueue => on(method, h::get_queue),
        Op::PauseQueue | Op::ResumeQueue => on(method, h::queue_action),
        Op::Enqueue => on(method, h::enqueue),
        Op::EnqueueBatch => on(method, h::enqueue_batch),
        Op::GetJob => on(method, h::get_job),
        Op::ListDead => on(method, h::list_dead),
        Op::RetryDead => on(method, h::dead_action),
        Op::DiscardDead => on(method, h::discard_dead),
        Op::ListWorkers => on(method, h::list_workers),
        Op::GetAllowedHosts => on(method, h::get_allowed_hosts),
        Op::PutAllowedHosts => on(method, h::put_allowed_hosts),
        Op::ImportProfiles => on(method, daily::import_profiles),
        Op::ProfileStats => on(method, daily::profile_stats),
        Op::StartDaily => on(method, daily::start_daily),
        Op::ListCampaigns => on(method, daily::list_campaigns),
        Op::GetCampaign => on(method, daily::get_campaign),
        Op::CampaignEvents => on(method, daily::campaign_events),
        Op::ResumeCampaign => on(method, daily::resume_campaign),
        Op::Cleanup => on(method, daily::cleanup),
        Op::CreateCallUser => on(method, calls::create_user),
        Op::CreateCallAgent => on(method, calls::create_agent),
        Op::RemoveCallAgent => on(method, calls::remove_agent),
        Op::ImportContacts => on(method, calls::import_contacts),
        Op::DeleteContact => on(method, calls::delete_contact),
        Op::PutVoiceProvider => on(method, calls::put_voice_provider),
        Op::CreateCallCampaign => on(method, calls::create_campaign),
        Op::UploadCallCampaign => on(method, calls::upload_campaign),
        Op::CallCampaignTemplate => on(method, calls::template),
        Op::ListCallCampaigns => on(method, calls::list_campaigns),
        Op::GetCallCampaign => on(method, calls::get_campaign),
        Op::UpdateCallCampaign => on(method, calls::update_campaign),
        Op::CallCampaignStats => on(method, calls::campaign_stats),
        Op::ListCampaignCalls => on(method, calls::list_calls),
        Op::GetCall => on(method, calls::get_call),
        Op::PauseCallCampaign | Op::ResumeCallCampaign | Op::CancelCallCampaign => {
            on(method, calls::campaign_action)
        }
        Op::DeleteCallCampaign => on(method, calls::delete_campaign),
        Op::VoiceWebhook => on(method, calls::voice_webhook),
        Op::CreateTemplate => on(method, whatsapp::create_template),
        Op::TemplateSampleCsv => on(method, whatsapp::sample_csv),
        Op::PutWhatsAppProvider => on(method, whatsapp::put_provider),
        Op::CreateMessageCampaign => on(method, whatsapp::create_campaign),
        Op::GetMessageCampaign => on(method, whatsapp::get_campaign),
        Op::MessageCampaignStats => on(method, whatsapp::campaign_stats),
        Op::SendMessageCampaign => on(method, whatsapp::send_campaign),
        Op::PauseMessageCampaign => on(method, whatsapp::pause_campaign),
        Op::ResumeMessageCampaign => on(method, whatsapp::resume_campaign),
        Op::StopMessageCampaign => on(method, whatsapp::stop_campaign),
        Op::RetryFailedMessages => on(method, whatsapp::retry_failed),
        Op::FailedMessagesCsv => on(method, whatsapp::failed_csv),
        Op::WhatsAppWebhookVerify => on(method, whatsapp::verify_webhook),
        Op::WhatsAppWebhook => on(method, whatsapp::status_webhook),
        Op::CreateSequence => on(method, sequences::create),
        Op::ListSequences => on(method, sequences::list),
        Op::GetSequence => on(method, sequences::get),
        Op::SequenceStats => on(method, sequences::stats),
        Op::AddSequenceLeads => on(method, sequences::add_leads),
        Op::StartSequence => on(method, sequences::start),
        Op::PauseSequence => on(method, sequences::pause),
        Op::StopSequence => on(method, sequences::stop),
        Op::SequenceLead => on(method, sequences::lead_timeline),
        Op::SequenceWebhook => on(method, sequences::inbound_webhook),
        Op::LoadLeadPool => on(method, sequences::load_pool),
        Op::GetLeadPool => on(method, sequences::get_pool),
        Op::PutEmailProvider => on(method, sequences::put_email_provider),
        Op::PutLinkedinProvider => on(method, sequences::put_linkedin_provider),
        Op::PutInstagramProvider => on(method, sequences::put_instagram_provider),
    }
}
