//! The fake's HTTP surface: Airtable's `/v0` record routes behind a gate that authenticates,
//! rate-limits and injects faults, plus the `/__fake` inspection routes for tests.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::faults::FailPlan;
use super::records::{self, ListQuery, Rejection, WriteKind};
use super::state::{Admission, AirtableFakeState, RateLimits};

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = json!({"error": {"type": self.kind, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// Airtable's 429 body; deliberately sent without a `Retry-After` header, as Airtable does.
fn rate_limited() -> Response {
    let body = json!({"errors": [{
        "error": "RATE_LIMIT_REACHED",
        "message": "Rate limit exceeded. Please try again later",
    }]});
    (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
}

fn admission_response(admission: Admission) -> Option<Response> {
    let rejection = match admission {
        Admission::Admitted => return None,
        Admission::RateLimited | Admission::Injected(StatusCode::TOO_MANY_REQUESTS) => {
            return Some(rate_limited());
        }
        Admission::Unauthorized => Rejection::new(
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_REQUIRED",
            "Authentication required",
        ),
        Admission::Forbidden => Rejection::new(
            StatusCode::FORBIDDEN,
            "INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND",
            "Invalid permissions, or the requested model was not found. Check that both your \
             user and your token have the required permissions, and that the model names \
             and/or ids are correct.",
        ),
        Admission::Injected(StatusCode::SERVICE_UNAVAILABLE) => Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            "The server could not process your request in time (injected by the fake)",
        ),
        Admission::Injected(status) => Rejection::new(
            status,
            "SERVER_ERROR",
            "The server encountered an unexpected condition (injected by the fake)",
        ),
    };
    Some(rejection.into_response())
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Every `/v0` request passes here: it is counted, then authenticated, rate-limited and
/// possibly answered with an injected fault before it reaches a handler.
async fn gate(
    State(state): State<AirtableFakeState>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    let base = params.get("base").cloned().unwrap_or_default();
    let admission = state.admit(&base, bearer_token(request.headers()));
    let response = match admission_response(admission) {
        Some(response) => response,
        None => next.run(request).await,
    };
    state.record_outcome(&base, response.status());
    response
}

fn respond<T: serde::Serialize>(result: Result<T, Rejection>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(rejection) => rejection.into_response(),
    }
}

async fn list(
    State(state): State<AirtableFakeState>,
    Path((base, table)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let query = ListQuery::from_pairs(pairs);
    respond(state.read_table(&base, &table, |stored| records::list(stored, &query)))
}

async fn create(
    State(state): State<AirtableFakeState>,
    Path((base, table)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    respond(
        records::parse_write(&body, WriteKind::Create).and_then(|request| {
            state.write_table(&base, &table, |stored, schema, now| {
                records::create(stored, schema, request, now)
            })
        }),
    )
}

fn update_many(
    state: &AirtableFakeState,
    base: &str,
    table: &str,
    body: &[u8],
    replace: bool,
) -> Response {
    respond(
        records::parse_write(body, WriteKind::Update).and_then(|request| {
            state.write_table(base, table, |stored, schema, now| {
                records::update(stored, schema, request, None, replace, now)
            })
        }),
    )
}

async fn patch_many(
    State(state): State<AirtableFakeState>,
    Path((base, table)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    update_many(&state, &base, &table, &body, false)
}

async fn put_many(
    State(state): State<AirtableFakeState>,
    Path((base, table)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    update_many(&state, &base, &table, &body, true)
}

async fn delete_many(
    State(state): State<AirtableFakeState>,
    Path((base, table)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let ids: Vec<String> = pairs
        .into_iter()
        .filter(|(key, _)| key == "records[]" || key == "records")
        .map(|(_, id)| id)
        .collect();
    if ids.len() > records::MAX_RECORDS_PER_REQUEST {
        return Rejection::too_many_records(ids.len()).into_response();
    }
    respond(
        state
            .write_table(&base, &table, |stored, _, _| records::delete(stored, &ids))
            .map(|deleted| json!({"records": deleted})),
    )
}

async fn get_one(
    State(state): State<AirtableFakeState>,
    Path((base, table, id)): Path<(String, String, String)>,
) -> Response {
    respond(state.read_table(&base, &table, |stored| {
        stored
            .get(&id)
            .cloned()
            .ok_or_else(|| Rejection::not_found(format!("Could not find record {id}")))
    }))
}

fn update_one(
    state: &AirtableFakeState,
    (base, table, id): (String, String, String),
    body: &[u8],
    replace: bool,
) -> Response {
    respond(
        records::parse_write(body, WriteKind::UpdateOne).and_then(|request| {
            state.write_table(&base, &table, |stored, schema, now| {
                records::update(stored, schema, request, Some(&id), replace, now)
            })
        }),
    )
}

async fn patch_one(
    State(state): State<AirtableFakeState>,
    Path(path): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    update_one(&state, path, &body, false)
}

async fn put_one(
    State(state): State<AirtableFakeState>,
    Path(path): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    update_one(&state, path, &body, true)
}

async fn delete_one(
    State(state): State<AirtableFakeState>,
    Path((base, table, id)): Path<(String, String, String)>,
) -> Response {
    respond(state.write_table(&base, &table, |stored, _, _| {
        if stored.get(&id).is_none() {
            return Err(Rejection::not_found(format!("Could not find record {id}")));
        }
        records::delete(stored, std::slice::from_ref(&id))
            .map(|mut deleted| deleted.pop())
            .map(|deleted| json!(deleted))
    }))
}

async fn stats(State(state): State<AirtableFakeState>) -> Response {
    Json(state.stats()).into_response()
}

async fn tables(State(state): State<AirtableFakeState>, Path(base): Path<String>) -> Response {
    Json(json!({"tables": state.tables(&base)})).into_response()
}

async fn table_records(
    State(state): State<AirtableFakeState>,
    Path((base, table)): Path<(String, String)>,
) -> Response {
    Json(json!({"records": state.records(&base, &table)})).into_response()
}

async fn fail_plans(State(state): State<AirtableFakeState>) -> Response {
    Json(json!({"plans": state.fail_plans()})).into_response()
}

async fn set_fail_plan(State(state): State<AirtableFakeState>, body: Bytes) -> Response {
    let plan: FailPlan = match serde_json::from_slice(&body) {
        Ok(plan) => plan,
        Err(err) => return Rejection::invalid_body(err.to_string()).into_response(),
    };
    match state.set_fail_plan(plan) {
        Ok(()) => Json(json!({"plans": state.fail_plans()})).into_response(),
        Err(err) => Rejection::invalid_body(err.to_string()).into_response(),
    }
}

async fn clear_fail_plans(State(state): State<AirtableFakeState>) -> Response {
    state.clear_fail_plans();
    Json(json!({"plans": []})).into_response()
}

/// Body of `POST /__fake/limits`; omitted fields keep their current value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsUpdate {
    per_base_rps: Option<u32>,
    per_token_rps: Option<u32>,
    lockout_ms: Option<u64>,
}

fn limits_body(limits: RateLimits) -> Value {
    json!({
        "per_base_rps": limits.per_base_rps,
        "per_token_rps": limits.per_token_rps,
        "lockout_ms": u64::try_from(limits.lockout.as_millis()).unwrap_or(u64::MAX),
    })
}

async fn limits(State(state): State<AirtableFakeState>) -> Response {
    Json(limits_body(state.rate_limits())).into_response()
}

async fn set_limits(State(state): State<AirtableFakeState>, body: Bytes) -> Response {
    let update: LimitsUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(err) => return Rejection::invalid_body(err.to_string()).into_response(),
    };
    let current = state.rate_limits();
    let limits = RateLimits {
        per_base_rps: update.per_base_rps.unwrap_or(current.per_base_rps),
        per_token_rps: update.per_token_rps.unwrap_or(current.per_token_rps),
        lockout: update
            .lockout_ms
            .map_or(current.lockout, Duration::from_millis),
    };
    state.set_rate_limits(limits);
    Json(limits_body(limits)).into_response()
}

async fn reset(State(state): State<AirtableFakeState>) -> Response {
    state.reset();
    StatusCode::NO_CONTENT.into_response()
}

async fn not_found() -> Response {
    Rejection::not_found("Could not find what you are looking for").into_response()
}

/// The whole fake as one router, shared by [`super::spawn`] and the binary.
pub fn router(state: AirtableFakeState) -> Router {
    let airtable = Router::new()
        .route(
            "/v0/{base}/{table}",
            get(list)
                .post(create)
                .patch(patch_many)
                .put(put_many)
                .delete(delete_many),
        )
        .route(
            "/v0/{base}/{table}/{record}",
            get(get_one)
                .patch(patch_one)
                .put(put_one)
                .delete(delete_one),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), gate));
    let inspection = Router::new()
        .route("/__fake/stats", get(stats))
        .route("/__fake/bases/{base}/tables", get(tables))
        .route(
            "/__fake/bases/{base}/tables/{table}/records",
            get(table_records),
        )
        .route(
            "/__fake/faults",
            get(fail_plans).post(set_fail_plan).delete(clear_fail_plans),
        )
        .route("/__fake/limits", get(limits).post(set_limits))
        .route("/__fake/reset", post(reset));
    airtable
        .merge(inspection)
        .fallback(not_found)
        .with_state(state)
}
