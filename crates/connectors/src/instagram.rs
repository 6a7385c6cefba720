//! An Instagram automation provider client: one action (DM, follow, like) from one of the
//! tenant's Instagram accounts to a user by handle, carrying herald's send id so the provider's
//! events (a reply) name it.
//!
//! The wire format is in `docs/providers.md`. Instagram rate-limits accounts hard: `429
//! rate_limited` carries its `Retry-After`, and `action_blocked` (Instagram's temporary block
//! of an account) is a throttle of hours, never a failure of the lead.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::rest;
pub use crate::rest::{Account, DEFAULT_TIMEOUT, Error};

/// The error code of the provider's request rate limit.
pub const CODE_RATE_LIMITED: &str = "rate_limited";
/// The error code of Instagram's temporary block of an account's actions.
pub const CODE_ACTION_BLOCKED: &str = "action_blocked";
/// How long to wait after an action block that names no wait.
pub const BLOCK_WAIT: Duration = Duration::from_secs(24 * 3600);

/// What to do to a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionType {
    Dm,
    Follow,
    /// Like the user's latest post.
    Like,
}

impl ActionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::Dm => "dm",
            ActionType::Follow => "follow",
            ActionType::Like => "like",
        }
    }
}

/// One action from `account` (the provider's id or name of the Instagram account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub account: String,
    pub action: ActionType,
    /// The user's handle, with or without the leading `@`.
    pub handle: String,
    /// The message of a DM.
    pub text: Option<String>,
    /// herald's send id; comes back in every event about this action.
    pub send_id: String,
}

impl Action {
    /// `/v1/accounts/{account}/actions`, the account escaped as a path segment.
    pub fn path(&self) -> String {
        rest::actions_path(&self.account)
    }

    /// The request body; the handle goes without its `@`.
    pub fn payload(&self) -> Value {
        let mut body = json!({
            "type": self.action.as_str(),
            "handle": self.handle.trim().trim_start_matches('@'),
            "send_id": self.send_id,
        });
        if let Some(text) = &self.text {
            body["text"] = json!(text);
        }
        body
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorItem,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// An error answer: `{"error": {"code", "message"}}`.
fn error_from(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Error {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => (
            error.code.unwrap_or_else(|| format!("http_{status}")),
            error.message.unwrap_or_default(),
        ),
        Err(_) => (format!("http_{status}"), rest::body_excerpt(body)),
    };
    let wait = if code == CODE_ACTION_BLOCKED {
        BLOCK_WAIT
    } else {
        rest::DEFAULT_THROTTLE_WAIT
    };
    rest::classify(
        status,
        retry_after,
        code,
        message,
        &[CODE_RATE_LIMITED, CODE_ACTION_BLOCKED],
        wait,
    )
}

/// An Instagram automation provider client. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct InstagramClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl InstagramClient {
    pub fn new(http: reqwest::Client, timeout: Duration) -> Self {
        Self { http, timeout }
    }

    /// Performs one action; returns the provider's action id.
    pub async fn act(&self, account: &Account, action: &Action) -> Result<String, Error> {
        rest::call(
            &self.http,
            self.timeout,
            account,
            (&action.path(), &action.payload()),
            "action_id",
            |a| error_from(a.status, a.retry_after, &a.body),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_blocks_are_throttles_with_their_waits() {
        assert!(matches!(
            error_from(429, Some(Duration::from_secs(5)), br#"{"error":{"code":"rate_limited","message":"slow down"}}"#),
            Error::Throttled { wait, .. } if wait == Duration::from_secs(5)
        ));
        assert!(matches!(
            error_from(403, None, br#"{"error":{"code":"action_blocked","message":"try again later"}}"#),
            Error::Throttled { wait, .. } if wait == BLOCK_WAIT
        ));
        assert_eq!(
            error_from(
                422,
                None,
                br#"{"error":{"code":"user_not_found","message":"no such user"}}"#
            ),
            Error::Refused {
                status: 422,
                code: "user_not_found".into(),
                message: "no such user".into()
            }
        );
    }

    #[test]
    fn the_handle_goes_without_its_at_sign() {
        let action = Action {
            account: "brand".into(),
            action: ActionType::Dm,
            handle: " @ann.k ".into(),
            text: Some("Hi".into()),
            send_id: "s-1".into(),
        };
        assert_eq!(action.payload()["handle"], "ann.k");
        assert_eq!(action.payload()["type"], "dm");
    }
}
