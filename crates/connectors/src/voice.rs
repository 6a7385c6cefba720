//! Voice-agent provider client (Vapi's API): place an outbound call, and read the call-ended
//! server messages the provider posts back.
//!
//! It sends each request once and maps the answer to an [`Error`] carrying the retry decision;
//! concurrency (the account's slots) is the caller's admission control, never a wait in here.
//! The provider takes no idempotency key, so the caller records the attempt before calling.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Vapi's public API.
pub const DEFAULT_API_URL: &str = "https://api.vapi.ai";
/// Per request, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// A voice request that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The account is at its concurrent-call limit: not a failure of the call, which may be
    /// placed once a call ends.
    #[error("the voice provider account is at its concurrency limit")]
    AtConcurrencyLimit,
    /// 429 for another reason: too many requests.
    #[error("the voice provider is rate limiting requests")]
    RateLimited,
    /// 5xx: the provider failed; the request may be retried.
    #[error("voice provider server error (HTTP {status})")]
    Server { status: u16 },
    /// 401 or 403: the API key is missing or wrong.
    #[error("the voice provider refused the API key")]
    Unauthorized,
    /// Another 4xx: the request itself is wrong (an unknown assistant, a bad number).
    #[error("the voice provider rejected the call (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// No usable answer (connection failure, timeout). The call may or may not have been
    /// placed.
    #[error("could not reach the voice provider: {0}")]
    Transport(String),
    /// A success status with a body that is not what the provider documents.
    #[error("unexpected response from the voice provider: {0}")]
    Decode(String),
}

impl Error {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::AtConcurrencyLimit | Self::RateLimited | Self::Server { .. } | Self::Transport(_)
        )
    }

    fn transport(err: &reqwest::Error) -> Self {
        let mut message = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Transport(message)
    }

    /// Maps a non-success answer. Vapi reports an account over its concurrency limit with a
    /// message naming the limit (`"Over Concurrency Limit."`), as a 429 or a 400, sometimes
    /// with `subscriptionLimits.concurrencyBlocked`.
    pub(crate) fn from_response(status: u16, body: &[u8]) -> Self {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if concurrency_blocked(&value) {
            return Self::AtConcurrencyLimit;
        }
        let message = match &value["message"] {
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::from_utf8_lossy(body).chars().take(200).collect(),
        };
        match status {
            429 => Self::RateLimited,
            401 | 403 => Self::Unauthorized,
            500..=599 => Self::Server { status },
            _ => Self::Rejected { status, message },
        }
    }
}

fn concurrency_blocked(body: &Value) -> bool {
    let by_flag = body["subscriptionLimits"]["concurrencyBlocked"].as_bool() == Some(true);
    let by_message = body["message"]
        .as_str()
        .is_some_and(|m| m.to_ascii_lowercase().contains("concurrency"));
    by_flag || by_message
}

/// Where and as whom to call.
#[derive(Clone, Debug)]
pub struct VoiceConfig {
    /// `VOICE_API_URL` or the tenant's own; a fake's URL in tests. No trailing slash.
    pub api_url: String,
    pub api_key: SecretString,
    pub timeout: Duration,
}

/// The person to call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Customer {
    pub number: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /call`'s body.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NewCall {
    #[serde(rename = "assistantId")]
    pub assistant_id: String,
    #[serde(rename = "phoneNumberId")]
    pub phone_number_id: String,
    pub customer: Customer,
    /// herald's ids and the contact's context; the provider echoes it in server messages.
    pub metadata: Map<String, Value>,
}

/// The provider's answer to `POST /call`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct PlacedCall {
    pub id: String,
    #[serde(default)]
    pub status: String,
}

/// A client for one provider account. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct VoiceClient {
    http: reqwest::Client,
    api_url: String,
    api_key: SecretString,
    timeout: Duration,
}

impl VoiceClient {
    pub fn new(http: reqwest::Client, config: VoiceConfig) -> Self {
        Self {
            http,
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            api_key: config.api_key,
            timeout: config.timeout,
        }
    }

    /// Places an outbound call: `POST {api_url}/call` with a bearer key.
    pub async fn create_call(&self, call: &NewCall) -> Result<PlacedCall, Error> {
        let response = self
            .http
            .post(format!("{}/call", self.api_url))
            .bearer_auth(self.api_key.expose_secret())
            .timeout(self.timeout)
            .json(call)
            .send()
            .await
            .map_err(|e| Error::transport(&e))?;
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        if !status.is_success() {
            let error = Error::from_response(status.as_u16(), &body);
            tracing::debug!(status = status.as_u16(), %error, "voice call refused");
            return Err(error);
        }
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| Error::Decode(e.to_string()))?;
        if concurrency_blocked(&value) {
            return Err(Error::AtConcurrencyLimit);
        }
        serde_json::from_value(value).map_err(|e| Error::Decode(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Server messages (webhooks)

/// What a server message says about a call, as far as herald cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// The call ended: its provider id, the provider's reason and, when known, how long it
    /// lasted.
    Ended {
        call_id: String,
        ended_reason: Option<String>,
        duration_ms: Option<i64>,
    },
    /// The call is ringing or connected.
    InProgress { call_id: String },
    /// A message herald does not act on (transcripts, tool calls, other statuses).
    Other,
}

/// Why a server message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not a server message: {0}")]
    Malformed(String),
    #[error("the message names no call id")]
    NoCallId,
}

/// Reads a Vapi server message: `{"message": {"type": "status-update", "status": "ended",
/// "endedReason", "call": {"id"}}}` or `{"message": {"type": "end-of-call-report", …}}`.
pub fn parse_server_message(body: &[u8]) -> Result<ServerEvent, MessageError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| MessageError::Malformed(e.to_string()))?;
    let message = value
        .get("message")
        .filter(|m| m.is_object())
        .ok_or_else(|| MessageError::Malformed("no `message` object".into()))?;
    let kind = message["type"].as_str().unwrap_or_default();
    let status = message["status"].as_str().unwrap_or_default();
    let call_id = || {
        message["call"]["id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or(MessageError::NoCallId)
    };
    let ended = kind == "end-of-call-report"
        || (kind == "status-update" && matches!(status, "ended" | "completed" | "call_ended"));
    if ended {
        let ended_reason = message["endedReason"]
            .as_str()
            .or_else(|| message["call"]["endedReason"].as_str())
            .map(str::to_owned);
        let duration_ms = message["durationMs"]
            .as_f64()
            .or_else(|| message["durationSeconds"].as_f64().map(|s| s * 1000.0))
            .filter(|d| d.is_finite() && *d >= 0.0)
            .map(|d| d.round() as i64);
        return Ok(ServerEvent::Ended {
            call_id: call_id()?,
            ended_reason,
            duration_ms,
        });
    }
    if kind == "status-update" && matches!(status, "ringing" | "in-progress") {
        return Ok(ServerEvent::InProgress {
            call_id: call_id()?,
        });
    }
    Ok(ServerEvent::Other)
}

/// How a call ended, from the provider's `endedReason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedAs {
    Completed,
    Busy,
    NoAnswer,
    Failed,
    Cancelled,
}

/// Classifies Vapi's `endedReason` (`customer-ended-call`, `customer-busy`,
/// `customer-did-not-answer`, `…error…`, `manually-canceled` …). An unknown reason without
/// "error" in it counts as completed: the call happened.
pub fn classify_ended_reason(reason: Option<&str>) -> EndedAs {
    let Some(reason) = reason else {
        return EndedAs::Completed;
    };
    let reason = reason.to_ascii_lowercase();
    if reason.contains("busy") {
        EndedAs::Busy
    } else if reason.contains("did-not-answer")
        || reason.contains("no-answer")
        || reason.contains("voicemail")
    {
        EndedAs::NoAnswer
    } else if reason.contains("cancel") {
        EndedAs::Cancelled
    } else if reason.contains("error") || reason.contains("failed") || reason.contains("fault") {
        EndedAs::Failed
    } else {
        EndedAs::Completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_refusals_are_retries_not_failures() {
        let over = Error::from_response(
            400,
            br#"{"message":"Over Concurrency Limit.","error":"Bad Request","statusCode":400}"#,
        );
        assert_eq!(over, Error::AtConcurrencyLimit);
        assert!(over.is_retryable());
        assert_eq!(
            Error::from_response(
                429,
                br#"{"subscriptionLimits":{"concurrencyBlocked":true}}"#
            ),
            Error::AtConcurrencyLimit
        );
        assert_eq!(Error::from_response(429, b""), Error::RateLimited);
        assert_eq!(Error::from_response(401, b""), Error::Unauthorized);
        let rejected = Error::from_response(400, br#"{"message":["assistantId must be a UUID"]}"#);
        assert!(!rejected.is_retryable());
        assert!(rejected.to_string().contains("assistantId"));
        assert!(Error::from_response(502, b"").is_retryable());
    }

    #[test]
    fn server_messages_are_read() {
        let ended = br#"{"message":{"type":"status-update","status":"ended","endedReason":"customer-busy","call":{"id":"c1"}}}"#;
        assert_eq!(
            parse_server_message(ended).unwrap(),
            ServerEvent::Ended {
                call_id: "c1".into(),
                ended_reason: Some("customer-busy".into()),
                duration_ms: None
            }
        );
        let report = br#"{"message":{"type":"end-of-call-report","endedReason":"customer-ended-call","durationSeconds":12.5,"call":{"id":"c2"}}}"#;
        assert_eq!(
            parse_server_message(report).unwrap(),
            ServerEvent::Ended {
                call_id: "c2".into(),
                ended_reason: Some("customer-ended-call".into()),
                duration_ms: Some(12_500)
            }
        );
        assert_eq!(
            parse_server_message(br#"{"message":{"type":"transcript"}}"#).unwrap(),
            ServerEvent::Other
        );
        assert_eq!(
            parse_server_message(br#"{"message":{"type":"end-of-call-report","call":{}}}"#),
            Err(MessageError::NoCallId)
        );
        assert!(parse_server_message(b"nope").is_err());
    }

    #[test]
    fn ended_reasons_map_to_outcomes() {
        use EndedAs::*;
        assert_eq!(
            classify_ended_reason(Some("customer-ended-call")),
            Completed
        );
        assert_eq!(classify_ended_reason(Some("customer-busy")), Busy);
        assert_eq!(
            classify_ended_reason(Some("customer-did-not-answer")),
            NoAnswer
        );
        assert_eq!(
            classify_ended_reason(Some("pipeline-error-openai-llm-failed")),
            Failed
        );
        assert_eq!(classify_ended_reason(Some("manually-canceled")), Cancelled);
        assert_eq!(classify_ended_reason(None), Completed);
    }
}
