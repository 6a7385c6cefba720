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

/// Stores contacts with these phones (named when `named`); returns their ids.
async fn contacts(app: &TestApp, token: &str, phones: &[(&str, bool)]) -> Vec<String> {
    let items: Vec<Value> = phones
        .iter()
        .map(|(phone, named)| {
            if *named {
                json!({"phone": phone, "name": format!("Name {phone}")})
            } else {
                json!({"phone": phone})
            }
        })
        .collect();
    let reply = req(Method::POST, "/v1/contacts")
        .token(token)
        .json(&json!({ "contacts": items }))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.body["contact_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

async fn create_campaign(
    app: &TestApp,
    token: &str,
    user: &str,
    agent: &str,
    contact_ids: &[String],
) -> String {
    let mut body = settings(user, agent);
    body["contact_ids"] = json!(contact_ids);
    let created = req(Method::POST, "/v1/call-campaigns")
        .token(token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    created.body["campaign"]["id"].as_str().unwrap().to_owned()
}

async fn patch(app: &TestApp, token: &str, id: &str, body: Value) -> Reply {
    req(Method::PATCH, &format!("/v1/call-campaigns/{id}"))
        .token(token)
        .json(&body)
        .send(&app.router)
        .await
}

/// The campaign row as stored: name, window, zone, start date, next action, agent, status,
/// pause reason.
async fn stored_campaign(pool: &PgPool, id: &str) -> Value {
    sqlx::query_scalar(
        "select jsonb_build_object('name', name, 'first', first_call_time::text,
                'last', last_call_time::text, 'zone', time_zone, 'start', start_date::text,
                'next_action', next_action, 'agent_id', agent_id::text, 'status', status,
                'pause_reason', pause_reason)
         from call_campaigns where id = $1::uuid",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_campaign_update_is_validated_like_create_and_dispatches_again(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token, user, agent) = setup(&app, "a").await;
    let ids = contacts(&app, &token, &[("+14155550100", true)]).await;
    let id = create_campaign(&app, &token, &user, &agent, &ids).await;
    let dispatches = "select count(*) from outbox where tenant_id = $1 and queue = 'call_dispatch'";
    assert_eq!(count(&app.pool, dispatches, tenant).await, 1);

    let updated = patch(
        &app,
        &token,
        &id,
        json!({"name": "Autumn", "first_call_time": "22:00", "last_call_time": "06:00",
               "time_zone": "America/New_York", "start_date": "2026-10-01", "next_action": null}),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    assert_eq!(updated.body["campaign"]["name"], "Autumn");
    assert_eq!(
        stored_campaign(&app.pool, &id).await,
        json!({"name": "Autumn", "first": "22:00:00", "last": "06:00:00",
               "zone": "America/New_York", "start": "2026-10-01", "next_action": null,
               "agent_id": agent, "status": "active", "pause_reason": null})
    );
    // An active campaign is dispatched again, under the new window.
    assert_eq!(count(&app.pool, dispatches, tenant).await, 2);
    // Absent fields keep their value.
    let renamed = patch(&app, &token, &id, json!({"next_action": "call back"})).await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.text);
    assert_eq!(stored_campaign(&app.pool, &id).await["name"], "Autumn");
    assert_eq!(
        stored_campaign(&app.pool, &id).await["next_action"],
        "call back"
    );

    // Refused as on create, naming the field; nothing changes.
    let before = stored_campaign(&app.pool, &id).await;
    for (body, field) in [
        (json!({"time_zone": "Mars/Base"}), "time_zone"),
        (json!({"first_call_time": "9am"}), "first_call_time"),
        (json!({"first_call_time": "06:00"}), "first_call_time"),
        (
            json!({"first_call_time": "10:00", "last_call_time": "10:00"}),
            "last_call_time",
        ),
        (json!({"name": ""}), "name"),
        (json!({"status": "active"}), "status"),
    ] {
        let reply = patch(&app, &token, &id, body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            reply.text
        );
        assert_eq!(reply.field(), field, "{body}");
    }
    let stranger = patch(
        &app,
        &token,
        &id,
        json!({"agent_id": uuid::Uuid::new_v4().to_string()}),
    )
    .await;
    assert_eq!(stranger.status, StatusCode::NOT_FOUND, "{}", stranger.text);
    assert_eq!(stored_campaign(&app.pool, &id).await, before);

    // Another tenant cannot see it; a cancelled campaign cannot change.
    let (_, other) = support::tenant(&app.pool, "b").await;
    let hidden = patch(&app, &other, &id, json!({"name": "Mine"})).await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    let cancelled = req(Method::POST, &format!("/v1/call-campaigns/{id}:cancel"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.text);
    let late = patch(&app, &token, &id, json!({"name": "Too late"})).await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.text);
    assert_eq!(stored_campaign(&app.pool, &id).await["name"], "Autumn");
    assert_eq!(count(&app.pool, dispatches, tenant).await, 3);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn deleting_a_contact_cancels_its_queued_calls_only(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token, user, agent) = setup(&app, "a").await;
    let ids = contacts(
        &app,
        &token,
        &[("+14155550100", true), ("+14155550101", false)],
    )
    .await;
    let (gone, kept) = (ids[0].clone(), ids[1].clone());
    let first = create_campaign(&app, &token, &user, &agent, &ids).await;
    let second = create_campaign(&app, &token, &user, &agent, &ids).await;
    // The contact's call in the second campaign is in progress: it must finish.
    sqlx::query(
        "update calls set state = 'in_call', provider_call_id = 'call-live', dialed_at = now()
         where campaign_id = $1::uuid and contact_id = $2::uuid",
    )
    .bind(&second)
    .bind(&gone)
    .execute(&app.pool)
    .await
    .unwrap();

    let (_, other) = support::tenant(&app.pool, "b").await;
    for (token, path) in [
        (&other, format!("/v1/contacts/{gone}")),
        (&token, "/v1/contacts/not-a-uuid".to_owned()),
    ] {
        let refused = req(Method::DELETE, &path)
            .token(token)
            .send(&app.router)
            .await;
        assert_eq!(refused.status, StatusCode::NOT_FOUND, "{}", refused.text);
    }
    let deleted = req(Method::DELETE, &format!("/v1/contacts/{gone}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    assert_eq!(deleted.body["cancelled_calls"], 1);

    let states: Vec<(String, String, String)> = sqlx::query_as(
        "select campaign_id::text, contact_id::text, state from calls where tenant_id = $1
         order by campaign_id, contact_id",
    )
    .bind(tenant.0)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let state_of = |campaign: &str, contact: &str| {
        states
            .iter()
            .find(|(c, k, _)| c == campaign && k == contact)
            .map(|(_, _, s)| s.as_str())
            .unwrap()
    };
    assert_eq!(state_of(&first, &gone), "cancelled");
    assert_eq!(state_of(&second, &gone), "in_call");
    assert_eq!(state_of(&first, &kept), "queued");
    assert_eq!(state_of(&second, &kept), "queued");
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from contacts where tenant_id = $1",
            tenant
        )
        .await,
        1
    );
    let again = req(Method::DELETE, &format!("/v1/contacts/{gone}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn removing_an_agent_pauses_its_active_campaigns_with_the_reason(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token, user, agent) = setup(&app, "a").await;
    let other_agent = req(Method::POST, "/v1/agents")
        .token(&token)
        .json(&json!({"name": "Bea", "assistant_id": "asst_2", "phone_number_id": "pn_2"}))
        .send(&app.router)
        .await;
    let other_agent = other_agent.body["id"].as_str().unwrap().to_owned();
    let ids = contacts(&app, &token, &[("+14155550100", true)]).await;
    let active = create_campaign(&app, &token, &user, &agent, &ids).await;
    let paused = create_campaign(&app, &token, &user, &agent, &ids).await;
    let untouched = create_campaign(&app, &token, &user, &other_agent, &ids).await;
    let pause = req(Method::POST, &format!("/v1/call-campaigns/{paused}:pause"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(pause.status, StatusCode::OK);

    let (_, stranger) = support::tenant(&app.pool, "b").await;
    let hidden = req(Method::DELETE, &format!("/v1/agents/{agent}"))
        .token(&stranger)
        .send(&app.router)
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    assert_eq!(
        stored_campaign(&app.pool, &active).await["status"],
        "active"
    );

    let removed = req(Method::DELETE, &format!("/v1/agents/{agent}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.text);
    assert_eq!(removed.body["paused_campaigns"], json!([active]));
    let view = req(Method::GET, &format!("/v1/call-campaigns/{active}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(view.body["campaign"]["status"], "paused");
    let reason = view.body["campaign"]["pause_reason"].as_str().unwrap();
    assert!(
        reason.contains("Ava") && reason.contains("removed"),
        "{reason}"
    );
    assert_eq!(
        stored_campaign(&app.pool, &paused).await["pause_reason"],
        "paused by request"
    );
    assert_eq!(
        stored_campaign(&app.pool, &untouched).await["status"],
        "active"
    );
    // Nothing of its calls was touched: they wait, queued.
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from calls where tenant_id = $1 and state = 'queued'",
            tenant
        )
        .await,
        3
    );

    // The removed agent cannot be used, nor can its campaigns resume until given another.
    let resume = req(Method::POST, &format!("/v1/call-campaigns/{active}:resume"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(resume.status, StatusCode::CONFLICT, "{}", resume.text);
    let mut body = settings(&user, &agent);
    body["contact_ids"] = json!(ids);
    let create = req(Method::POST, "/v1/call-campaigns")
        .token(&token)
        .json(&body)
        .send(&app.router)
        .await;
    assert_eq!(create.status, StatusCode::NOT_FOUND, "{}", create.text);
    // It can still be edited while it keeps the removed agent.
    let renamed = patch(&app, &token, &active, json!({"name": "Renamed"})).await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.text);
    assert_eq!(renamed.body["campaign"]["status"], "paused");
    let refused = patch(&app, &token, &untouched, json!({"agent_id": agent})).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND, "{}", refused.text);
    let moved = patch(&app, &token, &active, json!({"agent_id": other_agent})).await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.text);
    let resume = req(Method::POST, &format!("/v1/call-campaigns/{active}:resume"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(resume.status, StatusCode::OK, "{}", resume.text);
    assert_eq!(
        stored_campaign(&app.pool, &active).await["pause_reason"],
        Value::Null
    );
    let again = req(Method::DELETE, &format!("/v1/agents/{agent}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

fn form(boundary: &str, fields: &[(&str, &str)], file: Option<(&str, &str, &str)>) -> String {
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    if let Some((file_name, content_type, content)) = file {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n\
             Content-Type: {content_type}\r\n\r\n{content}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn multipart_uploads_store_contacts_and_create_campaigns(pool: PgPool) {
    let app = app(pool).await;
    let (tenant, token, user, agent) = setup(&app, "a").await;
    let boundary = "herald-calls-boundary";
    let content_type = format!("multipart/form-data; boundary={boundary}");

    // Contacts as a multipart CSV file.
    let csv = "phone,name,company\n+14155550100,Ann,Acme\nnope,Bob,\n+14155550101,,\n";
    let stored = req(Method::POST, "/v1/contacts")
        .token(&token)
        .raw(
            &content_type,
            form(boundary, &[], Some(("contacts.csv", "text/csv", csv))),
        )
        .send(&app.router)
        .await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.text);
    assert_eq!(stored.body["stored"], 2);
    assert_eq!(stored.body["rejected_rows"][0]["line"], 3);
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from contacts where tenant_id = $1",
            tenant
        )
        .await,
        2
    );

    // A campaign: settings as form fields, one in the query, the CSV as the file.
    let fields = [
        ("name", "Multipart"),
        ("user_id", user.as_str()),
        ("agent_id", agent.as_str()),
        ("first_call_time", "09:00"),
        ("last_call_time", "18:00"),
        ("time_zone", "Europe/London"),
    ];
    let csv = "phone,name\n+14155550102,Cleo\n+14155550103,\nbad,Dan\n";
    let created = req(
        Method::POST,
        "/v1/call-campaigns:upload?next_action=book%20a%20demo",
    )
    .token(&token)
    .raw(
        &content_type,
        form(boundary, &fields, Some(("calls.csv", "text/csv", csv))),
    )
    .send(&app.router)
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.body["queued"], 2);
    assert_eq!(created.body["rejected"], 1);
    let id = created.body["campaign"]["id"].as_str().unwrap().to_owned();
    let row = stored_campaign(&app.pool, &id).await;
    assert_eq!(row["name"], "Multipart");
    assert_eq!(row["next_action"], "book a demo");
    assert_eq!(
        count(
            &app.pool,
            "select count(*) from calls where tenant_id = $1",
            tenant
        )
        .await,
        2
    );

    // No file, a JSON file, a bad setting: refused, nothing written.
    for (body, status, field) in [
        (
            form(boundary, &fields, None),
            StatusCode::BAD_REQUEST,
            "file",
        ),
        (
            form(
                boundary,
                &fields,
                Some(("calls.json", "application/json", "[]")),
            ),
            StatusCode::BAD_REQUEST,
            "file",
        ),
        (
            form(
                boundary,
                &[("name", "x"), ("user_id", user.as_str())],
                Some(("calls.csv", "text/csv", csv)),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "agent_id",
        ),
    ] {
        let reply = req(Method::POST, "/v1/call-campaigns:upload")
            .token(&token)
            .raw(&content_type, body)
            .send(&app.router)
            .await;
        assert_eq!(reply.status, status, "{}", reply.text);
        assert_eq!(reply.field(), field, "{}", reply.text);
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
}
