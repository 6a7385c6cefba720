//! Generic enqueue, shared by the HTTP API and the `herald` CLI: parse a job request, validate
//! every job of a batch against its job type (and the tenant's allow-list for `http` jobs)
//! before anything is written, then write durable jobs to the outbox and the others straight to
//! Redis, all or nothing.
//!
//! This module knows nothing of HTTP; it must not write anything before the whole batch is valid.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_core::{JobId, Priority, QueueName, TenantId, now_ms};
use herald_jobs::JobType;
use herald_jobs::http::HttpJob;
use herald_queue::{Client, Enqueued, NewJob};
use herald_store::PgPool;
use herald_store::outbox::{self, NewOutboxJob};
use serde_json::{Map, Value};

/// The most jobs one batch request may carry.
pub const MAX_BATCH: usize = 1_000;
/// The largest `max_attempts` a job may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000;
/// The furthest into the future a job may be scheduled.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest dedupe key accepted (the outbox's limit, which is also the queue's).
pub const MAX_KEY_LEN: usize = outbox::MAX_JOB_KEY_LEN;

/// One job as a caller describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub payload: Value,
    pub key: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub delay_ms: Option<u64>,
    pub priority: Priority,
    pub max_attempts: Option<u32>,
    pub durable: bool,
}

impl JobRequest {
    /// A request carrying only a payload: run now, normal priority, not durable.
    pub fn new(payload: Value) -> Self {
        Self {
            payload,
            key: None,
            run_at: None,
            delay_ms: None,
            priority: Priority::Normal,
            max_attempts: None,
            durable: false,
        }
    }
}

/// A field that is wrong, and what is wrong with it. `field` is a path such as
/// `payload`, `run_at` or `jobs[3].payload.url`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same problem, one level down: `jobs[3]` + `payload` → `jobs[3].payload`.
    pub fn under(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            message: self.message,
        }
    }
}

/// Why an enqueue did not happen. Nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Store(#[from] herald_store::Error),
    #[error(transparent)]
    Queue(#[from] herald_queue::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(herald_store::Error::Database(e))
    }
}

const FIELDS: &[&str] = &[
    "payload",
    "key",
    "run_at",
    "delay_ms",
    "priority",
    "max_attempts",
    "durable",
];

/// Parses one job object, naming the first field that is wrong.
pub fn parse_job_request(value: &Value) -> Result<JobRequest, Invalid> {
    let Value::Object(map) = value else {
        return Err(Invalid::new("(body)", "must be a JSON object"));
    };
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Invalid::new(
            unknown.clone(),
            format!("unknown field; expected one of {}", FIELDS.join(", ")),
        ));
    }
    let payload = map
        .get("payload")
        .cloned()
        .ok_or_else(|| Invalid::new("payload", "is required"))?;
    let key = optional(map, "key", |v| match v {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_KEY_LEN => Ok(s.clone()),
        Value::String(_) => Err(format!("must be 1 to {MAX_KEY_LEN} bytes")),
        _ => Err("must be a string".into()),
    })?;
    let run_at = optional(map, "run_at", |v| {
        let s = v.as_str().ok_or("must be an RFC 3339 timestamp string")?;
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                format!("must be an RFC 3339 timestamp such as 2026-01-31T09:00:00Z ({e})")
            })
    })?;
    let delay_ms = optional(map, "delay_ms", |v| {
        v.as_u64()
            .filter(|d| *d <= MAX_SCHEDULE_AHEAD.as_millis() as u64)
            .ok_or_else(|| {
                format!(
                    "must be a whole number of milliseconds from 0 to {}",
                    MAX_SCHEDULE_AHEAD.as_millis()
                )
            })
    })?;
    let priority = optional(map, "priority", |v| {
        v.as_str()
            .ok_or_else(|| "must be one of \"high\", \"normal\", \"low\"".to_owned())?
            .parse::<Priority>()
            .map_err(|e| e.to_string())
    })?
    .unwrap_or_default();
    let max_attempts = optional(map, "max_attempts", |v| {
        v.as_u64()
            .filter(|n| (1..=u64::from(MAX_ATTEMPTS_LIMIT)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| format!("must be a whole number from 1 to {MAX_ATTEMPTS_LIMIT}"))
    })?;
    let durable = optional(map, "durable", |v| {
        v.as_bool()
            .ok_or_else(|| "must be true or false".to_owned())
    })?
    .unwrap_or(false);
    if run_at.is_some() && delay_ms.is_some() {
        return Err(Invalid::new(
            "delay_ms",
            "give run_at or delay_ms, not both",
        ));
    }
    if let Some(at) = run_at {
        let ahead = at.timestamp_millis() - now_ms() as i64;
        if ahead > MAX_SCHEDULE_AHEAD.as_millis() as i64 {
            return Err(Invalid::new(
                "run_at",
                "must be at most 366 days in the future",
            ));
        }
    }
    Ok(JobRequest {
        payload,
        key,
        run_at,
        delay_ms,
        priority,
        max_attempts,
        durable,
    })
}

/// `map[name]` parsed by `parse`, `None` when absent or `null`.
fn optional<T>(
    map: &Map<String, Value>,
    name: &str,
    parse: impl FnOnce(&Value) -> Result<T, String>,
) -> Result<Option<T>, Invalid> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse(v).map(Some).map_err(|m| Invalid::new(name, m)),
    }
}

/// The job type served by `queue` if other services may enqueue to it.
pub fn public_job_type(queue: &str) -> Option<&'static JobType> {
    herald_jobs::job_type(queue).filter(|t| t.public)
}

/// A validated job, ready to be written.
struct Prepared {
    request: JobRequest,
    payload_text: String,
    max_attempts: u32,
}

/// Validates every job of the batch (the job type's schema, and for `http` jobs the tenant's
/// allow-list), then writes them all or none. `field_of(i)` names job `i` in errors (`""` for a
/// single job, `"jobs[i]"` for a batch). Returns one answer per job, in order.
pub async fn enqueue(
    pool: &PgPool,
    queues: &Client,
    tenant: TenantId,
    job_type: &JobType,
    requests: Vec<JobRequest>,
    field_of: impl Fn(usize) -> String,
) -> Result<Vec<Enqueued>, Error> {
    let name_field = |i: usize, field: &str| {
        let prefix = field_of(i);
        if prefix.is_empty() {
            field.to_owned()
        } else {
            format!("{prefix}.{field}")
        }
    };
    let mut allowed_hosts: HashMap<String, bool> = HashMap::new();
    let mut prepared = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        (job_type.validate)(&request.payload)
            .map_err(|m| Invalid::new(name_field(i, "payload"), m))?;
        if job_type.queue == <HttpJob as herald_core::JobPayload>::QUEUE {
            check_destination(pool, tenant, &request.payload, &mut allowed_hosts)
                .await?
                .map_err(|m| Invalid::new(name_field(i, "payload.url"), m))?;
        }
        let payload_text = serde_json::to_string(&request.payload)
            .map_err(|e| Invalid::new(name_field(i, "payload"), e.to_string()))?;
        prepared.push(Prepared {
            max_attempts: request.max_attempts.unwrap_or(job_type.max_attempts),
            request,
            payload_text,
        });
    }
    write(pool, queues, tenant, job_type, prepared).await
}

/// `Ok(Err(reason))` when the payload's destination is not on the tenant's allow-list.
async fn check_destination(
    pool: &PgPool,
    tenant: TenantId,
    payload: &Value,
    cache: &mut HashMap<String, bool>,
) -> Result<Result<(), String>, Error> {
    let job: HttpJob = match serde_json::from_value(payload.clone()) {
        Ok(job) => job,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let host = match job.check() {
        Ok(host) => host,
        Err(e) => return Ok(Err(e)),
    };
    let allowed = match cache.get(&host) {
        Some(allowed) => *allowed,
        None => {
            let allowed = herald_jobs::http::destination_allowed(pool, tenant, &job)
                .await
                .map_err(|e| {
                    Error::Store(herald_store::Error::Corrupt {
                        what: "allow-list lookup",
                        reason: e,
                    })
                })?;
            cache.insert(host.clone(), allowed);
            allowed
        }
    };
    if allowed {
        Ok(Ok(()))
    } else {
        Ok(Err(format!(
            "host {host:?} is not on the tenant's allow-list (PUT /v1/tenant/allowed-hosts)"
        )))
    }
}

async fn write(
    pool: &PgPool,
    queues: &Client,
    tenant: TenantId,
    job_type: &JobType,
    prepared: Vec<Prepared>,
) -> Result<Vec<Enqueued>, Error> {
    let queue_name = QueueName::try_from(job_type.queue.to_owned())
        .map_err(|e| Invalid::new("queue", e.to_string()))?;
    let queue = queues.queue(&queue_name);
    let mut answers: Vec<Option<Enqueued>> = vec![None; prepared.len()];

    // Durable jobs first, inside a transaction that commits only after the Redis writes
    // succeeded: a failure anywhere leaves nothing behind.
    let mut tx = None;
    let key_taken_since = Utc::now()
        - chrono::Duration::from_std(queues.settings().key_retention)
            .unwrap_or(chrono::Duration::days(1));
    for (i, job) in prepared.iter().enumerate() {
        if !job.request.durable {
            continue;
        }
        if let Some(key) = &job.request.key
            && let Some(holder) = queue.key_holder(tenant, key).await?
        {
            answers[i] = Some(Enqueued {
                id: holder,
                duplicate: true,
            });
            continue;
        }
        let tx = match &mut tx {
            Some(tx) => tx,
            None => tx.insert(pool.begin().await?),
        };
        let row = NewOutboxJob {
            queue: queue_name.clone(),
            payload: job.request.payload.clone(),
            payload_version: job_type.version,
            priority: job.request.priority,
            max_attempts: Some(job.max_attempts),
            run_at: run_at(&job.request),
            job_key: job.request.key.clone(),
        };
        let (id, duplicate) =
            outbox::insert_unless_key_taken(tx, tenant, &row, key_taken_since).await?;
        let id = JobId::try_from(id.simple().to_string())
            .map_err(|e| herald_queue::Error::Protocol(e.to_string()))?;
        answers[i] = Some(Enqueued { id, duplicate });
    }

    let direct: Vec<(usize, NewJob)> = prepared
        .iter()
        .enumerate()
        .filter(|(_, job)| !job.request.durable)
        .map(|(i, job)| (i, new_job(tenant, job_type, job)))
        .collect();
    if !direct.is_empty() {
        let (indexes, jobs): (Vec<usize>, Vec<NewJob>) = direct.into_iter().unzip();
        let written = queue.enqueue_batch(jobs).await?;
        for (i, answer) in indexes.into_iter().zip(written) {
            answers[i] = Some(answer);
        }
    }
    if let Some(tx) = tx {
        tx.commit().await?;
    }
    answers
        .into_iter()
        .map(|a| a.ok_or_else(|| herald_queue::Error::Protocol("a job got no answer".into())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)
}

fn run_at(request: &JobRequest) -> Option<DateTime<Utc>> {
    match (request.run_at, request.delay_ms) {
        (Some(at), _) => Some(at),
        (None, Some(ms)) => Some(Utc::now() + chrono::Duration::milliseconds(ms as i64)),
        (None, None) => None,
    }
}

fn new_job(tenant: TenantId, job_type: &JobType, job: &Prepared) -> NewJob {
    let mut new = NewJob::raw(
        tenant,
        job.payload_text.clone(),
        job_type.version,
        job.max_attempts,
    )
    .priority(job.request.priority);
    if let Some(key) = &job.request.key {
        new = new.key(key.clone());
    }
    if let Some(at) = job.request.run_at {
        new = new.run_at_ms(at.timestamp_millis().max(0) as u64);
    } else if let Some(ms) = job.request.delay_ms {
        new = new.delay(Duration::from_millis(ms));
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_requests_name_the_wrong_field() {
        let ok = parse_job_request(&json!({
            "payload": {}, "key": "k", "delay_ms": 10, "priority": "high",
            "max_attempts": 3, "durable": true
        }))
        .unwrap();
        assert_eq!(ok.priority, Priority::High);
        assert!(ok.durable);

        let field = |v: Value| parse_job_request(&v).unwrap_err().field;
        assert_eq!(field(json!({})), "payload");
        assert_eq!(field(json!({"payload": {}, "prio": "x"})), "prio");
        assert_eq!(
            field(json!({"payload": {}, "priority": "urgent"})),
            "priority"
        );
        assert_eq!(
            field(json!({"payload": {}, "run_at": "tomorrow"})),
            "run_at"
        );
        assert_eq!(
            field(json!({"payload": {}, "max_attempts": 0})),
            "max_attempts"
        );
        assert_eq!(field(json!({"payload": {}, "key": ""})), "key");
        assert_eq!(field(json!({"payload": {}, "durable": "yes"})), "durable");
        assert_eq!(
            field(json!({"payload": {}, "delay_ms": 1, "run_at": "2030-01-01T00:00:00Z"})),
            "delay_ms"
        );
        assert_eq!(field(json!([1])), "(body)");
    }

    #[test]
    fn invalid_fields_nest() {
        assert_eq!(
            Invalid::new("payload", "x").under("jobs[2]").field,
            "jobs[2].payload"
        );
    }
}
