//! What the JSON-over-HTTP outreach providers (email, LinkedIn, Instagram) have in common: the
//! account herald calls as, the [`Error`] every call maps to, and the one POST that classifies
//! what went wrong on the way the same way the WhatsApp client does.
//!
//! Each provider module reads its own error body (they differ, as real providers' do) and hands
//! the code and message to [`classify`]; nothing here retries or sleeps.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;

/// The per-request timeout unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait after a throttling answer that names no wait (a per-second limit).
pub const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(1);

/// Where and as whom to call a provider: one tenant's (or the worker's) account.
#[derive(Clone)]
pub struct Account {
    /// The provider's base URL (`EMAIL_API_URL` …); no trailing slash needed.
    pub api_url: String,
    pub api_key: SecretString,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl Account {
    /// `{api_url}{path}`, `path` starting with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url.trim_end_matches('/'))
    }
}

/// A call that did not succeed, with the retry decision in the variant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A rate or volume limit: nothing was done; the same call may succeed after `wait`.
    #[error("the provider throttled the request ({code}); retry after {wait:?}")]
    Throttled { code: String, wait: Duration },
    /// 401: the API key is wrong, revoked or missing. Nothing was done.
    #[error("the provider refused the API key ({code}): {message}")]
    Unauthorized { code: String, message: String },
    /// The provider refused this action (bad address, unknown profile, suppressed recipient…);
    /// sending it again cannot help.
    #[error("the provider refused the action (HTTP {status}, {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// 5xx: the provider answered that it did not take the action; it may be tried again.
    #[error("provider server error (HTTP {status})")]
    Server { status: u16 },
    /// The request never left (connection refused, DNS): certainly not done.
    #[error("could not reach the provider: {0}")]
    NotSent(String),
    /// The request may have reached the provider but no usable answer came back (timeout,
    /// connection dropped, a 2xx body without the id): the action may have been done.
    #[error("no usable answer from the provider; the action may have been done: {0}")]
    Ambiguous(String),
}

impl Error {
    /// The provider's error code, for the record.
    pub fn code(&self) -> Option<String> {
        match self {
            Error::Throttled { code, .. }
            | Error::Unauthorized { code, .. }
            | Error::Refused { code, .. } => Some(code.clone()),
            Error::Server { status } => Some(format!("http_{status}")),
            Error::NotSent(_) | Error::Ambiguous(_) => None,
        }
    }
}

/// An error answer in the common terms: the HTTP status decides, except that a code in
/// `throttle_codes` is a throttle whatever the status (some providers answer limits with 400
/// or 403). `code` and `message` come from the provider's body, read by its module.
pub(crate) fn classify(
    status: u16,
    retry_after: Option<Duration>,
    code: String,
    message: String,
    throttle_codes: &[&str],
    throttle_wait: Duration,
) -> Error {
    if throttle_codes.contains(&code.as_str()) {
        return Error::Throttled {
            code,
            wait: retry_after.unwrap_or(throttle_wait),
        };
    }
    match status {
        429 => Error::Throttled {
            code,
            wait: retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT),
        },
        401 => Error::Unauthorized { code, message },
        500..=599 => Error::Server { status },
        _ => Error::Refused {
            status,
            code,
            message,
        },
    }
}

/// A provider's answer: its status, its `Retry-After` (whole seconds), and its body.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A request that brought back no answer to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// It never left (connection refused, DNS): certainly not done.
    NotSent(String),
    /// It may have reached the provider (timeout, connection dropped, a success whose body was
    /// lost): maybe done.
    Ambiguous(String),
}

impl From<Transport> for Error {
    fn from(t: Transport) -> Self {
        match t {
            Transport::NotSent(m) => Error::NotSent(m),
            Transport::Ambiguous(m) => Error::Ambiguous(m),
        }
    }
}

/// POSTs `body` as JSON to `url` with `bearer` as the token, once. A success whose body was
/// lost in transit is [`Transport::Ambiguous`]; an error whose body was lost keeps its status
/// (the status decides).
pub(crate) async fn post_json(
    http: &reqwest::Client,
    timeout: Duration,
    url: &str,
    bearer: &str,
    body: &Value,
) -> Result<Answer, Transport> {
    let response = http
        .post(url)
        .bearer_auth(bearer)
        .timeout(timeout)
        .json(body)
        .send()
        .await
        .map_err(|err| {
            let text = describe(&err);
            if err.is_connect() || err.is_builder() {
                Transport::NotSent(text)
            } else {
                Transport::Ambiguous(text)
            }
        })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = match response.bytes().await {
        Ok(bytes) => bytes.to_vec(),
        Err(err) if status.is_success() => return Err(Transport::Ambiguous(describe(&err))),
        Err(_) => Vec::new(),
    };
    Ok(Answer {
        status: status.as_u16(),
        retry_after,
        body,
    })
}

/// One action at `{account.api_url}{path}`: the string `id_field` of a success (its absence is
/// ambiguous), or the error `error_from` reads from the provider's answer.
pub(crate) async fn call(
    http: &reqwest::Client,
    timeout: Duration,
    account: &Account,
    (path, body): (&str, &Value),
    id_field: &str,
    error_from: impl FnOnce(&Answer) -> Error,
) -> Result<String, Error> {
    let answer = post_json(
        http,
        timeout,
        &account.url(path),
        account.api_key.expose_secret(),
        body,
    )
    .await?;
    if !answer.is_success() {
        return Err(error_from(&answer));
    }
    id_from(&answer.body, id_field)
}

/// The string field `field` of a success body: the provider's id for what it did. A success
/// without it is ambiguous (the provider may have acted).
pub(crate) fn id_from(body: &[u8], field: &str) -> Result<String, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::Ambiguous(format!("unreadable success body: {e}")))?;
    value[field]
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Error::Ambiguous(format!("a success body without {field}")))
}

/// `/v1/accounts/{account}/actions`, where the automation providers (LinkedIn, Instagram) take
/// an account's actions.
pub fn actions_path(account: &str) -> String {
    format!("/v1/accounts/{}/actions", path_segment(account))
}

/// `text` as one URL path segment: unreserved characters kept, every other byte escaped.
pub(crate) fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Up to 200 characters of a body that carries no readable error, for the record.
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

/// A reqwest error with its chain of causes.
pub(crate) fn describe(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_decides_unless_the_code_is_a_throttle() {
        let c = |status, code: &str| {
            classify(
                status,
                None,
                code.into(),
                "m".into(),
                &["limit_reached"],
                Duration::from_secs(3600),
            )
        };
        assert!(
            matches!(c(429, "x"), Error::Throttled { wait, .. } if wait == DEFAULT_THROTTLE_WAIT)
        );
        assert!(
            matches!(c(422, "limit_reached"), Error::Throttled { wait, .. } if wait == Duration::from_secs(3600))
        );
        assert!(matches!(c(401, "unauthorized"), Error::Unauthorized { .. }));
        assert!(matches!(
            c(403, "forbidden"),
            Error::Refused { status: 403, .. }
        ));
        assert!(matches!(c(503, ""), Error::Server { status: 503 }));
        assert_eq!(c(400, "bad").code().as_deref(), Some("bad"));
    }

    #[test]
    fn a_success_without_its_id_is_ambiguous() {
        assert_eq!(
            id_from(br#"{"message_id":"m-1"}"#, "message_id").unwrap(),
            "m-1"
        );
        assert!(matches!(
            id_from(br#"{"message_id":""}"#, "message_id"),
            Err(Error::Ambiguous(_))
        ));
        assert!(matches!(
            id_from(b"oops", "message_id"),
            Err(Error::Ambiguous(_))
        ));
    }

    #[test]
    fn path_segments_escape_everything_but_unreserved_characters() {
        assert_eq!(path_segment("sales-1"), "sales-1");
        assert_eq!(path_segment("a b/c?é"), "a%20b%2Fc%3F%C3%A9");
    }
}
