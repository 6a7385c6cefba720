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
//! ([`Fault`]), and status webhooks sent back to herald signed with the app secret
//! ([`MetaFake::send_statuses`]), optionally shuffled and duplicated. The same inspection is
//! served under `/__fake/messages` and `/__fake/stats`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
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
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::oneshot;
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
}

impl Default for MetaFakeConfig {
    fn default() -> Self {
        Self {
            per_number_mps: 80,
            pair_interval: Duration::from_secs(6),
            tokens: Vec::new(),
        }
    }
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
}

impl Stats {
    /// Every throttling refusal, whatever its code.
    pub fn throttled(&self) -> u64 {
        self.throughput_errors + self.pair_rate_errors + self.too_many_requests
    }
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
}

/// The fake's shared state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaFakeState {
    inner: Arc<Mutex<Inner>>,
}

enum Outcome {
    Accepted(Box<SentMessage>, Option<Duration>),
    Refused(Response),
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
            })),
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
        match inner.faults.pop_front() {
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
        inner.messages.push(message.clone());
        Outcome::Accepted(Box::new(message), stall)
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
        Outcome::Accepted(message, stall) => {
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
    Ok(MetaFake {
        addr,
        state,
        http: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
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
            Outcome::Accepted(..)
        ));
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000001")),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000002")),
            Outcome::Accepted(..)
        ));
        assert!(matches!(
            state.handle("1", Some("t"), &payload("1555000003")),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            state.handle("2", Some("t"), &payload("1555000003")),
            Outcome::Accepted(..)
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
}
