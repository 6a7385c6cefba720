//! What the email, LinkedIn and Instagram fakes share: a clock tests can move forward, sliding
//! rate windows, the record of every accepted action (with counts per send id, so a test can
//! assert "exactly once"), injected faults, and the events each fake posts back to herald's
//! sequence webhook — delayed, duplicated and shuffled as configured, signed like herald checks.
//!
//! Events go to `POST /v1/webhooks/sequences/{tenant_id}` as
//! `{"events": [{"send_id", "event", "at", "reason"?}]}` with
//! `X-Herald-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>`; a failed post
//! (connection error or 5xx) is tried again a few times, as providers do.
//!
//! The fakes are independent of herald's crates: the wire formats here are the ones written
//! down in `docs/providers.md`.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
use axum::routing::get;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The header herald's sequence webhook reads the signature from.
pub const SIGNATURE_HEADER: &str = "x-herald-signature";
/// How many times one webhook request is tried before its events are dropped.
const WEBHOOK_ATTEMPTS: u32 = 5;

/// At most `max` requests in any sliding `per`; `max == 0` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub max: u32,
    pub per: Duration,
}

impl Limit {
    pub const fn per_second(max: u32) -> Self {
        Self {
            max,
            per: Duration::from_secs(1),
        }
    }

    pub const fn per_hour(max: u32) -> Self {
        Self {
            max,
            per: Duration::from_secs(3600),
        }
    }

    pub const fn unlimited() -> Self {
        Self::per_second(0)
    }
}

/// How events are sent back.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookPlan {
    /// Each event waits a random time in this range before it may be sent.
    pub delay: RangeInclusive<Duration>,
    /// The probability (0.0 to 1.0) that an event is sent a second time, with its own delay.
    pub duplicate: f64,
    /// Due events go out in random order (else in the order they were made).
    pub shuffle: bool,
    /// Events per webhook request (1 or more).
    pub batch: usize,
}

impl Default for WebhookPlan {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO..=Duration::ZERO,
            duplicate: 0.0,
            shuffle: false,
            batch: 20,
        }
    }
}

/// Where events go and the secret they are signed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTarget {
    /// e.g. `http://127.0.0.1:8080/v1/webhooks/sequences/{tenant_id}`.
    pub url: String,
    pub secret: String,
}

/// A fault answered instead of the next requests' normal outcome (after authentication and
/// validation, before the rate limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 429 with `Retry-After: 1`; nothing done.
    TooManyRequests,
    /// HTTP 500; nothing done.
    ServerError,
    /// The action is done and recorded, then the answer is held back this long (longer than
    /// the client's timeout: the client cannot know it was done).
    AcceptThenStall(Duration),
}

/// An action a fake accepted (an email sent, an invitation sent, a DM…).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Action {
    /// The fake's id for it (the `message_id` or `action_id` it answered).
    pub id: String,
    /// herald's send id, as the request carried it.
    pub send_id: Option<String>,
    /// The sender: the mailbox (email) or the provider account (LinkedIn, Instagram).
    pub account: String,
    /// `email`, or the action type (`connect`, `dm`…).
    pub kind: String,
    /// The recipient: address, profile URL or handle.
    pub target: String,
    pub subject: Option<String>,
    pub text: Option<String>,
    /// The fake's clock when it was accepted.
    pub at: DateTime<Utc>,
}

/// An event about an accepted action, as sent to herald.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub send_id: String,
    /// `delivered`, `bounced`, `opened`, `clicked`, `connected`, `replied`.
    pub event: String,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The fake's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub accepted: u64,
    /// Refusals by error code (`rate_limited`, `invitation_limit_exceeded`, `unauthorized`…).
    pub errors: BTreeMap<String, u64>,
    /// Events made (copies included).
    pub events_queued: u64,
    /// Events herald answered 2xx to (copies included).
    pub events_delivered: u64,
    pub webhook_requests: u64,
    /// Events dropped after every attempt failed, or refused by herald with a 4xx.
    pub events_dropped: u64,
}

impl Stats {
    /// Refusals with `code`.
    pub fn errors_of(&self, code: &str) -> u64 {
        self.errors.get(code).copied().unwrap_or(0)
    }
}

/// The fake's clock.
#[derive(Debug, Clone, Copy)]
enum Clock {
    /// The real clock plus an offset.
    Running(chrono::Duration),
    /// Stopped at an instant.
    Pinned(DateTime<Utc>),
}

impl Clock {
    fn now(self) -> DateTime<Utc> {
        match self {
            Clock::Running(offset) => Utc::now() + offset,
            Clock::Pinned(at) => at,
        }
    }

    fn advance_to(&mut self, at: DateTime<Utc>) {
        match self {
            Clock::Running(offset) => {
                let now = Utc::now() + *offset;
                if at > now {
                    *offset += at - now;
                }
            }
            Clock::Pinned(pinned) => *pinned = (*pinned).max(at),
        }
    }
}

#[derive(Debug)]
struct Queued {
    event: Event,
    due: Instant,
    attempts: u32,
}

#[derive(Debug)]
struct Inner {
    clock: Clock,
    windows: HashMap<String, VecDeque<DateTime<Utc>>>,
    actions: Vec<Action>,
    by_send_id: HashMap<String, usize>,
    faults: VecDeque<Fault>,
    stats: Stats,
    target: Option<WebhookTarget>,
    plan: WebhookPlan,
    pending: Vec<Queued>,
    in_flight: usize,
    delivered: Vec<Event>,
}

/// The state every outreach fake shares; cheap to clone.
#[derive(Clone, Debug)]
pub struct Shared {
    inner: Arc<Mutex<Inner>>,
    id_prefix: &'static str,
}

/// How long until a full rate window has room.
pub(crate) type Wait = Duration;

impl Shared {
    pub(crate) fn new(
        id_prefix: &'static str,
        target: Option<WebhookTarget>,
        plan: WebhookPlan,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                clock: Clock::Running(chrono::Duration::zero()),
                windows: HashMap::new(),
                actions: Vec::new(),
                by_send_id: HashMap::new(),
                faults: VecDeque::new(),
                stats: Stats::default(),
                target,
                plan,
                pending: Vec::new(),
                in_flight: 0,
                delivered: Vec::new(),
            })),
            id_prefix,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is one step under the lock, so a poisoned lock still holds usable data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fake's clock: the real clock plus whatever tests moved it by, or the instant it is
    /// pinned at.
    pub fn now(&self) -> DateTime<Utc> {
        self.lock().clock.now()
    }

    /// Moves the fake's clock forward to `at` (never backwards): limits and timestamps follow.
    pub fn advance_to(&self, at: DateTime<Utc>) {
        self.lock().clock.advance_to(at);
    }

    /// Moves the fake's clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut inner = self.lock();
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::zero());
        let at = inner.clock.now() + by;
        inner.clock.advance_to(at);
    }

    /// Stops the fake's clock at `at` (or its now, if later): from then on it moves only when
    /// told to, so a test on a simulated clock sees limits exactly as on that clock.
    pub fn pin(&self, at: DateTime<Utc>) {
        let mut inner = self.lock();
        let now = inner.clock.now();
        inner.clock = Clock::Pinned(now.max(at));
    }

    pub fn set_webhook(&self, target: Option<WebhookTarget>) {
        self.lock().target = target;
    }

    pub fn set_plan(&self, plan: WebhookPlan) {
        self.lock().plan = plan;
    }

    /// Answers the next requests with `faults`, one each, before normal behaviour resumes.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Every accepted action, in the order accepted.
    pub fn actions(&self) -> Vec<Action> {
        self.lock().actions.clone()
    }

    /// How many accepted actions carried each send id.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.lock().by_send_id.clone()
    }

    /// How many accepted actions carried `send_id`.
    pub fn count(&self, send_id: &str) -> usize {
        self.lock().by_send_id.get(send_id).copied().unwrap_or(0)
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// Every event herald acknowledged (a duplicate copy appears twice), in delivery order.
    pub fn delivered_events(&self) -> Vec<Event> {
        self.lock().delivered.clone()
    }

    /// Makes an event about the action that carried `send_id` (a reply, an accepted
    /// invitation, an open…), sent like the others. `false` if no accepted action carried it.
    pub fn emit(&self, send_id: &str, event: &str) -> bool {
        let mut inner = self.lock();
        if !inner.by_send_id.contains_key(send_id) {
            return false;
        }
        let at = inner.clock.now();
        queue(&mut inner, send_id, event, None, at);
        true
    }

    /// Waits (at most `timeout`) until every event made so far has been sent and answered;
    /// `false` if some are still waiting (no target set, herald unreachable, or time ran out).
    pub async fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let inner = self.lock();
                if inner.pending.is_empty() && inner.in_flight == 0 {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // --- for the fakes' handlers ------------------------------------------------------------

    /// Counts a request; returns the fake's now.
    pub(crate) fn begin(&self) -> DateTime<Utc> {
        let mut inner = self.lock();
        inner.stats.requests += 1;
        inner.clock.now()
    }

    /// Counts a refusal with `code`.
    pub(crate) fn refused(&self, code: &str) {
        *self.lock().stats.errors.entry(code.to_owned()).or_default() += 1;
    }

    pub(crate) fn next_fault(&self) -> Option<Fault> {
        self.lock().faults.pop_front()
    }

    /// Takes one unit of every `(key, limit)` window at `now` if each has room, all or none
    /// under one lock (concurrent requests cannot both take the last unit). Otherwise the
    /// index of the first full window and the wait until it has room; nothing is taken.
    pub(crate) fn admit(
        &self,
        limits: &[(&str, Limit)],
        now: DateTime<Utc>,
    ) -> Result<(), (usize, Wait)> {
        let mut inner = self.lock();
        for (index, (key, limit)) in limits.iter().enumerate() {
            if limit.max == 0 {
                continue;
            }
            let per = chrono::Duration::from_std(limit.per).unwrap_or(chrono::Duration::days(1));
            let window = inner.windows.entry((*key).to_owned()).or_default();
            while window.front().is_some_and(|t| now - *t >= per) {
                window.pop_front();
            }
            if window.len() >= limit.max as usize {
                let oldest = window.front().copied().unwrap_or(now);
                let wait = (oldest + per - now).to_std().unwrap_or(Duration::ZERO);
                return Err((index, wait));
            }
        }
        for (key, limit) in limits {
            if limit.max > 0 {
                inner
                    .windows
                    .entry((*key).to_owned())
                    .or_default()
                    .push_back(now);
            }
        }
        Ok(())
    }

    /// Records an accepted action under a new id (`action.id` is replaced) and returns it.
    pub(crate) fn accept(&self, mut action: Action) -> Action {
        let mut inner = self.lock();
        inner.stats.accepted += 1;
        action.id = format!("{}_{:08}", self.id_prefix, inner.actions.len() + 1);
        if let Some(send_id) = &action.send_id {
            *inner.by_send_id.entry(send_id.clone()).or_default() += 1;
        }
        inner.actions.push(action.clone());
        action
    }

    /// Makes an event about `send_id` at the fake's `at`.
    pub(crate) fn event(&self, send_id: &str, event: &str, reason: Option<String>) {
        let mut inner = self.lock();
        let at = inner.clock.now();
        queue(&mut inner, send_id, event, reason, at);
    }

    /// The events due now, taken for sending in batches; empty without a target.
    fn take_due(&self) -> Option<(WebhookTarget, Vec<Vec<Queued>>)> {
        let mut inner = self.lock();
        let target = inner.target.clone()?;
        let now = Instant::now();
        let (mut due, waiting): (Vec<Queued>, Vec<Queued>) =
            inner.pending.drain(..).partition(|q| q.due <= now);
        inner.pending = waiting;
        if due.is_empty() {
            return None;
        }
        if inner.plan.shuffle {
            due.shuffle(&mut rand::thread_rng());
        }
        inner.in_flight += due.len();
        let batch = inner.plan.batch.max(1);
        let mut batches = Vec::new();
        let mut rest = due.into_iter().peekable();
        while rest.peek().is_some() {
            batches.push(rest.by_ref().take(batch).collect());
        }
        Some((target, batches))
    }

    fn finish(&self, batch: Vec<Queued>, answer: Result<u16, String>) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(batch.len());
        inner.stats.webhook_requests += 1;
        match answer {
            Ok(status) if (200..300).contains(&status) => {
                inner.stats.events_delivered += batch.len() as u64;
                inner.delivered.extend(batch.into_iter().map(|q| q.event));
            }
            Ok(status) if (400..500).contains(&status) => {
                tracing::warn!(
                    status,
                    events = batch.len(),
                    "herald refused events; dropped"
                );
                inner.stats.events_dropped += batch.len() as u64;
            }
            answer => {
                for mut queued in batch {
                    queued.attempts += 1;
                    if queued.attempts >= WEBHOOK_ATTEMPTS {
                        tracing::warn!(?answer, "an event could not be delivered; dropped");
                        inner.stats.events_dropped += 1;
                    } else {
                        let backoff = Duration::from_millis(50 << queued.attempts.min(6));
                        queued.due = Instant::now() + backoff;
                        inner.pending.push(queued);
                    }
                }
            }
        }
    }
}

fn random_delay(range: &RangeInclusive<Duration>) -> Duration {
    let (low, high) = (*range.start(), *range.end());
    if high <= low {
        return low;
    }
    let spread = u64::try_from((high - low).as_micros()).unwrap_or(u64::MAX);
    low + Duration::from_micros(rand::thread_rng().gen_range(0..=spread))
}

fn queue(inner: &mut Inner, send_id: &str, event: &str, reason: Option<String>, at: DateTime<Utc>) {
    let event = Event {
        send_id: send_id.to_owned(),
        event: event.to_owned(),
        at,
        reason,
    };
    let copies = if rand::thread_rng().gen_bool(inner.plan.duplicate.clamp(0.0, 1.0)) {
        2
    } else {
        1
    };
    for _ in 0..copies {
        let due = Instant::now() + random_delay(&inner.plan.delay);
        inner.stats.events_queued += 1;
        inner.pending.push(Queued {
            event: event.clone(),
            due,
            attempts: 0,
        });
    }
}

/// `sha256=<hex HMAC-SHA256 of body with secret>`, herald's `X-Herald-Signature`: the same
/// scheme as Meta's `X-Hub-Signature-256`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    crate::meta::signature(secret, body)
}

/// The webhook body for `events`.
pub fn webhook_body(events: &[Event]) -> Value {
    json!({ "events": events })
}

/// Sends due events until aborted.
async fn dispatch(shared: Shared, http: reqwest::Client) {
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let Some((target, batches)) = shared.take_due() else {
            continue;
        };
        for batch in batches {
            let events: Vec<Event> = batch.iter().map(|q| q.event.clone()).collect();
            let body = webhook_body(&events).to_string();
            let answer = http
                .post(&target.url)
                .header(header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, signature(&target.secret, body.as_bytes()))
                .timeout(Duration::from_secs(10))
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string());
            shared.finish(batch, answer);
        }
    }
}

// --- HTTP helpers the fakes share -------------------------------------------------------------

/// The bearer token of a request.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `token` is accepted: any non-empty token when `keys` is empty.
pub(crate) fn key_ok(keys: &[String], token: Option<&str>) -> bool {
    token.is_some_and(|t| keys.is_empty() || keys.iter().any(|k| k == t))
}

/// A response with `Retry-After` in whole seconds (at least 1).
pub(crate) fn with_retry_after(mut response: Response, wait: Duration) -> Response {
    if let Ok(value) = header::HeaderValue::from_str(&retry_secs(wait).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Whole seconds of `wait`, rounded up, at least 1.
pub(crate) fn retry_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// A fake's error answer in its provider's shape: `(status, code, message)` → response.
pub(crate) type Respond = fn(StatusCode, &str, &str) -> Response;

/// A refusal to answer with (boxed: a response is large next to what it refuses).
pub(crate) type Refusal = Box<Response>;

/// What a fake's handler decided: the accepted action and how long to hold the answer back
/// (an injected stall), or the refusal to answer.
pub(crate) type Handled = Result<(Action, Option<Duration>), Refusal>;

impl Shared {
    /// Counts a refusal with `code` and answers it in the provider's shape.
    pub(crate) fn refuse(
        &self,
        respond: Respond,
        status: StatusCode,
        code: &str,
        message: &str,
    ) -> Refusal {
        self.refused(code);
        Box::new(respond(status, code, message))
    }

    /// Counts a throttle with `code` and answers 429 with `Retry-After` for `wait`.
    pub(crate) fn throttle(
        &self,
        respond: Respond,
        code: &str,
        message: &str,
        wait: Duration,
    ) -> Refusal {
        let response = self.refuse(respond, StatusCode::TOO_MANY_REQUESTS, code, message);
        Box::new(with_retry_after(*response, wait))
    }

    /// The key check, and the account check when the fake knows its accounts (`accounts` not
    /// empty): 401 `unauthorized`, 404 `account_not_found`.
    pub(crate) fn authorize(
        &self,
        respond: Respond,
        (keys, accounts): (&[String], &[String]),
        token: Option<&str>,
        account: &str,
    ) -> Result<(), Refusal> {
        if !key_ok(keys, token) {
            return Err(self.refuse(
                respond,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the API key is missing or invalid",
            ));
        }
        if !accounts.is_empty() && !accounts.iter().any(|a| a == account) {
            return Err(self.refuse(
                respond,
                StatusCode::NOT_FOUND,
                "account_not_found",
                "no account with this id is connected",
            ));
        }
        Ok(())
    }

    /// The next injected fault, answered in the provider's shape (`throttle_code` for a 429):
    /// `Err` is the answer; `Ok(Some(wait))` accepts and holds the answer back.
    pub(crate) fn fault(
        &self,
        respond: Respond,
        throttle_code: &str,
    ) -> Result<Option<Duration>, Refusal> {
        match self.next_fault() {
            Some(Fault::TooManyRequests) => Err(self.throttle(
                respond,
                throttle_code,
                "too many requests",
                Duration::from_secs(1),
            )),
            Some(Fault::ServerError) => Err(self.refuse(
                respond,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "injected by the fake",
            )),
            Some(Fault::AcceptThenStall(wait)) => Ok(Some(wait)),
            None => Ok(None),
        }
    }
}

/// The HTTP answer to a handled request: `status` with `body` for an accepted action (after
/// any injected stall), or the refusal.
pub(crate) async fn answer(
    handled: Handled,
    status: StatusCode,
    body: impl FnOnce(&Action) -> Value,
) -> Response {
    match handled {
        Err(refusal) => *refusal,
        Ok((action, stall)) => {
            if let Some(wait) = stall {
                tokio::time::sleep(wait).await;
            }
            (status, Json(body(&action))).into_response()
        }
    }
}

#[derive(Deserialize)]
struct EmitRequest {
    send_id: String,
    event: String,
}

/// The inspection routes every outreach fake serves: `GET /__fake/actions`, `GET /__fake/stats`,
/// `GET /__fake/events` (delivered), and `POST /__fake/events {"send_id", "event"}` to make an
/// event on demand (a reply for the demo).
pub(crate) fn inspection(shared: Shared) -> Router {
    Router::new()
        .route(
            "/__fake/actions",
            get(|State(s): State<Shared>| async move { Json(json!(s.actions())) }),
        )
        .route(
            "/__fake/stats",
            get(|State(s): State<Shared>| async move { Json(json!(s.stats())) }),
        )
        .route(
            "/__fake/events",
            get(|State(s): State<Shared>| async move { Json(json!(s.delivered_events())) }).post(
                |State(s): State<Shared>, Json(request): Json<EmitRequest>| async move {
                    if s.emit(&request.send_id, &request.event) {
                        StatusCode::ACCEPTED.into_response()
                    } else {
                        (
                            StatusCode::NOT_FOUND,
                            Json(json!({"error": "no accepted action carried this send_id"})),
                        )
                            .into_response()
                    }
                },
            ),
        )
        .with_state(shared)
}

/// A running outreach fake; dropping it (or [`ProviderFake::shutdown`]) stops the server and
/// its webhook sender.
#[derive(Debug)]
pub struct ProviderFake {
    addr: SocketAddr,
    shared: Shared,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    dispatcher: JoinHandle<()>,
}

/// Serves `app` (with the inspection routes) on `addr` and starts the webhook sender.
pub(crate) async fn serve(
    addr: SocketAddr,
    app: Router,
    shared: Shared,
    name: &str,
) -> anyhow::Result<ProviderFake> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} fake to {addr}"))?;
    let addr = listener.local_addr()?;
    let app = app.merge(inspection(shared.clone()));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    let dispatcher = tokio::spawn(dispatch(shared.clone(), reqwest::Client::new()));
    Ok(ProviderFake {
        addr,
        shared,
        stop: Some(stop),
        server: Some(server),
        dispatcher,
    })
}

impl ProviderFake {
    /// The URL to use as the provider's `*_API_URL` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &Shared {
        &self.shared
    }

    pub fn actions(&self) -> Vec<Action> {
        self.shared.actions()
    }

    pub fn counts(&self) -> HashMap<String, usize> {
        self.shared.counts()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Makes a `replied` event for the action that carried `send_id`; `false` if none did.
    pub fn reply(&self, send_id: &str) -> bool {
        self.shared.emit(send_id, "replied")
    }

    pub fn emit(&self, send_id: &str, event: &str) -> bool {
        self.shared.emit(send_id, event)
    }

    pub async fn settle(&self, timeout: Duration) -> bool {
        self.shared.settle(timeout).await
    }

    pub fn set_webhook(&self, target: WebhookTarget) {
        self.shared.set_webhook(Some(target));
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.dispatcher.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .context("the fake's server task failed")?
                .context("the fake's server failed")?;
        }
        Ok(())
    }
}

impl Drop for ProviderFake {
    fn drop(&mut self) {
        self.dispatcher.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_refuses_past_its_limit_and_says_how_long_to_wait() {
        let shared = Shared::new("t", None, WebhookPlan::default());
        let now: DateTime<Utc> = "2026-03-02T10:00:00Z".parse().unwrap();
        let limit = Limit::per_second(2);
        let hourly = Limit::per_hour(3);
        for i in 0..2 {
            let at = now + chrono::Duration::milliseconds(100 * i);
            shared.admit(&[("k", limit), ("h", hourly)], at).unwrap();
        }
        let (index, wait) = shared
            .admit(
                &[("k", limit), ("h", hourly)],
                now + chrono::Duration::milliseconds(400),
            )
            .unwrap_err();
        assert_eq!((index, wait), (0, Duration::from_millis(600)));
        assert!(shared.admit(&[("other", limit)], now).is_ok());
        // Two seconds later "k" has room again, but "h" is full after one more.
        let later = now + chrono::Duration::seconds(2);
        shared.admit(&[("k", limit), ("h", hourly)], later).unwrap();
        let (index, _) = shared
            .admit(&[("k", limit), ("h", hourly)], later)
            .unwrap_err();
        assert_eq!(index, 1);
        // Nothing was taken from "k" by the refusal.
        assert!(shared.admit(&[("k", limit)], later).is_ok());
        assert_eq!(retry_secs(wait), 1);
    }

    #[test]
    fn the_clock_only_moves_forward() {
        let shared = Shared::new("t", None, WebhookPlan::default());
        let later = Utc::now() + chrono::Duration::days(3);
        shared.advance_to(later);
        shared.advance_to(later - chrono::Duration::days(1));
        assert!(shared.now() >= later);
        shared.pin(later + chrono::Duration::hours(1));
        let pinned = shared.now();
        assert_eq!(shared.now(), pinned);
        shared.advance(Duration::from_secs(60));
        assert_eq!(shared.now(), pinned + chrono::Duration::seconds(60));
    }

    #[test]
    fn events_only_about_accepted_actions() {
        let shared = Shared::new("t", None, WebhookPlan::default());
        assert!(!shared.emit("s-1", "replied"));
        shared.accept(Action {
            id: String::new(),
            send_id: Some("s-1".into()),
            account: "a".into(),
            kind: "dm".into(),
            target: "ann".into(),
            subject: None,
            text: None,
            at: Utc::now(),
        });
        assert!(shared.emit("s-1", "replied"));
        assert_eq!(shared.count("s-1"), 1);
        assert_eq!(shared.stats().events_queued, 1);
    }
}
