//! Multichannel sequences over HTTP: validation errors name the step and the field, leads are
//! added and scheduled on start (counted in the outbox), the signed inbound webhook stops a lead
//! on reply and refuses a bad signature, another tenant sees nothing.

mod support;

use axum::http::{Method, StatusCode};
use herald_connectors::whatsapp::sign;
use serde_json::json;
use support::*;

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn sequences_are_validated_started_and_stopped_by_a_signed_reply(pool: herald_store::PgPool) {
    let app = app(pool.clone()).await;
    let (_, other) = tenant(&pool, "globex").await;
    let (tenant, token) = tenant(&pool, "acme").await;

    let bad = req(Method::POST, "/v1/sequences")
        .token(&token)
        .json(&json!({"name": "s", "steps": [
            {"type": "linkedin_visit"},
            {"type": "email_send", "body": "Hi {{first_name}}"}
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.text);
    assert_eq!(bad.field(), "steps[1].subject");
    assert!(bad.text.contains("step 1 (email_send)"), "{}", bad.text);
    let unknown = req(Method::POST, "/v1/sequences")
        .token(&token)
        .json(&json!({"name": "s", "steps": [{"type": "linkedin_message", "message": "Hi {{nick}}"}]}))
        .send(&app.router)
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unknown.field(), "steps[0].message");

    let created = req(Method::POST, "/v1/sequences")
        .token(&token)
        .json(&json!({"name": "outreach", "steps": [
            {"type": "email_send", "subject": "Hi {{first_name}}", "body": "From {{company_name}}"},
            {"type": "delay", "hours": 5},
            {"type": "linkedin_connect"}
        ], "rules": {"caps": [{"action": "linkedin_connect", "daily": 100, "weekly": 200}]},
           "senders": {"linkedin": "sales-1"}}))
        .send(&app.router)
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.body["id"].as_str().unwrap().to_owned();

    let missing = req(Method::POST, &format!("/v1/sequences/{id}/leads"))
        .token(&token)
        .json(&json!({"leads": [{"first_name": "Ann", "email": "ann@example.test"}]}))
        .send(&app.router)
        .await;
    assert_eq!(missing.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(missing.field(), "leads[0].linkedin_url");
    let added = req(Method::POST, &format!("/v1/sequences/{id}/leads"))
        .token(&token)
        .json(&json!({"leads": [
            {"external_id": "p1", "first_name": "Ann", "email": "ann@example.test", "linkedin_url": "https://l.example/ann"},
            {"external_id": "p2", "first_name": "Bob", "email": "bob@example.test", "linkedin_url": "https://l.example/bob"},
            {"external_id": "p1", "first_name": "Ann", "email": "ann@example.test", "linkedin_url": "https://l.example/ann"}
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text);
    assert_eq!(added.body["duplicates"], 1);
    let lead = added.body["added"][0].as_str().unwrap().to_owned();

    let started = req(Method::POST, &format!("/v1/sequences/{id}/start"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    assert_eq!(started.body["status"], "active");
    let jobs: i64 = sqlx::query_scalar(
        "select count(*) from outbox where tenant_id = $1 and queue = 'sequence_step'",
    )
    .bind(tenant.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(jobs, 2);
    let again = req(Method::POST, &format!("/v1/sequences/{id}/start"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    // Another tenant sees nothing.
    let hidden = req(Method::GET, &format!("/v1/sequences/{id}"))
        .token(&other)
        .send(&app.router)
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);

    // The reply webhook: unsigned is 401 and changes nothing; signed stops the lead.
    let body = json!({"lead_id": lead, "event": "replied"}).to_string();
    let path = format!("/v1/webhooks/sequences/{tenant}");
    let unsigned = req(Method::POST, &path)
        .raw("application/json", body.clone())
        .send(&app.router)
        .await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    let secret = herald_store::tenants::hmac_secret(&pool, tenant)
        .await
        .unwrap();
    let signed = req(Method::POST, &path)
        .header("x-herald-signature", &sign(&secret, body.as_bytes()))
        .raw("application/json", body.clone())
        .send(&app.router)
        .await;
    assert_eq!(signed.status, StatusCode::OK, "{}", signed.text);
    let timeline = req(Method::GET, &format!("/v1/sequences/{id}/leads/{lead}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(timeline.status, StatusCode::OK, "{}", timeline.text);
    assert_eq!(timeline.body["state"], "replied");
    assert_eq!(timeline.body["signals"][0]["signal"], "replied");

    let stats = req(Method::GET, &format!("/v1/sequences/{id}/stats"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(stats.body["leads"]["replied"], 1);
    assert_eq!(stats.body["leads"]["active"], 1);
    let stopped = req(Method::POST, &format!("/v1/sequences/{id}/stop"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(stopped.status, StatusCode::OK);
    assert_eq!(stopped.body["stats"]["leads"]["stopped"], 1);
}
