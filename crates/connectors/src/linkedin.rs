//! A LinkedIn automation provider (Unipile/PhantomBuster-like) client: one action (visit,
//! connect, message, follow) from one of the tenant's LinkedIn accounts, carrying herald's send
//! id so the provider's events (an invitation accepted, a reply) name it.
//!
//! The wire format is in `docs/providers.md`. LinkedIn caps invitations per account (about 100
//! a day and 200 a week): the provider's `invitation_limit_exceeded` is a throttle until the
//! limit resets, never a failure — the invitation was not sent and will be, later. Like every
//! throttle it comes back as [`Error::Throttled`] with the wait; nothing here sleeps.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::rest;
pub use crate::rest::{Account, DEFAULT_TIMEOUT, Error};

/// The error code of a reached daily or weekly invitation limit.
pub const CODE_INVITATION_LIMIT: &str = "invitation_limit_exceeded";
/// The error code of the provider's own request rate limit.
pub const CODE_TOO_MANY_REQUESTS: &str = "too_many_requests";
/// How long to wait after an invitation limit that names no reset (neither `Retry-After` nor
/// `retry_at`): try again in an hour rather than guess the provider's day.
pub const LIMIT_WAIT: Duration = Duration::from_secs(3600);
/// The longest invitation note LinkedIn takes.
pub const MAX_NOTE_CHARS: usize = 300;

/// What to do on a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionType {
    Visit,
    Connect,
    Message,
    Follow,
}

impl ActionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::Visit => "visit",
            ActionType::Connect => "connect",
            ActionType::Message => "message",
            ActionType::Follow => "follow",
        }
    }
}

/// One action from `account` (the provider's id or name of the LinkedIn account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub account: String,
    pub action: ActionType,
    pub profile_url: String,
    /// The invitation note (connect, optional) or the message (message).
    pub text: Option<String>,
    /// herald's send id; comes back in every event about this action.
    pub send_id: String,
}

impl Action {
    /// `/v1/accounts/{account}/actions`, the account escaped as a path segment.
    pub fn path(&self) -> String {
        rest::actions_path(&self.account)
    }

    /// The request body.
    pub fn payload(&self) -> Value {
        let mut body = json!({
            "type": self.action.as_str(),
            "profile_url": self.profile_url,
            "send_id": self.send_id,
        });
        if let Some(text) = &self.text {
            body["text"] = json!(text);
        }
        body
    }
}

/// An error answer, problem-details style: `{"type": "errors/<code>", "status", "title",
/// "detail", "limit"?, "retry_at"?}`.
#[derive(Deserialize)]
struct Problem {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    retry_at: Option<String>,
}

fn error_from(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Error {
    let Ok(problem) = serde_json::from_slice::<Problem>(body) else {
        return rest::classify(
            status,
            retry_after,
            format!("http_{status}"),
            rest::body_excerpt(body),
            &[],
            LIMIT_WAIT,
        );
    };
    let code = problem
        .kind
        .as_deref()
        .map(|k| k.trim_start_matches("errors/").to_owned())
        .unwrap_or_else(|| format!("http_{status}"));
    let message = match (problem.title, problem.detail) {
        (Some(title), Some(detail)) => format!("{title}: {detail}"),
        (title, detail) => title.or(detail).unwrap_or_default(),
    };
    // The reset instant is the fallback when the provider sends no Retry-After.
    let until_reset = problem
        .retry_at
        .as_deref()
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .and_then(|at| (at.with_timezone(&Utc) - now).to_std().ok());
    rest::classify(
        status,
        retry_after.or(until_reset),
        code,
        message,
        &[CODE_INVITATION_LIMIT],
        LIMIT_WAIT,
    )
}

/// A LinkedIn automation provider client. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct LinkedinClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl LinkedinClient {
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
            |a| error_from(a.status, a.retry_after, &a.body, Utc::now()),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invitation_limit_throttles_until_the_reset() {
        let now: DateTime<Utc> = "2026-03-02T15:00:00Z".parse().unwrap();
        let body = br#"{"type":"errors/invitation_limit_exceeded","status":429,"title":"Invitation limit reached","detail":"daily limit of 100","limit":"daily","retry_at":"2026-03-03T00:00:00Z"}"#;
        assert_eq!(
            error_from(429, None, body, now),
            Error::Throttled {
                code: CODE_INVITATION_LIMIT.into(),
                wait: Duration::from_secs(9 * 3600)
            }
        );
        // Retry-After wins over retry_at; a limit without either waits an hour.
        assert!(matches!(
            error_from(429, Some(Duration::from_secs(60)), body, now),
            Error::Throttled { wait, .. } if wait == Duration::from_secs(60)
        ));
        let bare = br#"{"type":"errors/invitation_limit_exceeded","status":422}"#;
        assert!(matches!(
            error_from(422, None, bare, now),
            Error::Throttled { wait, .. } if wait == LIMIT_WAIT
        ));
    }

    #[test]
    fn other_problems_are_refusals_named_by_their_type() {
        let now = Utc::now();
        let body =
            br#"{"type":"errors/profile_not_found","status":422,"title":"Profile not found"}"#;
        assert_eq!(
            error_from(422, None, body, now),
            Error::Refused {
                status: 422,
                code: "profile_not_found".into(),
                message: "Profile not found".into()
            }
        );
        assert!(matches!(
            error_from(
                401,
                None,
                br#"{"type":"errors/unauthorized","status":401}"#,
                now
            ),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            error_from(429, None, br#"{"type":"errors/too_many_requests","status":429}"#, now),
            Error::Throttled { wait, .. } if wait == rest::DEFAULT_THROTTLE_WAIT
        ));
    }

    #[test]
    fn the_account_is_one_escaped_path_segment() {
        let action = Action {
            account: "sales team/1".into(),
            action: ActionType::Connect,
            profile_url: "https://www.linkedin.com/in/ann".into(),
            text: None,
            send_id: "s-1".into(),
        };
        assert_eq!(action.path(), "/v1/accounts/sales%20team%2F1/actions");
        assert!(action.payload().get("text").is_none());
    }
}
