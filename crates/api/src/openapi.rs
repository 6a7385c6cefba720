//! The OpenAPI 3 document served at `/v1/openapi.json`, written by hand. A test checks that
//! its paths and methods are exactly those of [`crate::routes::ROUTES`].

use serde_json::{Value, json};

mod calls;
mod sequences;
mod whatsapp;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn json_response(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn json_body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn param(name: &str, location: &str, description: &str, schema: Value) -> Value {
    json!({
        "name": name,
        "in": location,
        "required": location == "path",
        "description": description,
        "schema": schema
    })
}

fn queue_param() -> Value {
    param(
        "queue",
        "path",
        "The queue (one per job type): see GET /v1/queues.",
        json!({"type": "string"}),
    )
}

fn id_param() -> Value {
    param(
        "id",
        "path",
        "A job id as returned by enqueue.",
        json!({"type": "string"}),
    )
}

fn campaign_param() -> Value {
    param(
        "id",
        "path",
        "A campaign id as returned by POST /v1/campaigns/daily.",
        json!({"type": "string", "format": "uuid"}),
    )
}

/// The responses of a route that needs a tenant token.
fn tenant_only(mut responses: Value) -> Value {
    if let Value::Object(map) = &mut responses {
        map.insert(
            "403".into(),
            error_response("An ops token: this route needs a tenant token."),
        );
    }
    with_common(responses)
}

fn optional_json_body(schema: &str) -> Value {
    json!({
        "required": false,
        "description": "Optional: an empty body takes every default.",
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn idempotency_param() -> Value {
    param(
        "Idempotency-Key",
        "header",
        "Replays the first successful response to the same key and body; the same key with another body is 422.",
        json!({"type": "string", "maxLength": 255}),
    )
}

/// The responses every authenticated route can give besides its own.
fn with_common(mut responses: Value) -> Value {
    if let Value::Object(map) = &mut responses {
        map.insert(
            "401".into(),
            error_response("Missing or unknown bearer token."),
        );
        map.insert("500".into(), error_response("Internal error."));
    }
    responses
}

fn enqueue_errors(mut responses: Value) -> Value {
    if let Value::Object(map) = &mut responses {
        map.insert(
            "400".into(),
            error_response("Malformed JSON, or a bad Idempotency-Key header."),
        );
        map.insert("403".into(), error_response("An ops token (enqueue needs a tenant token), or a queue that takes no jobs over the API."));
        map.insert("404".into(), error_response("Unknown queue."));
        map.insert("413".into(), error_response("Body over the size limit."));
        map.insert(
            "415".into(),
            error_response("Content-Type is not application/json."),
        );
        map.insert("422".into(), error_response("A field is wrong (error.field names it), the payload does not match the job type, an http job's host is not allow-listed, or the Idempotency-Key was used with another body."));
        map.insert("503".into(), error_response("Redis memory is over the high-water mark: retry after the Retry-After header's seconds."));
    }
    with_common(responses)
}

/// The daily VA assignment's paths (profiles, campaigns, cleanup).
fn daily_paths() -> Value {
    json!({
            "/v1/profiles": {"post": {
                "summary": "Import profiles into the tenant's pool: good rows go in, duplicates and bad rows are reported with their line numbers. A body that is not CSV at all is refused whole.",
                "parameters": [idempotency_param()],
                "requestBody": {
                    "required": true,
                    "content": {
                        "text/csv": {"schema": {"type": "string", "description": "A header row naming username (and optionally external_id, full_name; any order, any case), then one profile per line."}},
                        "application/json": {"schema": {"$ref": "#/components/schemas/ProfilesUpload"}},
                        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary", "description": "The CSV file (or JSON, by its content type or .json name)."}}}}
                    }
                },
                "responses": tenant_only(json!({
                    "200": json_response("What the import did, row by row.", "ImportReport"),
                    "400": error_response("Not CSV at all (malformed_csv), malformed JSON, or a form without a file."),
                    "413": error_response("Body over the import size limit."),
                    "415": error_response("Content-Type is not text/csv, application/json or multipart/form-data."),
                    "422": error_response("JSON that is not {\"profiles\": [...]}.")
                }))
            }},
            "/v1/profiles/stats": {"get": {
                "summary": "The tenant's pool: total, unused and used profiles.",
                "responses": tenant_only(json!({"200": json_response("The pool's counts.", "PoolStats")}))
            }},
            "/v1/campaigns/daily": {"post": {
                "summary": "Start the tenant's daily VA assignment for a date (select, distribute, sync to Airtable). One campaign per (tenant, date): the same date again returns that campaign with created: false.",
                "parameters": [idempotency_param()],
                "requestBody": optional_json_body("DailyRequest"),
                "responses": tenant_only(json!({
                    "202": json_response("Accepted: the campaign (stage selecting when new).", "StartedCampaign"),
                    "400": error_response("Malformed JSON."),
                    "415": error_response("Content-Type is not application/json."),
                    "422": error_response("A field is wrong; error.field names it.")
                }))
            }},
            "/v1/campaigns": {"get": {
                "summary": "The tenant's daily campaigns, newest first.",
                "parameters": [param("limit", "query", "Most campaigns returned.", json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 50}))],
                "responses": tenant_only(json!({
                    "200": json_response("The campaigns.", "CampaignList"),
                    "400": error_response("Bad limit.")
                }))
            }},
            "/v1/campaigns/{id}": {"get": {
                "summary": "One campaign: status, stage, progress, counts, error. Another tenant's is 404.",
                "parameters": [campaign_param()],
                "responses": tenant_only(json!({
                    "200": json_response("The campaign.", "Campaign"),
                    "404": error_response("No such campaign for this tenant.")
                }))
            }},
            "/v1/campaigns/{id}/events": {"get": {
                "summary": "Server-sent events: `event: campaign` with the view of GET /v1/campaigns/{id}, at once and on every change, until the campaign is complete or failed (then the stream ends).",
                "parameters": [campaign_param()],
                "responses": tenant_only(json!({
                    "200": {"description": "An event stream; each event's data is a Campaign.", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "404": error_response("No such campaign for this tenant.")
                }))
            }},
            "/v1/campaigns/{id}/resume": {"post": {
                "summary": "Resume a failed campaign from the stage that failed, without redoing finished work.",
                "parameters": [campaign_param(), idempotency_param()],
                "responses": tenant_only(json!({
                    "202": json_response("Resumed: the campaign, back in the failed stage.", "Campaign"),
                    "404": error_response("No such campaign for this tenant."),
                    "409": error_response("The campaign has not failed.")
                }))
            }},
            "/v1/cleanup": {"post": {
                "summary": "Run the rolling 7-day cleanup for the tenant now: 7-day-old assignments are marked unfollow, 8+ days old are deleted (in Postgres and Airtable).",
                "parameters": [idempotency_param()],
                "requestBody": optional_json_body("CleanupRequest"),
                "responses": tenant_only(json!({
                    "202": json_response("Accepted: the cleanup job.", "CleanupAccepted"),
                    "400": error_response("Malformed JSON."),
                    "415": error_response("Content-Type is not application/json."),
                    "422": error_response("A field is wrong; error.field names it.")
                }))
            }}
    })
}

/// The daily VA assignment's schemas.
fn daily_schemas() -> Value {
    json!({
                "ProfilesUpload": {"type": "object", "required": ["profiles"], "additionalProperties": false, "properties": {"profiles": {"type": "array", "items": {"type": "object", "properties": {
                    "username": {"type": "string", "description": "Unique per tenant; lower-cased, a leading @ dropped; letters, digits, . and _ (1–30)."},
                    "external_id": {"type": "string"}, "full_name": {"type": "string"}
                }}}}},
                "ImportReport": {"type": "object", "properties": {
                    "inserted": {"type": "integer"}, "duplicates": {"type": "integer"}, "rejected": {"type": "integer"},
                    "duplicate_rows": {"type": "array", "items": {"type": "object", "properties": {"line": {"type": "integer"}, "username": {"type": "string"}}}},
                    "rejected_rows": {"type": "array", "items": {"type": "object", "properties": {"line": {"type": "integer", "description": "The CSV line (the header is line 1), or the item's number in a JSON list, from 1."}, "reason": {"type": "string"}}}}
                }},
                "PoolStats": {"type": "object", "properties": {"total": {"type": "integer"}, "unused": {"type": "integer"}, "used": {"type": "integer"}}},
                "DailyRequest": {"type": "object", "additionalProperties": false, "properties": {
                    "date": {"type": "string", "format": "date", "description": "Default: today in the tenant's time zone."},
                    "target": {"type": "integer", "minimum": 1, "default": 14400, "description": "Profiles to take; at most tables × per_table."},
                    "tables": {"type": "integer", "minimum": 1, "maximum": 99, "default": 80},
                    "per_table": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 180}
                }},
                "CampaignCounts": {"type": "object", "properties": {
                    "target": {"type": "integer"}, "selected": {"type": "integer"}, "shortfall": {"type": "integer"},
                    "distributed": {"type": "integer"}, "batches_total": {"type": "integer"}, "batches_done": {"type": "integer"},
                    "synced": {"type": "integer"}, "rejected": {"type": "integer"}
                }},
                "Campaign": {"type": "object", "properties": {
                    "campaign_id": {"type": "string", "format": "uuid"}, "date": {"type": "string", "format": "date"},
                    "status": {"type": "string", "enum": ["running", "complete", "failed"]},
                    "stage": {"type": "string", "enum": ["selecting", "distributing", "syncing", "complete", "failed"]},
                    "failed_stage": {"type": "string", "nullable": true, "enum": ["selecting", "distributing", "syncing"]},
                    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                    "counts": {"$ref": "#/components/schemas/CampaignCounts"},
                    "tables": {"type": "integer"}, "per_table": {"type": "integer"},
                    "error": {"type": "string", "nullable": true},
                    "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"},
                    "completed_at": {"type": "string", "format": "date-time", "nullable": true}
                }},
                "StartedCampaign": {"allOf": [{"$ref": "#/components/schemas/Campaign"}, {"type": "object", "properties": {"created": {"type": "boolean", "description": "False when the tenant already had a campaign for this date (that one is returned)."}}}]},
                "CampaignList": {"type": "object", "properties": {"campaigns": {"type": "array", "items": {"$ref": "#/components/schemas/Campaign"}}}},
                "CleanupRequest": {"type": "object", "additionalProperties": false, "properties": {"date": {"type": "string", "format": "date", "description": "Clean up as of this day; default today in the tenant's time zone."}}},
                "CleanupAccepted": {"type": "object", "properties": {"job_id": {"type": "string", "format": "uuid"}, "queue": {"type": "string"}, "date": {"type": "string", "format": "date", "nullable": true}}}
    })
}

/// Adds every entry of `extra` (an object) to the object at `target`.
fn extend(target: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (target, extra) {
        target.extend(extra);
    }
}

pub fn document() -> Value {
    let bearer = json!([{"bearer": []}]);
    let mut document = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "herald API",
            "version": "1",
            "description": "Enqueue jobs, inspect queues and dead jobs, pause and resume queues; import profiles and run the daily VA assignment. All bodies are JSON; errors are {\"error\": {\"code\", \"message\", \"field\"?}}. Tenant tokens see their own jobs only; an ops token sees every tenant. See docs/api.md."
        },
        "security": bearer,
        "paths": {
            "/healthz": {"get": {
                "summary": "Liveness: the process answers.",
                "security": [],
                "responses": {"200": json_response("Alive.", "Status")}
            }},
            "/readyz": {"get": {
                "summary": "Readiness: Postgres and Redis both answer.",
                "security": [],
                "responses": {
                    "200": json_response("Ready.", "Readiness"),
                    "503": json_response("Postgres or Redis is unavailable; checks says which.", "Readiness")
                }
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (OpenMetrics text).",
                "security": [],
                "responses": {"200": {"description": "Metrics.", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}}
            }},
            "/v1/openapi.json": {"get": {
                "summary": "This document.",
                "security": [],
                "responses": {"200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }},
            "/v1/queues": {"get": {
                "summary": "Every queue with its counts (the caller's jobs, or everyone's for ops) and whether it is paused.",
                "responses": with_common(json!({"200": json_response("The queues.", "QueueList")}))
            }},
            "/v1/queues/{queue}": {"get": {
                "summary": "One queue.",
                "parameters": [queue_param()],
                "responses": with_common(json!({
                    "200": json_response("The queue.", "Queue"),
                    "404": error_response("Unknown queue.")
                }))
            }},
            "/v1/queues/{queue}:pause": {"post": {
                "summary": "Stop every worker fetching this queue's jobs (running jobs finish). Ops token only.",
                "parameters": [queue_param(), idempotency_param()],
                "responses": with_common(json!({
                    "200": json_response("Paused.", "PauseState"),
                    "403": error_response("Not an ops token."),
                    "404": error_response("Unknown queue.")
                }))
            }},
            "/v1/queues/{queue}:resume": {"post": {
                "summary": "Resume a paused queue. Ops token only.",
                "parameters": [queue_param(), idempotency_param()],
                "responses": with_common(json!({
                    "200": json_response("Resumed.", "PauseState"),
                    "403": error_response("Not an ops token."),
                    "404": error_response("Unknown queue.")
                }))
            }},
            "/v1/queues/{queue}/jobs": {"post": {
                "summary": "Enqueue one job. Durable jobs are written to Postgres first and survive Redis data loss.",
                "parameters": [queue_param(), idempotency_param()],
                "requestBody": json_body("JobRequest"),
                "responses": enqueue_errors(json!({"202": json_response("Accepted (or a duplicate of an existing job, which is not run twice).", "Enqueued")}))
            }},
            "/v1/queues/{queue}/jobs:batch": {"post": {
                "summary": "Enqueue up to 1,000 jobs, all or nothing: every job is validated before any is written.",
                "parameters": [queue_param(), idempotency_param()],
                "requestBody": json_body("BatchRequest"),
                "responses": enqueue_errors(json!({"202": json_response("Accepted; one answer per job, in order.", "BatchEnqueued")}))
            }},
            "/v1/queues/{queue}/jobs/{id}": {"get": {
                "summary": "One job. Another tenant's job is 404.",
                "parameters": [queue_param(), id_param()],
                "responses": with_common(json!({
                    "200": json_response("The job.", "Job"),
                    "404": error_response("No such job for this caller.")
                }))
            }},
            "/v1/queues/{queue}/dead": {"get": {
                "summary": "Dead jobs (attempts exhausted or permanently failed), newest first.",
                "parameters": [
                    queue_param(),
                    param("offset", "query", "Jobs to skip.", json!({"type": "integer", "minimum": 0, "default": 0})),
                    param("limit", "query", "Page size.", json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 50}))
                ],
                "responses": with_common(json!({
                    "200": json_response("A page of dead jobs.", "DeadPage"),
                    "400": error_response("Bad paging parameters."),
                    "404": error_response("Unknown queue.")
                }))
            }},
            "/v1/queues/{queue}/dead/{id}:retry": {"post": {
                "summary": "Put a dead job back in the queue with a fresh attempt budget.",
                "parameters": [queue_param(), id_param(), idempotency_param()],
                "responses": with_common(json!({
                    "200": json_response("Retried.", "DeadAction"),
                    "404": error_response("No such dead job for this caller.")
                }))
            }},
            "/v1/queues/{queue}/dead/{id}": {"delete": {
                "summary": "Discard a dead job.",
                "parameters": [queue_param(), id_param()],
                "responses": with_common(json!({
                    "200": json_response("Discarded.", "DeadAction"),
                    "404": error_response("No such dead job for this caller.")
                }))
            }},
            "/v1/workers": {"get": {
                "summary": "Live workers (recent heartbeat) per queue. Ops token only.",
                "responses": with_common(json!({
                    "200": json_response("The workers.", "WorkerList"),
                    "403": error_response("Not an ops token.")
                }))
            }},
            "/v1/tenant/allowed-hosts": {
                "get": {
                    "summary": "The hosts this tenant's http jobs may call.",
                    "responses": with_common(json!({
                        "200": json_response("The allow-list.", "AllowedHosts"),
                        "403": error_response("Not a tenant token.")
                    }))
                },
                "put": {
                    "summary": "Replace this tenant's allow-list for http jobs.",
                    "requestBody": json_body("AllowedHosts"),
                    "responses": with_common(json!({
                        "200": json_response("The new allow-list, normalised and sorted.", "AllowedHosts"),
                        "400": error_response("Malformed JSON."),
                        "403": error_response("Not a tenant token."),
                        "415": error_response("Content-Type is not application/json."),
                        "422": error_response("A host is not a host name or address.")
                    }))
                }
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "A tenant token (hrd_…) or an ops token (hrdops_…)."}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "enum": ["unauthorized", "forbidden", "not_found", "route_not_found", "method_not_allowed", "malformed_json", "malformed_csv", "bad_request", "payload_too_large", "unsupported_media_type", "invalid", "idempotency_key_reused", "conflict", "backpressure", "internal", "unavailable"]},
                        "message": {"type": "string"},
                        "field": {"type": "string", "description": "The field at fault, e.g. payload, run_at, jobs[3].payload.url."}
                    }
                }}},
                "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
                "Readiness": {"type": "object", "properties": {
                    "status": {"type": "string", "enum": ["ready", "unavailable"]},
                    "checks": {"type": "object", "properties": {"postgres": {"type": "string"}, "redis": {"type": "string"}}}
                }},
                "JobRequest": {"type": "object", "required": ["payload"], "additionalProperties": false, "properties": {
                    "payload": {"description": "The job type's payload; validated against it."},
                    "key": {"type": "string", "minLength": 1, "maxLength": 256, "description": "De-duplication key, per tenant and queue: while a job with this key is pending, running, dead, or finished within the key retention (24 h by default), enqueueing again answers duplicate: true with the existing job's id."},
                    "run_at": {"type": "string", "format": "date-time", "description": "Run no earlier than this instant (RFC 3339). Not with delay_ms."},
                    "delay_ms": {"type": "integer", "minimum": 0, "description": "Run after this many milliseconds. Not with run_at."},
                    "priority": {"type": "string", "enum": ["high", "normal", "low"], "default": "normal"},
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "Overrides the job type's attempt budget."},
                    "durable": {"type": "boolean", "default": false, "description": "Write the job to Postgres (outbox) first, so it survives Redis data loss."}
                }},
                "BatchRequest": {"type": "object", "required": ["jobs"], "additionalProperties": false, "properties": {
                    "jobs": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"$ref": "#/components/schemas/JobRequest"}}
                }},
                "Enqueued": {"type": "object", "required": ["id", "duplicate"], "properties": {
                    "id": {"type": "string"},
                    "duplicate": {"type": "boolean", "description": "True when an existing job holds the key; id is that job's."}
                }},
                "BatchEnqueued": {"type": "object", "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Enqueued"}}}},
                "Counts": {"type": "object", "properties": {
                    "ready": {"type": "integer"}, "delayed": {"type": "integer"}, "running": {"type": "integer"},
                    "dead": {"type": "integer"}, "completed": {"type": "integer"}
                }},
                "Queue": {"type": "object", "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"}, "version": {"type": "integer"},
                    "max_attempts": {"type": "integer"}, "timeout_ms": {"type": "integer"}, "public": {"type": "boolean"},
                    "paused": {"type": "boolean"}, "counts": {"$ref": "#/components/schemas/Counts"}
                }},
                "QueueList": {"type": "object", "properties": {"queues": {"type": "array", "items": {"$ref": "#/components/schemas/Queue"}}}},
                "PauseState": {"type": "object", "properties": {"queue": {"type": "string"}, "paused": {"type": "boolean"}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"}, "queue": {"type": "string"}, "tenant": {"type": "string", "format": "uuid"},
                    "state": {"type": "string", "enum": ["ready", "delayed", "running", "dead", "completed", "accepted", "published"], "description": "accepted: a durable job not yet published to Redis; published: a durable job Redis no longer holds (the reconciler restores it)."},
                    "payload": {}, "payload_version": {"type": "integer"}, "attempts": {"type": "integer"},
                    "max_attempts": {"type": "integer"}, "priority": {"type": "string", "enum": ["high", "normal", "low"]},
                    "created_at_ms": {"type": "integer"}, "finished_at_ms": {"type": "integer", "nullable": true},
                    "run_at_ms": {"type": "integer", "nullable": true}, "last_error": {"type": "string", "nullable": true},
                    "waiting_reason": {"type": "string", "nullable": true}, "worker": {"type": "string", "nullable": true},
                    "durable": {"type": "boolean"}
                }},
                "DeadPage": {"type": "object", "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                    "offset": {"type": "integer"}, "limit": {"type": "integer"},
                    "next_offset": {"type": "integer", "nullable": true}
                }},
                "DeadAction": {"type": "object", "properties": {"id": {"type": "string"}, "retried": {"type": "boolean"}, "discarded": {"type": "boolean"}}},
                "WorkerList": {"type": "object", "properties": {"workers": {"type": "array", "items": {"type": "object", "properties": {
                    "queue": {"type": "string"}, "id": {"type": "string"}, "last_heartbeat_ms": {"type": "integer"},
                    "fields": {"type": "object", "additionalProperties": {"type": "string"}}
                }}}}},
                "AllowedHosts": {"type": "object", "required": ["hosts"], "properties": {"hosts": {"type": "array", "maxItems": 1000, "items": {"type": "string"}}}}
            }
        }
    });
    extend(&mut document["paths"], daily_paths());
    extend(&mut document["components"]["schemas"], daily_schemas());
    extend(&mut document["paths"], calls::paths());
    extend(&mut document["components"]["schemas"], calls::schemas());
    extend(&mut document["paths"], whatsapp::paths());
    extend(&mut document["components"]["schemas"], whatsapp::schemas());
    extend(&mut document["paths"], sequences::paths());
    extend(&mut document["components"]["schemas"], sequences::schemas());
    document
}
