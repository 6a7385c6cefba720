//! A local Instagram automation provider fake that follows the wire format herald speaks
//! (`docs/providers.md`).
//!
//! What it does:
//! - `POST /v1/accounts/{account}/actions` with a bearer key and `{"type": "dm" | "follow" |
//!   "like", "handle", "text"?, "send_id"}` answers 201 `{"action_id", "type"}`;
//! - a per-account action rate (60 an hour by default): over it, 429 `rate_limited` with
//!   `Retry-After`, and nothing is done;
//! - errors as `{"error": {"code", "message"}}`: 401 `unauthorized`, 404 `account_not_found`,
//!   400 `invalid_request` (a handle that cannot exist, a DM without text or over 1,000
//!   characters);
//! - no idempotency key: the same request twice acts twice (herald must not ask twice).
//!
//! Events back to herald (see [`crate::outreach`]): `replied` on demand
//! ([`ProviderFake::reply`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::outreach::{
    self, Action, Handled, Limit, ProviderFake, Shared, WebhookPlan, WebhookTarget,
};

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct InstagramFakeConfig {
    /// Actions per account; over it, 429 `rate_limited`.
    pub rate: Limit,
    /// Accepted API keys; empty accepts any non-empty key.
    pub api_keys: Vec<String>,
    /// Known accounts; empty knows every account.
    pub accounts: Vec<String>,
    pub webhook: Option<WebhookTarget>,
    pub plan: WebhookPlan,
}

impl Default for InstagramFakeConfig {
    fn default() -> Self {
        Self {
            rate: Limit::per_hour(60),
            api_keys: Vec::new(),
            accounts: Vec::new(),
            webhook: None,
            plan: WebhookPlan::default(),
        }
    }
}

const ACTIONS: &[&str] = &["dm", "follow", "like"];
const MAX_DM_CHARS: usize = 1_000;

#[derive(Clone, Debug)]
struct InstagramState {
    shared: Shared,
    config: Arc<InstagramFakeConfig>,
}

/// An error in the provider's shape: `{"error": {"code", "message"}}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Instagram handles: 1 to 30 letters, digits, periods and underscores.
fn is_handle(handle: &str) -> bool {
    (1..=30).contains(&handle.len())
        && handle
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
}

impl InstagramState {
    fn handle(&self, account: &str, token: Option<&str>, body: &[u8]) -> Handled {
        let now = self.shared.begin();
        let config = &self.config;
        self.shared
            .authorize(error, (&config.api_keys, &config.accounts), token, account)?;
        let payload: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let kind = payload["type"].as_str().unwrap_or_default();
        let handle = payload["handle"].as_str().unwrap_or_default().trim();
        let text = payload["text"]
            .as_str()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let problem = if !ACTIONS.contains(&kind) {
            Some("type must be dm, follow or like")
        } else if !is_handle(handle) {
            Some("handle must be an Instagram username")
        } else if kind == "dm" && text.is_none_or(|t| t.chars().count() > MAX_DM_CHARS) {
            Some("a dm needs text of at most 1000 characters")
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(self.shared.refuse(
                error,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                message,
            ));
        }
        let stall = self.shared.fault(error, "rate_limited")?;
        let key = format!("rate:{account}");
        if let Err((_, wait)) = self.shared.admit(&[(&key, config.rate)], now) {
            return Err(self.shared.throttle(
                error,
                "rate_limited",
                "this account's action rate is exceeded",
                wait,
            ));
        }
        let action = self.shared.accept(Action {
            id: String::new(),
            send_id: payload["send_id"].as_str().map(str::to_owned),
            account: account.to_owned(),
            kind: kind.to_owned(),
            target: handle.to_owned(),
            subject: None,
            text: text.map(str::to_owned),
            at: now,
        });
        Ok((action, stall))
    }
}

async fn act(
    State(state): State<InstagramState>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let handled = state.handle(&account, outreach::bearer(&headers), &body);
    outreach::answer(
        handled,
        StatusCode::CREATED,
        |action| json!({"action_id": action.id, "type": action.kind}),
    )
    .await
}

/// Starts the fake on `127.0.0.1` on a free port.
pub async fn spawn(config: InstagramFakeConfig) -> anyhow::Result<ProviderFake> {
    spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
}

/// Starts the fake on `addr` (port 0 picks a free port).
pub async fn spawn_on(
    addr: SocketAddr,
    config: InstagramFakeConfig,
) -> anyhow::Result<ProviderFake> {
    let shared = Shared::new("ig", config.webhook.clone(), config.plan.clone());
    let state = InstagramState {
        shared: shared.clone(),
        config: Arc::new(config),
    };
    let app = Router::new()
        .route("/v1/accounts/{account}/actions", post(act))
        .with_state(state);
    outreach::serve(addr, app, shared, "Instagram").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_is_per_account_and_handles_are_checked() {
        let state = InstagramState {
            shared: Shared::new("ig", None, WebhookPlan::default()),
            config: Arc::new(InstagramFakeConfig {
                rate: Limit::per_hour(1),
                ..InstagramFakeConfig::default()
            }),
        };
        let follow = |handle: &str| {
            json!({"type": "follow", "handle": handle, "send_id": handle})
                .to_string()
                .into_bytes()
        };
        assert!(state.handle("a", Some("k"), &follow("ann")).is_ok());
        assert!(state.handle("a", Some("k"), &follow("bob")).is_err());
        assert!(state.handle("b", Some("k"), &follow("bob")).is_ok());
        assert!(
            state
                .handle("b", Some("k"), &follow("not a handle"))
                .is_err()
        );
        let dm = json!({"type": "dm", "handle": "ann"}).to_string();
        assert!(state.handle("c", Some("k"), dm.as_bytes()).is_err());
        let stats = state.shared.stats();
        assert_eq!(stats.accepted, 2);
        assert_eq!(stats.errors_of("rate_limited"), 1);
        assert_eq!(stats.errors_of("invalid_request"), 2);
    }
}
