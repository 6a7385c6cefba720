//! A local voice-agent provider fake that follows Vapi's documented behaviour (see DESIGN.md,
//! "Providers: facts the fakes must follow"), not any client's code.
//!
//! What it does, like Vapi:
//! - `POST /call` with a bearer key and `{"assistantId","phoneNumberId","customer":{"number",
//!   "name"?},"metadata"?}` answers 201 `{"id","status":"queued",…}`;
//! - the account has a concurrency limit (10 by default): a call over it is refused with 400
//!   `{"message":"Over Concurrency Limit.", "subscriptionLimits": {"concurrencyBlocked": true}}`
//!   and no call is created;
//! - each call "talks" for a random duration, then ends (freeing its slot at once) and posts
//!   server messages to the webhook URL with the `X-Vapi-Secret` header: a `status-update`
//!   (`status: ended`) and an `end-of-call-report`.
//!
//! Faults for tests ([`WebhookFaults`]): a call's webhooks may be sent twice, late, or never.
//!
//! Inspection: [`VapiFake::state`] (and `GET /__fake/stats`, `GET /__fake/calls`): every call
//! placed in order, the most calls ever active at once in total, per value of a metadata key
//! (herald's user) and per value of another (herald's tenant, for fakes several tenants share),
//! refusals, webhooks sent.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng as _;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What happens to a call's webhooks; probabilities are 0.0 to 1.0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WebhookFaults {
    /// The webhooks of a call are sent twice.
    pub duplicate: f64,
    /// The webhooks of a call are sent `late_by` after the call ended.
    pub late: f64,
    pub late_by: Duration,
    /// The call's webhooks are never sent.
    pub drop: f64,
}

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct VapiFakeConfig {
    /// The account's concurrent-call limit.
    pub concurrency_limit: usize,
    /// How long each call talks, chosen at random in this range.
    pub talk: RangeInclusive<Duration>,
    /// Accepted API keys; empty accepts any non-empty key.
    pub api_keys: Vec<String>,
    /// Where server messages go, and the secret they carry; settable later with
    /// [`VapiFakeState::set_webhook`].
    pub webhook_url: Option<String>,
    pub webhook_secret: String,
    /// The metadata key whose value groups calls for the per-group concurrency figure.
    pub group_by: String,
    /// The metadata key whose value names the calls' tenant, for the per-tenant figure.
    pub tenant_by: String,
    pub faults: WebhookFaults,
}

impl Default for VapiFakeConfig {
    fn default() -> Self {
        Self {
            concurrency_limit: 10,
            talk: Duration::from_millis(20)..=Duration::from_millis(80),
            api_keys: Vec::new(),
            webhook_url: None,
            webhook_secret: String::new(),
            group_by: "user_id".into(),
            tenant_by: "tenant_id".into(),
            faults: WebhookFaults::default(),
        }
    }
}

/// One call as placed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlacedCall {
    pub id: String,
    pub assistant_id: String,
    pub phone_number_id: String,
    pub number: String,
    pub name: Option<String>,
    pub metadata: Map<String, Value>,
    pub ended: bool,
    pub duration_ms: u64,
    pub ended_reason: String,
    /// When the fake accepted the call, in microseconds since the Unix epoch.
    pub placed_at_us: u64,
    /// When the call ended (its slot freed, its webhooks about to go), likewise.
    pub ended_at_us: Option<u64>,
}

/// Now, in microseconds since the Unix epoch: the timeline of placed and ended calls, which a
/// benchmark in the same process compares with its own instants.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The string value of a metadata key ("" when absent), for grouping calls.
fn metadata_value(metadata: &Map<String, Value>, key: &str) -> String {
    metadata
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// The fake's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VapiStats {
    pub calls_created: u64,
    pub refused_at_limit: u64,
    pub rejected: u64,
    pub calls_ended: u64,
    pub active: usize,
    pub max_active: usize,
    pub max_active_by_group: BTreeMap<String, usize>,
    pub max_active_by_tenant: BTreeMap<String, usize>,
    pub webhooks_sent: u64,
    pub webhooks_failed: u64,
    pub webhooks_dropped: u64,
}

#[derive(Debug)]
struct Inner {
    config: VapiFakeConfig,
    calls: Vec<PlacedCall>,
    index: HashMap<String, usize>,
    active_by_group: HashMap<String, usize>,
    active_by_tenant: HashMap<String, usize>,
    stats: VapiStats,
}

/// Shared state and inspection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct VapiFakeState {
    inner: Arc<Mutex<Inner>>,
    http: reqwest::Client,
}

const ENDED_REASONS: &[&str] = &[
    "customer-ended-call",
    "assistant-ended-call",
    "customer-busy",
    "customer-did-not-answer",
];

impl VapiFakeState {
    fn new(config: VapiFakeConfig) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                config,
                calls: Vec::new(),
                index: HashMap::new(),
                active_by_group: HashMap::new(),
                active_by_tenant: HashMap::new(),
                stats: VapiStats::default(),
            })),
            http: reqwest::Client::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters that are still worth reading.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where server messages go from now on.
    pub fn set_webhook(&self, url: impl Into<String>, secret: impl Into<String>) {
        let mut inner = self.lock();
        inner.config.webhook_url = Some(url.into());
        inner.config.webhook_secret = secret.into();
    }

    pub fn set_faults(&self, faults: WebhookFaults) {
        self.lock().config.faults = faults;
    }

    pub fn set_concurrency_limit(&self, limit: usize) {
        self.lock().config.concurrency_limit = limit;
    }

    pub fn stats(&self) -> VapiStats {
        self.lock().stats.clone()
    }

    /// Every call placed, in the order the fake accepted them.
    pub fn calls(&self) -> Vec<PlacedCall> {
        self.lock().calls.clone()
    }

    /// Ends a call now (as a hang-up would), posting its webhooks; `false` if unknown or ended.
    pub fn end_call(&self, id: &str) -> bool {
        let ended = self.finish(id);
        if let Some((call, config)) = ended {
            let state = self.clone();
            tokio::spawn(async move { state.post_webhooks(call, config).await });
            true
        } else {
            false
        }
    }

    fn check_key(&self, headers: &HeaderMap) -> bool {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .unwrap_or_default();
        let inner = self.lock();
        !key.is_empty()
            && (inner.config.api_keys.is_empty() || inner.config.api_keys.iter().any(|k| k == key))
    }

    /// Accepts a call if the account has a free slot; returns it and how long it will talk.
    fn place(&self, body: &Value) -> Result<(PlacedCall, Duration), Box<Response>> {
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        let reject = |message: &str| {
            Box::new(
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"message": [message], "error": "Bad Request", "statusCode": 400})),
                )
                    .into_response(),
            )
        };
        let mut inner = self.lock();
        let (Some(assistant_id), Some(phone_number_id), Some(number)) = (
            text(&body["assistantId"]),
            text(&body["phoneNumberId"]),
            text(&body["customer"]["number"]),
        ) else {
            inner.stats.rejected += 1;
            return Err(reject(
                "assistantId, phoneNumberId and customer.number are required",
            ));
        };
        if !number.starts_with('+') {
            inner.stats.rejected += 1;
            return Err(reject("customer.number must be in E.164 format"));
        }
        let limit = inner.config.concurrency_limit;
        if inner.stats.active >= limit {
            inner.stats.refused_at_limit += 1;
            let body = json!({
                "message": "Over Concurrency Limit.",
                "error": "Bad Request",
                "statusCode": 400,
                "subscriptionLimits": {
                    "concurrencyBlocked": true,
                    "concurrencyLimit": limit,
                    "remainingConcurrentCalls": 0
                }
            });
            return Err(Box::new(
                (StatusCode::BAD_REQUEST, Json(body)).into_response(),
            ));
        }
        let metadata = body["metadata"].as_object().cloned().unwrap_or_default();
        let group = metadata_value(&metadata, &inner.config.group_by);
        let tenant = metadata_value(&metadata, &inner.config.tenant_by);
        let mut rng = rand::thread_rng();
        let (lo, hi) = (
            inner.config.talk.start().as_millis() as u64,
            inner.config.talk.end().as_millis() as u64,
        );
        let talk_ms = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        let reason = ENDED_REASONS[rng.gen_range(0..ENDED_REASONS.len())];
        let id = format!("call-{:032x}", rng.r#gen::<u128>());
        let call = PlacedCall {
            id: id.clone(),
            assistant_id,
            phone_number_id,
            number,
            name: text(&body["customer"]["name"]),
            metadata,
            ended: false,
            duration_ms: talk_ms,
            ended_reason: reason.to_owned(),
            placed_at_us: unix_micros(),
            ended_at_us: None,
        };
        inner.stats.calls_created += 1;
        inner.stats.active += 1;
        inner.stats.max_active = inner.stats.max_active.max(inner.stats.active);
        let in_group = {
            let n = inner.active_by_group.entry(group.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let max = inner.stats.max_active_by_group.entry(group).or_insert(0);
        *max = (*max).max(in_group);
        let in_tenant = {
            let n = inner.active_by_tenant.entry(tenant.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let max = inner.stats.max_active_by_tenant.entry(tenant).or_insert(0);
        *max = (*max).max(in_tenant);
        let position = inner.calls.len();
        inner.calls.push(call.clone());
        inner.index.insert(id, position);
        Ok((call, Duration::from_millis(talk_ms)))
    }

    /// Ends the call (its slot is free at once); `None` if unknown or already ended.
    fn finish(&self, id: &str) -> Option<(PlacedCall, VapiFakeConfig)> {
        let mut inner = self.lock();
        let position = *inner.index.get(id)?;
        let call = inner.calls.get_mut(position)?;
        if call.ended {
            return None;
        }
        call.ended = true;
        call.ended_at_us = Some(unix_micros());
        let call = call.clone();
        let group = metadata_value(&call.metadata, &inner.config.group_by);
        let tenant = metadata_value(&call.metadata, &inner.config.tenant_by);
        if let Some(n) = inner.active_by_group.get_mut(&group) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = inner.active_by_tenant.get_mut(&tenant) {
            *n = n.saturating_sub(1);
        }
        inner.stats.active = inner.stats.active.saturating_sub(1);
        inner.stats.calls_ended += 1;
        Some((call, inner.config.clone()))
    }

    async fn talk_then_end(self, id: String, talk: Duration) {
        tokio::time::sleep(talk).await;
        if let Some((call, config)) = self.finish(&id) {
            self.post_webhooks(call, config).await;
        }
    }

    async fn post_webhooks(&self, call: PlacedCall, config: VapiFakeConfig) {
        let Some(url) = config.webhook_url.clone() else {
            return;
        };
        let (drop, late, twice) = {
            let mut rng = rand::thread_rng();
            let faults = &config.faults;
            (
                rng.gen_bool(faults.drop.clamp(0.0, 1.0)),
                rng.gen_bool(faults.late.clamp(0.0, 1.0)),
                rng.gen_bool(faults.duplicate.clamp(0.0, 1.0)),
            )
        };
        if drop {
            self.lock().stats.webhooks_dropped += 1;
            return;
        }
        if late {
            tokio::time::sleep(config.faults.late_by).await;
        }
        let call_json = json!({"id": call.id, "metadata": call.metadata});
        let messages = [
            json!({"message": {"type": "status-update", "status": "ended",
                   "endedReason": call.ended_reason, "call": call_json}}),
            json!({"message": {"type": "end-of-call-report", "endedReason": call.ended_reason,
                   "durationMs": call.duration_ms, "call": call_json}}),
        ];
        for _ in 0..(1 + usize::from(twice)) {
            for message in &messages {
                let sent = self
                    .http
                    .post(&url)
                    .header("X-Vapi-Secret", &config.webhook_secret)
                    .json(message)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let mut inner = self.lock();
                match sent {
                    Ok(r) if r.status().is_success() => inner.stats.webhooks_sent += 1,
                    _ => inner.stats.webhooks_failed += 1,
                }
            }
        }
    }
}

async fn create_call(
    State(state): State<VapiFakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !state.check_key(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "Invalid Key. Hot tip, you may be using the private key instead of the public key, or vice versa.", "error": "Unauthorized", "statusCode": 401})),
        )
            .into_response();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": ["body must be JSON"], "error": "Bad Request", "statusCode": 400})),
        )
            .into_response();
    };
    match state.place(&body) {
        Ok((call, talk)) => {
            tokio::spawn(state.clone().talk_then_end(call.id.clone(), talk));
            let answer = json!({
                "id": call.id, "status": "queued", "type": "outboundPhoneCall",
                "assistantId": call.assistant_id, "phoneNumberId": call.phone_number_id,
                "customer": {"number": call.number, "name": call.name},
                "metadata": call.metadata
            });
            (StatusCode::CREATED, Json(answer)).into_response()
        }
        Err(response) => *response,
    }
}

async fn stats(State(state): State<VapiFakeState>) -> Json<VapiStats> {
    Json(state.stats())
}

async fn calls(State(state): State<VapiFakeState>) -> Json<Vec<PlacedCall>> {
    Json(state.calls())
}

/// The fake's routes over `state`.
pub fn router(state: VapiFakeState) -> Router {
    Router::new()
        .route("/call", post(create_call))
        .route("/__fake/stats", get(stats))
        .route("/__fake/calls", get(calls))
        .with_state(state)
}

/// A running fake; dropping it stops the server.
#[derive(Debug)]
pub struct VapiFake {
    addr: SocketAddr,
    state: VapiFakeState,
    stop: Option<oneshot::Sender<()>>,
    _server: JoinHandle<std::io::Result<()>>,
}

/// Starts the fake on `127.0.0.1` on a free port.
pub async fn spawn(config: VapiFakeConfig) -> anyhow::Result<VapiFake> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("binding the Vapi fake")?;
    let addr = listener.local_addr()?;
    let state = VapiFakeState::new(config);
    let app = router(state.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(VapiFake {
        addr,
        state,
        stop: Some(stop),
        _server: server,
    })
}

impl VapiFake {
    /// The URL to use as `VOICE_API_URL` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &VapiFakeState {
        &self.state
    }
}

impl Drop for VapiFake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peaks_are_kept_per_user_and_per_tenant() {
        let fake = spawn(VapiFakeConfig {
            talk: Duration::from_secs(30)..=Duration::from_secs(30),
            ..VapiFakeConfig::default()
        })
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let place = |tenant: &str, user: &str, number: &str| {
            http.post(format!("{}/call", fake.base_url()))
                .bearer_auth("key")
                .json(&json!({
                    "assistantId": "a", "phoneNumberId": "p",
                    "customer": {"number": number},
                    "metadata": {"tenant_id": tenant, "user_id": user}
                }))
                .send()
        };
        for (tenant, user, number) in [
            ("t1", "u1", "+15550000001"),
            ("t1", "u1", "+15550000002"),
            ("t1", "u2", "+15550000003"),
            ("t2", "u3", "+15550000004"),
        ] {
            let answer = place(tenant, user, number).await.unwrap();
            assert_eq!(answer.status(), StatusCode::CREATED);
        }
        let first = fake.state().calls()[0].id.clone();
        assert!(fake.state().end_call(&first));
        place("t1", "u1", "+15550000005").await.unwrap();
        let stats = fake.state().stats();
        assert_eq!(stats.max_active, 4);
        assert_eq!(stats.max_active_by_group["u1"], 2);
        assert_eq!(stats.max_active_by_group["u2"], 1);
        assert_eq!(stats.max_active_by_tenant["t1"], 3);
        assert_eq!(stats.max_active_by_tenant["t2"], 1);
    }
}
