//! What can go wrong talking to Airtable, named from the caller's side, with the retry decision.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

/// How long Airtable makes a base (or token) wait after a 429: it sends no `Retry-After`.
pub const RATE_LIMIT_LOCKOUT: Duration = Duration::from_secs(30);

/// An Airtable request that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Refused before any request was sent: Airtable takes at most `max` records per request.
    #[error("Airtable takes at most {max} records per request, got {count}")]
    TooManyRecords { count: usize, max: usize },
    /// 429: the base or token is over its rate limit and locked out for a while.
    #[error("Airtable rate limit reached")]
    RateLimited {
        /// The `Retry-After` header, when one was sent (Airtable itself sends none).
        retry_after: Option<Duration>,
    },
    /// 5xx: Airtable failed; the request may be retried.
    #[error("Airtable server error (HTTP {status})")]
    Server { status: u16 },
    /// 4xx other than 401/403/404/429 (mostly 422): the request itself is wrong and retrying
    /// it cannot help. `kind` is Airtable's error type, e.g. `UNKNOWN_FIELD_NAME`.
    #[error("Airtable rejected the request (HTTP {status} {kind}): {message}")]
    Rejected {
        status: u16,
        kind: String,
        message: String,
    },
    /// 404: the base or table does not exist.
    #[error("Airtable base or table not found")]
    NotFound,
    /// 401 or 403: the token is missing, invalid, or has no access to the base.
    #[error("Airtable refused the token")]
    Unauthorized,
    /// No usable answer: connection failure or timeout. A write may or may not have happened,
    /// so only idempotent writes (upserts) should be retried blindly.
    #[error("could not reach Airtable: {0}")]
    Transport(String),
    /// A success status with a body that is not what Airtable documents.
    #[error("unexpected response from Airtable: {0}")]
    Decode(String),
}

impl Error {
    /// Whether the same request may succeed later: rate limits, server errors and transport
    /// failures. Everything else needs a different request (or a human).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Transport(_)
        )
    }

    /// The least wait before retrying, when the provider decides it: the `Retry-After` header,
    /// else Airtable's documented 30 s lock-out, for a 429; `None` otherwise (use a backoff).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => Some(retry_after.unwrap_or(RATE_LIMIT_LOCKOUT)),
            _ => None,
        }
    }

    pub(crate) fn transport(err: &reqwest::Error) -> Self {
        // reqwest's own message is terse ("error sending request"); the causes say why.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Transport(message)
    }

    /// Maps a non-success response to the error its status means.
    pub(crate) fn from_response(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        match status {
            429 => Self::RateLimited { retry_after },
            401 | 403 => Self::Unauthorized,
            404 => Self::NotFound,
            500..=599 => Self::Server { status },
            _ => {
                let (kind, message) = describe_body(body);
                Self::Rejected {
                    status,
                    kind,
                    message,
                }
            }
        }
    }
}

/// Airtable's error type and message from an error body. Airtable uses
/// `{"error":{"type","message"}}`, sometimes `{"error":"TYPE"}`, and for 429s
/// `{"errors":[{"error","message"}]}`.
fn describe_body(body: &[u8]) -> (String, String) {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let error = &value["error"];
    if let Some(kind) = error["type"].as_str() {
        return (kind.to_owned(), text(&error["message"]));
    }
    if let Some(kind) = error.as_str() {
        return (kind.to_owned(), text(&value["message"]));
    }
    if let Some(kind) = value["errors"][0]["error"].as_str() {
        return (kind.to_owned(), text(&value["errors"][0]["message"]));
    }
    let raw = String::from_utf8_lossy(body);
    let message: String = raw.chars().take(200).collect();
    ("UNKNOWN".to_owned(), message)
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date.
pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_retry_decisions() {
        let rate_limited = Error::from_response(429, None, b"");
        assert!(rate_limited.is_retryable());
        assert_eq!(rate_limited.retry_after(), Some(RATE_LIMIT_LOCKOUT));
        assert!(Error::from_response(503, None, b"").is_retryable());
        assert_eq!(Error::from_response(404, None, b""), Error::NotFound);
        assert_eq!(Error::from_response(403, None, b""), Error::Unauthorized);
        let rejected = Error::from_response(
            422,
            None,
            br#"{"error":{"type":"INVALID_VALUE_FOR_COLUMN","message":"bad"}}"#,
        );
        assert_eq!(
            rejected,
            Error::Rejected {
                status: 422,
                kind: "INVALID_VALUE_FOR_COLUMN".into(),
                message: "bad".into()
            }
        );
        assert!(!rejected.is_retryable());
        assert_eq!(rejected.retry_after(), None);
    }

    #[test]
    fn every_error_body_shape_is_understood() {
        assert_eq!(
            describe_body(br#"{"error":"NOT_FOUND"}"#),
            ("NOT_FOUND".into(), String::new())
        );
        assert_eq!(
            describe_body(br#"{"errors":[{"error":"RATE_LIMIT_REACHED","message":"slow"}]}"#),
            ("RATE_LIMIT_REACHED".into(), "slow".into())
        );
        assert_eq!(
            describe_body(b"<html>bad gateway</html>"),
            ("UNKNOWN".into(), "<html>bad gateway</html>".into())
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 01 Jan 2025 00:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Tue, 31 Dec 2024 23:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
