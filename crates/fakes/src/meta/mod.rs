//! A local WhatsApp Cloud API (Meta) fake that follows Meta's documented behaviour (see
//! DESIGN.md, "Providers: facts the fakes must follow").
//!
//! What it does, like Meta:
//! - `POST /v21.0/{phone_number_id}/messages` with a bearer token and a template payload answers
//!   `{"messaging_product":"whatsapp","contacts":[…],"messages":[{"id":"wamid…"}]}`;
//! - a sliding one-second window per sender number (80 msg/s by default): over it the request
//!   is refused with error 130429 in Meta's error shape, and a pair limit (one message per
//!   6 s to the same user by default) refused with 131056; refused requests send nothing;
//! - a missing or unknown token is 401 with OAuth error 190; a payload without the template
//!   fields is 400 with error 100.
//!
//! For tests: every accepted message is recorded with the instant it was accepted
//! ([`MetaFake::messages`]), counters ([`MetaFake::stats`]), faults for the next requests
//! ([`Fault`]) or spread through a run ([`RecurringFaults`]), answers held back on demand
//! ([`MetaFakeState::hold_answers`]: the message is sent, the client cannot know it), and status
//! webhooks sent back to herald signed with the app secret, either on demand
//! ([`MetaFake::send_statuses`], optionally shuffled and duplicated) or on their own after each
//! accepted message ([`StatusWebhooks`]: random delays, so out of order, and duplicates). The same
//! inspection is served under `/__fake/messages` and `/__fake/stats`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use rand::Rng as _;
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the fake behaves; the defaults are Meta's.
#[derive(Clone, Debug)]
pub struct MetaFakeConfig {
    /// Messages per second per sender number; 0 means unlimited.
    pub per_number_mps: u32,
    /// The least spacing between two messages to the same user from one number; zero: none.
    pub pair_interval: Duration,
    /// Accepted bearer tokens; empty accepts any non-empty token.
    pub tokens: Vec<String>,
    /// Faults spread through a run (none by default).
    pub recurring_faults: Option<RecurringFaults>,
}

impl Default for MetaFakeConfig {
    fn default() -> Self {
        Self {
            per_number_mps: 80,
            pair_interval: Duration::from_secs(6),
            tokens: Vec::new(),
            recurring_faults: None,
        }
    }
}

/// Faults spread through a run: every `every`-th well-formed, authorised request (counted from
/// the fake's start) is answered with the next fault of `cycle`, round and round. Faults queued
/// with [`MetaFakeState::inject`] come first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecurringFaults {
    pub every: u64,
    pub cycle: Vec<Fault>,
}

/// A fault answered instead of the next requests' normal outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Error 130429 (throughput), nothing sent.
    Throughput,
    /// Error 131056 (pair rate limit), nothing sent.
    PairRate,
    /// HTTP 429 with `Retry-After: 1`, nothing sent.
    TooManyRequests,
    /// HTTP 500, nothing sent.
    ServerError,
    /// The message is accepted and recorded, then the answer is held back this long (longer
    /// than the client's timeout: the client cannot know it was sent).
    AcceptThenStall(Duration),
}

/// A message the fake accepted.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SentMessage {
    pub wamid: String,
    /// Milliseconds since the fake started.
    pub at_ms: u64,
    pub phone_number_id: String,
    pub to: String,
    pub template: String,
    pub language: String,
    /// `biz_opaque_callback_data`, herald's send id.
    pub callback_data: Option<String>,
    pub payload: Value,
}

/// Request counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub accepted: u64,
    /// Refused with 130429 (window overflow or injected).
    pub throughput_errors: u64,
    /// Refused with 131056.
    pub pair_rate_errors: u64,
    /// Answered HTTP 429.
    pub too_many_requests: u64,
    pub server_errors: u64,
    pub unauthorized: u64,
    pub rejected: u64,
    /// Status events posted by [`StatusWebhooks`] (each copy counts), the requests that carried
    /// them, and the requests herald did not answer 2xx (their events are posted again).
    pub webhook_events: u64,
    pub webhook_requests: u64,
    pub webhook_failures: u64,
}

impl Stats {
    /// Every throttling refusal, whatever its code.
    pub fn throttled(&self) -> u64 {
        self.throughput_errors + self.pair_rate_errors + self.too_many_requests
    }
}

/// The statuses an accepted message goes through, in Meta's order (e.g. `["sent",
/// "delivered", "read"]` or `["sent", "failed"]`); empty: no webhook for it.
pub type StatusPath = Arc<dyn Fn(&SentMessage) -> Vec<&'static str> + Send + Sync>;

/// Status webhooks the fake posts on its own after each accepted message, as Meta does: each
/// event after a random delay of its own (so a later status may overtake an earlier one), some
/// twice, several events per request, signed with the app secret. A request herald does not
/// answer 2xx is posted again half a second later, as Meta retries.
#[derive(Clone)]
pub struct StatusWebhooks {
    pub target: WebhookTarget,
    pub path: StatusPath,
    /// Each event is posted this long after its message was accepted, chosen per event.
    pub delay: RangeInclusive<Duration>,
    /// The chance (0.0 to 1.0) that an event is posted a second time, with a delay of its own.
    pub duplicate: f64,
    /// Most events per request.
    pub batch: usize,
}

impl StatusWebhooks {
    /// Every event once, within 200 ms, 50 per request.
    pub fn new(target: WebhookTarget, path: StatusPath) -> Self {
        Self {
            target,
            path,
            delay: Duration::ZERO..=Duration::from_millis(200),
            duplicate: 0.0,
            batch: 50,
        }
    }
}

impl std::fmt::Debug for StatusWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWebhooks")
            .field("target", &self.target.url)
            .field("delay", &self.delay)
            .field("duplicate", &self.duplicate)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// A status event waiting for its instant.
#[derive(Debug)]
struct PendingEvent {
    due: Instant,
    phone_number_id: String,
    event: Value,
}

#[derive(Debug)]
struct Inner {
    config: MetaFakeConfig,
    started: Instant,
    windows: HashMap<String, VecDeque<Instant>>,
    last_to_pair: HashMap<(String, String), Instant>,
    messages: Vec<SentMessage>,
    faults: VecDeque<Fault>,
    stats: Stats,
    /// Answers waiting for [`MetaFakeState::release_answers`].
    held: usize,
    webhooks: Option<StatusWebhooks>,
    webhooks_paused: bool,
    pending_events: Vec<PendingEvent>,
    /// Events taken for posting and not yet answered.
    posting_events: usize,
}

impl Inner {
    /// The recurring fault due for the request just counted, if any.
    fn recurring_fault(&self) -> Option<Fault> {
        let plan = self.config.recurring_faults.as_ref()?;
        let requests = self.stats.requests;
        if plan.every == 0 || plan.cycle.is_empty() || !requests.is_multiple_of(plan.every) {
            return None;
        }
        let turn = (requests / plan.every - 1) % plan.cycle.len() as u64;
        plan.cycle.get(turn as usize).copied()
    }
}

/// The fake's shared state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaFakeState {
    inner: Arc<Mutex<Inner>>,
    /// `true` while answers are held back.
    holding: Arc<watch::Sender<bool>>,
}

enum Outcome {
    /// Sent; answer after the stall, if any, and after the hold, if `held`.
    Accepted {
        message: Box<SentMessage>,
        stall: Option<Duration>,
        held: bool,
    },
    Refused(Response),
}

/// Gives a held answer back to the count when its request ends, answered or dropped.
struct HeldAnswer(MetaFakeState);

impl Drop for HeldAnswer {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.held = inner.held.saturating_sub(1);
    }
}

fn meta_error(status: StatusCode, code: i64, message: &str, details: &str) -> Response {
    let body = json!({"error": {
        "message": format!("(#{code}) {message}"),
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details},
        "fbtrace_id": "fake"
    }});
    (status, Json(body)).into_response()
}

fn throughput_error() -> Response {
    meta_error(
        StatusCode::BAD_REQUEST,
        130_429,
        "Rate limit hit",
        "Cloud API message throughput has been reached.",
    )
}

fn pair_rate_error() -> Response {
    meta_error(
        StatusCode::BAD_REQUEST,
        131_056,
        "(Business Account, Consumer Account) pair rate limit hit",
        "Too many messages sent from the sender phone number to the same recipient phone number in a short period of time.",
    )
}

impl MetaFakeState {
    pub fn new(config: MetaFakeConfig) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                config,
                started: Instant::now(),
                windows: HashMap::new(),
                last_to_pair: HashMap::new(),
                messages: Vec::new(),
                faults: VecDeque::new(),
                stats: Stats::default(),
                held: 0,
                webhooks: None,
                webhooks_paused: false,
                pending_events: Vec::new(),
                posting_events: 0,
            })),
            holding: Arc::new(watch::channel(false).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind (every update is one
        // step), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every accepted message, in the order accepted.
    pub fn messages(&self) -> Vec<SentMessage> {
        self.lock().messages.clone()
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// Answers the next requests with `faults`, one each, before normal behaviour resumes.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Changes the per-number limit while running (0: unlimited).
    pub fn set_per_number_mps(&self, mps: u32) {
        self.lock().config.per_number_mps = mps;
    }

    /// From now on, accepted messages are sent (recorded, counted, their webhooks scheduled) but
    /// their answers wait until [`release_answers`](Self::release_answers): a client that dies
    /// meanwhile cannot know its message went out.
    pub fn hold_answers(&self) {
        self.holding.send_replace(true);
    }

    /// Answers every held request and stops holding.
    pub fn release_answers(&self) {
        self.holding.send_replace(false);
    }

    /// Requests whose message was sent and whose answer is held right now.
    pub fn held_answers(&self) -> usize {
        self.lock().held
    }

    /// Posts status webhooks on their own after each message accepted from now on (`None`:
    /// stops, and forgets events not yet posted). Needs the running server ([`spawn`]).
    pub fn set_status_webhooks(&self, webhooks: Option<StatusWebhooks>) {
        let mut inner = self.lock();
        if webhooks.is_none() {
            inner.pending_events.clear();
        }
        inner.webhooks = webhooks;
    }

    /// While paused, status events are kept (and their instants pass); resuming posts the due
    /// ones at once.
    pub fn pause_status_webhooks(&self, paused: bool) {
        self.lock().webhooks_paused = paused;
    }

    /// Status events scheduled and not yet answered 2xx by herald.
    pub fn status_webhooks_pending(&self) -> usize {
        let inner = self.lock();
        inner.pending_events.len() + inner.posting_events
    }

    /// Schedules the status events of a message just accepted.
    fn schedule_statuses(inner: &mut Inner, message: &SentMessage, now: Instant) {
        let Some(webhooks) = &inner.webhooks else {
            return;
        };
        let path = (webhooks.path)(message);
        let (low, high) = (*webhooks.delay.start(), *webhooks.delay.end());
        let duplicate = webhooks.duplicate.clamp(0.0, 1.0);
        let accepted_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut rng = rand::thread_rng();
        let mut delay = || {
            if high > low {
                rng.gen_range(low..=high)
            } else {
                low
            }
        };
        let mut scheduled = Vec::new();
        for (step, status) in path.iter().enumerate() {
            let event = status_event(message, status, accepted_unix + step as u64);
            scheduled.push(PendingEvent {
                due: now + delay(),
                phone_number_id: message.phone_number_id.clone(),
                event: event.clone(),
            });
            if duplicate > 0.0 && rand::thread_rng().gen_bool(duplicate) {
                scheduled.push(PendingEvent {
                    due: now + delay(),
                    phone_number_id: message.phone_number_id.clone(),
                    event,
                });
            }
        }
        inner.pending_events.extend(scheduled);
    }

    /// The events due by `now` (none while paused), in random order, with where to post them.
    fn take_due_events(&self, now: Instant) -> Option<(StatusWebhooks, Vec<PendingEvent>)> {
        let mut inner = self.lock();
        if inner.webhooks_paused || inner.pending_events.is_empty() {
            return None;
        }
        let webhooks = inner.webhooks.clone()?;
        let (mut due, later): (Vec<PendingEvent>, Vec<PendingEvent>) =
            inner.pending_events.drain(..).partition(|e| e.due <= now);
        inner.pending_events = later;
        if due.is_empty() {
            return None;
        }
        inner.posting_events += due.len();
        due.shuffle(&mut rand::thread_rng());
        Some((webhooks, due))
    }

    /// Records a posted request: answered 2xx, or its events go back for another try.
    fn posted(&self, mut events: Vec<PendingEvent>, ok: bool) {
        let mut inner = self.lock();
        inner.posting_events = inner.posting_events.saturating_sub(events.len());
        inner.stats.webhook_requests += 1;
        if ok {
            inner.stats.webhook_events += events.len() as u64;
        } else {
            inner.stats.webhook_failures += 1;
            if inner.webhooks.is_some() {
                let retry_at = Instant::now() + WEBHOOK_RETRY;
                for event in &mut events {
                    event.due = retry_at;
                }
                inner.pending_events.extend(events);
            }
        }
    }

    fn handle(&self, phone_number_id: &str, token: Option<&str>, body: &[u8]) -> Outcome {
        let mut inner = self.lock();
        inner.stats.requests += 1;
        let token_ok = token.is_some_and(|t| {
            !t.is_empty()
                && (inner.config.tokens.is_empty() || inner.config.tokens.iter().any(|k| k == t))
        });
        if !token_ok {
            inner.stats.unauthorized += 1;
            return Outcome::Refused(meta_error(
                StatusCode::UNAUTHORIZED,
                190,
                "Invalid OAuth access token - Cannot parse access token",
                "Invalid OAuth access token",
            ));
        }
        let payload: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let to = payload["to"].as_str().unwrap_or_default().to_owned();
        let template = payload["template"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let language = payload["template"]["language"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let well_formed = payload["messaging_product"] == "whatsapp"
            && payload["type"] == "template"
            && !to.is_empty()
            && to.bytes().all(|b| b.is_ascii_digit())
            && !template.is_empty()
            && !language.is_empty();
        if !well_formed {
            inner.stats.rejected += 1;
            return Outcome::Refused(meta_error(
                StatusCode::BAD_REQUEST,
                100,
                "Invalid parameter",
                "messaging_product, to, type=template, template.name and template.language.code are required",
            ));
        }
        let now = Instant::now();
        let mut stall = None;
        let fault = match inner.faults.pop_front() {
            Some(fault) => Some(fault),
            None => inner.recurring_fault(),
        };
        match fault {
            Some(Fault::Throughput) => {
                inner.stats.throughput_errors += 1;
                return Outcome::Refused(throughput_error());
            }
            Some(Fault::PairRate) => {
                inner.stats.pair_rate_errors += 1;
                return Outcome::Refused(pair_rate_error());
            }
            Some(Fault::TooManyRequests) => {
                inner.stats.too_many_requests += 1;
                let mut response = meta_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    80_007,
                    "Rate limit issues",
                    "The WhatsApp Business Account has reached its rate limit.",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                return Outcome::Refused(response);
            }
            Some(Fault::ServerError) => {
                inner.stats.server_errors += 1;
                return Outcome::Refused(meta_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    131_000,
                    "Something went wrong",
                    "injected by the fake",
                ));
            }
            Some(Fault::AcceptThenStall(wait)) => stall = Some(wait),
            None => {}
        }
        let limit = inner.config.per_number_mps;
        let window = inner.windows.entry(phone_number_id.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if limit > 0 && window.len() >= limit as usize {
            inner.stats.throughput_errors += 1;
            return Outcome::Refused(throughput_error());
        }
        let pair = (phone_number_id.to_owned(), to.clone());
        let pair_interval = inner.config.pair_interval;
        if !pair_interval.is_zero()
            && inner
                .last_to_pair
                .get(&pair)
                .is_some_and(|t| now.duration_since(*t) < pair_interval)
        {
            inner.stats.pair_rate_errors += 1;
            return Outcome::Refused(pair_rate_error());
        }
        inner
            .windows
            .entry(phone_number_id.to_owned())
            .or_default()
            .push_back(now);
        inner.last_to_pair.insert(pair, now);
        inner.stats.accepted += 1;
        let message = SentMessage {
            wamid: format!("wamid.fake{:010}", inner.messages.len() + 1),
            at_ms: now.duration_since(inner.started).as_millis() as u64,
            phone_number_id: phone_number_id.to_owned(),
            to,
            template,
            language,
            callback_data: payload["biz_opaque_callback_data"]
                .as_str()
                .map(str::to_owned),
            payload,
        };
        Self::schedule_statuses(&mut inner, &message, now);
        inner.messages.push(message.clone());
        let held = *self.holding.borrow();
        if held {
            inner.held += 1;
        }
        Outcome::Accepted {
            message: Box::new(message),
            stall,
            held,
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

async fn send_message(
    State(state): State<MetaFakeState>,
    Path((version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if version != "v21.0" {
        return meta_error(
            StatusCode::BAD_REQUEST,
            2_635,
            "Unsupported version",
            "the fake speaks v21.0",
        );
    }
    match state.handle(&phone_number_id, bearer_token(&headers), &body) {
        Outcome::Refused(response) => response,
        Outcome::Accepted {
            message,
            stall,
            held,
        } => {
            if held {
                let _held = HeldAnswer(state.clone());
                let mut holding = state.holding.subscribe();
                let _ = holding.wait_for(|holding| !*holding).await;
            }
            if let Some(wait) = stall {
                tokio::time::sleep(wait).await;
            }
            Json(json!({
                "messaging_product": "whatsapp",
                "contacts": [{"input": message.to, "wa_id": message.to}],
                "messages": [{"id": message.wamid, "message_status": "accepted"}]
            }))
            .into_response()
        }
    }
}

/// The fake's HTTP surface: Meta's messages route and the `/__fake` inspection routes.
pub fn router(state: MetaFakeState) -> Router {
    Router::new()
        .route("/{version}/{phone_number_id}/messages", post(send_message))
        .route(
            "/__fake/messages",
            get(|State(s): State<MetaFakeState>| async move { Json(json!(s.messages())) }),
        )
        .route(
            "/__fake/stats",
            get(|State(s): State<MetaFakeState>| async move { Json(json!(s.stats())) }),
        )
        .with_state(state)
}

/// How often the poster looks for due status events.
const WEBHOOK_TICK: Duration = Duration::from_millis(10);
/// How long status events herald did not take wait before they are posted again.
const WEBHOOK_RETRY: Duration = Duration::from_millis(500);
/// How long one webhook request may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Posts the status events [`StatusWebhooks`] scheduled, as they fall due, until aborted.
async fn post_status_webhooks(state: MetaFakeState, http: reqwest::Client) {
    let mut tick = tokio::time::interval(WEBHOOK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some((webhooks, due)) = state.take_due_events(Instant::now()) else {
            continue;
        };
        let mut by_number: HashMap<String, Vec<PendingEvent>> = HashMap::new();
        for event in due {
            by_number
                .entry(event.phone_number_id.clone())
                .or_default()
                .push(event);
        }
        for (number, mut events) in by_number {
            while !events.is_empty() {
                let rest = events.split_off(webhooks.batch.max(1).min(events.len()));
                let chunk = std::mem::replace(&mut events, rest);
                let statuses: Vec<Value> = chunk.iter().map(|e| e.event.clone()).collect();
                let body = webhook_body(&number, &statuses).to_string();
                let ok = http
                    .post(&webhooks.target.url)
                    .timeout(WEBHOOK_TIMEOUT)
                    .header("content-type", "application/json")
                    .header(
                        "x-hub-signature-256",
                        signature(&webhooks.target.app_secret, body.as_bytes()),
                    )
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                state.posted(chunk, ok);
            }
        }
    }
}

/// How status webhooks are sent back.
#[derive(Clone, Debug)]
pub struct StatusPlan {
    /// Events per webhook request.
    pub batch: usize,
    /// Shuffle the events across the whole run (out of order).
    pub shuffle: bool,
    /// Send every event this many times (1: once).
    pub copies: usize,
}

impl Default for StatusPlan {
    fn default() -> Self {
        Self {
            batch: 50,
            shuffle: false,
            copies: 1,
        }
    }
}

/// Where herald receives webhooks.
#[derive(Clone, Debug)]
pub struct WebhookTarget {
    /// e.g. `http://127.0.0.1:8080/v1/webhooks/whatsapp/{tenant_id}`.
    pub url: String,
    pub app_secret: String,
}

/// A status event of `message` in Meta's shape; `failed` carries error 131026.
pub fn status_event(message: &SentMessage, status: &str, timestamp: u64) -> Value {
    let mut event = json!({
        "id": message.wamid,
        "status": status,
        "timestamp": timestamp.to_string(),
        "recipient_id": message.to,
    });
    if let Some(data) = &message.callback_data {
        event["biz_opaque_callback_data"] = json!(data);
    }
    if status == "failed" {
        event["errors"] = json!([{
            "code": 131_026, "title": "Message undeliverable",
            "message": "Message undeliverable",
            "error_data": {"details": "Message Undeliverable."}
        }]);
    }
    event
}

/// A webhook body in Meta's shape for one sender number.
pub fn webhook_body(phone_number_id: &str, events: &[Value]) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "0", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "0", "phone_number_id": phone_number_id},
            "statuses": events
        }}]}]
    })
}

/// `sha256=<hex HMAC-SHA256 of body with app_secret>`, Meta's `X-Hub-Signature-256`.
pub fn signature(app_secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app_secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A running fake; dropping it (or calling [`MetaFake::shutdown`]) stops the server.
#[derive(Debug)]
pub struct MetaFake {
    addr: SocketAddr,
    state: MetaFakeState,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    webhooks: JoinHandle<()>,
}

/// Starts the fake on `127.0.0.1` on a free port.
pub async fn spawn(config: MetaFakeConfig) -> anyhow::Result<MetaFake> {
    spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
}

/// Starts the fake on `addr` (port 0 picks a free port).
pub async fn spawn_on(addr: SocketAddr, config: MetaFakeConfig) -> anyhow::Result<MetaFake> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the Meta fake to {addr}"))?;
    let addr = listener.local_addr()?;
    let state = MetaFakeState::new(config);
    let app = router(state.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    let http = reqwest::Client::new();
    let webhooks = tokio::spawn(post_status_webhooks(state.clone(), http.clone()));
    Ok(MetaFake {
        addr,
        state,
        http,
        stop: Some(stop),
        server: Some(server),
        webhooks,
    })
}

impl MetaFake {
    /// The URL to use as `WHATSAPP_API_URL` (no version segment, no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &MetaFakeState {
        &self.state
    }

    pub fn messages(&self) -> Vec<SentMessage> {
        self.state.messages()
    }

    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Posts `events` (status events in Meta's shape) to `target` as signed webhooks, `plan`
    /// deciding batch size, order and duplication. Returns the HTTP status of every request.
    pub async fn send_statuses(
        &self,
        target: &WebhookTarget,
        phone_number_id: &str,
        mut events: Vec<Value>,
        plan: &StatusPlan,
    ) -> anyhow::Result<Vec<u16>> {
        if plan.copies > 1 {
            let once = events.clone();
            for _ in 1..plan.copies {
                events.extend(once.iter().cloned());
            }
        }
        if plan.shuffle {
            events.shuffle(&mut rand::thread_rng());
        }
        let mut statuses = Vec::new();
        for chunk in events.chunks(plan.batch.max(1)) {
            let body = webhook_body(phone_number_id, chunk).to_string();
            let response = self
                .http
                .post(&target.url)
                .header("content-type", "application/json")
                .header(
                    "x-hub-signature-256",
                    signature(&target.app_secret, body.as_bytes()),
                )
                .body(body)
                .send()
                .await
                .with_context(|| format!("posting a status webhook to {}", target.url))?;
            statuses.push(response.status().as_u16());
        }
        Ok(statuses)
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.webhooks.abort();
        // A held answer would keep the graceful shutdown waiting.
        self.state.release_answers();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .context("the Meta fake's server task failed")?
                .context("the Meta fake's server failed")?;
        }
        Ok(())
    }
}

impl Drop for MetaFake {
    fn drop(&mut self) {
        self.webhooks.abort();
        self.state.release_answers();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(to: &str) -> Vec<u8> {
        json!({"messaging_product": "whatsapp", "to": to, "type": "template",
               "template": {"name": "t", "language": {"code": "en"}}})
        .to_string()
        .into_bytes()
    }

    #[tokio::test]
    async fn the_window_refuses_with_130429_and_the_pair_limit_with_131056() {
        let state = MetaFakeState::new(MetaFakeConfig {
            per_number_mps: 2,
            ..MetaFakeConfig::default()
        });
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000001")),
            Outcome::Accepted { .. }
        ));
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000001")),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000002")),
            Outcome::Accepted { .. }
        ));
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000003")),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            state.handle("2", Some("t"), &payload("1555000003")),
            Outcome::Accepted { .. }
        ));
        assert!(matches!(
            state.handle("2", None, &payload("1555000004")),
            Outcome::Refused(_)
        ));
        let stats = state.stats();
        assert_eq!(stats.accepted, 3);
        assert_eq!(stats.pair_rate_errors, 1);
        assert_eq!(stats.throughput_errors, 1);
        assert_eq!(stats.unauthorized, 1);
    }

    #[tokio::test]
    async fn recurring_faults_are_spread_through_the_run() {
        let state = MetaFakeState::new(MetaFakeConfig {
            pair_interval: Duration::ZERO,
            recurring_faults: Some(RecurringFaults {
                every: 3,
                cycle: vec![Fault::Throughput, Fault::PairRate, Fault::TooManyRequests],
            }),
            ..MetaFakeConfig::default()
        });
        let outcomes: Vec<bool> = (0..9)
            .map(|i| {
                matches!(
                    state.handle("1", Some("t"), &payload(&format!("155500000{i}"))),
                    Outcome::Accepted { .. }
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [true, true, false, true, true, false, true, true, false]
        );
        let stats = state.stats();
        assert_eq!(
            (
                stats.throughput_errors,
                stats.pair_rate_errors,
                stats.too_many_requests
            ),
            (1, 1, 1)
        );
        assert_eq!(stats.throttled(), 3);
    }

    #[tokio::test]
    async fn held_answers_wait_and_status_webhooks_follow_on_their_own() {
        const SECRET: &str = "s3cret";
        // herald's side: records every event of every correctly signed webhook.
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = received.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let signed = headers
                        .get("x-hub-signature-256")
                        .and_then(|v| v.to_str().ok())
                        == Some(signature(SECRET, &body).as_str());
                    if !signed {
                        return StatusCode::UNAUTHORIZED;
                    }
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let events = body["entry"][0]["changes"][0]["value"]["statuses"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    sink.lock().unwrap().extend(events);
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let fake = spawn(MetaFakeConfig::default()).await.unwrap();
        let mut webhooks = StatusWebhooks::new(
            WebhookTarget {
                url: hook,
                app_secret: SECRET.into(),
            },
            Arc::new(|_: &SentMessage| vec!["sent", "delivered", "read"]),
        );
        webhooks.delay = Duration::ZERO..=Duration::from_millis(30);
        webhooks.duplicate = 1.0;
        fake.state().set_status_webhooks(Some(webhooks));
        fake.state().pause_status_webhooks(true);
        fake.state().hold_answers();

        let url = format!("{}/v21.0/123/messages", fake.base_url());
        let request = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth("t")
                .header("content-type", "application/json")
                .body(payload("15550000001"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        for _ in 0..200 {
            if fake.state().held_answers() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.state().held_answers(), 1);
        assert_eq!(fake.messages().len(), 1, "sent before it is answered");
        assert!(!request.is_finished());
        fake.state().release_answers();
        assert_eq!(request.await.unwrap().unwrap(), 200);
        assert_eq!(fake.state().held_answers(), 0);

        // Paused: nothing posted; resumed: three statuses, each twice.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(received.lock().unwrap().is_empty());
        assert_eq!(fake.state().status_webhooks_pending(), 6);
        fake.state().pause_status_webhooks(false);
        for _ in 0..300 {
            if fake.state().status_webhooks_pending() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let events = received.lock().unwrap().clone();
        assert_eq!(events.len(), 6, "{events:?}");
        let wamid = &fake.messages()[0].wamid;
        for status in ["sent", "delivered", "read"] {
            assert_eq!(
                events
                    .iter()
                    .filter(|e| e["status"] == status && e["id"] == wamid.as_str())
                    .count(),
                2
            );
        }
        let stats = fake.stats();
        assert_eq!((stats.webhook_events, stats.webhook_failures), (6, 0));
        fake.shutdown().await.unwrap();
    }
}
