//! Route handlers. Each checks who is calling ([`Caller`]), resolves the queue through the
//! job-type registry, and answers JSON; errors go through [`ApiError`].

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use herald_core::{JobId, QueueName};
use herald_jobs::JobType;
use herald_queue::{Enqueued, Queue};
use herald_store::{outbox, tenants};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::Caller;
use crate::enqueue::{self, Invalid, MAX_BATCH};
use crate::extract::{JsonBody, Params, QueryParams};
use crate::routes::split_action;
use crate::{ApiError, AppState};

/// How long a readiness check waits for Postgres or Redis.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// The default and largest page of dead jobs.
const DEAD_PAGE_DEFAULT: usize = 50;
const DEAD_PAGE_MAX: usize = 500;
/// The most hosts one allow-list may hold.
const MAX_ALLOWED_HOSTS: usize = 1_000;

pub async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when Postgres and Redis both answer; 503 naming the one that did not.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let postgres =
        tokio::time::timeout(READY_TIMEOUT, sqlx::query("select 1").execute(state.pool())).await;
    let postgres = match postgres {
        Ok(Ok(_)) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: postgres failed");
            "unavailable"
        }
        Err(_) => "timed out",
    };
    let redis = match tokio::time::timeout(READY_TIMEOUT, state.queues().ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: redis failed");
            "unavailable"
        }
        Err(_) => "timed out",
    };
    let ready = postgres == "ok" && redis == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": {"postgres": postgres, "redis": redis},
    });
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state
        .metrics()
        .render()
        .map_err(|e| ApiError::Internal(format!("rendering metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

/// The job type and queue handle for `name`; unknown queues are 404.
fn resolve(state: &AppState, name: &str) -> Result<(&'static JobType, Queue), ApiError> {
    let job_type = herald_jobs::job_type(name)
        .ok_or_else(|| ApiError::not_found(format!("queue {name:?}")))?;
    let queue_name = QueueName::try_from(job_type.queue.to_owned())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((job_type, state.queues().queue(&queue_name)))
}

async fn queue_summary(
    caller: &Caller,
    job_type: &JobType,
    queue: &Queue,
) -> Result<Value, ApiError> {
    let counts = queue.counts(caller.scope()).await?;
    let paused = queue.is_paused().await?;
    Ok(json!({
        "name": job_type.queue,
        "description": job_type.description,
        "version": job_type.version,
        "max_attempts": job_type.max_attempts,
        "timeout_ms": job_type.timeout.as_millis() as u64,
        "public": job_type.public,
        "paused": paused,
        "counts": counts,
    }))
}

pub async fn list_queues(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let mut queues = Vec::new();
    for job_type in herald_jobs::job_types() {
        let (job_type, queue) = resolve(&state, job_type.queue)?;
        queues.push(queue_summary(&caller, job_type, &queue).await?);
    }
    Ok(Json(json!({ "queues": queues })))
}

pub async fn get_queue(
    State(state): State<AppState>,
    caller: Caller,
    Params(name): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let (job_type, queue) = resolve(&state, &name)?;
    Ok(Json(queue_summary(&caller, job_type, &queue).await?))
}

/// `POST /v1/queues/{queue}:pause` and `:resume`, ops only.
pub async fn queue_action(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
    Params(segment): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let (name, action) =
        split_action(&segment).ok_or_else(|| ApiError::RouteNotFound(uri.path().to_owned()))?;
    if action != "pause" && action != "resume" {
        return Err(ApiError::RouteNotFound(uri.path().to_owned()));
    }
    caller.require_ops()?;
    let (job_type, queue) = resolve(&state, name)?;
    if action == "pause" {
        queue.pause().await?;
    } else {
        queue.resume().await?;
    }
    tracing::info!(queue = job_type.queue, action, "queue state changed");
    Ok(Json(
        json!({"queue": job_type.queue, "paused": action == "pause"}),
    ))
}

fn enqueue_error(e: enqueue::Error) -> ApiError {
    match e {
        enqueue::Error::Invalid(Invalid { field, message }) => ApiError::invalid(field, message),
        enqueue::Error::Store(e) => e.into(),
        enqueue::Error::Queue(e) => e.into(),
    }
}

/// The job type `name` if callers may enqueue to it: unknown queues are 404, internal ones 403.
fn enqueueable(state: &AppState, name: &str) -> Result<&'static JobType, ApiError> {
    let (job_type, _) = resolve(state, name)?;
    if !job_type.public {
        return Err(ApiError::Forbidden("this queue takes no jobs over the API"));
    }
    Ok(job_type)
}

fn record_enqueued(state: &AppState, queue: &str, answers: &[Enqueued]) {
    let duplicates = answers.iter().filter(|a| a.duplicate).count() as u64;
    state
        .metrics()
        .enqueued(queue, answers.len() as u64 - duplicates, duplicates);
}

pub async fn enqueue(
    State(state): State<AppState>,
    caller: Caller,
    Params(name): Params<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let job_type = enqueueable(&state, &name)?;
    let request = enqueue::parse_job_request(&body)
        .map_err(|Invalid { field, message }| ApiError::invalid(field, message))?;
    state.check_backpressure().await?;
    let answers = enqueue::enqueue(
        state.pool(),
        state.queues(),
        tenant,
        job_type,
        vec![request],
        |_| String::new(),
    )
    .await
    .map_err(enqueue_error)?;
    record_enqueued(&state, job_type.queue, &answers);
    let answer = answers
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("enqueue returned no answer".into()))?;
    Ok((StatusCode::ACCEPTED, Json(json!(answer))).into_response())
}

pub async fn enqueue_batch(
    State(state): State<AppState>,
    caller: Caller,
    Params(name): Params<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let job_type = enqueueable(&state, &name)?;
    let jobs = match &body {
        Value::Object(map) => {
            if let Some(unknown) = map.keys().find(|k| k.as_str() != "jobs") {
                return Err(ApiError::invalid(
                    unknown.clone(),
                    "unknown field; expected jobs",
                ));
            }
            map.get("jobs")
                .and_then(Value::as_array)
                .ok_or_else(|| ApiError::invalid("jobs", "is required and must be an array"))?
        }
        _ => {
            return Err(ApiError::invalid(
                "(body)",
                "must be a JSON object {\"jobs\": [...]}",
            ));
        }
    };
    if jobs.is_empty() || jobs.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "jobs",
            format!("must hold 1 to {MAX_BATCH} jobs, got {}", jobs.len()),
        ));
    }
    let requests = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| enqueue::parse_job_request(job).map_err(|e| e.under(&format!("jobs[{i}]"))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|Invalid { field, message }| ApiError::invalid(field, message))?;
    state.check_backpressure().await?;
    let answers = enqueue::enqueue(
        state.pool(),
        state.queues(),
        tenant,
        job_type,
        requests,
        |i| format!("jobs[{i}]"),
    )
    .await
    .map_err(enqueue_error)?;
    record_enqueued(&state, job_type.queue, &answers);
    Ok((StatusCode::ACCEPTED, Json(json!({ "jobs": answers }))).into_response())
}

pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Params((name, id)): Params<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (job_type, queue) = resolve(&state, &name)?;
    let not_found = || ApiError::not_found(format!("job {id:?}"));
    let job_id: JobId = id.parse().map_err(|_| not_found())?;
    if let Some(info) = queue.job(&job_id).await? {
        if caller.scope().is_some_and(|t| t != info.tenant) {
            return Err(not_found());
        }
        return Ok(Json(json!(info)));
    }
    // A durable job the relay has not published yet (or whose Redis record is gone): Postgres
    // still knows it.
    let (Some(tenant), Ok(row_id)) = (caller.scope(), Uuid::try_parse(&id)) else {
        return Err(not_found());
    };
    let Some((row, progress)) = outbox::get(state.pool(), tenant, row_id).await? else {
        return Err(not_found());
    };
    if row.queue.as_str() != job_type.queue {
        return Err(not_found());
    }
    let state_name = if progress.completed_at.is_some() {
        "completed"
    } else if progress.dead_at.is_some() {
        "dead"
    } else if progress.published_at.is_some() {
        "published"
    } else {
        "accepted"
    };
    Ok(Json(json!({
        "id": job_id,
        "queue": row.queue,
        "tenant": row.tenant_id,
        "state": state_name,
        "payload": row.payload,
        "payload_version": row.payload_version,
        "max_attempts": row.max_attempts,
        "priority": row.priority,
        "run_at": row.run_at,
        "created_at": row.created_at,
        "last_error": progress.last_error,
        "durable": true,
    })))
}

#[derive(Debug, Deserialize)]
pub struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
}

pub async fn list_dead(
    State(state): State<AppState>,
    caller: Caller,
    Params(name): Params<String>,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Value>, ApiError> {
    let (_, queue) = resolve(&state, &name)?;
    let offset = page.offset.unwrap_or(0);
    let limit = page.limit.unwrap_or(DEAD_PAGE_DEFAULT);
    if !(1..=DEAD_PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest {
            field: "limit".into(),
            message: format!("must be 1 to {DEAD_PAGE_MAX}"),
        });
    }
    let jobs = queue.dead(caller.scope(), offset, limit).await?;
    let next_offset = (jobs.len() == limit).then_some(offset + limit);
    Ok(Json(json!({
        "jobs": jobs,
        "offset": offset,
        "limit": limit,
        "next_offset": next_offset,
    })))
}

/// What to do with a dead job.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DeadAction {
    Retry,
    Discard,
}

/// Retries or discards one of the caller's dead jobs; 404 when the caller has no such dead job.
async fn act_on_dead(
    state: &AppState,
    caller: Caller,
    name: &str,
    id: &str,
    action: DeadAction,
) -> Result<Json<Value>, ApiError> {
    let (_, queue) = resolve(state, name)?;
    let not_found = || ApiError::not_found(format!("dead job {id:?}"));
    let job_id: JobId = id.parse().map_err(|_| not_found())?;
    let done = match action {
        DeadAction::Retry => queue.retry_dead(&job_id, caller.scope()).await?,
        DeadAction::Discard => queue.discard_dead(&job_id, caller.scope()).await?,
    };
    if !done {
        return Err(not_found());
    }
    let verb = match action {
        DeadAction::Retry => "retried",
        DeadAction::Discard => "discarded",
    };
    Ok(Json(json!({"id": job_id, verb: true})))
}

/// `POST /v1/queues/{queue}/dead/{id}:retry`.
pub async fn dead_action(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
    Params((name, segment)): Params<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let Some((id, "retry")) = split_action(&segment) else {
        return Err(ApiError::RouteNotFound(uri.path().to_owned()));
    };
    act_on_dead(&state, caller, &name, id, DeadAction::Retry).await
}

/// `DELETE /v1/queues/{queue}/dead/{id}`.
pub async fn discard_dead(
    State(state): State<AppState>,
    caller: Caller,
    Params((name, id)): Params<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    act_on_dead(&state, caller, &name, &id, DeadAction::Discard).await
}

pub async fn list_workers(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_ops()?;
    let mut workers = Vec::new();
    for job_type in herald_jobs::job_types() {
        let (_, queue) = resolve(&state, job_type.queue)?;
        for worker in queue.workers(state.config().worker_max_age).await? {
            workers.push(json!({
                "queue": job_type.queue,
                "id": worker.id,
                "last_heartbeat_ms": worker.last_heartbeat_ms,
                "fields": worker.fields,
            }));
        }
    }
    Ok(Json(json!({ "workers": workers })))
}

pub async fn get_allowed_hosts(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let hosts = tenants::allowed_hosts(state.pool(), tenant).await?;
    Ok(Json(json!({ "hosts": hosts })))
}

pub async fn put_allowed_hosts(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let hosts = body
        .as_object()
        .filter(|map| map.keys().all(|k| k == "hosts"))
        .and_then(|map| map.get("hosts"))
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("hosts", "body must be {\"hosts\": [\"host\", ...]}"))?;
    if hosts.len() > MAX_ALLOWED_HOSTS {
        return Err(ApiError::invalid(
            "hosts",
            format!("at most {MAX_ALLOWED_HOSTS} hosts"),
        ));
    }
    let hosts = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            h.as_str()
                .map(str::to_owned)
                .ok_or_else(|| ApiError::invalid(format!("hosts[{i}]"), "must be a string"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hosts = tenants::replace_allowed_hosts(state.pool(), tenant, &hosts)
        .await
        .map_err(|e| match e {
            herald_store::Error::Invalid { reason, .. } => ApiError::invalid("hosts", reason),
            other => other.into(),
        })?;
    Ok(Json(json!({ "hosts": hosts })))
}
