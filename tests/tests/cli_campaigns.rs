//! The `herald` operator tool's outreach commands, run as the real binary against a private
//! database: templates, message campaigns (counts, pause/resume/stop, the failed-recipient
//! CSV), sequences (per-step counts, one lead's history) and call campaigns. Output is read for
//! its content and exit codes are checked; every change a command makes is read back from
//! Postgres; an unknown id and another tenant's id are both "not found".

use std::collections::BTreeMap;
use std::process::Command;

use chrono::Utc;
use herald_core::TenantId;
use herald_store::PgPool;
use herald_store::messages;
use herald_store::sends::{self, SendStatus, StatusChange};
use herald_store::sequences::steps::{self, Channel, Signal};
use herald_store::sequences::{self, NewActivity, NewLead, NewSequence, Outcome};
use herald_tests::{TestDb, cli_binary, http_request, namespace, serve_api};
use serde_json::json;
use uuid::Uuid;

/// What one `herald` run printed and how it ended.
struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn herald(db: &TestDb, args: &[&str]) -> Run {
    let out = Command::new(cli_binary())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .args(args)
        .output()
        .expect("running herald");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `herald args…`, which must succeed; returns its stdout.
fn ok(db: &TestDb, args: &[&str]) -> String {
    let run = herald(db, args);
    assert!(
        run.ok,
        "herald {args:?} failed ({:?}):\n{}{}",
        run.code, run.stdout, run.stderr
    );
    run.stdout
}

/// Runs `herald args…`, which must fail with exit code 1 and one `herald: error: …` line that
/// contains `want`.
fn fails(db: &TestDb, args: &[&str], want: &str) {
    let run = herald(db, args);
    assert_eq!(
        run.code,
        Some(1),
        "herald {args:?}:\n{}{}",
        run.stdout,
        run.stderr
    );
    let err = run.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("herald: error: "), "{err}");
    assert!(err.contains(want), "{err:?} does not say {want:?}");
}

/// The row of `table` whose first cell is `key`, split on runs of spaces.
fn row<'a>(table: &'a str, key: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&key))
        .unwrap_or_else(|| panic!("no row {key:?} in:\n{table}"))
}

async fn tenant(pool: &PgPool, name: &str) -> TenantId {
    tenant_and_token(pool, name).await.0
}

async fn tenant_and_token(pool: &PgPool, name: &str) -> (TenantId, String) {
    let (tenant, token) = herald_store::tenants::create(pool, name, "UTC")
        .await
        .unwrap();
    (tenant.id, token)
}

/// `GET path` on herald-api's router served in this process (Redis: the shared server, under a
/// namespace of its own).
async fn api_get(db: &TestDb, token: &str, path: &str) -> String {
    let addr = serve_api(&db.pool, "redis://127.0.0.1:6379", &namespace()).await;
    let auth = format!("Bearer {token}");
    let reply = http_request(addr, "GET", path, &[("authorization", &auth)], b"")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    reply.body
}

async fn campaign_status(pool: &PgPool, tenant: TenantId, id: Uuid) -> String {
    sqlx::query_scalar("select status from message_campaigns where tenant_id = $1 and id = $2")
        .bind(tenant.0)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A template with one body parameter and a draft campaign of three recipients, started; the
/// first recipient's send failed at Meta. Returns (template, campaign).
async fn message_campaign(pool: &PgPool, tenant: TenantId) -> (Uuid, Uuid) {
    let template = messages::create_template(
        pool,
        tenant,
        "order_update",
        "en_US",
        &json!([{"type": "BODY", "text": "Hello {{1}}, your order ships today"}]),
    )
    .await
    .unwrap();
    let rows = messages::parse_recipients_csv(
        b"country_code,phone_number,body_param_1\n1,5550000001,\"Ann, Jr\"\n1,5550000002,Ben\n1,5550000003,Cy\n",
        &template,
    )
    .unwrap();
    let (campaign, report) = messages::create_campaign(pool, tenant, "spring", &template, rows)
        .await
        .unwrap();
    assert_eq!(report.accepted, 3);
    messages::put_settings(
        pool,
        tenant,
        &messages::WhatsAppSettings {
            api_url: Some("http://127.0.0.1:9".into()),
            token: "cli-test-token".into(),
            phone_number_id: "106540352242922".into(),
            app_secret: "cli-test-secret".into(),
            verify_token: "cli-test-verify".into(),
        },
    )
    .await
    .unwrap();
    herald_jobs::whatsapp::start_sending(pool, tenant, campaign.id, 10, 2)
        .await
        .unwrap();
    let first: Uuid = sqlx::query_scalar(
        "select id from message_recipients where tenant_id = $1 and campaign_id = $2 order by line limit 1",
    )
    .bind(tenant.0)
    .bind(campaign.id)
    .fetch_one(pool)
    .await
    .unwrap();
    let messages::Begin::Started(send) =
        messages::begin_send(pool, tenant, campaign.id, first, "cli-test-job")
            .await
            .unwrap()
    else {
        panic!("the send did not begin");
    };
    sends::apply(
        pool,
        tenant,
        "whatsapp",
        SendStatus::Failed,
        &StatusChange {
            send_id: Some(send),
            error_code: Some("131026".into()),
            error: Some("Message undeliverable".into()),
            ..StatusChange::default()
        },
    )
    .await
    .unwrap();
    (template.id, campaign.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_message_campaigns_from_the_command_line() {
    let db = TestDb::create().await;
    let (acme, token) = tenant_and_token(&db.pool, "acme").await;
    let other = tenant(&db.pool, "globex").await;
    let (template, campaign) = message_campaign(&db.pool, acme).await;
    let (template, campaign) = (template.to_string(), campaign.to_string());
    let acme_id = acme.to_string();

    // Templates: listed by tenant id or name; the sample CSV is the API's file.
    let list = ok(&db, &["templates", "list", "--tenant", "acme"]);
    let cells = row(&list, &template);
    assert_eq!(
        cells[1..4],
        [
            "order_update",
            "en_US",
            "country_code,phone_number,body_param_1"
        ]
    );
    assert_eq!(ok(&db, &["templates", "list", "--tenant", &acme_id]), list);
    assert_eq!(
        ok(&db, &["templates", "list", "--tenant", "globex"]).trim(),
        "no templates"
    );
    let sample = ok(
        &db,
        &["templates", "sample-csv", &template, "--tenant", "acme"],
    );
    let stored = messages::template(&db.pool, acme, template.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(sample, messages::sample_csv(&stored));
    assert_eq!(
        sample,
        api_get(&db, &token, &format!("/v1/templates/{template}/sample.csv")).await
    );
    assert!(sample.starts_with("country_code,phone_number,body_param_1\n"));
    fails(
        &db,
        &["templates", "sample-csv", &template, "--tenant", "globex"],
        &format!("template {template} not found"),
    );

    // Message campaigns: counts by status, as the API's stats.
    let list = ok(&db, &["message-campaigns", "list", "--tenant", "acme"]);
    let header = list.lines().next().unwrap();
    assert!(header.split_whitespace().eq([
        "id",
        "name",
        "status",
        "total",
        "pending",
        "sent",
        "delivered",
        "read",
        "failed",
        "unknown",
        "created"
    ]));
    assert_eq!(
        row(&list, &campaign)[1..10],
        ["spring", "sending", "3", "2", "0", "0", "0", "1", "0"]
    );
    let show = ok(
        &db,
        &["message-campaigns", "show", &campaign, "--tenant", "acme"],
    );
    assert!(show.contains("status:"), "{show}");
    assert_eq!(row(&show, "status:")[1], "sending");
    for (status, n) in [
        ("total", "3"),
        ("pending", "2"),
        ("attempting", "0"),
        ("sent", "0"),
        ("delivered", "0"),
        ("read", "0"),
        ("failed", "1"),
        ("unknown", "0"),
    ] {
        assert_eq!(row(&show, status)[1], n, "{status} in:\n{show}");
    }

    // The failed recipients' CSV, quoted where needed, as the API serves it.
    let csv = ok(
        &db,
        &[
            "message-campaigns",
            "failed-csv",
            &campaign,
            "--tenant",
            "acme",
        ],
    );
    assert_eq!(
        csv,
        "country_code,phone_number,body_param_1,error_code,error\n1,5550000001,\"Ann, Jr\",131026,Message undeliverable\n"
    );
    assert_eq!(
        csv,
        api_get(
            &db,
            &token,
            &format!("/v1/message-campaigns/{campaign}/failed.csv")
        )
        .await
    );

    // Pause, resume, stop: the same calls as the API's, read back from Postgres.
    let out = ok(
        &db,
        &["message-campaigns", "pause", &campaign, "--tenant", "acme"],
    );
    assert_eq!(out.trim(), format!("message campaign {campaign} is paused"));
    let id: Uuid = campaign.parse().unwrap();
    assert_eq!(campaign_status(&db.pool, acme, id).await, "paused");
    let before: i64 = sqlx::query_scalar(
        "select count(*) from outbox where tenant_id = $1 and queue = 'whatsapp_send'",
    )
    .bind(acme.0)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    ok(
        &db,
        &["message-campaigns", "resume", &campaign, "--tenant", "acme"],
    );
    assert_eq!(campaign_status(&db.pool, acme, id).await, "sending");
    let after: i64 = sqlx::query_scalar(
        "select count(*) from outbox where tenant_id = $1 and queue = 'whatsapp_send'",
    )
    .bind(acme.0)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        after - before,
        2,
        "resume wrote a send step per pending recipient"
    );
    // Stopped is final: resuming is refused with the reason, and nothing changes.
    ok(
        &db,
        &["message-campaigns", "stop", &campaign, "--tenant", "acme"],
    );
    assert_eq!(campaign_status(&db.pool, acme, id).await, "stopped");
    fails(
        &db,
        &["message-campaigns", "resume", &campaign, "--tenant", "acme"],
        "is stopped",
    );
    assert_eq!(campaign_status(&db.pool, acme, id).await, "stopped");

    // Unknown ids, other tenants' ids, unknown tenants: clear errors, exit 1, nothing changed.
    let unknown = Uuid::now_v7().to_string();
    fails(
        &db,
        &["message-campaigns", "show", &unknown, "--tenant", "acme"],
        &format!("message campaign {unknown} not found"),
    );
    for command in ["show", "pause", "stop", "failed-csv"] {
        fails(
            &db,
            &[
                "message-campaigns",
                command,
                &campaign,
                "--tenant",
                &other.to_string(),
            ],
            &format!("message campaign {campaign} not found"),
        );
    }
    assert_eq!(campaign_status(&db.pool, acme, id).await, "stopped");
    fails(
        &db,
        &["message-campaigns", "list", "--tenant", "initech"],
        "no tenant has the id or name \"initech\"",
    );
    let nobody = Uuid::now_v7().to_string();
    fails(
        &db,
        &["message-campaigns", "list", "--tenant", &nobody],
        "not found",
    );
    // A malformed id is refused by the argument parser (exit 2), on one line.
    let run = herald(
        &db,
        &["message-campaigns", "show", "nope", "--tenant", &acme_id],
    );
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.trim().starts_with("herald: error: "),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_and_a_leads_history_from_the_command_line() {
    let db = TestDb::create().await;
    let pool = &db.pool;
    let acme = tenant(pool, "acme").await;
    let other = tenant(pool, "globex").await;
    let sequence = sequences::create(
        pool,
        acme,
        &NewSequence {
            name: "welcome".into(),
            steps: steps::parse_steps(&json!([
                {"type": "delay", "days": 2},
                {"type": "condition", "if": "replied", "yes": 3, "no": 2},
                {"type": "linkedin_visit"}
            ]))
            .unwrap(),
            rules: steps::parse_rules(None).unwrap(),
            senders: BTreeMap::from([(Channel::Linkedin, "sales-1".to_owned())]),
        },
    )
    .await
    .unwrap();
    let leads: Vec<NewLead> = (0..3)
        .map(|i| NewLead {
            external_id: Some(format!("p{i}")),
            variables: BTreeMap::from([
                ("first_name".to_owned(), format!("Ann{i}")),
                (
                    "linkedin_url".to_owned(),
                    format!("https://www.linkedin.com/in/ann{i}"),
                ),
            ]),
        })
        .collect();
    let added = herald_jobs::sequences::add_leads(pool, acme, sequence.id, &leads)
        .await
        .unwrap();
    herald_jobs::sequences::start(pool, acme, sequence.id)
        .await
        .unwrap();
    // The first lead waited through its delay (as the step job records it); the second replied.
    let first = added.added[0];
    let now = Utc::now();
    let mut tx = pool.begin().await.unwrap();
    assert!(
        sequences::record_activity(
            &mut tx,
            acme,
            &NewActivity {
                sequence: sequence.id,
                lead: first,
                step: 0,
                step_type: "delay",
                channel: None,
                outcome: Outcome::Waited,
                sender_account: None,
                send_id: None,
                call_id: None,
                job_id: "cli-test-job",
                at: now,
            },
        )
        .await
        .unwrap()
    );
    assert!(
        sequences::advance(
            &mut tx,
            acme,
            first,
            0,
            1,
            3,
            now + chrono::Duration::days(2)
        )
        .await
        .unwrap()
    );
    tx.commit().await.unwrap();
    herald_jobs::sequences::apply_signal(pool, acme, added.added[1], Signal::Replied)
        .await
        .unwrap();
    let (seq, lead) = (sequence.id.to_string(), first.to_string());

    let list = ok(&db, &["sequences", "list", "--tenant", "acme"]);
    // id, name, status, steps, active, completed, replied, stopped, failed
    assert_eq!(
        row(&list, &seq)[1..9],
        ["welcome", "active", "3", "2", "0", "1", "0", "0"]
    );
    assert_eq!(
        ok(&db, &["sequences", "list", "--tenant", "globex"]).trim(),
        "no sequences"
    );

    let show = ok(&db, &["sequences", "show", &seq, "--tenant", "acme"]);
    assert_eq!(row(&show, "status:")[1], "active");
    assert!(
        show.contains("active=2") && show.contains("replied=1"),
        "{show}"
    );
    assert!(show.contains("linkedin=sales-1"), "{show}");
    // step, type, executed, yes, no, sends
    assert_eq!(row(&show, "0"), ["0", "delay", "1", "0", "0", "-"]);
    assert_eq!(row(&show, "1"), ["1", "condition", "0", "0", "0", "-"]);
    assert_eq!(row(&show, "2"), ["2", "linkedin_visit", "0", "0", "0", "-"]);

    let history = ok(&db, &["sequences", "lead", &seq, &lead, "--tenant", "acme"]);
    assert_eq!(row(&history, "state:")[1], "active");
    assert!(
        history.contains("current step: 1 (condition: if replied then 3 else 2)"),
        "{history}"
    );
    assert!(history.contains("external id:  p0"), "{history}");
    let waited = row(&history, "0");
    assert_eq!(waited[..3], ["0", "delay", "waited"]);
    let replied = ok(
        &db,
        &[
            "sequences",
            "lead",
            &seq,
            &added.added[1].to_string(),
            "--tenant",
            "acme",
        ],
    );
    assert_eq!(row(&replied, "state:")[1], "replied");
    assert!(replied.contains("no steps executed yet"), "{replied}");
    assert_eq!(row(&replied, "replied")[0], "replied");

    // Not found: an unknown sequence, another tenant's, a lead of another sequence.
    fails(
        &db,
        &["sequences", "show", &seq, "--tenant", &other.to_string()],
        &format!("sequence {seq} not found"),
    );
    fails(
        &db,
        &["sequences", "lead", &seq, &lead, "--tenant", "globex"],
        "not found",
    );
    let unknown = Uuid::now_v7().to_string();
    fails(
        &db,
        &["sequences", "lead", &seq, &unknown, "--tenant", "acme"],
        &format!("lead {unknown} not found"),
    );

    // Call campaigns: none yet, and an unknown one is not found.
    assert_eq!(
        ok(&db, &["call-campaigns", "list", "--tenant", "acme"]).trim(),
        "no call campaigns"
    );
    fails(
        &db,
        &["call-campaigns", "show", &unknown, "--tenant", "acme"],
        &format!("call campaign {unknown} not found"),
    );
    fails(
        &db,
        &["calls", "list", &unknown, "--tenant", "acme"],
        &format!("call campaign {unknown} not found"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_campaigns_and_their_calls_from_the_command_line() {
    use herald_store::calls::{self, NewCampaign, NewContact};
    let db = TestDb::create().await;
    let pool = &db.pool;
    let acme = tenant(pool, "acme").await;
    let other = tenant(pool, "globex").await;
    let user = calls::create_user(pool, acme, "caller", Some(2))
        .await
        .unwrap();
    let agent = calls::create_agent(pool, acme, "Ava", "asst-cli", "phone-cli")
        .await
        .unwrap();
    let contacts: Vec<NewContact> = (0..3)
        .map(|i| {
            NewContact::new(
                &format!("+1555000000{i}"),
                (i == 1).then_some("Bea"),
                serde_json::Map::new(),
            )
            .unwrap()
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    let ids = calls::upsert_contacts(&mut conn, acme, &contacts)
        .await
        .unwrap();
    let (campaign, queued) = calls::create_campaign(
        &mut conn,
        acme,
        &NewCampaign {
            name: "renewals".into(),
            user_id: user.id,
            agent_id: agent.id,
            next_action: None,
            first_call_time: chrono::NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            last_call_time: chrono::NaiveTime::from_hms_opt(17, 0, 0).unwrap(),
            time_zone: "UTC".into(),
            start_date: Utc::now().date_naive(),
        },
        &ids,
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(queued, 3);
    let id = campaign.id.to_string();

    // id, name, status, total, queued, in_call, completed, failed
    let list = ok(&db, &["call-campaigns", "list", "--tenant", "acme"]);
    assert_eq!(
        row(&list, &id)[1..8],
        ["renewals", "active", "3", "3", "0", "0", "0"]
    );
    let show = ok(&db, &["call-campaigns", "show", &id, "--tenant", "acme"]);
    assert_eq!(row(&show, "status:")[1], "active");
    assert!(show.contains("09:00–17:00 UTC"), "{show}");
    assert_eq!(row(&show, "total")[1], "3");
    assert_eq!(row(&show, "queued")[1], "3");
    assert_eq!(row(&show, "completed")[1], "0");

    // The calls in dispatch order: the named contact first (priority 0), then FIFO.
    let calls_out = ok(&db, &["calls", "list", &id, "--tenant", "acme"]);
    let phones: Vec<&str> = calls_out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(phones, ["+15550000001", "+15550000000", "+15550000002"]);
    assert!(calls_out.lines().skip(1).all(|l| l.contains("queued")));
    let none = ok(
        &db,
        &[
            "calls",
            "list",
            &id,
            "--tenant",
            "acme",
            "--state",
            "completed",
        ],
    );
    assert_eq!(none.trim(), "no calls");
    fails(
        &db,
        &[
            "calls", "list", &id, "--tenant", "acme", "--state", "ringing",
        ],
        "--state: \"ringing\" is not one of",
    );
    for args in [
        vec!["call-campaigns", "show", id.as_str()],
        vec!["calls", "list", id.as_str()],
    ] {
        let other = other.to_string();
        let mut args = args;
        args.extend(["--tenant", other.as_str()]);
        fails(&db, &args, &format!("call campaign {id} not found"));
    }
}
