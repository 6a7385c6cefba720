//! `Idempotency-Key` on POST: the first successful response to a tenant's key is stored in
//! Postgres and replayed (same status, same body) when the same request comes again; the same
//! key with a different request is 422. Requests with the same key are serialised by a
//! Postgres advisory lock, so two racing retries do the work once.
//!
//! Only 2xx responses are stored: a refused request (4xx, 503 backpressure) did nothing, and
//! the caller may fix it and retry under the same key. Ops requests are not recorded (their
//! actions — pause, resume, retry — are idempotent by nature and have no tenant to file under).

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_store::idempotency::{self, MAX_KEY_LEN, StoreOutcome};
use herald_store::tenants::Principal;
use sha2::{Digest, Sha256};

use crate::extract::body_rejection;
use crate::{ApiError, AppState};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on a replayed response.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub async fn replay_or_record(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if request.method() != Method::POST {
        return Ok(next.run(request).await);
    }
    let Some(key) = request.headers().get(&IDEMPOTENCY_KEY) else {
        return Ok(next.run(request).await);
    };
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .ok_or_else(|| ApiError::BadRequest {
            field: "Idempotency-Key".into(),
            message: format!("must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
        })?
        .to_owned();
    let Some(Principal::Tenant(tenant)) = request.extensions().get::<Principal>().copied() else {
        return Ok(next.run(request).await);
    };

    let (parts, body) = request.into_parts();
    // The limit in force is the route's (the router sets it); this one only words the 413.
    let limit = if parts.uri.path() == "/v1/profiles" {
        state.config().import_body_limit
    } else {
        state.config().body_limit
    };
    let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), &state)
        .await
        .map_err(|e| body_rejection(e, limit))?;
    let request_hash = request_hash(&parts.method, parts.uri.path(), &bytes);

    let _slot = state
        .idempotency_slots()
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
    let mut lock = state.pool().begin().await?;
    idempotency::lock(&mut lock, tenant, &key).await?;
    if let Some(stored) = idempotency::lookup(state.pool(), tenant, &key).await? {
        if stored.request_hash != request_hash {
            return Err(ApiError::IdempotencyMismatch);
        }
        return Ok(replay(stored.status_code, stored.response));
    }

    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !response.status().is_success() {
        return Ok(response);
    }
    let (mut parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(format!("reading a response to record it: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let outcome = idempotency::store(
        state.pool(),
        tenant,
        &key,
        &request_hash,
        parts.status.as_u16(),
        &json,
    )
    .await?;
    lock.commit().await?;
    if let StoreOutcome::AlreadyStored(first) = outcome {
        // Only possible if the lock was lost (a dropped connection): answer as the first did.
        return Ok(replay(first.status_code, first.response));
    }
    parts.headers.remove(&REPLAYED);
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// sha256 over the method, the path and the body: the same key on another route is another
/// request.
fn request_hash(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b" ");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hex::encode(hash.finalize())
}

fn replay(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
