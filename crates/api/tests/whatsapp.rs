//! WhatsApp template campaigns over HTTP: templates and their sample CSV, campaign creation
//! with a row report, send validation, webhook verification and signatures, stats and the
//! failed-recipients CSV. Effects are counted in Postgres.

mod support;

use axum::http::{Method, StatusCode};
use herald_connectors::whatsapp::sign;
use herald_store::PgPool;
use serde_json::{Value, json};
use support::*;

const SECRET: &str = "app-secret";

async fn provider(app: &TestApp, token: &str) {
    let reply = req(Method::PUT, "/v1/providers/whatsapp")
        .token(token)
        .json(&json!({"token": "meta", "phone_number_id": "1065", "app_secret": SECRET, "verify_token": "vt"}))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(!reply.text.contains(SECRET));
}

async fn template(app: &TestApp, token: &str) -> String {
    let reply = req(Method::POST, "/v1/templates")
        .token(token)
        .json(&json!({"name": "order_update", "language": "en_US", "components": [
            {"type": "HEADER", "format": "TEXT", "text": "Hi {{1}}"},
            {"type": "BODY", "text": "Order {{1}} ships {{2}}"},
            {"type": "BUTTONS", "buttons": [{"type": "URL", "text": "Track", "url": "https://t.example/{{1}}"}]}
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    reply.body["id"].as_str().unwrap().to_owned()
}

const COLUMNS: &str =
    "country_code,phone_number,header_param_1,body_param_1,body_param_2,button_url_param";

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn the_sample_csv_matches_the_template_and_uploads_get_a_row_report(pool: PgPool) {
    let app = app(pool.clone()).await;
    let (_, token) = tenant(&pool, "acme").await;
    let id = template(&app, &token).await;

    let sample = req(Method::GET, &format!("/v1/templates/{id}/sample.csv"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(sample.status, StatusCode::OK);
    assert!(
        sample.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert_eq!(sample.text.lines().next(), Some(COLUMNS));

    // Columns in another order; a bad phone, a missing parameter, a duplicate, a short row.
    let csv = "phone_number,country_code,header_param_1,body_param_1,body_param_2,button_url_param\n\
               5550100001,1,Ann,#1,today,a1\n\
               12,1,Bob,#2,today,b2\n\
               5550100003,1,Cy,,today,c3\n\
               555-010-0001,+1,Ann,#1,today,a1\n\
               5550100005,1,Di\n\
               07700900123,44,Ed,#6,\"today, late\",e6\n";
    let created = req(
        Method::POST,
        &format!("/v1/message-campaigns?template_id={id}&name=launch"),
    )
    .token(&token)
    .raw("text/csv", csv)
    .send(&app.router)
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let report = &created.body["report"];
    assert_eq!(report["accepted"], 2);
    assert_eq!(report["duplicates"], 1);
    assert_eq!(report["rejected"], 3);
    let lines: Vec<u64> = report["rejected_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![3, 4, 6]);
    assert_eq!(report["duplicate_rows"][0]["line"], 5);
    assert_eq!(created.body["status"], "draft");
    let campaign = created.body["id"].as_str().unwrap();
    let stats = req(
        Method::GET,
        &format!("/v1/message-campaigns/{campaign}/stats"),
    )
    .token(&token)
    .send(&app.router)
    .await;
    assert_eq!(stats.body["total"], 2);
    assert_eq!(stats.body["pending"], 2);

    // A header that is not the template's is refused whole; so is a body that is not CSV.
    let wrong = req(
        Method::POST,
        &format!("/v1/message-campaigns?template_id={id}&name=x"),
    )
    .token(&token)
    .raw(
        "text/csv",
        "country_code,phone_number,body_param_1\n1,5550100001,x\n",
    )
    .send(&app.router)
    .await;
    assert_eq!(wrong.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(wrong.field(), "columns");
    let binary = req(
        Method::POST,
        &format!("/v1/message-campaigns?template_id={id}&name=x"),
    )
    .token(&token)
    .raw("text/csv", vec![0u8, 159, 146, 150])
    .send(&app.router)
    .await;
    assert_eq!(binary.code(), "malformed_csv");
    let campaigns: i64 = sqlx::query_scalar("select count(*) from message_campaigns")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(campaigns, 1);

    // JSON recipients, and another tenant cannot see the template or the campaign.
    let json_created = req(Method::POST, "/v1/message-campaigns")
        .token(&token)
        .json(&json!({"name": "j", "template_id": id, "recipients": [
            {"country_code": "1", "phone_number": "5550100009", "header_param_1": "A",
             "body_param_1": "1", "body_param_2": "2", "button_url_param": "x"},
            {"country_code": "1", "phone_number": "5550100010", "colour": "red"}
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(
        json_created.status,
        StatusCode::CREATED,
        "{}",
        json_created.text
    );
    assert_eq!(json_created.body["report"]["accepted"], 1);
    assert_eq!(json_created.body["report"]["rejected"], 1);
    let (_, other) = tenant(&pool, "other").await;
    let hidden = req(Method::GET, &format!("/v1/message-campaigns/{campaign}"))
        .token(&other)
        .send(&app.router)
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    let hidden = req(Method::GET, &format!("/v1/templates/{id}/sample.csv"))
        .token(&other)
        .send(&app.router)
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn sending_validates_rate_and_concurrency_then_writes_one_step_per_recipient(pool: PgPool) {
    let app = app(pool.clone()).await;
    let (_, token) = tenant(&pool, "acme").await;
    let id = template(&app, &token).await;
    let csv =
        format!("{COLUMNS}\n1,5550100001,A,1,2,x\n1,5550100002,B,1,2,y\n1,5550100003,C,1,2,z\n");
    let created = req(
        Method::POST,
        &format!("/v1/message-campaigns?template_id={id}&name=launch"),
    )
    .token(&token)
    .raw("text/csv", csv)
    .send(&app.router)
    .await;
    let campaign = created.body["id"].as_str().unwrap().to_owned();
    let send = |body: Value| {
        req(
            Method::POST,
            &format!("/v1/message-campaigns/{campaign}/send"),
        )
        .token(&token)
        .json(&body)
    };
    // Not configured yet.
    let reply = send(json!({"rate_per_sec": 50, "concurrency": 10}))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    provider(&app, &token).await;
    for (body, field) in [
        (
            json!({"rate_per_sec": 0, "concurrency": 10}),
            "rate_per_sec",
        ),
        (
            json!({"rate_per_sec": 1001, "concurrency": 10}),
            "rate_per_sec",
        ),
        (json!({"rate_per_sec": 50, "concurrency": 0}), "concurrency"),
        (
            json!({"rate_per_sec": 50, "concurrency": 101}),
            "concurrency",
        ),
        (json!({"rate_per_sec": "fast"}), "rate_per_sec"),
    ] {
        let reply = send(body.clone()).send(&app.router).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(reply.field(), field, "{body}");
    }
    let jobs = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("select count(*) from outbox where queue = 'whatsapp_send'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(jobs(pool.clone()).await, 0);
    let reply = send(json!({"rate_per_sec": 50, "concurrency": 10}))
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert_eq!(reply.body["status"], "sending");
    assert_eq!(jobs(pool.clone()).await, 3);
    // A second send is a conflict and writes nothing.
    let again = send(json!({"rate_per_sec": 50, "concurrency": 10}))
        .send(&app.router)
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(jobs(pool.clone()).await, 3);
    // Pause, resume (one step per pending recipient again), stop.
    for (action, status) in [
        ("pause", "paused"),
        ("resume", "sending"),
        ("stop", "stopped"),
    ] {
        let reply = req(
            Method::POST,
            &format!("/v1/message-campaigns/{campaign}/{action}"),
        )
        .token(&token)
        .send(&app.router)
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{action}: {}", reply.text);
        assert_eq!(reply.body["status"], status);
    }
    assert_eq!(jobs(pool.clone()).await, 6);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn webhooks_need_the_verify_token_and_a_valid_signature(pool: PgPool) {
    let app = app(pool.clone()).await;
    let (tenant_id, token) = tenant(&pool, "acme").await;
    provider(&app, &token).await;
    let path = format!("/v1/webhooks/whatsapp/{tenant_id}");

    let ok = req(
        Method::GET,
        &format!("{path}?hub.mode=subscribe&hub.verify_token=vt&hub.challenge=1158201444"),
    )
    .send(&app.router)
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.text, "1158201444");
    let wrong = req(
        Method::GET,
        &format!("{path}?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1"),
    )
    .send(&app.router)
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);

    // A send recorded as unknown: only a correctly signed webhook may settle it.
    let send_id = {
        let mut tx = pool.begin().await.unwrap();
        let id = herald_store::sends::begin(&mut tx, tenant_id, "whatsapp", "job-1")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        herald_store::sends::mark_unknown(&pool, tenant_id, id)
            .await
            .unwrap();
        id
    };
    let body = herald_connectors::whatsapp::webhook_body(
        "1065",
        &[
            json!({"id": "wamid.X", "status": "delivered", "timestamp": "1",
                 "recipient_id": "15550100001", "biz_opaque_callback_data": send_id.to_string()}),
        ],
    )
    .to_string();
    let status_now = || async {
        herald_store::sends::get(&pool, tenant_id, send_id)
            .await
            .unwrap()
            .unwrap()
            .status
    };
    for signature in [
        None,
        Some(sign("wrong-secret", body.as_bytes())),
        Some("sha256=00".to_owned()),
    ] {
        let mut request = req(Method::POST, &path);
        if let Some(signature) = &signature {
            request = request.header("x-hub-signature-256", signature);
        }
        let reply = request
            .raw("application/json", body.clone())
            .send(&app.router)
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{signature:?}");
        assert_eq!(status_now().await, herald_store::sends::SendStatus::Unknown);
    }
    // Signed over a different body.
    let reply = req(Method::POST, &path)
        .header("x-hub-signature-256", &sign(SECRET, b"{}"))
        .raw("application/json", body.clone())
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    let reply = req(Method::POST, &path)
        .header("x-hub-signature-256", &sign(SECRET, body.as_bytes()))
        .raw("application/json", body.clone())
        .send(&app.router)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["applied"], 1);
    assert_eq!(
        status_now().await,
        herald_store::sends::SendStatus::Delivered
    );
    // The same event again changes nothing.
    let again = req(Method::POST, &path)
        .header("x-hub-signature-256", &sign(SECRET, body.as_bytes()))
        .raw("application/json", body)
        .send(&app.router)
        .await;
    assert_eq!(again.body["applied"], 0);
    assert_eq!(again.body["ignored"], 1);
}
