//! A local HTTP email provider fake (SendGrid/SES-like) that follows the wire format herald
//! speaks (`docs/providers.md`) and DESIGN.md's facts about email providers.
//!
//! What it does:
//! - `POST /v1/send` with a bearer key and `{"from", "to", "subject"?, "text", "custom_args":
//!   {"send_id"}}` answers 202 `{"message_id"}`; without a subject the email continues the last
//!   thread between `from` and `to` (`Re: …`), and is refused when there is none;
//! - a sliding per-key rate limit (14/s by default, SES's default sending rate): over it, 429
//!   `rate_limited` with `Retry-After`, and nothing is sent;
//! - errors as `{"errors": [{"code", "message", "field"?}]}`: 401 `unauthorized`, 400
//!   `invalid_request` / `invalid_from` / `invalid_recipient` / `invalid_text` /
//!   `missing_subject`, 422
//!   `recipient_suppressed` (an address that bounced before);
//! - no idempotency key: the same request twice sends twice (herald must not ask twice).
//!
//! Events back to herald (see [`crate::outreach`]): `delivered`, or `bounced` for recipients at
//! a bounce domain (then suppressed); `opened` for a share of delivered emails and `clicked` for
//! a share of those opened; `replied` on demand ([`ProviderFake::reply`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rand::Rng as _;
use serde_json::{Value, json};

use crate::outreach::{
    self, Action, Handled, Limit, ProviderFake, Shared, WebhookPlan, WebhookTarget,
};

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct EmailFakeConfig {
    /// Emails per API key; over it, 429.
    pub rate: Limit,
    /// Accepted API keys; empty accepts any non-empty key.
    pub api_keys: Vec<String>,
    /// The share (0.0 to 1.0) of delivered emails that are opened.
    pub open_rate: f64,
    /// The share of opened emails that are clicked.
    pub click_rate: f64,
    /// Recipients at these domains bounce.
    pub bounce_domains: Vec<String>,
    pub webhook: Option<WebhookTarget>,
    pub plan: WebhookPlan,
}

impl Default for EmailFakeConfig {
    fn default() -> Self {
        Self {
            rate: Limit::per_second(14),
            api_keys: Vec::new(),
            open_rate: 0.3,
            click_rate: 0.2,
            bounce_domains: vec!["bounce.test".into()],
            webhook: None,
            plan: WebhookPlan::default(),
        }
    }
}

#[derive(Debug)]
struct Mail {
    config: EmailFakeConfig,
    /// (from, to) → the thread's subject.
    threads: HashMap<(String, String), String>,
    suppressed: HashSet<String>,
}

#[derive(Clone, Debug)]
struct EmailState {
    shared: Shared,
    mail: Arc<Mutex<Mail>>,
}

impl EmailState {
    fn mail(&self) -> MutexGuard<'_, Mail> {
        self.mail.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An error in the provider's shape: `{"errors": [{"code", "message", "field"?}]}`, the field
/// named by the code.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let field = match code {
        "invalid_from" => Some("from"),
        "invalid_recipient" | "recipient_suppressed" => Some("to"),
        "missing_subject" => Some("subject"),
        "invalid_text" => Some("text"),
        _ => None,
    };
    let mut item = json!({"code": code, "message": message});
    if let Some(field) = field {
        item["field"] = json!(field);
    }
    (status, Json(json!({"errors": [item]}))).into_response()
}

fn is_address(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !text.chars().any(char::is_whitespace)
}

impl EmailState {
    fn handle(&self, token: Option<&str>, body: &[u8]) -> Handled {
        let now = self.shared.begin();
        let refuse = |status, code: &str, message: &str| {
            Err(self.shared.refuse(error, status, code, message))
        };
        let config = self.mail().config.clone();
        self.shared
            .authorize(error, (&config.api_keys, &[]), token, "")?;
        let Ok(payload) = serde_json::from_slice::<Value>(body) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body is not JSON",
            );
        };
        let text_of = |field: &str| payload[field].as_str().map(str::trim).unwrap_or_default();
        let (from, to, text) = (text_of("from"), text_of("to"), text_of("text"));
        if !is_address(from) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_from",
                "from must be an email address",
            );
        }
        if !is_address(to) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_recipient",
                "to must be an email address",
            );
        }
        if text.is_empty() {
            return refuse(StatusCode::BAD_REQUEST, "invalid_text", "text is required");
        }
        let thread = (from.to_ascii_lowercase(), to.to_ascii_lowercase());
        let subject = match payload["subject"].as_str().map(str::trim) {
            Some(subject) if !subject.is_empty() => subject.to_owned(),
            _ => match self.mail().threads.get(&thread) {
                Some(subject) => format!("Re: {}", subject.trim_start_matches("Re: ")),
                None => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "missing_subject",
                        "subject is required to start a thread",
                    );
                }
            },
        };
        if self.mail().suppressed.contains(&thread.1) {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "recipient_suppressed",
                "the recipient bounced before and is on the suppression list",
            );
        }
        let stall = self.shared.fault(error, "rate_limited")?;
        let key = format!("key:{}", token.unwrap_or_default());
        if let Err((_, wait)) = self.shared.admit(&[(&key, config.rate)], now) {
            return Err(self.shared.throttle(
                error,
                "rate_limited",
                "the sending rate of this key is exceeded",
                wait,
            ));
        }
        let send_id = payload["custom_args"]["send_id"]
            .as_str()
            .map(str::to_owned);
        let action = self.shared.accept(Action {
            id: String::new(),
            send_id: send_id.clone(),
            account: from.to_owned(),
            kind: "email".into(),
            target: to.to_owned(),
            subject: Some(subject.clone()),
            text: Some(text.to_owned()),
            at: now,
        });
        let bounces = thread
            .1
            .rsplit_once('@')
            .is_some_and(|(_, domain)| config.bounce_domains.iter().any(|d| d == domain));
        {
            let mut mail = self.mail();
            mail.threads.entry(thread.clone()).or_insert(subject);
            if bounces {
                mail.suppressed.insert(thread.1.clone());
            }
        }
        if let Some(send_id) = send_id {
            if bounces {
                self.shared.event(
                    &send_id,
                    "bounced",
                    Some("550 5.1.1 the email account does not exist".into()),
                );
            } else {
                self.shared.event(&send_id, "delivered", None);
                let mut rng = rand::thread_rng();
                if rng.gen_bool(config.open_rate.clamp(0.0, 1.0)) {
                    self.shared.event(&send_id, "opened", None);
                    if rng.gen_bool(config.click_rate.clamp(0.0, 1.0)) {
                        self.shared.event(&send_id, "clicked", None);
                    }
                }
            }
        }
        Ok((action, stall))
    }
}

async fn send(
    State(state): State<EmailState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let handled = state.handle(outreach::bearer(&headers), &body);
    outreach::answer(
        handled,
        StatusCode::ACCEPTED,
        |action| json!({"message_id": action.id}),
    )
    .await
}

/// Starts the fake on `127.0.0.1` on a free port.
pub async fn spawn(config: EmailFakeConfig) -> anyhow::Result<ProviderFake> {
    spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
}

/// Starts the fake on `addr` (port 0 picks a free port).
pub async fn spawn_on(addr: SocketAddr, config: EmailFakeConfig) -> anyhow::Result<ProviderFake> {
    let shared = Shared::new("em", config.webhook.clone(), config.plan.clone());
    let state = EmailState {
        shared: shared.clone(),
        mail: Arc::new(Mutex::new(Mail {
            config,
            threads: HashMap::new(),
            suppressed: HashSet::new(),
        })),
    };
    let app = Router::new()
        .route("/v1/send", post(send))
        .with_state(state);
    outreach::serve(addr, app, shared, "email").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(config: EmailFakeConfig) -> EmailState {
        EmailState {
            shared: Shared::new("em", None, WebhookPlan::default()),
            mail: Arc::new(Mutex::new(Mail {
                config,
                threads: HashMap::new(),
                suppressed: HashSet::new(),
            })),
        }
    }

    fn email(to: &str, subject: Option<&str>, send_id: &str) -> Vec<u8> {
        let mut body = json!({"from": "sales@acme.test", "to": to, "text": "Hello",
                              "custom_args": {"send_id": send_id}});
        if let Some(subject) = subject {
            body["subject"] = json!(subject);
        }
        body.to_string().into_bytes()
    }

    #[test]
    fn follow_ups_continue_the_thread_and_bounced_addresses_are_suppressed() {
        let state = state(EmailFakeConfig {
            rate: Limit::unlimited(),
            open_rate: 0.0,
            ..EmailFakeConfig::default()
        });
        assert!(
            state
                .handle(Some("k"), &email("ann@example.test", None, "s0"))
                .is_err()
        );
        assert!(
            state
                .handle(Some("k"), &email("ann@example.test", Some("Hi"), "s1"))
                .is_ok()
        );
        assert!(
            state
                .handle(Some("k"), &email("ann@example.test", None, "s2"))
                .is_ok()
        );
        assert_eq!(state.shared.actions()[1].subject.as_deref(), Some("Re: Hi"));
        assert!(
            state
                .handle(Some("k"), &email("bob@bounce.test", Some("Hi"), "s3"))
                .is_ok()
        );
        assert!(
            state
                .handle(Some("k"), &email("bob@bounce.test", None, "s4"))
                .is_err()
        );
        assert!(
            state
                .handle(None, &email("ann@example.test", Some("Hi"), "s5"))
                .is_err()
        );
        let stats = state.shared.stats();
        assert_eq!(stats.accepted, 3);
        assert_eq!(stats.errors_of("missing_subject"), 1);
        assert_eq!(stats.errors_of("recipient_suppressed"), 1);
        assert_eq!(stats.errors_of("unauthorized"), 1);
        // delivered, delivered, bounced
        assert_eq!(stats.events_queued, 3);
    }

    #[test]
    fn the_rate_limit_is_per_key() {
        let state = state(EmailFakeConfig {
            rate: Limit::per_second(1),
            ..EmailFakeConfig::default()
        });
        assert!(
            state
                .handle(Some("a"), &email("ann@example.test", Some("Hi"), "s1"))
                .is_ok()
        );
        assert!(
            state
                .handle(Some("a"), &email("bob@example.test", Some("Hi"), "s2"))
                .is_err()
        );
        assert!(
            state
                .handle(Some("b"), &email("bob@example.test", Some("Hi"), "s3"))
                .is_ok()
        );
        assert_eq!(state.shared.stats().errors_of("rate_limited"), 1);
    }
}
