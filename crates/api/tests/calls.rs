//! Call campaigns' routes against a fresh Postgres database per test: users, agents, contacts,
//! the provider account, campaigns (JSON and CSV upload), templates, pause/resume/cancel/delete,
//! stats, and the provider's webhook with its secret. Every test checks the rows in Postgres.

mod support;

use axum::http::{Method, StatusCode};
use herald_core::TenantId;
use herald_store::PgPool;
use serde_json::{Value, json};
use support::*;

const SECRET: &str = "a-webhook-secret";

async fn count(pool: &PgPool, sql: &str, tenant: TenantId) -> i64 {
    sqlx::query_scalar(sql)
        .bind(tenant.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A tenant with a provider account, a user and an agent; returns their ids.
async fn setup(app: &TestApp, name: &str) -> (TenantId, String, String, String) {
    let (tenant, token) = tenant(&app.pool, name).await;
    let provider = req(Method::PUT, "/v1/providers/voice")
        .token(&token)
        .json(&json!({"api_url": "http://127.0.0.1:9", "api_key": "k", "webhook_secret": SECRET}))
        .send(&app.router)
        .await;
    assert_eq!(provider.status, StatusCode::OK, "{}", provider.text);
    assert_eq!(provider.body["system_limit"], 10);
    assert!(provider.body.get("api_key").is_none());
    let user = req(Method::POST, "/v1/users")
        .token(&token)
        .json(&json!({"name": "Uma"}))
        .send(&app.router)
        .await;
    assert_eq!(user.status, StatusCode::CREATED, "{}", user.text);
    assert_eq!(user.body["concurrent_calls_limit"], 2);
    let agent = req(Method::POST, "/v1/agents")
        .token(&token)
        .json(&json!({"name": "Ava", "assistant_id": "asst_1", "phone_number_id": "pn_1"}))
        .send(&app.router)
        .await;
    assert_eq!(agent.status, StatusCode::CREATED, "{}", agent.text);
    (
        tenant,
        token,
        user.body["id"].as_str().unwrap().to_owned(),
        agent.body["id"].as_str().unwrap().to_owned(),
    )
}

fn settings(user: &str, agent: &str) -> Value {
    json!({
        "name": "Spring", "user_id": user, "agent_id": agent,
        "first_call_time": "09:00", "last_call_time": "18:00", "time_zone": "Europe/London",
        "start_date": "2026-03-02", "next_action": "book a demo"
    })
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn contacts_then_a_campaign_queue_calls_and_a_dispatch_job(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token, user, agent) = setup(&app, "a").await;
    let contacts = req(Method::POST, "/v1/contacts")
        .token(&token)
        .json(&json!({"contacts": [
            {"phone": "+14155550100", "name": "Ann", "company": "Acme"},
            {"phone": "555-0101"},
            {"phone": "+14155550102"}
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(contacts.status, StatusCode::OK, "{}", contacts.text);
    assert_eq!(contacts.body["stored"], 2);
    assert_eq!(
        contacts.body["rejected_rows"][0]["line"], 2,
        "{}",
        contacts.text
    );
    assert_eq!(contacts.body["rejected_rows"][0]["column"], "phone");
    let ids = contacts.body["contact_ids"].clone();

    let mut body = settings(&user, &agent);
    body["contact_ids"] = ids;
    let created = req(Method::POST, "/v1/call-campaigns")
        .token(&token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.body["queued"], 2);
    assert_eq!(created.body["campaign"]["status"], "active");
    let id = created.body["campaign"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from calls where tenant_id = $1 and state = 'queued'",
            tenant
        )
        .await,
        2
    );
    // The named contact comes first.
    let named: Option<String> = sqlx::query_scalar(
        "select name from calls where tenant_id = $1 order by priority, seq limit 1",
    )
    .bind(tenant.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(named.as_deref(), Some("Ann"));
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from outbox where tenant_id = $1 and queue = 'call_dispatch'",
            tenant
        )
        .await,
        1
    );

    // A bad window or zone is 422 naming the field; nothing more is written.
    for (field, value) in [("time_zone", "Mars/Base"), ("first_call_time", "9am")] {
        let mut bad = body.clone();
        bad[field] = json!(value);
        let reply = req(Method::POST, "/v1/call-campaigns")
            .token(&token)
            .json(&bad)
            .send(&app.router)
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            reply.text
        );
        assert_eq!(reply.field(), field);
    }
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from call_campaigns where tenant_id = $1",
            tenant
        )
        .await,
        1
    );

    // Pause, resume (a dispatch job again), stats, cancel, delete.
    let paused = req(Method::POST, &format!("/v1/call-campaigns/{id}:pause"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text);
    assert_eq!(paused.body["campaign"]["status"], "paused");
    let again = req(Method::POST, &format!("/v1/call-campaigns/{id}:pause"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let resumed = req(Method::POST, &format!("/v1/call-campaigns/{id}:resume"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(resumed.body["campaign"]["status"], "active");
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from outbox where tenant_id = $1 and queue = 'call_dispatch'",
            tenant
        )
        .await,
        2
    );
    let stats = req(Method::GET, &format!("/v1/call-campaigns/{id}/stats"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(stats.body["queued"], 2, "{}", stats.text);
    let cancelled = req(Method::POST, &format!("/v1/call-campaigns/{id}:cancel"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(cancelled.body["cancelled_calls"], 2, "{}", cancelled.text);
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from calls where tenant_id = $1 and state = 'cancelled'",
            tenant
        )
        .await,
        2
    );

    // Another tenant sees nothing.
    let (_, other) = support::tenant(&app.pool, "b").await;
    let hidden = req(Method::GET, &format!("/v1/call-campaigns/{id}"))
        .token(&other)
        .send(&app.router)
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    let listed = req(Method::GET, "/v1/call-campaigns")
        .token(&other)
        .send(&app.router)
        .await;
    assert_eq!(listed.body["campaigns"], json!([]));

    let deleted = req(Method::DELETE, &format!("/v1/call-campaigns/{id}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from calls where tenant_id = $1",
            tenant
        )
        .await,
        0
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_csv_upload_reports_bad_rows_and_calls_the_good_ones(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token, user, agent) = setup(&app, "a").await;
    let query = format!(
        "name=Upload&user_id={user}&agent_id={agent}&first_call_time=22:00&last_call_time=06:00&time_zone=America/New_York"
    );
    let csv = "phone,name,company\n+14155550100,Ann,Acme\nnot-a-phone,Bob,\n,Cy,\n+442079460000,,Example\n";
    let reply = req(Method::POST, &format!("/v1/call-campaigns:upload?{query}"))
        .token(&token)
        .raw("text/csv", csv)
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.body["queued"], 2);
    assert_eq!(reply.body["rejected"], 2);
    assert_eq!(
        reply.body["rejected_rows"],
        json!([
            {"line": 3, "column": "phone", "reason": "phone \"not-a-phone\" is not E.164: it must start with + and the country code"},
            {"line": 4, "column": "phone", "reason": "phone is missing"}
        ])
    );
    let context: Value = sqlx::query_scalar(
        "select context from calls where tenant_id = $1 and phone = '+14155550100'",
    )
    .bind(tenant.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(context, json!({"company": "Acme"}));

    // Not CSV, or too big: 400 and nothing written.
    let before = count(
        &app.pool,
        "select count(*) from calls where tenant_id = $1",
        tenant,
    )
    .await;
    let binary = req(Method::POST, &format!("/v1/call-campaigns:upload?{query}"))
        .token(&token)
        .raw("text/csv", vec![0u8, 159, 146, 150])
        .send(&app.router)
        .await;
    assert_eq!(binary.status, StatusCode::BAD_REQUEST, "{}", binary.text);
    assert_eq!(binary.code(), "malformed_csv");
    let no_phone = req(Method::POST, &format!("/v1/call-campaigns:upload?{query}"))
        .token(&token)
        .raw("text/csv", "name\nAnn\n")
        .send(&app.router)
        .await;
    assert_eq!(no_phone.status, StatusCode::BAD_REQUEST);
    let mut huge = String::from("phone,name\n");
    while huge.len() <= herald_store::calls::MAX_CONTACTS_CSV_BYTES {
        huge.push_str("+14155550199,A very long name to fill the file up quickly\n");
    }
    let too_big = req(Method::POST, &format!("/v1/call-campaigns:upload?{query}"))
        .token(&token)
        .raw("text/csv", huge)
        .send(&app.router)
        .await;
    assert_eq!(too_big.status, StatusCode::BAD_REQUEST, "{}", too_big.text);
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from calls where tenant_id = $1",
            tenant
        )
        .await,
        before
    );
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from call_campaigns where tenant_id = $1",
            tenant
        )
        .await,
        1
    );

    for file in ["basic.csv", "advanced.csv"] {
        let template = req(Method::GET, &format!("/v1/call-campaigns/templates/{file}"))
            .token(&token)
            .send(&app.router)
            .await;
        assert_eq!(template.status, StatusCode::OK);
        assert!(template.text.starts_with("phone,name"));
        // A template is itself a valid upload.
        assert!(
            herald_store::calls::parse_contacts_csv(template.text.as_bytes())
                .unwrap()
                .iter()
                .all(|r| r.contact.is_ok())
        );
    }
    let missing = req(Method::GET, "/v1/call-campaigns/templates/other.csv")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn webhooks_need_the_tenants_secret_and_release_once_per_call(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, _token, _, _) = setup(&app, "a").await;
    let path = format!("/v1/webhooks/voice/{tenant}");
    let ended = json!({"message": {"type": "status-update", "status": "ended",
                       "endedReason": "customer-ended-call", "call": {"id": "call-1"}}});
    let releases =
        "select count(*) from outbox where tenant_id = $1 and queue = 'call_release_slot'";

    for secret in [None, Some("wrong-secret"), Some("a-webhook-secre")] {
        let mut request = req(Method::POST, &path).json(&ended);
        if let Some(secret) = secret {
            request = request.header("x-vapi-secret", secret);
        }
        let reply = request.send(&app.router).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{secret:?}");
        assert_eq!(reply.code(), "unauthorized");
    }
    // An unknown tenant is refused the same way.
    let stranger = req(
        Method::POST,
        &format!("/v1/webhooks/voice/{}", TenantId::new()),
    )
    .header("x-vapi-secret", SECRET)
    .json(&ended)
    .send(&app.router)
    .await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    assert_eq!(count(&app.pool, releases, tenant).await, 0);

    let first = req(Method::POST, &path)
        .header("x-vapi-secret", SECRET)
        .json(&ended)
        .send(&app.router)
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body, json!({"received": "ended", "duplicate": false}));
    let report = json!({"message": {"type": "end-of-call-report", "endedReason": "customer-ended-call",
                        "durationSeconds": 42, "call": {"id": "call-1"}}});
    let second = req(Method::POST, &path)
        .header("x-vapi-secret", SECRET)
        .json(&report)
        .send(&app.router)
        .await;
    assert_eq!(second.body, json!({"received": "ended", "duplicate": true}));
    assert_eq!(count(&app.pool, releases, tenant).await, 1);

    let transcript = req(Method::POST, &path)
        .header("x-vapi-secret", SECRET)
        .json(&json!({"message": {"type": "transcript", "transcript": "hi"}}))
        .send(&app.router)
        .await;
    assert_eq!(transcript.body["received"], "ignored");
    let garbage = req(Method::POST, &path)
        .header("x-vapi-secret", SECRET)
        .raw("application/json", "nope")
        .send(&app.router)
        .await;
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
    assert_eq!(count(&app.pool, releases, tenant).await, 1);
}
