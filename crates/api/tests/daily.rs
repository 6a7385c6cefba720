//! The daily VA assignment's routes against a fresh Postgres database per test and a random
//! Redis namespace: profile imports, pool stats, starting, listing, watching and resuming
//! campaigns, cleanup on demand. Every test checks the rows in Postgres, not only the answer.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use futures::StreamExt;
use herald_core::TenantId;
use herald_store::PgPool;
use serde_json::{Value, json};
use support::*;
use tower::ServiceExt;
use uuid::Uuid;

async fn profile_count(pool: &PgPool, tenant: TenantId) -> i64 {
    sqlx::query_scalar("select count(*) from profiles where tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn outbox_queues(pool: &PgPool, tenant: TenantId) -> Vec<String> {
    sqlx::query_scalar("select queue from outbox where tenant_id = $1 order by created_at, id")
        .bind(tenant.0)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn campaign_count(pool: &PgPool, tenant: TenantId) -> i64 {
    sqlx::query_scalar("select count(*) from daily_campaigns where tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A CSV of `n` good profiles, `user_1` … `user_n`.
fn good_csv(n: usize) -> String {
    let mut csv = String::from("username,full_name,external_id\n");
    for i in 1..=n {
        csv.push_str(&format!("user_{i},User {i},ext-{i}\n"));
    }
    csv
}

async fn start(app: &TestApp, token: &str, body: Value) -> Reply {
    req(Method::POST, "/v1/campaigns/daily")
        .token(token)
        .json(&body)
        .send(&app.router)
        .await
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_csv_with_bad_rows_inserts_the_good_ones_and_reports_the_rest(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let csv = "username,full_name,external_id\n\
               @Alice,Alice A,1\n\
               bob,Bob B,2\n\
               ,Nobody,3\n\
               bad name,Bad,4\n\
               alice,Alice again,5\n\
               carol,Carol,6\n";
    let reply = req(Method::POST, "/v1/profiles")
        .token(&token)
        .raw("text/csv; charset=utf-8", csv)
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["inserted"], 3);
    assert_eq!(reply.body["duplicates"], 1);
    assert_eq!(reply.body["rejected"], 2);
    assert_eq!(
        reply.body["duplicate_rows"],
        json!([{"line": 6, "username": "alice"}])
    );
    let rejected = reply.body["rejected_rows"].as_array().unwrap();
    assert_eq!(rejected[0]["line"], 4);
    assert_eq!(rejected[0]["reason"], "username is missing");
    assert_eq!(rejected[1]["line"], 5);
    assert!(
        rejected[1]["reason"]
            .as_str()
            .unwrap()
            .contains("letters, digits")
    );

    let usernames: Vec<String> = sqlx::query_scalar(
        "select username from profiles where tenant_id = $1 and used_on is null order by username",
    )
    .bind(tenant.0)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(usernames, ["alice", "bob", "carol"]);

    // The same file again: everything is a duplicate, nothing new.
    let again = req(Method::POST, "/v1/profiles")
        .token(&token)
        .raw("text/csv", csv)
        .send(&app.router)
        .await;
    assert_eq!(again.body["inserted"], 0);
    assert_eq!(again.body["duplicates"], 4);
    assert_eq!(profile_count(&app.pool, tenant).await, 3);

    let stats = req(Method::GET, "/v1/profiles/stats")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.body, json!({"total": 3, "unused": 3, "used": 0}));

    let metrics = req(Method::GET, "/metrics").send(&app.router).await;
    assert!(
        metrics
            .text
            .contains("herald_api_profiles_imported_total{outcome=\"inserted\"} 3"),
        "{}",
        metrics.text
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn json_and_multipart_imports_land_in_the_pool(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let reply = req(Method::POST, "/v1/profiles")
        .token(&token)
        .json(&json!({"profiles": [
            {"username": "dora", "full_name": "Dora", "external_id": 7},
            {"username": 5},
            {"username": "eve"}
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["inserted"], 2);
    assert_eq!(
        reply.body["rejected_rows"],
        json!([{"line": 2, "reason": "username must be a string"}])
    );
    let external: Option<String> = sqlx::query_scalar(
        "select external_id from profiles where tenant_id = $1 and username = 'dora'",
    )
    .bind(tenant.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(external.as_deref(), Some("7"));

    let boundary = "herald-test-boundary";
    let form = format!(
        "--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"pool.csv\"\r\n\
         Content-Type: text/csv\r\n\r\n\
         {}\r\n--{boundary}--\r\n",
        good_csv(4)
    );
    let multipart = req(Method::POST, "/v1/profiles")
        .token(&token)
        .raw(&format!("multipart/form-data; boundary={boundary}"), form)
        .send(&app.router)
        .await;
    assert_eq!(multipart.status, StatusCode::OK, "{}", multipart.text);
    assert_eq!(multipart.body["inserted"], 4);
    assert_eq!(profile_count(&app.pool, tenant).await, 6);

    let empty_form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--{boundary}--\r\n"
    );
    let no_file = req(Method::POST, "/v1/profiles")
        .token(&token)
        .raw(
            &format!("multipart/form-data; boundary={boundary}"),
            empty_form,
        )
        .send(&app.router)
        .await;
    assert_eq!(no_file.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_file.field(), "file");
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_file_that_is_not_csv_is_refused_whole(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let post = |content_type: &'static str, body: Vec<u8>| {
        req(Method::POST, "/v1/profiles")
            .token(&token)
            .raw(content_type, body)
            .send(&app.router)
    };

    let png = post("text/csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec()).await;
    assert_eq!(png.status, StatusCode::BAD_REQUEST);
    assert_eq!(png.code(), "malformed_csv");
    let no_username = post("text/csv", b"name,full_name\nalice,Alice\n".to_vec()).await;
    assert_eq!(no_username.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_username.code(), "malformed_csv");
    assert!(
        no_username.text.contains("username"),
        "{}",
        no_username.text
    );

    let bad_json = post("application/json", b"{\"profiles\": [".to_vec()).await;
    assert_eq!(bad_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_json.code(), "malformed_json");
    let wrong_shape = post("application/json", b"[{\"username\": \"a\"}]".to_vec()).await;
    assert_eq!(wrong_shape.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(wrong_shape.field(), "body");

    let plain = post("text/plain", good_csv(2).into_bytes()).await;
    assert_eq!(plain.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(plain.text.contains("text/csv"), "{}", plain.text);

    assert_eq!(profile_count(&app.pool, tenant).await, 0);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn starting_a_day_twice_gives_one_campaign_and_one_select_job(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let body = json!({"date": "2026-03-02", "target": 20, "tables": 2, "per_table": 10});

    let first = start(&app, &token, body.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert_eq!(first.body["created"], true);
    assert_eq!(first.body["stage"], "selecting");
    assert_eq!(first.body["status"], "running");
    assert_eq!(first.body["date"], "2026-03-02");
    assert_eq!(first.body["counts"]["target"], 20);
    let id = first.body["campaign_id"].as_str().unwrap().to_owned();

    // Another shape for the same date still answers the existing campaign.
    let second = start(&app, &token, json!({"date": "2026-03-02", "target": 5})).await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.body["created"], false);
    assert_eq!(second.body["campaign_id"], id.as_str());
    assert_eq!(second.body["counts"]["target"], 20);

    assert_eq!(campaign_count(&app.pool, tenant).await, 1);
    assert_eq!(outbox_queues(&app.pool, tenant).await, ["daily_select"]);
    let payload: Value =
        sqlx::query_scalar("select payload from outbox where tenant_id = $1 and queue = $2")
            .bind(tenant.0)
            .bind("daily_select")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(payload, json!({"campaign_id": id}));

    // No body at all: today's campaign with the seed's shape.
    let today = req(Method::POST, "/v1/campaigns/daily")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(today.status, StatusCode::ACCEPTED, "{}", today.text);
    assert_eq!(today.body["counts"]["target"], 14_400);
    assert_eq!(today.body["tables"], 80);
    assert_eq!(today.body["per_table"], 180);
    assert_eq!(
        today.body["date"],
        chrono::Utc::now().date_naive().to_string()
    );
    assert_eq!(campaign_count(&app.pool, tenant).await, 2);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn campaign_requests_name_the_bad_field_and_write_nothing(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    for (body, field) in [
        (json!({"date": "2026-02-30"}), "date"),
        (json!({"tables": 100}), "tables"),
        (json!({"per_table": 0}), "per_table"),
        (
            json!({"target": 181, "tables": 1, "per_table": 180}),
            "target",
        ),
        (json!({"target": "many"}), "target"),
        (json!({"table": 3}), "table"),
    ] {
        let reply = start(&app, &token, body.clone()).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(reply.code(), "invalid");
        assert_eq!(reply.field(), field, "{body}");
    }
    let malformed = req(Method::POST, "/v1/campaigns/daily")
        .token(&token)
        .raw("application/json", "{\"date\": ")
        .send(&app.router)
        .await;
    assert_eq!(malformed.code(), "malformed_json");
    assert_eq!(campaign_count(&app.pool, tenant).await, 0);
    assert!(outbox_queues(&app.pool, tenant).await.is_empty());

    let ops = ops_token(&app.pool).await;
    let by_ops = start(&app, &ops, json!({})).await;
    assert_eq!(by_ops.status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn campaigns_are_listed_newest_first_and_hidden_from_other_tenants(pool: PgPool) {
    let app = app(pool).await;
    let (_, token_a) = tenant(&app.pool, "a").await;
    let (_, token_b) = tenant(&app.pool, "b").await;
    let older = start(&app, &token_a, json!({"date": "2026-03-05", "target": 10})).await;
    let newer = start(&app, &token_a, json!({"date": "2026-03-01", "target": 10})).await;
    let id = older.body["campaign_id"].as_str().unwrap().to_owned();

    let list = req(Method::GET, "/v1/campaigns")
        .token(&token_a)
        .send(&app.router)
        .await;
    assert_eq!(list.status, StatusCode::OK);
    let ids: Vec<&Value> = list.body["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["campaign_id"])
        .collect();
    assert_eq!(
        ids,
        [&newer.body["campaign_id"], &older.body["campaign_id"]]
    );
    let one = req(Method::GET, "/v1/campaigns?limit=1")
        .token(&token_a)
        .send(&app.router)
        .await;
    assert_eq!(one.body["campaigns"].as_array().unwrap().len(), 1);
    let bad_limit = req(Method::GET, "/v1/campaigns?limit=0")
        .token(&token_a)
        .send(&app.router)
        .await;
    assert_eq!(bad_limit.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_limit.field(), "limit");

    let own = req(Method::GET, &format!("/v1/campaigns/{id}"))
        .token(&token_a)
        .send(&app.router)
        .await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.body["campaign_id"], id.as_str());
    assert_eq!(own.body["stage"], "selecting");
    assert_eq!(own.body["progress"], 0);
    assert_eq!(own.body["error"], Value::Null);
    assert!(own.body["counts"].is_object());

    // Tenant B sees nothing of A's: not in its list, 404 on every campaign route.
    let list_b = req(Method::GET, "/v1/campaigns")
        .token(&token_b)
        .send(&app.router)
        .await;
    assert_eq!(list_b.body["campaigns"], json!([]));
    for (method, path) in [
        (Method::GET, format!("/v1/campaigns/{id}")),
        (Method::GET, format!("/v1/campaigns/{id}/events")),
        (Method::POST, format!("/v1/campaigns/{id}/resume")),
        (Method::GET, "/v1/campaigns/not-a-uuid".to_owned()),
        (Method::GET, format!("/v1/campaigns/{}", Uuid::now_v7())),
    ] {
        let reply = req(method.clone(), &path)
            .token(&token_b)
            .send(&app.router)
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(reply.code(), "not_found");
    }
    // B's resume attempt changed nothing of A's.
    let still = req(Method::GET, &format!("/v1/campaigns/{id}"))
        .token(&token_a)
        .send(&app.router)
        .await;
    assert_eq!(still.body["stage"], "selecting");
}

/// Reads server-sent events from `body` until `events` events have arrived or the stream ends;
/// returns each event's (name, data).
async fn read_events(body: Body, events: usize) -> (Vec<(String, Value)>, bool) {
    let mut stream = body.into_data_stream();
    let mut text = String::new();
    let mut parsed = Vec::new();
    let mut ended = false;
    while parsed.len() < events {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event within 10 s");
        let Some(chunk) = chunk else {
            ended = true;
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk.expect("body chunk")));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                parsed.push((name, serde_json::from_str(&data).expect("JSON data")));
            }
        }
    }
    if !ended && parsed.len() >= events {
        // See whether the stream ends right after.
        ended = matches!(
            tokio::time::timeout(Duration::from_secs(2), stream.next()).await,
            Ok(None)
        );
    }
    (parsed, ended)
}

async fn open_events(app: &TestApp, token: &str, id: &str) -> axum::response::Response {
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("/v1/campaigns/{id}/events"))
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    app.router.clone().oneshot(request).await.unwrap()
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn the_event_stream_sends_the_view_and_its_changes_until_the_campaign_ends(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let started = start(&app, &token, json!({"date": "2026-03-03", "target": 10})).await;
    let id = started.body["campaign_id"].as_str().unwrap().to_owned();

    let response = open_events(&app, &token, &id).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.into_body();
    // The stream polls Postgres; move the campaign on while it watches.
    let pool = app.pool.clone();
    let campaign = Uuid::parse_str(&id).unwrap();
    let mover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        sqlx::query(
            "update daily_campaigns set stage = 'distributing', selected = 10, updated_at = now()
             where tenant_id = $1 and id = $2",
        )
        .bind(tenant.0)
        .bind(campaign)
        .execute(&pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        sqlx::query(
            "update daily_campaigns set stage = 'complete', completed_at = now(), updated_at = now()
             where tenant_id = $1 and id = $2",
        )
        .bind(tenant.0)
        .bind(campaign)
        .execute(&pool)
        .await
        .unwrap();
    });
    let (events, ended) = read_events(body, 3).await;
    mover.await.unwrap();
    let stages: Vec<&Value> = events.iter().map(|(_, view)| &view["stage"]).collect();
    assert_eq!(stages, ["selecting", "distributing", "complete"]);
    for (name, view) in &events {
        assert_eq!(name, "campaign");
        assert_eq!(view["campaign_id"], id.as_str());
    }
    assert_eq!(events[1].1["counts"]["selected"], 10);
    assert_eq!(events[2].1["status"], "complete");
    assert_eq!(events[2].1["progress"], 100);
    assert!(ended, "the stream ends once the campaign is complete");

    // A finished campaign's stream is one event, then the end.
    let (events, ended) = read_events(open_events(&app, &token, &id).await.into_body(), 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["stage"], "complete");
    assert!(ended);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn only_a_failed_campaign_resumes_and_from_the_stage_that_failed(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let started = start(&app, &token, json!({"date": "2026-03-04", "target": 10})).await;
    let id = started.body["campaign_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/campaigns/{id}/resume");

    let running = req(Method::POST, &path)
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(running.status, StatusCode::CONFLICT, "{}", running.text);
    assert_eq!(running.code(), "conflict");
    assert_eq!(outbox_queues(&app.pool, tenant).await, ["daily_select"]);

    sqlx::query(
        "update daily_campaigns set stage = 'failed', failed_stage = 'distributing',
                error = 'worker lost', updated_at = now()
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(Uuid::parse_str(&id).unwrap())
    .execute(&app.pool)
    .await
    .unwrap();
    let failed = req(Method::GET, &format!("/v1/campaigns/{id}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(failed.body["status"], "failed");
    assert_eq!(failed.body["error"], "worker lost");

    let resumed = req(Method::POST, &path)
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(resumed.status, StatusCode::ACCEPTED, "{}", resumed.text);
    assert_eq!(resumed.body["stage"], "distributing");
    assert_eq!(resumed.body["error"], Value::Null);
    assert_eq!(
        outbox_queues(&app.pool, tenant).await,
        ["daily_select", "daily_distribute"]
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn cleanup_on_demand_writes_a_cleanup_job(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let reply = req(Method::POST, "/v1/cleanup")
        .token(&token)
        .json(&json!({"date": "2026-03-10"}))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert_eq!(reply.body["queue"], "daily_cleanup");
    let job_id = Uuid::parse_str(reply.body["job_id"].as_str().unwrap()).unwrap();
    let (queue, payload): (String, Value) =
        sqlx::query_as("select queue, payload from outbox where tenant_id = $1 and id = $2")
            .bind(tenant.0)
            .bind(job_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(queue, "daily_cleanup");
    assert_eq!(payload, json!({"date": "2026-03-10"}));

    let without_body = req(Method::POST, "/v1/cleanup")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(without_body.status, StatusCode::ACCEPTED);
    let bad = req(Method::POST, "/v1/cleanup")
        .token(&token)
        .json(&json!({"date": "yesterday"}))
        .send(&app.router)
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.field(), "date");
    assert_eq!(
        outbox_queues(&app.pool, tenant).await,
        ["daily_cleanup", "daily_cleanup"]
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_import_with_an_idempotency_key_is_replayed_not_redone(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token) = tenant(&app.pool, "a").await;
    let send = || {
        req(Method::POST, "/v1/profiles")
            .token(&token)
            .header("idempotency-key", "import-1")
            .raw("text/csv", good_csv(3))
            .send(&app.router)
    };
    let first = send().await;
    assert_eq!(first.body["inserted"], 3);
    let second = send().await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(second.body["inserted"], 3, "the first answer, replayed");
    assert_eq!(profile_count(&app.pool, tenant).await, 3);
}
