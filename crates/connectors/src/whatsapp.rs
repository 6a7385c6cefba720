//! WhatsApp Cloud API (Meta) client: send a template message, and read and verify the status
//! webhooks Meta posts back.
//!
//! It sends each message once and maps the answer to an [`Error`] carrying the retry decision:
//! throughput (130429), pair-rate (131056) and HTTP 429 refusals are throttles with the wait
//! they call for, never failures; a request that may have reached Meta without an answer is
//! [`Error::Ambiguous`], which must not be resent blindly. Pacing and retries belong to the
//! caller's admission control and job runner; nothing here sleeps.

use std::time::Duration;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::rest::{self, Transport};

/// Meta's Graph API.
pub const DEFAULT_API_URL: &str = "https://graph.facebook.com";
/// The Graph API version herald speaks.
pub const API_VERSION: &str = "v21.0";
/// The per-request timeout unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a message waits after Meta's throughput error (130429) without a hint. Meta counts
/// messages per second: a fifth of a second frees a fifth of that second's count. A campaign's
/// send step backs its number off for less, fleet-wide (`THROUGHPUT_BACK_OFF` in herald-jobs,
/// ADR 0015), and waits this long only when that cannot be recorded.
pub const THROUGHPUT_WAIT: Duration = Duration::from_millis(200);
/// How long one recipient waits after the pair rate limit (131056): about one message per
/// 6 s to the same user.
pub const PAIR_WAIT: Duration = Duration::from_secs(6);
/// How long the account waits after an application-level rate limit (codes 4, 80007).
pub const ACCOUNT_WAIT: Duration = Duration::from_secs(60);
/// The signature header of Meta's webhooks.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Meta's throughput-exceeded error code.
pub const CODE_THROUGHPUT: i64 = 130_429;
/// Meta's pair-rate-limit error code.
pub const CODE_PAIR_RATE: i64 = 131_056;

/// Which limit a throttle came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Throttle {
    /// The sender number's messages per second (130429).
    Throughput,
    /// Messages to the same user (131056).
    Pair,
    /// HTTP 429 or an application-level limit (4, 80007).
    Account,
}

/// A send that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A rate limit: try the same message again after `wait`; nothing was sent. `told`: the
    /// wait is Meta's own (`Retry-After`), not this client's default for the limit.
    #[error("WhatsApp throttled the request ({kind:?}, code {code:?}); retry after {wait:?}")]
    Throttled {
        kind: Throttle,
        code: Option<i64>,
        wait: Duration,
        told: bool,
    },
    /// 401, or OAuth errors (190): the token is wrong or expired.
    #[error("WhatsApp refused the token (code {code:?}): {message}")]
    Unauthorized { code: Option<i64>, message: String },
    /// The message itself was refused (bad parameters, unknown template, undeliverable
    /// number…); sending it again cannot help.
    #[error("WhatsApp rejected the message (HTTP {status}, code {code:?}): {message}")]
    Rejected {
        status: u16,
        code: Option<i64>,
        message: String,
    },
    /// 5xx: Meta failed to take the message; it may be sent again.
    #[error("WhatsApp server error (HTTP {status})")]
    Server { status: u16 },
    /// The request never left (connection refused, DNS): certainly not sent.
    #[error("could not reach WhatsApp: {0}")]
    NotSent(String),
    /// The request may have reached Meta but no usable answer came back (timeout, connection
    /// dropped, a 2xx body without a message id): the message may have been sent.
    #[error("no usable answer from WhatsApp; the message may have been sent: {0}")]
    Ambiguous(String),
}

impl Error {
    /// The provider's error code, as text, for the record.
    pub fn code(&self) -> Option<String> {
        match self {
            Error::Throttled { code, .. }
            | Error::Unauthorized { code, .. }
            | Error::Rejected { code, .. } => code.map(|c| c.to_string()),
            Error::Server { status } => Some(format!("http_{status}")),
            Error::NotSent(_) | Error::Ambiguous(_) => None,
        }
    }

    fn from_response(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let error = &value["error"];
        let code = error["code"].as_i64();
        let mut message = error["message"].as_str().unwrap_or_default().to_owned();
        if let Some(details) = error["error_data"]["details"].as_str() {
            message = format!("{message} ({details})");
        }
        if message.is_empty() {
            message = String::from_utf8_lossy(body).chars().take(200).collect();
        }
        let told = retry_after.is_some();
        match (status, code) {
            (_, Some(CODE_THROUGHPUT)) => Error::Throttled {
                kind: Throttle::Throughput,
                code,
                wait: retry_after.unwrap_or(THROUGHPUT_WAIT),
                told,
            },
            (_, Some(CODE_PAIR_RATE)) => Error::Throttled {
                kind: Throttle::Pair,
                code,
                wait: retry_after.unwrap_or(PAIR_WAIT),
                told,
            },
            (_, Some(4 | 80_007)) | (429, _) => Error::Throttled {
                kind: Throttle::Account,
                code,
                wait: retry_after.unwrap_or(if status == 429 {
                    THROUGHPUT_WAIT
                } else {
                    ACCOUNT_WAIT
                }),
                told,
            },
            (401, _) | (_, Some(190)) => Error::Unauthorized { code, message },
            (500..=599, _) => Error::Server { status },
            _ => Error::Rejected {
                status,
                code,
                message,
            },
        }
    }
}

/// Where and as whom to send: one tenant's WhatsApp Business number.
#[derive(Clone, Debug)]
pub struct Account {
    /// `WHATSAPP_API_URL` or the tenant's own; no version segment, no trailing slash needed.
    pub api_url: String,
    pub token: SecretString,
    pub phone_number_id: String,
}

/// A template message to one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateMessage {
    /// The recipient's number, digits only with the country code.
    pub to: String,
    pub template: String,
    pub language: String,
    pub header: Vec<String>,
    pub body: Vec<String>,
    /// (button index, URL suffix) for URL buttons with a placeholder.
    pub url_buttons: Vec<(u32, String)>,
    /// Comes back in every status webhook of the message (herald's send id).
    pub callback_data: String,
}

impl TemplateMessage {
    /// The Cloud API request body.
    pub fn payload(&self) -> Value {
        let texts = |values: &[String]| -> Vec<Value> {
            values
                .iter()
                .map(|v| json!({"type": "text", "text": v}))
                .collect()
        };
        let mut components = Vec::new();
        if !self.header.is_empty() {
            components.push(json!({"type": "header", "parameters": texts(&self.header)}));
        }
        if !self.body.is_empty() {
            components.push(json!({"type": "body", "parameters": texts(&self.body)}));
        }
        for (index, suffix) in &self.url_buttons {
            components.push(json!({
                "type": "button", "sub_type": "url", "index": index.to_string(),
                "parameters": [{"type": "text", "text": suffix}]
            }));
        }
        json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": self.to,
            "type": "template",
            "biz_opaque_callback_data": self.callback_data,
            "template": {
                "name": self.template,
                "language": {"code": self.language},
                "components": components
            }
        })
    }
}

#[derive(Deserialize)]
struct SendResponse {
    #[serde(default)]
    messages: Vec<SentMessage>,
}

#[derive(Deserialize)]
struct SentMessage {
    id: String,
}

/// A Cloud API client. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct WhatsAppClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl WhatsAppClient {
    pub fn new(http: reqwest::Client, timeout: Duration) -> Self {
        Self { http, timeout }
    }

    /// `{api_url}/v21.0/{phone_number_id}/messages`.
    pub fn messages_url(account: &Account) -> String {
        format!(
            "{}/{API_VERSION}/{}/messages",
            account.api_url.trim_end_matches('/'),
            account.phone_number_id
        )
    }

    /// Sends one template message; returns Meta's message id (`wamid…`).
    pub async fn send_template(
        &self,
        account: &Account,
        message: &TemplateMessage,
    ) -> Result<String, Error> {
        let answer = rest::post_json(
            &self.http,
            self.timeout,
            &Self::messages_url(account),
            account.token.expose_secret(),
            &message.payload(),
        )
        .await
        .map_err(|t| match t {
            Transport::NotSent(text) => Error::NotSent(text),
            Transport::Ambiguous(text) => Error::Ambiguous(text),
        })?;
        if !answer.is_success() {
            // The status decides; a body lost in transit only loses detail.
            return Err(Error::from_response(
                answer.status,
                answer.retry_after,
                &answer.body,
            ));
        }
        let body = answer.body;
        let parsed: SendResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Ambiguous(format!("unreadable success body: {e}")))?;
        parsed
            .messages
            .into_iter()
            .next()
            .map(|m| m.id)
            .ok_or_else(|| Error::Ambiguous("a success body without a message id".into()))
    }
}

// ---------------------------------------------------------------------------------------------
// Webhooks

/// The `X-Hub-Signature-256` value for `body`: `sha256=` and the hex HMAC-SHA256 with the app
/// secret.
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app_secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` is the valid signature of `body` under `app_secret`, compared in constant
/// time. A missing or malformed header is invalid.
pub fn verify_signature(app_secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// One status event of a webhook (`entry[].changes[].value.statuses[]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct StatusEvent {
    /// Meta's message id (`wamid…`).
    pub id: String,
    /// `sent`, `delivered`, `read`, `failed` (others are ignored by herald).
    pub status: String,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub recipient_id: Option<String>,
    #[serde(default)]
    pub biz_opaque_callback_data: Option<String>,
    #[serde(default)]
    pub errors: Vec<StatusError>,
}

/// An error carried by a `failed` status.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct StatusError {
    pub code: i64,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error_data: Option<ErrorData>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ErrorData {
    #[serde(default)]
    pub details: Option<String>,
}

impl StatusError {
    /// The most specific text Meta gave.
    pub fn describe(&self) -> String {
        let details = self.error_data.as_ref().and_then(|d| d.details.clone());
        details
            .or_else(|| self.message.clone())
            .or_else(|| self.title.clone())
            .unwrap_or_else(|| format!("error {}", self.code))
    }
}

/// Every status event of a webhook body; other changes (messages, template updates) are
/// skipped. Errors only when the body is not a WhatsApp webhook object at all.
pub fn status_events(body: &[u8]) -> Result<Vec<StatusEvent>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let entries = value["entry"]
        .as_array()
        .ok_or("expected {\"object\":\"whatsapp_business_account\",\"entry\":[…]}")?;
    let mut events = Vec::new();
    for entry in entries {
        for change in entry["changes"].as_array().into_iter().flatten() {
            for status in change["value"]["statuses"].as_array().into_iter().flatten() {
                let event: StatusEvent = serde_json::from_value(status.clone())
                    .map_err(|e| format!("a status event: {e}"))?;
                events.push(event);
            }
        }
    }
    Ok(events)
}

/// A webhook body in Meta's shape carrying `events`, for fakes and tests.
pub fn webhook_body(phone_number_id: &str, events: &[Value]) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "0",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "0", "phone_number_id": phone_number_id},
                    "statuses": events
                }
            }]
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_carry_their_wait_and_are_not_failures() {
        let body = br#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,"error_data":{"messaging_product":"whatsapp","details":"Cloud API message throughput has been reached."}}}"#;
        assert!(matches!(
            Error::from_response(400, None, body),
            Error::Throttled { kind: Throttle::Throughput, wait, told: false, .. } if wait == THROUGHPUT_WAIT
        ));
        let pair = br#"{"error":{"message":"(#131056) pair rate limit","code":131056}}"#;
        assert!(matches!(
            Error::from_response(400, None, pair),
            Error::Throttled { kind: Throttle::Pair, wait, .. } if wait == PAIR_WAIT
        ));
        assert!(matches!(
            Error::from_response(429, Some(Duration::from_secs(3)), b""),
            Error::Throttled { wait, told: true, .. } if wait == Duration::from_secs(3)
        ));
        assert!(matches!(
            Error::from_response(
                400,
                None,
                br#"{"error":{"code":132001,"message":"no template"}}"#
            ),
            Error::Rejected {
                code: Some(132_001),
                ..
            }
        ));
        assert!(matches!(
            Error::from_response(401, None, b""),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            Error::from_response(503, None, b""),
            Error::Server { status: 503 }
        ));
    }

    #[test]
    fn signatures_verify_only_the_exact_body() {
        let body = br#"{"entry":[]}"#;
        let signature = sign("s3cret", body);
        assert!(verify_signature("s3cret", body, Some(&signature)));
        assert!(!verify_signature("other", body, Some(&signature)));
        assert!(!verify_signature(
            "s3cret",
            b"{\"entry\":[1]}",
            Some(&signature)
        ));
        assert!(!verify_signature("s3cret", body, None));
        assert!(!verify_signature("s3cret", body, Some("sha256=zz")));
        assert!(!verify_signature("s3cret", body, Some(&signature[7..])));
    }

    #[test]
    fn payload_has_metas_template_shape() {
        let message = TemplateMessage {
            to: "15550100123".into(),
            template: "order_update".into(),
            language: "en_US".into(),
            header: vec!["Ann".into()],
            body: vec!["42".into(), "today".into()],
            url_buttons: vec![(1, "abc".into())],
            callback_data: "send-1".into(),
        };
        let payload = message.payload();
        assert_eq!(payload["type"], "template");
        assert_eq!(payload["template"]["language"]["code"], "en_US");
        assert_eq!(
            payload["template"]["components"][1]["parameters"][1]["text"],
            "today"
        );
        assert_eq!(payload["template"]["components"][2]["index"], "1");
        assert_eq!(payload["biz_opaque_callback_data"], "send-1");
    }

    #[test]
    fn status_events_are_read_from_every_entry() {
        let body = webhook_body(
            "123",
            &[
                json!({"id": "wamid.1", "status": "failed", "timestamp": "1", "recipient_id": "1555",
                      "biz_opaque_callback_data": "s1",
                      "errors": [{"code": 131026, "title": "Message undeliverable"}]}),
            ],
        );
        let events = status_events(body.to_string().as_bytes()).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].errors[0].describe(), "Message undeliverable");
        assert!(status_events(b"[]").is_err());
    }
}
