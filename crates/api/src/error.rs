//! The one error type every handler returns, and the one place it becomes a status code and a
//! JSON body `{"error": {"code", "message", "field"?}}`. 5xx bodies say nothing internal; the
//! detail goes to the log.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request failed, from the caller's side.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No bearer token, or one herald does not know.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The token is valid but may not do this (a tenant pausing a queue, ops enqueueing).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The thing does not exist, or belongs to another tenant (indistinguishable on purpose).
    #[error("{what} not found")]
    NotFound { what: String },
    /// No route matches the path.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body is not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A header or path parameter is unusable.
    #[error("{field}: {message}")]
    BadRequest { field: String, message: String },
    /// The body is over the configured size limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is not declared with a content type the route takes (named in the message).
    #[error("content-type must be {0}")]
    UnsupportedMediaType(&'static str),
    /// A CSV upload that is not CSV at all (binary data, no header, no `username` column):
    /// refused whole.
    #[error("not a CSV file: {0}")]
    MalformedCsv(String),
    /// The request conflicts with the resource's state (resuming a campaign that has not failed).
    #[error("{0}")]
    Conflict(String),
    /// Well-formed JSON that is wrong: names the field and the problem.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// An `Idempotency-Key` reused with a different request.
    #[error("Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    /// Redis memory is above the high-water mark; try again after the delay.
    #[error("the queue is over its memory high-water mark; retry later")]
    Backpressure { retry_after: Duration },
    /// Postgres or Redis failed; the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
    /// Postgres or Redis is unreachable right now.
    #[error("a backing service is unavailable")]
    Unavailable(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound { what: what.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::MalformedJson(_)
            | ApiError::MalformedCsv(_)
            | ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid { .. } | ApiError::IdempotencyMismatch => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Backpressure { .. } | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code clients branch on (documented in `docs/api.md`).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound { .. } => "not_found",
            ApiError::RouteNotFound(_) => "route_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::MalformedCsv(_) => "malformed_csv",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Conflict(_) => "conflict",
            ApiError::Invalid { .. } => "invalid",
            ApiError::IdempotencyMismatch => "idempotency_key_reused",
            ApiError::Backpressure { .. } => "backpressure",
            ApiError::Internal(_) => "internal",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { field, .. } | ApiError::BadRequest { field, .. } => Some(field),
            ApiError::IdempotencyMismatch => Some("Idempotency-Key"),
            _ => None,
        }
    }
}

impl From<herald_store::Error> for ApiError {
    fn from(e: herald_store::Error) -> Self {
        match e {
            herald_store::Error::Invalid { field, reason } => ApiError::invalid(field, reason),
            herald_store::Error::NotFound { what } => ApiError::NotFound { what },
            herald_store::Error::Conflict { what } => ApiError::Conflict(what),
            herald_store::Error::Database(sqlx::Error::PoolTimedOut) => {
                ApiError::Unavailable("postgres pool timed out".into())
            }
            // The connection went away (Postgres restarting): the pool replaces it, so the
            // request can be retried.
            herald_store::Error::Database(e) if connection_lost(&e) => {
                ApiError::Unavailable(format!("postgres connection lost: {e}"))
            }
            other => ApiError::Internal(format!("store: {other}")),
        }
    }
}

/// Whether `e` says the connection is gone rather than the statement wrong: an I/O error, or
/// the server shutting down or not yet accepting connections (SQLSTATE class 57P).
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("57P")),
        _ => false,
    }
}

impl From<herald_queue::Error> for ApiError {
    fn from(e: herald_queue::Error) -> Self {
        match e {
            herald_queue::Error::InvalidJob(m) => ApiError::invalid("job", m),
            herald_queue::Error::Backpressure { .. } => ApiError::Backpressure {
                retry_after: crate::BACKPRESSURE_RETRY_AFTER,
            },
            other if other.is_transient() => ApiError::Unavailable(format!("redis: {other}")),
            other => ApiError::Internal(format!("queue: {other}")),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::from(herald_store::Error::Database(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            match &self {
                ApiError::Internal(detail) | ApiError::Unavailable(detail) => {
                    tracing::error!(code = self.code(), %detail, "request failed")
                }
                _ => tracing::warn!(code = self.code(), "request refused"),
            }
        }
        let mut error = json!({"code": self.code(), "message": self.to_string()});
        if let Some(field) = self.field() {
            error["field"] = json!(field);
        }
        let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
        if let ApiError::Backpressure { retry_after } = &self {
            let secs = retry_after.as_secs().max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_postgres_connection_is_unavailable_not_internal() {
        let lost = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ));
        assert!(
            matches!(ApiError::from(lost), ApiError::Unavailable(m) if m.contains("connection lost"))
        );
        assert!(matches!(
            ApiError::from(sqlx::Error::PoolTimedOut),
            ApiError::Unavailable(_)
        ));
        assert!(matches!(
            ApiError::from(sqlx::Error::RowNotFound),
            ApiError::Internal(_)
        ));
    }
}
