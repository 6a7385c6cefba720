//! An HTTP email provider (SendGrid/SES-like) client: send one email, carrying herald's send id
//! in `custom_args` so the provider's events (delivered, bounced, opened, clicked) name it.
//!
//! The wire format is in `docs/providers.md`. Email providers take no idempotency key, so the
//! caller records the attempt before calling; a request that may have reached the provider
//! without an answer is [`Error::Ambiguous`] and must not be sent again blindly.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::rest::{self, DEFAULT_THROTTLE_WAIT};
pub use crate::rest::{Account, DEFAULT_TIMEOUT, Error};

/// The send route under the account's base URL.
pub const SEND_PATH: &str = "/v1/send";

/// Error codes that mean "too fast" whatever the HTTP status (SES answers its sending-rate
/// limit with 400 `Throttling`).
const THROTTLE_CODES: &[&str] = &["rate_limited", "throttling", "Throttling"];

/// One email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    /// The mailbox it goes out from (the sequence's email sender account).
    pub from: String,
    pub to: String,
    /// `None`: a follow-up, sent in the thread of the last email between `from` and `to`.
    pub subject: Option<String>,
    pub text: String,
    /// herald's send id; comes back in every event about this email.
    pub send_id: String,
}

impl Email {
    /// The request body.
    pub fn payload(&self) -> Value {
        let mut body = json!({
            "from": self.from,
            "to": self.to,
            "text": self.text,
            "custom_args": {"send_id": self.send_id},
        });
        if let Some(subject) = &self.subject {
            body["subject"] = json!(subject);
        }
        body
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    field: Option<String>,
}

/// An error answer: `{"errors": [{"code", "message", "field"?}]}`, the first error decides.
fn error_from(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Error {
    let first = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.errors.into_iter().next());
    let (code, message) = match first {
        Some(item) => {
            let message = item.message.unwrap_or_default();
            let message = match item.field {
                Some(field) => format!("{field}: {message}"),
                None => message,
            };
            (
                item.code.unwrap_or_else(|| format!("http_{status}")),
                message,
            )
        }
        None => (format!("http_{status}"), rest::body_excerpt(body)),
    };
    rest::classify(
        status,
        retry_after,
        code,
        message,
        THROTTLE_CODES,
        DEFAULT_THROTTLE_WAIT,
    )
}

/// An email provider client. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct EmailClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl EmailClient {
    pub fn new(http: reqwest::Client, timeout: Duration) -> Self {
        Self { http, timeout }
    }

    /// Sends one email; returns the provider's message id.
    pub async fn send(&self, account: &Account, email: &Email) -> Result<String, Error> {
        rest::call(
            &self.http,
            self.timeout,
            account,
            (SEND_PATH, &email.payload()),
            "message_id",
            |a| error_from(a.status, a.retry_after, &a.body),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_the_first_item_and_throttles_whatever_the_status() {
        let body =
            br#"{"errors":[{"code":"invalid_recipient","message":"not an address","field":"to"}]}"#;
        assert_eq!(
            error_from(400, None, body),
            Error::Refused {
                status: 400,
                code: "invalid_recipient".into(),
                message: "to: not an address".into()
            }
        );
        assert!(matches!(
            error_from(400, None, br#"{"errors":[{"code":"Throttling","message":"Maximum sending rate exceeded."}]}"#),
            Error::Throttled { wait, .. } if wait == DEFAULT_THROTTLE_WAIT
        ));
        assert!(matches!(
            error_from(429, Some(Duration::from_secs(2)), b""),
            Error::Throttled { wait, .. } if wait == Duration::from_secs(2)
        ));
        assert!(matches!(
            error_from(502, None, b"<html>bad gateway</html>"),
            Error::Server { status: 502 }
        ));
    }

    #[test]
    fn a_follow_up_has_no_subject() {
        let email = Email {
            from: "sales@acme.test".into(),
            to: "ann@example.test".into(),
            subject: None,
            text: "Any thoughts?".into(),
            send_id: "s-1".into(),
        };
        let payload = email.payload();
        assert!(payload.get("subject").is_none());
        assert_eq!(payload["custom_args"]["send_id"], "s-1");
    }
}
