//! The API against a fresh Postgres database per test and a random Redis namespace: every test
//! checks the effect in Postgres or Redis, not only the status code.

mod support;

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use herald_api::ApiConfig;
use herald_core::{JobId, QueueName};
use herald_queue::{JobState, QueueSettings};
use herald_store::PgPool;
use serde_json::{Value, json};
use support::*;

fn probe_job(key: &str) -> Value {
    json!({"payload": {"effect_key": key}})
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn queue(app: &TestApp, name: &str) -> herald_queue::Queue {
    app.queues.queue(&name.parse::<QueueName>().unwrap())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn tokens_are_required_and_tenants_see_only_their_jobs(pool: PgPool) {
    let app = app(pool).await;
    let (_, token_a) = tenant(&app.pool, "a").await;
    let (_, token_b) = tenant(&app.pool, "b").await;
    let ops = ops_token(&app.pool).await;

    let missing = req(Method::GET, "/v1/queues").send(&app.router).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.code(), "unauthorized");
    let wrong = req(Method::GET, "/v1/queues")
        .token("hrd_not-a-token")
        .send(&app.router)
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.code(), "unauthorized");

    let created = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&token_a)
        .json(&probe_job("a-1"))
        .send(&app.router)
        .await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.text);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/queues/probe/jobs/{id}");

    let own = req(Method::GET, &path)
        .token(&token_a)
        .send(&app.router)
        .await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.body["state"], "ready");
    let other = req(Method::GET, &path)
        .token(&token_b)
        .send(&app.router)
        .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(other.code(), "not_found");
    let by_ops = req(Method::GET, &path).token(&ops).send(&app.router).await;
    assert_eq!(by_ops.status, StatusCode::OK);

    // Counts: B sees none of A's jobs; ops sees all.
    let list_b = req(Method::GET, "/v1/queues/probe")
        .token(&token_b)
        .send(&app.router)
        .await;
    assert_eq!(list_b.body["counts"]["ready"], 0);
    let list_ops = req(Method::GET, "/v1/queues/probe")
        .token(&ops)
        .send(&app.router)
        .await;
    assert_eq!(list_ops.body["counts"]["ready"], 1);

    // Ops cannot enqueue (a job needs a tenant).
    let ops_enqueue = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&ops)
        .json(&probe_job("x"))
        .send(&app.router)
        .await;
    assert_eq!(ops_enqueue.status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn enqueue_writes_to_redis_and_reports_duplicates(pool: PgPool) {
    let app = app(pool).await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let body = json!({"payload": {"effect_key": "e1"}, "key": "order-1", "priority": "high", "delay_ms": 60000});

    let first = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert_eq!(first.body["duplicate"], false);
    let id: JobId = first.body["id"].as_str().unwrap().parse().unwrap();

    let info = queue(&app, "probe")
        .job(&id)
        .await
        .unwrap()
        .expect("job in redis");
    assert_eq!(info.tenant, tenant_id);
    assert_eq!(info.state, JobState::Delayed);
    assert_eq!(info.priority, herald_core::Priority::High);
    assert_eq!(info.payload, json!({"effect_key": "e1"}));
    assert!(!info.durable);

    let second = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.body["duplicate"], true);
    assert_eq!(second.body["id"], first.body["id"]);
    let counts = queue(&app, "probe").counts(Some(tenant_id)).await.unwrap();
    assert_eq!(counts.delayed, 1);
    assert_eq!(outbox_rows(&app.pool).await, 0);

    let metrics = req(Method::GET, "/metrics").send(&app.router).await;
    assert!(
        metrics
            .text
            .contains("herald_api_jobs_enqueued_total{queue=\"probe\"} 1"),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("herald_api_jobs_duplicate_total{queue=\"probe\"} 1")
    );
    assert!(metrics.text.contains("route=\"/v1/queues/{queue}/jobs\""));
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn bad_input_gets_a_json_error_naming_the_problem(pool: PgPool) {
    let app = app_with(
        pool,
        &redis_url(),
        settings(),
        ApiConfig {
            body_limit: 1024,
            ..ApiConfig::default()
        },
    )
    .await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let post = |path: &str| req(Method::POST, path).token(&token);

    let unknown = post("/v1/queues/nope/jobs")
        .json(&probe_job("x"))
        .send(&app.router)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.code(), "not_found");

    let mismatch = post("/v1/queues/probe/jobs")
        .json(&json!({"payload": {"effect_key": 5}}))
        .send(&app.router)
        .await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(mismatch.field(), "payload");
    assert!(
        mismatch.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("probe")
    );

    let bad_field = post("/v1/queues/probe/jobs")
        .json(&json!({"payload": {"effect_key": "a"}, "run_at": "soon"}))
        .send(&app.router)
        .await;
    assert_eq!(bad_field.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad_field.field(), "run_at");

    let malformed = post("/v1/queues/probe/jobs")
        .raw("application/json", "{\"payload\": ")
        .send(&app.router)
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.code(), "malformed_json");

    let wrong_type = post("/v1/queues/probe/jobs")
        .raw("text/plain", probe_job("x").to_string())
        .send(&app.router)
        .await;
    assert_eq!(wrong_type.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(wrong_type.code(), "unsupported_media_type");

    let big = json!({"payload": {"effect_key": "x".repeat(2000)}});
    let too_large = post("/v1/queues/probe/jobs")
        .json(&big)
        .send(&app.router)
        .await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.code(), "payload_too_large");
    let too_large_idempotent = post("/v1/queues/probe/jobs")
        .header("idempotency-key", "big-1")
        .json(&big)
        .send(&app.router)
        .await;
    assert_eq!(too_large_idempotent.status, StatusCode::PAYLOAD_TOO_LARGE);

    let no_route = req(Method::GET, "/v1/nothing-here").send(&app.router).await;
    assert_eq!(no_route.status, StatusCode::NOT_FOUND);
    assert_eq!(no_route.code(), "route_not_found");
    let wrong_method = req(Method::PATCH, "/v1/queues")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.code(), "method_not_allowed");

    // Nothing of the above was written anywhere.
    let counts = queue(&app, "probe").counts(Some(tenant_id)).await.unwrap();
    assert_eq!(counts, herald_queue::Counts::default());
    assert_eq!(outbox_rows(&app.pool).await, 0);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_batch_is_validated_whole_before_anything_is_written(pool: PgPool) {
    let app = app(pool).await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let batch = |jobs: Vec<Value>| {
        req(Method::POST, "/v1/queues/probe/jobs:batch")
            .token(&token)
            .json(&json!({ "jobs": jobs }))
    };

    let refused = batch(vec![
        json!({"payload": {"effect_key": "1"}, "durable": true}),
        json!({"payload": {"effect_key": "2"}}),
        json!({"payload": {"wrong": true}}),
    ])
    .send(&app.router)
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.text
    );
    assert_eq!(refused.field(), "jobs[2].payload");
    let refused_field = batch(vec![
        json!({"payload": {"effect_key": "1"}}),
        json!({"payload": {"effect_key": "2"}, "priority": "urgent"}),
    ])
    .send(&app.router)
    .await;
    assert_eq!(refused_field.field(), "jobs[1].priority");
    let too_many = batch(vec![json!({"payload": {"effect_key": "1"}}); 1001])
        .send(&app.router)
        .await;
    assert_eq!(too_many.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(too_many.field(), "jobs");
    assert_eq!(
        queue(&app, "probe").counts(Some(tenant_id)).await.unwrap(),
        herald_queue::Counts::default()
    );
    assert_eq!(outbox_rows(&app.pool).await, 0);

    let accepted = batch(vec![
        json!({"payload": {"effect_key": "1"}, "durable": true}),
        json!({"payload": {"effect_key": "2"}}),
        json!({"payload": {"effect_key": "3"}, "key": "k3"}),
    ])
    .send(&app.router)
    .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text);
    let answers = accepted.body["jobs"].as_array().unwrap();
    assert_eq!(answers.len(), 3);
    assert!(answers.iter().all(|a| a["duplicate"] == false));
    assert_eq!(outbox_rows(&app.pool).await, 1);
    assert_eq!(
        queue(&app, "probe")
            .counts(Some(tenant_id))
            .await
            .unwrap()
            .ready,
        2
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn idempotency_keys_replay_the_first_response(pool: PgPool) {
    let app = app(pool).await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let send = |key: &str, body: Value| {
        req(Method::POST, "/v1/queues/probe/jobs")
            .token(&token)
            .header("idempotency-key", key)
            .json(&body)
    };

    let first = send("req-1", probe_job("a")).send(&app.router).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = send("req-1", probe_job("a")).send(&app.router).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    // The job exists once: no job key, so only the idempotency record prevented a second.
    assert_eq!(
        queue(&app, "probe")
            .counts(Some(tenant_id))
            .await
            .unwrap()
            .ready,
        1
    );
    let stored: i64 = sqlx::query_scalar(
        "select count(*) from idempotency_keys where tenant_id = $1 and key = 'req-1'",
    )
    .bind(tenant_id.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);

    let reused = send("req-1", probe_job("b")).send(&app.router).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.code(), "idempotency_key_reused");
    assert_eq!(
        queue(&app, "probe")
            .counts(Some(tenant_id))
            .await
            .unwrap()
            .ready,
        1
    );

    // A refused request is not recorded: fixed and retried under the same key, it goes through.
    let refused = send("req-2", json!({"payload": {}}))
        .send(&app.router)
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = send("req-2", probe_job("c")).send(&app.router).await;
    assert_eq!(fixed.status, StatusCode::ACCEPTED);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn durable_jobs_go_through_the_outbox(pool: PgPool) {
    let app = app(pool).await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let body = json!({"payload": {"effect_key": "d1"}, "durable": true, "key": "dk", "max_attempts": 3, "priority": "low"});
    let first = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert_eq!(first.body["duplicate"], false);
    let id = first.body["id"].as_str().unwrap().to_owned();

    let row: (uuid::Uuid, String, Value, Option<String>, i16, Option<i32>) = sqlx::query_as(
        "select tenant_id, queue, payload, job_key, priority, max_attempts from outbox where id = $1",
    )
    .bind(uuid::Uuid::parse_str(&id).unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row.0, tenant_id.0);
    assert_eq!(row.1, "probe");
    assert_eq!(row.2, json!({"effect_key": "d1"}));
    assert_eq!(row.3.as_deref(), Some("dk"));
    assert_eq!(row.4, 2);
    assert_eq!(row.5, Some(3));
    // Not in Redis until the relay publishes it.
    assert_eq!(
        queue(&app, "probe").counts(None).await.unwrap(),
        herald_queue::Counts::default()
    );
    let shown = req(Method::GET, &format!("/v1/queues/probe/jobs/{id}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(shown.body["state"], "accepted");
    assert_eq!(shown.body["durable"], true);

    let again = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(outbox_rows(&app.pool).await, 1);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn http_jobs_only_reach_allow_listed_hosts(pool: PgPool) {
    let app = app(pool).await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let job =
        json!({"payload": {"method": "POST", "url": "https://hooks.example.com/in", "body": "{}"}});

    let refused = req(Method::POST, "/v1/queues/http/jobs")
        .token(&token)
        .json(&job)
        .send(&app.router)
        .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.text
    );
    assert_eq!(refused.field(), "payload.url");

    let put = req(Method::PUT, "/v1/tenant/allowed-hosts")
        .token(&token)
        .json(&json!({"hosts": ["Hooks.Example.com", "other.example.org"]}))
        .send(&app.router)
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    assert_eq!(
        put.body["hosts"],
        json!(["hooks.example.com", "other.example.org"])
    );
    let got = req(Method::GET, "/v1/tenant/allowed-hosts")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(got.body, put.body);

    let accepted = req(Method::POST, "/v1/queues/http/jobs")
        .token(&token)
        .json(&job)
        .send(&app.router)
        .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text);
    assert_eq!(
        queue(&app, "http")
            .counts(Some(tenant_id))
            .await
            .unwrap()
            .ready,
        1
    );

    let bad_host = req(Method::PUT, "/v1/tenant/allowed-hosts")
        .token(&token)
        .json(&json!({"hosts": ["https://x.example.com/path"]}))
        .send(&app.router)
        .await;
    assert_eq!(bad_host.status, StatusCode::UNPROCESSABLE_ENTITY);
    // The refused list changed nothing.
    assert_eq!(
        herald_store::tenants::allowed_hosts(&app.pool, tenant_id)
            .await
            .unwrap(),
        vec!["hooks.example.com", "other.example.org"]
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn enqueue_answers_503_with_retry_after_above_the_high_water_mark(pool: PgPool) {
    let redis = PrivateRedis::start(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"]);
    let app = app_with(
        pool,
        &redis.url,
        QueueSettings {
            memory_high_water: 0.0001,
            ..settings()
        },
        ApiConfig::default(),
    )
    .await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let refused = req(Method::POST, "/v1/queues/probe/jobs")
        .token(&token)
        .json(&probe_job("x"))
        .send(&app.router)
        .await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text
    );
    assert_eq!(refused.code(), "backpressure");
    assert_eq!(refused.headers["retry-after"], "5");
    assert_eq!(
        queue(&app, "probe").counts(Some(tenant_id)).await.unwrap(),
        herald_queue::Counts::default()
    );
    let metrics = req(Method::GET, "/metrics").send(&app.router).await;
    assert!(
        metrics
            .text
            .contains("herald_api_backpressure_rejections_total 1")
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn only_ops_tokens_pause_and_resume_queues(pool: PgPool) {
    let app = app(pool).await;
    let (_, token) = tenant(&app.pool, "a").await;
    let ops = ops_token(&app.pool).await;

    let by_tenant = req(Method::POST, "/v1/queues/probe:pause")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(by_tenant.status, StatusCode::FORBIDDEN);
    assert!(!queue(&app, "probe").is_paused().await.unwrap());

    let paused = req(Method::POST, "/v1/queues/probe:pause")
        .token(&ops)
        .send(&app.router)
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text);
    assert!(queue(&app, "probe").is_paused().await.unwrap());
    let shown = req(Method::GET, "/v1/queues")
        .token(&token)
        .send(&app.router)
        .await;
    let probe = shown.body["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "probe")
        .cloned()
        .unwrap();
    assert_eq!(probe["paused"], true);

    let resumed = req(Method::POST, "/v1/queues/probe:resume")
        .token(&ops)
        .send(&app.router)
        .await;
    assert_eq!(resumed.status, StatusCode::OK);
    assert!(!queue(&app, "probe").is_paused().await.unwrap());

    let unknown_action = req(Method::POST, "/v1/queues/probe:explode")
        .token(&ops)
        .send(&app.router)
        .await;
    assert_eq!(unknown_action.status, StatusCode::NOT_FOUND);
    let workers = req(Method::GET, "/v1/workers")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(workers.status, StatusCode::FORBIDDEN);
    let workers = req(Method::GET, "/v1/workers")
        .token(&ops)
        .send(&app.router)
        .await;
    assert_eq!(workers.status, StatusCode::OK);
    assert!(workers.body["workers"].is_array());
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn dead_jobs_of_another_tenant_are_not_found(pool: PgPool) {
    let app = app(pool).await;
    let (_, token) = tenant(&app.pool, "a").await;
    let listed = req(Method::GET, "/v1/queues/probe/dead?limit=10")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
    assert_eq!(listed.body["jobs"], json!([]));
    let bad_page = req(Method::GET, "/v1/queues/probe/dead?limit=0")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(bad_page.status, StatusCode::BAD_REQUEST);
    let missing = JobId::generate();
    let retry = req(
        Method::POST,
        &format!("/v1/queues/probe/dead/{missing}:retry"),
    )
    .token(&token)
    .send(&app.router)
    .await;
    assert_eq!(retry.status, StatusCode::NOT_FOUND);
    assert_eq!(retry.code(), "not_found");
    let discard = req(Method::DELETE, &format!("/v1/queues/probe/dead/{missing}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(discard.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn readyz_names_the_backing_service_that_failed(pool: PgPool) {
    let mut redis = PrivateRedis::start(&[]);
    let app = app_with(pool, &redis.url, settings(), ApiConfig::default()).await;
    let ready = req(Method::GET, "/readyz").send(&app.router).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);
    assert_eq!(
        ready.body["checks"],
        json!({"postgres": "ok", "redis": "ok"})
    );
    let health = req(Method::GET, "/healthz").send(&app.router).await;
    assert_eq!(health.status, StatusCode::OK);

    redis.kill();
    let not_ready = req(Method::GET, "/readyz").send(&app.router).await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(not_ready.body["checks"]["postgres"], "ok");
    assert_ne!(not_ready.body["checks"]["redis"], "ok");
}

/// Every route in the table is in the OpenAPI document and every documented operation is in the
/// table; and the router answers every route (no `route_not_found`, no 405).
#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn the_openapi_document_matches_the_routes(pool: PgPool) {
    let app = app(pool).await;
    let served = req(Method::GET, "/v1/openapi.json").send(&app.router).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.body["openapi"], "3.0.3");

    let documented: BTreeSet<(String, String)> = served.body["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = herald_api::routes::ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(documented, routed);

    let (_, token) = tenant(&app.pool, "a").await;
    for route in herald_api::routes::ROUTES {
        let path = route
            .path
            .replace("{queue}", "probe")
            .replace("{id}", JobId::generate().as_str());
        let reply = req(route.method(), &path)
            .token(&token)
            .send(&app.router)
            .await;
        assert_ne!(reply.code(), "route_not_found", "{} {path}", route.method);
        assert_ne!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{} {path}",
            route.method
        );
    }
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn racing_requests_with_one_idempotency_key_do_the_work_once(pool: PgPool) {
    let app = app(pool).await;
    let (tenant_id, token) = tenant(&app.pool, "a").await;
    let send = || {
        req(Method::POST, "/v1/queues/probe/jobs")
            .token(&token)
            .header("idempotency-key", "race-1")
            .json(&probe_job("race"))
            .send(&app.router)
    };
    let (a, b, c) = tokio::join!(send(), send(), send());
    for reply in [&a, &b, &c] {
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
        assert_eq!(reply.body["id"], a.body["id"]);
    }
    assert_eq!(
        queue(&app, "probe")
            .counts(Some(tenant_id))
            .await
            .unwrap()
            .ready,
        1
    );
}
