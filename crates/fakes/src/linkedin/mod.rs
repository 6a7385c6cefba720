//! A local LinkedIn automation provider fake (Unipile/PhantomBuster-like) that follows the wire
//! format herald speaks (`docs/providers.md`) and DESIGN.md's facts about LinkedIn.
//!
//! What it does:
//! - `POST /v1/accounts/{account}/actions` with a bearer key and `{"type": "visit" | "connect" |
//!   "message" | "follow", "profile_url", "text"?, "send_id"}` answers 201 `{"object": "Action",
//!   "action_id", "type"}`;
//! - invitations (`connect`) are capped per account: 100 per UTC day and 200 in any rolling
//!   7 days by default; over either, 429 `errors/invitation_limit_exceeded` with `limit`
//!   (`daily`/`weekly`), `retry_at` and `Retry-After` until the limit frees a unit;
//! - a per-account request rate (5/s by default): over it, 429 `errors/too_many_requests`;
//! - errors problem-details style `{"type": "errors/<code>", "status", "title", "detail"}`:
//!   401 `unauthorized`, 404 `account_not_found`, 400 `invalid_parameters`, 422
//!   `note_too_long` (over 300 characters) and `already_invited`;
//! - no idempotency key: the same request twice acts twice (herald must not ask twice).
//!
//! Events back to herald (see [`crate::outreach`]): `connected` when an invitation is accepted
//! (a share of them, or on demand with `emit(send_id, "connected")`), `replied` on demand.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Days, SecondsFormat, Utc};
use rand::Rng as _;
use serde_json::{Value, json};

use crate::outreach::{
    self, Action, Handled, Limit, ProviderFake, Shared, WebhookPlan, WebhookTarget,
};

/// How the fake behaves; the defaults are LinkedIn's.
#[derive(Clone, Debug)]
pub struct LinkedinFakeConfig {
    /// Requests per account; over it, 429 `too_many_requests`.
    pub rate: Limit,
    /// Invitations per account per UTC day (0: unlimited).
    pub invitations_per_day: u32,
    /// Invitations per account in any rolling 7 days (0: unlimited).
    pub invitations_per_week: u32,
    /// The share (0.0 to 1.0) of invitations accepted (a `connected` event).
    pub accept_rate: f64,
    /// Accepted API keys; empty accepts any non-empty key.
    pub api_keys: Vec<String>,
    /// Known accounts; empty knows every account.
    pub accounts: Vec<String>,
    pub webhook: Option<WebhookTarget>,
    pub plan: WebhookPlan,
}

impl Default for LinkedinFakeConfig {
    fn default() -> Self {
        Self {
            rate: Limit::per_second(5),
            invitations_per_day: 100,
            invitations_per_week: 200,
            accept_rate: 0.3,
            api_keys: Vec::new(),
            accounts: Vec::new(),
            webhook: None,
            plan: WebhookPlan::default(),
        }
    }
}

const ACTIONS: &[&str] = &["visit", "connect", "message", "follow"];
/// The error code of a reached invitation limit.
const CODE_LIMIT: &str = "invitation_limit_exceeded";
const MAX_NOTE_CHARS: usize = 300;

#[derive(Debug)]
struct Network {
    config: LinkedinFakeConfig,
    /// (account, profile) pairs with an invitation sent.
    invited: HashSet<(String, String)>,
}

#[derive(Clone, Debug)]
struct LinkedinState {
    shared: Shared,
    network: Arc<Mutex<Network>>,
}

/// A problem-details body: `{"type": "errors/<code>", "status", "title", "detail"}`, the title
/// spelled from the code.
fn problem_body(status: StatusCode, code: &str, detail: &str) -> Value {
    let words = code.replace('_', " ");
    let mut title = words.chars();
    let title = title
        .next()
        .map(|first| first.to_uppercase().chain(title).collect::<String>())
        .unwrap_or_default();
    json!({
        "type": format!("errors/{code}"),
        "status": status.as_u16(),
        "title": title,
        "detail": detail,
    })
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    (status, Json(problem_body(status, code, detail))).into_response()
}

/// The next UTC midnight after `now`.
fn next_utc_day(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive()
        .checked_add_days(Days::new(1))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(now + chrono::Duration::days(1), |d| d.and_utc())
}

impl LinkedinState {
    fn network(&self) -> MutexGuard<'_, Network> {
        self.network.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, account: &str, token: Option<&str>, body: &[u8]) -> Handled {
        let now = self.shared.begin();
        let refuse = |status, code: &str, detail: &str| {
            Err(self.shared.refuse(problem, status, code, detail))
        };
        let config = self.network().config.clone();
        self.shared.authorize(
            problem,
            (&config.api_keys, &config.accounts),
            token,
            account,
        )?;
        let payload: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let kind = payload["type"].as_str().unwrap_or_default();
        let profile = payload["profile_url"].as_str().unwrap_or_default().trim();
        let text = payload["text"]
            .as_str()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let invalid = |detail: &str| refuse(StatusCode::BAD_REQUEST, "invalid_parameters", detail);
        if !ACTIONS.contains(&kind) {
            return invalid("type must be visit, connect, message or follow");
        }
        if !(profile.starts_with("https://") || profile.starts_with("http://"))
            || !profile.contains("/in/")
        {
            return invalid("profile_url must be a LinkedIn profile URL (…/in/<name>)");
        }
        if kind == "message" && text.is_none() {
            return invalid("text is required for a message");
        }
        if kind == "connect" && text.is_some_and(|t| t.chars().count() > MAX_NOTE_CHARS) {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "note_too_long",
                "an invitation note has at most 300 characters",
            );
        }
        let pair = (account.to_owned(), profile.to_owned());
        if kind == "connect" && self.network().invited.contains(&pair) {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "already_invited",
                "an invitation to this profile is pending",
            );
        }
        let stall = self.shared.fault(problem, "too_many_requests")?;
        let rate_key = format!("rate:{account}");
        let day_key = format!("inv-day:{account}:{}", now.date_naive());
        let week_key = format!("inv-week:{account}");
        let mut limits = vec![(rate_key.as_str(), config.rate)];
        if kind == "connect" {
            // The daily count is per calendar day (a key per date); the weekly one rolls.
            limits.push((
                day_key.as_str(),
                Limit {
                    max: config.invitations_per_day,
                    per: Duration::from_secs(86_400),
                },
            ));
            limits.push((
                week_key.as_str(),
                Limit {
                    max: config.invitations_per_week,
                    per: Duration::from_secs(7 * 86_400),
                },
            ));
        }
        match self.shared.admit(&limits, now) {
            Ok(()) => {}
            Err((0, wait)) => {
                return Err(self.shared.throttle(
                    problem,
                    "too_many_requests",
                    "this account's request rate is exceeded",
                    wait,
                ));
            }
            Err((index, wait)) => {
                let (limit, retry_at, max) = if index == 1 {
                    ("daily", next_utc_day(now), config.invitations_per_day)
                } else {
                    let at = now + chrono::Duration::from_std(wait).unwrap_or_default();
                    ("weekly", at, config.invitations_per_week)
                };
                self.shared.refused(CODE_LIMIT);
                let status = StatusCode::TOO_MANY_REQUESTS;
                let mut body = problem_body(
                    status,
                    CODE_LIMIT,
                    &format!("this account reached its {limit} limit of {max} invitations"),
                );
                body["limit"] = json!(limit);
                body["retry_at"] = json!(retry_at.to_rfc3339_opts(SecondsFormat::Secs, true));
                let wait = (retry_at - now).to_std().unwrap_or(Duration::ZERO);
                let response = (status, Json(body)).into_response();
                return Err(Box::new(outreach::with_retry_after(response, wait)));
            }
        }
        if kind == "connect" {
            self.network().invited.insert(pair);
        }
        let send_id = payload["send_id"].as_str().map(str::to_owned);
        let action = self.shared.accept(Action {
            id: String::new(),
            send_id: send_id.clone(),
            account: account.to_owned(),
            kind: kind.to_owned(),
            target: profile.to_owned(),
            subject: None,
            text: text.map(str::to_owned),
            at: now,
        });
        if kind == "connect"
            && let Some(send_id) = send_id
            && rand::thread_rng().gen_bool(config.accept_rate.clamp(0.0, 1.0))
        {
            self.shared.event(&send_id, "connected", None);
        }
        Ok((action, stall))
    }
}

async fn act(
    State(state): State<LinkedinState>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let handled = state.handle(&account, outreach::bearer(&headers), &body);
    outreach::answer(
        handled,
        StatusCode::CREATED,
        |action| json!({"object": "Action", "action_id": action.id, "type": action.kind}),
    )
    .await
}

/// Starts the fake on `127.0.0.1` on a free port.
pub async fn spawn(config: LinkedinFakeConfig) -> anyhow::Result<ProviderFake> {
    spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
}

/// Starts the fake on `addr` (port 0 picks a free port).
pub async fn spawn_on(
    addr: SocketAddr,
    config: LinkedinFakeConfig,
) -> anyhow::Result<ProviderFake> {
    let shared = Shared::new("li", config.webhook.clone(), config.plan.clone());
    let state = LinkedinState {
        shared: shared.clone(),
        network: Arc::new(Mutex::new(Network {
            config,
            invited: HashSet::new(),
        })),
    };
    let app = Router::new()
        .route("/v1/accounts/{account}/actions", post(act))
        .with_state(state);
    outreach::serve(addr, app, shared, "LinkedIn").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(config: LinkedinFakeConfig) -> LinkedinState {
        LinkedinState {
            shared: Shared::new("li", None, WebhookPlan::default()),
            network: Arc::new(Mutex::new(Network {
                config,
                invited: HashSet::new(),
            })),
        }
    }

    fn connect(i: usize) -> Vec<u8> {
        json!({"type": "connect", "profile_url": format!("https://www.linkedin.com/in/p{i}"),
               "send_id": format!("s{i}")})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn invitations_stop_at_the_daily_and_weekly_limits() {
        let state = state(LinkedinFakeConfig {
            rate: Limit::unlimited(),
            invitations_per_day: 3,
            invitations_per_week: 5,
            accept_rate: 0.0,
            ..LinkedinFakeConfig::default()
        });
        let monday: DateTime<Utc> = "2030-01-07T10:00:00Z".parse().unwrap();
        state.shared.advance_to(monday);
        let mut accepted = 0;
        for i in 0..4 {
            if state.handle("a", Some("k"), &connect(i)).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 3);
        // Another account has its own limits; a visit is not an invitation.
        assert!(state.handle("b", Some("k"), &connect(10)).is_ok());
        let visit = json!({"type": "visit", "profile_url": "https://www.linkedin.com/in/p0"});
        assert!(
            state
                .handle("a", Some("k"), visit.to_string().as_bytes())
                .is_ok()
        );
        // The next day two more, then the rolling week is full.
        state
            .shared
            .advance_to("2030-01-08T09:00:00Z".parse().unwrap());
        for i in 20..23 {
            let _ = state.handle("a", Some("k"), &connect(i));
        }
        let stats = state.shared.stats();
        assert_eq!(stats.accepted, 3 + 1 + 1 + 2);
        assert_eq!(stats.errors_of("invitation_limit_exceeded"), 2);
        // Inviting the same profile again is refused.
        state
            .shared
            .advance_to("2030-01-20T09:00:00Z".parse().unwrap());
        assert!(state.handle("a", Some("k"), &connect(0)).is_err());
        assert_eq!(state.shared.stats().errors_of("already_invited"), 1);
    }

    #[test]
    fn next_utc_day_is_midnight() {
        let at: DateTime<Utc> = "2030-01-07T23:59:59Z".parse().unwrap();
        assert_eq!(
            next_utc_day(at),
            "2030-01-08T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}
