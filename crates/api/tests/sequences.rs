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

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn provider_accounts_sign_events_about_their_own_sends(pool: herald_store::PgPool) {
    let app = app(pool.clone()).await;
    let (tenant, token) = tenant(&pool, "acme").await;

    let missing = req(Method::PUT, "/v1/providers/email")
        .token(&token)
        .json(&json!({"webhook_secret": "whsec-email"}))
        .send(&app.router)
        .await;
    assert_eq!(missing.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(missing.field(), "api_key");
    let bad_url = req(Method::PUT, "/v1/providers/linkedin")
        .token(&token)
        .json(&json!({"api_url": "ftp://x", "api_key": "k", "webhook_secret": "s"}))
        .send(&app.router)
        .await;
    assert_eq!(bad_url.field(), "api_url");
    for (channel, secret) in [("email", "whsec-email"), ("linkedin", "whsec-linkedin")] {
        let saved = req(Method::PUT, &format!("/v1/providers/{channel}"))
            .token(&token)
            .json(&json!({"api_url": "https://api.provider.example", "api_key": "key-1", "webhook_secret": secret}))
            .send(&app.router)
            .await;
        assert_eq!(saved.status, StatusCode::OK, "{}", saved.text);
        assert_eq!(saved.body["provider"], channel);
        assert_eq!(
            saved.body["webhook_path"],
            format!("/v1/webhooks/sequences/{tenant}")
        );
        assert!(!saved.text.contains("key-1") && !saved.text.contains(secret));
    }

    // A lead whose first email went out (its activity and send, as the step job records them).
    let created = req(Method::POST, "/v1/sequences")
        .token(&token)
        .json(&json!({"name": "s", "steps": [
            {"type": "email_send", "subject": "Hi", "body": "Hello {{first_name}}"}
        ]}))
        .send(&app.router)
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let added = req(Method::POST, &format!("/v1/sequences/{id}/leads"))
        .token(&token)
        .json(&json!({"leads": [{"first_name": "Ann", "email": "ann@example.test"}]}))
        .send(&app.router)
        .await;
    let lead: uuid::Uuid = added.body["added"][0].as_str().unwrap().parse().unwrap();
    let send = uuid::Uuid::now_v7();
    sqlx::query(
        "insert into sends (tenant_id, id, channel, job_id, status) values ($1, $2, 'email', 'j', 'sent')",
    )
    .bind(tenant.0)
    .bind(send)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into sequence_activities (tenant_id, id, sequence_id, lead_id, step, step_type,
             channel, outcome, send_id, job_id)
         values ($1, $2, $3, $4, 0, 'email_send', 'email', 'executed', $5, 'j')",
    )
    .bind(tenant.0)
    .bind(uuid::Uuid::now_v7())
    .bind(id.parse::<uuid::Uuid>().unwrap())
    .bind(lead)
    .bind(send)
    .execute(&pool)
    .await
    .unwrap();

    let path = format!("/v1/webhooks/sequences/{tenant}");
    let post = |body: String, secret: &str| {
        req(Method::POST, &path)
            .header("x-herald-signature", &sign(secret, body.as_bytes()))
            .raw("application/json", body)
    };
    // The email provider's batch: delivered and opened (out of order, one twice), and an
    // event about a send herald never made.
    let batch = json!({"events": [
        {"send_id": send, "event": "opened", "at": "2030-01-07T10:00:00Z"},
        {"send_id": send, "event": "delivered"},
        {"send_id": send, "event": "opened"},
        {"send_id": uuid::Uuid::now_v7(), "event": "opened"}
    ]})
    .to_string();
    let applied = post(batch.clone(), "whsec-email").send(&app.router).await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.text);
    assert_eq!(applied.body["received"], 4);
    assert_eq!(applied.body["new"], 1);
    assert_eq!(applied.body["repeats"], 2);
    assert_eq!(applied.body["unknown"], 1);
    let timeline = req(Method::GET, &format!("/v1/sequences/{id}/leads/{lead}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(timeline.body["signals"][0]["signal"], "opened");
    assert_eq!(timeline.body["activities"][0]["send_status"], "read");

    // The LinkedIn provider's secret does not cover email sends, nor may a provider name leads.
    let reply = json!({"events": [{"send_id": send, "event": "replied"}]}).to_string();
    let foreign = post(reply.clone(), "whsec-linkedin")
        .send(&app.router)
        .await;
    assert_eq!(foreign.status, StatusCode::OK);
    assert_eq!(foreign.body["unknown"], 1);
    let by_lead = json!({"lead_id": lead, "event": "replied"}).to_string();
    let refused = post(by_lead, "whsec-email").send(&app.router).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.field(), "lead_id");
    let forged = post(reply.clone(), "not-a-secret").send(&app.router).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    let bad = post(
        json!({"events": [{"send_id": send, "event": "sent"}]}).to_string(),
        "whsec-email",
    )
    .send(&app.router)
    .await;
    assert_eq!(bad.field(), "events[0].event");

    // The email provider's reply stops the lead.
    let replied = post(reply, "whsec-email").send(&app.router).await;
    assert_eq!(replied.body["new"], 1);
    let timeline = req(Method::GET, &format!("/v1/sequences/{id}/leads/{lead}"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(timeline.body["state"], "replied");
    // One event about a send: the single-event answer.
    let single = post(
        json!({"send_id": send, "event": "clicked"}).to_string(),
        "whsec-email",
    )
    .send(&app.router)
    .await;
    assert_eq!(single.status, StatusCode::OK, "{}", single.text);
    assert_eq!(single.body["send_id"], send.to_string());
    assert_eq!(single.body["new"], true);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn call_steps_and_lead_pools_are_validated_and_counted(pool: herald_store::PgPool) {
    let app = app(pool.clone()).await;
    let (_, other) = tenant(&pool, "globex").await;
    let (tenant, token) = tenant(&pool, "acme").await;
    let user = req(Method::POST, "/v1/users")
        .token(&token)
        .json(&json!({"name": "Uma"}))
        .send(&app.router)
        .await;
    assert_eq!(user.status, StatusCode::CREATED, "{}", user.text);
    let user = user.body["id"].as_str().unwrap().to_owned();
    let agent = req(Method::POST, "/v1/agents")
        .token(&token)
        .json(&json!({"name": "Ava", "assistant_id": "asst_1", "phone_number_id": "pn_1"}))
        .send(&app.router)
        .await;
    assert_eq!(agent.status, StatusCode::CREATED, "{}", agent.text);
    let agent = agent.body["id"].as_str().unwrap().to_owned();
    let sequences_saved = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from sequences where tenant_id = $1")
            .bind(tenant.0)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let create = |steps: serde_json::Value| {
        req(Method::POST, "/v1/sequences")
            .token(&token)
            .json(&json!({"name": "calls", "steps": steps}))
    };

    // A missing field, an id of nobody, another tenant's user: 422 naming the step and field.
    let missing = create(json!([
        {"type": "delay", "hours": 1},
        {"type": "voice_agent_call", "user_id": user}
    ]))
    .send(&app.router)
    .await;
    assert_eq!(
        missing.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        missing.text
    );
    assert_eq!(missing.field(), "steps[1].agent_id", "{}", missing.text);
    assert!(
        missing.text.contains("step 1 (voice_agent_call)"),
        "{}",
        missing.text
    );
    let nobody = create(json!([{"type": "voice_agent_call", "user_id": user,
        "agent_id": "0190a5b0-0000-7000-8000-0000000000aa"}]))
    .send(&app.router)
    .await;
    assert_eq!(
        nobody.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        nobody.text
    );
    assert_eq!(nobody.field(), "steps[0].agent_id");
    let foreign_user = req(Method::POST, "/v1/users")
        .token(&other)
        .json(&json!({"name": "Gus"}))
        .send(&app.router)
        .await;
    let foreign_user = foreign_user.body["id"].as_str().unwrap().to_owned();
    let foreign = create(json!([
        {"type": "voice_agent_call", "user_id": foreign_user, "agent_id": agent}
    ]))
    .send(&app.router)
    .await;
    assert_eq!(
        foreign.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        foreign.text
    );
    assert_eq!(foreign.field(), "steps[0].user_id");
    // lead_generation anywhere but first, or with a limit out of range.
    let second = create(json!([
        {"type": "delay", "hours": 1},
        {"type": "lead_generation", "daily_limit": 5, "pool": "p"}
    ]))
    .send(&app.router)
    .await;
    assert_eq!(
        second.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        second.text
    );
    assert_eq!(second.field(), "steps[1].type");
    assert!(
        second.text.contains("step 1 (lead_generation)"),
        "{}",
        second.text
    );
    let too_many = create(json!([
        {"type": "lead_generation", "daily_limit": 10_001, "pool": "p"},
        {"type": "delay", "hours": 1}
    ]))
    .send(&app.router)
    .await;
    assert_eq!(too_many.field(), "steps[0].daily_limit");
    assert_eq!(sequences_saved().await, 0, "nothing half-written");

    let created = create(json!([
        {"type": "lead_generation", "daily_limit": 2, "pool": "q4"},
        {"type": "voice_agent_call", "user_id": user, "agent_id": agent},
        {"type": "condition", "if": "connected", "yes": 3, "no": 3}
    ]))
    .send(&app.router)
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.body["steps"][1]["type"], "voice_agent_call");
    assert_eq!(created.body["steps"][1]["agent_id"], agent.as_str());
    assert_eq!(created.body["steps"][0]["daily_limit"], 2);
    let id = created.body["id"].as_str().unwrap().to_owned();
    // A lead added by hand needs the phone the call step dials.
    let no_phone = req(Method::POST, &format!("/v1/sequences/{id}/leads"))
        .token(&token)
        .json(&json!({"leads": [{"external_id": "x", "first_name": "Ann"}]}))
        .send(&app.router)
        .await;
    assert_eq!(no_phone.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(no_phone.field(), "leads[0].phone");

    // The pool: row by row, a rejected row named and skipped, a repeat updates.
    let loaded = req(Method::POST, "/v1/lead-pools/q4/people")
        .token(&token)
        .json(&json!({"people": [
            {"external_id": "p1", "first_name": "Ann", "phone": "+15550000001"},
            {"first_name": "NoId", "phone": "+15550000002"},
            {"external_id": "p2", "first_name": "Bob", "phone": "+15550000003", "shoe_size": "44"},
            {"external_id": "p3", "first_name": "Cy", "phone": "555"},
            {"external_id": "p4", "first_name": "Di", "phone": "+15550000004"},
            "not an object"
        ]}))
        .send(&app.router)
        .await;
    assert_eq!(loaded.status, StatusCode::OK, "{}", loaded.text);
    assert_eq!(loaded.body["accepted"], 2);
    assert_eq!(loaded.body["added"], 2);
    let rejected: Vec<&str> = loaded.body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        rejected,
        vec![
            "people[1].external_id",
            "people[2].shoe_size",
            "people[3].phone",
            "people[5]"
        ]
    );
    let again = req(Method::POST, "/v1/lead-pools/q4/people")
        .token(&token)
        .json(&json!({"people": [{"external_id": "p1", "first_name": "Anna", "phone": "+15550000001"}]}))
        .send(&app.router)
        .await;
    assert_eq!(
        (again.body["added"].as_u64(), again.body["updated"].as_u64()),
        (Some(0), Some(1))
    );
    let people: i64 = sqlx::query_scalar(
        "select count(*) from lead_pool_people where tenant_id = $1 and pool = 'q4'",
    )
    .bind(tenant.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(people, 2);
    let view = req(Method::GET, "/v1/lead-pools/q4")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(view.status, StatusCode::OK, "{}", view.text);
    assert_eq!(
        (
            view.body["people"].as_u64(),
            view.body["in_sequences"].as_u64()
        ),
        (Some(2), Some(0))
    );
    let bad_name = req(Method::GET, "/v1/lead-pools/a%20b")
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(
        bad_name.status,
        StatusCode::BAD_REQUEST,
        "{}",
        bad_name.text
    );
    // Another tenant's pool of the same name is empty to it.
    let hidden = req(Method::GET, "/v1/lead-pools/q4")
        .token(&other)
        .send(&app.router)
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);

    // Starting writes the day's generation job.
    let started = req(Method::POST, &format!("/v1/sequences/{id}/start"))
        .token(&token)
        .send(&app.router)
        .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    let generation: i64 = sqlx::query_scalar(
        "select count(*) from outbox where tenant_id = $1 and queue = 'lead_generation'",
    )
    .bind(tenant.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(generation, 1);
}
