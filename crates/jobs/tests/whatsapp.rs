//! WhatsApp template campaigns end to end without Redis queues: each test gets a fresh migrated
//! database, a real Redis rate limiter under a random namespace and the Meta fake on a free
//! port; a small driver runs the outbox's send steps through `run_send` the way the engine
//! would (a deferral waits for its instant without spending an attempt, a retry spends one),
//! several at once, until none is left. Effects are counted in Postgres and in the fake.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt as _;
use herald_admission::{Connection, RateLimiter, Slots};
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_fakes::meta::{self as fake, Fault, MetaFake, MetaFakeConfig, status_event};
use herald_jobs::Deps;
use herald_jobs::whatsapp::{self, WhatsApp, WhatsAppSend, WhatsAppSettings};
use herald_store::messages::{self, CampaignStatus, RecipientRow, Template};
use herald_store::sends::{self, SendStatus};
use herald_store::{PgPool, outbox, tenants};
use serde_json::{Value, json};
use uuid::Uuid;

const TOKEN: &str = "meta-token";
const NUMBER: &str = "106540352242922";
const SECRET: &str = "app-secret";

async fn tenant(pool: &PgPool, name: &str) -> TenantId {
    tenants::create(pool, name, "UTC").await.unwrap().0.id
}

/// The rate limiter and the concurrency slots under a random namespace.
async fn admission() -> (RateLimiter, Slots) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = Connection::connect(&url).await.expect("redis reachable");
    let namespace = format!("test-{}", Uuid::new_v4().simple());
    (
        RateLimiter::new(conn.clone(), &namespace, WhatsAppSend::QUEUE).unwrap(),
        Slots::new(conn, &namespace, WhatsAppSend::QUEUE).unwrap(),
    )
}

async fn deps(pool: &PgPool, fake: &MetaFake, timeout: Duration) -> Deps {
    let settings = WhatsAppSettings {
        api_url: fake.base_url(),
        timeout,
    };
    let http = reqwest::Client::new();
    let (limiter, slots) = admission().await;
    Deps::new(pool.clone(), http.clone(), false)
        .with_whatsapp(WhatsApp::new(http, &settings, limiter, slots))
}

async fn configure(pool: &PgPool, tenant: TenantId, token: &str) {
    messages::put_settings(
        pool,
        tenant,
        &messages::WhatsAppSettings {
            api_url: None,
            token: token.into(),
            phone_number_id: NUMBER.into(),
            app_secret: SECRET.into(),
            verify_token: "verify".into(),
        },
    )
    .await
    .unwrap();
}

async fn template(pool: &PgPool, tenant: TenantId) -> Template {
    messages::create_template(
        pool,
        tenant,
        "order_update",
        "en_US",
        &json!([
            {"type": "HEADER", "format": "TEXT", "text": "Hi {{1}}"},
            {"type": "BODY", "text": "Order {{1}} ships {{2}}"},
            {"type": "BUTTONS", "buttons": [{"type": "URL", "text": "Track", "url": "https://t.example/{{1}}"}]}
        ]),
    )
    .await
    .unwrap()
}

/// A draft campaign of `n` recipients (+1 555 01xxxxx).
async fn campaign(pool: &PgPool, tenant: TenantId, n: usize) -> Uuid {
    let template = template(pool, tenant).await;
    let rows = (0..n)
        .map(|i| RecipientRow {
            line: i as u64 + 2,
            recipient: Ok(messages::NewRecipient {
                country_code: "1".into(),
                phone: format!("1555{:07}", 100_000 + i),
                params: vec![
                    format!("Ann{i}"),
                    format!("#{i}"),
                    "today".into(),
                    format!("t{i}"),
                ],
            }),
        })
        .collect();
    let (campaign, report) = messages::create_campaign(pool, tenant, "launch", &template, rows)
        .await
        .unwrap();
    assert_eq!(report.accepted, n as u64);
    campaign.id
}

/// Runs the tenant's unfinished send steps until none is left, `parallel` at once, as the engine
/// would; returns how many deferrals and retries happened.
async fn drain(deps: &Deps, tenant: TenantId, parallel: usize) -> (u64, u64) {
    let mut deferred = 0;
    let mut retried = 0;
    loop {
        let rows: Vec<(Uuid, Value)> = sqlx::query_as(
            "select id, payload from outbox where tenant_id = $1 and queue = $2
               and completed_at is null and dead_at is null order by id",
        )
        .bind(tenant.0)
        .bind(WhatsAppSend::QUEUE)
        .fetch_all(&deps.pool)
        .await
        .unwrap();
        if rows.is_empty() {
            return (deferred, retried);
        }
        let outcomes: Vec<(u64, u64)> = futures::stream::iter(rows)
            .map(|(id, payload)| run_job(deps, tenant, id, payload))
            .buffer_unordered(parallel)
            .collect()
            .await;
        for (d, r) in outcomes {
            deferred += d;
            retried += r;
        }
    }
}

async fn run_job(deps: &Deps, tenant: TenantId, id: Uuid, payload: Value) -> (u64, u64) {
    let job: WhatsAppSend = serde_json::from_value(payload).unwrap();
    let job_id = id.simple().to_string();
    let (mut deferred, mut attempt) = (0, 1);
    loop {
        let last = attempt >= WhatsAppSend::MAX_ATTEMPTS;
        match whatsapp::run_send(deps, tenant, &job_id, Some(id), &job, last).await {
            Ok(finished) => {
                // As the worker does: the run finished the job's outbox row itself, or the
                // worker finishes it.
                if !finished {
                    outbox::mark_completed(&deps.pool, tenant, id)
                        .await
                        .unwrap();
                }
                return (deferred, u64::from(attempt - 1));
            }
            Err(JobError::Defer { until_ms, .. }) => {
                deferred += 1;
                let wait = until_ms.saturating_sub(now_ms());
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(JobError::Retry { .. }) if !last => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                outbox::mark_dead(&deps.pool, tenant, id, &e.to_string())
                    .await
                    .unwrap();
                return (deferred, u64::from(attempt - 1));
            }
        }
    }
}

async fn stats(pool: &PgPool, tenant: TenantId, campaign: Uuid) -> messages::Stats {
    messages::stats(pool, tenant, campaign).await.unwrap()
}

async fn status(pool: &PgPool, tenant: TenantId, campaign: Uuid) -> CampaignStatus {
    let mut conn = pool.acquire().await.unwrap();
    messages::campaign(&mut conn, tenant, campaign, false)
        .await
        .unwrap()
        .status
}

/// The most messages the fake accepted in any window of `window_ms`, by its own clock.
fn max_in_window(at_ms: &[u64], window_ms: u64) -> usize {
    let mut sorted = at_ms.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window_ms {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// The most admissions the number's cap allows in a window of `window_ms`: `k` admissions span
/// at least `(k − 1) × interval − tolerance`, which must be shorter than the window.
fn cap_bound(rate_per_sec: u32, window_ms: u64) -> usize {
    let cap = whatsapp::rate_cap(rate_per_sec).unwrap();
    let interval_us = cap.interval().as_micros() as u64;
    let tolerance_us = interval_us * u64::from(cap.burst() - 1) + cap.lateness().as_micros() as u64;
    ((window_ms * 1_000 + tolerance_us - 1) / interval_us + 1) as usize
}

fn per_recipient(fake: &MetaFake) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in fake.messages() {
        *counts.entry(m.to).or_insert(0) += 1;
    }
    counts
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn every_recipient_is_messaged_once_at_no_more_than_the_configured_rate(pool: PgPool) {
    const RATE: u32 = 50;
    // Send steps running at once: the most that can be between admission and Meta.
    const PARALLEL: usize = 16;
    // What Meta may see in one second: the cap's RATE admissions plus the steps admitted
    // before that second and still on their way. The fake's tier is set there, so one message
    // more in any second is a 130429 the test counts.
    let tier = RATE as usize + PARALLEL;
    assert_eq!(cap_bound(RATE, 1_000), RATE as usize);
    let fake = fake::spawn(MetaFakeConfig {
        tokens: vec![TOKEN.into()],
        per_number_mps: tier as u32,
        ..MetaFakeConfig::default()
    })
    .await
    .unwrap();
    let deps = deps(&pool, &fake, Duration::from_secs(5)).await;
    let tenant = tenant(&pool, "acme").await;
    configure(&pool, tenant, TOKEN).await;
    let id = campaign(&pool, tenant, 150).await;
    whatsapp::start_sending(&pool, tenant, id, RATE, 10)
        .await
        .unwrap();

    let (deferred, retried) = drain(&deps, tenant, PARALLEL).await;

    let messages = fake.messages();
    assert_eq!(messages.len(), 150);
    assert!(per_recipient(&fake).values().all(|n| *n == 1));
    let at: Vec<u64> = messages.iter().map(|m| m.at_ms).collect();
    // The bound holds for any window: in two seconds at most 100 admissions (plus those on
    // their way), so 150 sends take more than two seconds however the machine schedules them.
    for window_ms in [1_000, 2_000] {
        let busiest = max_in_window(&at, window_ms);
        let bound = cap_bound(RATE, window_ms) + PARALLEL;
        assert!(
            busiest <= bound,
            "{busiest} sends in {window_ms} ms at {RATE}/s (bound {bound})"
        );
    }
    assert!(deferred > 0, "150 sends at 50/s must have been paced");
    assert_eq!(retried, 0);
    assert_eq!(fake.stats().throttled(), 0);
    // The payload is Meta's template shape with the recipient's own parameters.
    let first = messages
        .iter()
        .find(|m| m.to == "15550100000")
        .expect("the first recipient");
    let components = &first.payload["template"]["components"];
    assert_eq!(components[0]["parameters"][0]["text"], "Ann0");
    assert_eq!(components[1]["parameters"][1]["text"], "today");
    assert_eq!(components[2]["parameters"][0]["text"], "t0");
    // Every send id travels as biz_opaque_callback_data and every send is recorded as sent.
    let s = stats(&pool, tenant, id).await;
    assert_eq!(
        (s.total, s.sent, s.pending, s.failed, s.unknown),
        (150, 150, 0, 0, 0)
    );
    for m in &messages {
        let send_id: Uuid = m.callback_data.as_deref().unwrap().parse().unwrap();
        let send = sends::get(&pool, tenant, send_id).await.unwrap().unwrap();
        assert_eq!(send.provider_message_id.as_deref(), Some(m.wamid.as_str()));
    }
    assert_eq!(status(&pool, tenant, id).await, CampaignStatus::Completed);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn throttling_errors_are_waited_out_never_counted_as_failures(pool: PgPool) {
    // The fake allows 5 msg/s per number while the campaign asks for 20: the fake's 130429s,
    // plus one injected 131056, one HTTP 429 and one 5xx, must all end in a sent message.
    let fake = fake::spawn(MetaFakeConfig {
        per_number_mps: 5,
        ..MetaFakeConfig::default()
    })
    .await
    .unwrap();
    fake.state().inject([
        Fault::PairRate,
        Fault::TooManyRequests,
        Fault::Throughput,
        Fault::ServerError,
    ]);
    let deps = deps(&pool, &fake, Duration::from_secs(5)).await;
    let tenant = tenant(&pool, "acme").await;
    configure(&pool, tenant, TOKEN).await;
    let id = campaign(&pool, tenant, 24).await;
    whatsapp::start_sending(&pool, tenant, id, 20, 5)
        .await
        .unwrap();

    let (deferred, retried) = drain(&deps, tenant, 8).await;

    let stats_now = stats(&pool, tenant, id).await;
    assert_eq!(stats_now.sent, 24, "{stats_now:?}");
    assert_eq!(stats_now.failed, 0);
    assert_eq!(fake.messages().len(), 24);
    assert!(per_recipient(&fake).values().all(|n| *n == 1));
    let fake_stats = fake.stats();
    assert!(fake_stats.throughput_errors >= 1, "{fake_stats:?}");
    assert_eq!(fake_stats.pair_rate_errors, 1);
    assert_eq!(fake_stats.too_many_requests, 1);
    assert!(deferred >= fake_stats.throttled());
    // Only the 5xx spent an attempt.
    assert_eq!(retried, 1);
    let dead: i64 = sqlx::query_scalar("select count(*) from outbox where dead_at is not null")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_crash_between_attempt_and_record_leaves_unknown_until_a_webhook_settles_it(
    pool: PgPool,
) {
    let fake = fake::spawn(MetaFakeConfig::default()).await.unwrap();
    let tenant = tenant(&pool, "acme").await;
    configure(&pool, tenant, TOKEN).await;
    let id = campaign(&pool, tenant, 3).await;
    whatsapp::start_sending(&pool, tenant, id, 100, 10)
        .await
        .unwrap();
    // A short client timeout: the fake takes the second message and answers too late.
    let deps = deps(&pool, &fake, Duration::from_millis(300)).await;
    let jobs: Vec<(Uuid, WhatsAppSend)> = sqlx::query_as::<_, (Uuid, Value)>(
        "select id, payload from outbox where tenant_id = $1 order by id",
    )
    .bind(tenant.0)
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, p)| (id, serde_json::from_value(p).unwrap()))
    .collect();

    // Job 1 dies after recording its attempt and calling Meta, before recording the answer:
    // the attempt is recorded and the message goes out, then nothing.
    let (job1_id, job1) = &jobs[0];
    let job1_key = job1_id.simple().to_string();
    let messages::Begin::Started(send_id) =
        messages::begin_send(&pool, tenant, id, job1.recipient_id, &job1_key)
            .await
            .unwrap()
    else {
        panic!("the attempt must begin")
    };
    let client = herald_connectors::whatsapp::WhatsAppClient::new(
        reqwest::Client::new(),
        Duration::from_secs(5),
    );
    let ctx = messages::send_context(&pool, tenant, id, job1.recipient_id)
        .await
        .unwrap();
    let account = herald_connectors::whatsapp::Account {
        api_url: fake.base_url(),
        token: secrecy::SecretString::from(TOKEN),
        phone_number_id: NUMBER.into(),
    };
    let message = herald_connectors::whatsapp::TemplateMessage {
        to: ctx.phone.clone(),
        template: ctx.template.name.clone(),
        language: ctx.template.language.clone(),
        header: vec![ctx.params[0].clone()],
        body: ctx.params[1..3].to_vec(),
        url_buttons: vec![(0, ctx.params[3].clone())],
        callback_data: send_id.to_string(),
    };
    client.send_template(&account, &message).await.unwrap();
    // The job is re-delivered: it must not send again.
    whatsapp::run_send(&deps, tenant, &job1_key, None, job1, false)
        .await
        .unwrap();
    // Job 2: Meta takes the message but its answer never arrives in time.
    fake.state()
        .inject([Fault::AcceptThenStall(Duration::from_secs(2))]);
    let (job2_id, job2) = &jobs[1];
    whatsapp::run_send(
        &deps,
        tenant,
        &job2_id.simple().to_string(),
        None,
        job2,
        false,
    )
    .await
    .unwrap();
    // Job 3 runs normally.
    let (job3_id, job3) = &jobs[2];
    whatsapp::run_send(
        &deps,
        tenant,
        &job3_id.simple().to_string(),
        None,
        job3,
        false,
    )
    .await
    .unwrap();

    assert_eq!(fake.messages().len(), 3, "each recipient messaged once");
    assert!(per_recipient(&fake).values().all(|n| *n == 1));
    let s = stats(&pool, tenant, id).await;
    assert_eq!((s.unknown, s.sent, s.pending), (2, 1, 0), "{s:?}");
    assert_eq!(status(&pool, tenant, id).await, CampaignStatus::Completed);

    // Meta's status webhooks carry the send ids and settle both.
    let events: Vec<Value> = fake
        .messages()
        .iter()
        .flat_map(|m| [status_event(m, "sent", 1), status_event(m, "delivered", 2)])
        .collect();
    let body = fake::webhook_body(NUMBER, &events).to_string();
    let outcome = whatsapp::apply_webhook(&pool, tenant, body.as_bytes())
        .await
        .unwrap();
    assert_eq!(outcome.unmatched, 0);
    let s = stats(&pool, tenant, id).await;
    assert_eq!((s.unknown, s.delivered), (0, 3), "{s:?}");
    let settled = sends::get(&pool, tenant, send_id).await.unwrap().unwrap();
    assert_eq!(settled.status, SendStatus::Delivered);
    assert!(settled.provider_message_id.is_some());
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn statuses_only_move_forward_under_shuffled_and_duplicated_webhooks(pool: PgPool) {
    let fake = fake::spawn(MetaFakeConfig::default()).await.unwrap();
    let deps = deps(&pool, &fake, Duration::from_secs(5)).await;
    let tenant = tenant(&pool, "acme").await;
    let other = tenant_with_campaign(&pool).await;
    configure(&pool, tenant, TOKEN).await;
    let id = campaign(&pool, tenant, 40).await;
    whatsapp::start_sending(&pool, tenant, id, 200, 20)
        .await
        .unwrap();
    drain(&deps, tenant, 20).await;

    // 30 recipients read their message, 5 got it delivered, 5 failed after being sent.
    let sent = fake.messages();
    let mut events = Vec::new();
    let mut expected: BTreeMap<String, &str> = BTreeMap::new();
    for (i, m) in sent.iter().enumerate() {
        let path: &[&str] = match i {
            0..30 => &["sent", "delivered", "read"],
            30..35 => &["sent", "delivered"],
            _ => &["sent", "failed"],
        };
        for (t, status) in path.iter().enumerate() {
            events.push(status_event(m, status, t as u64));
        }
        expected.insert(m.wamid.clone(), path[path.len() - 1]);
    }
    // Three copies of everything, in random order, in batches.
    let mut all: Vec<Value> = events
        .iter()
        .chain(&events)
        .chain(&events)
        .cloned()
        .collect();
    use rand::seq::SliceRandom as _;
    all.shuffle(&mut rand::thread_rng());
    for chunk in all.chunks(17) {
        let body = fake::webhook_body(NUMBER, chunk).to_string();
        whatsapp::apply_webhook(&pool, tenant, body.as_bytes())
            .await
            .unwrap();
    }
    let s = stats(&pool, tenant, id).await;
    assert_eq!(
        (s.read, s.delivered, s.failed, s.sent),
        (30, 5, 5, 0),
        "{s:?}"
    );
    let codes: HashSet<Option<String>> = messages::failed_recipients(&pool, tenant, id)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.error_code)
        .collect();
    assert_eq!(codes, HashSet::from([Some("131026".to_owned())]));

    // Another tenant's webhook naming these messages changes nothing.
    let body = fake::webhook_body(NUMBER, &events).to_string();
    let outcome = whatsapp::apply_webhook(&pool, other, body.as_bytes())
        .await
        .unwrap();
    assert_eq!(outcome.applied, 0);
    assert_eq!(stats(&pool, tenant, id).await, s);
}

async fn tenant_with_campaign(pool: &PgPool) -> TenantId {
    let other = tenant(pool, "other").await;
    campaign(pool, other, 1).await;
    other
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn refused_sends_fail_and_retry_failed_sends_them_again(pool: PgPool) {
    let fake = fake::spawn(MetaFakeConfig {
        tokens: vec![TOKEN.into()],
        pair_interval: Duration::ZERO,
        ..MetaFakeConfig::default()
    })
    .await
    .unwrap();
    let deps = deps(&pool, &fake, Duration::from_secs(5)).await;
    let tenant = tenant(&pool, "acme").await;
    configure(&pool, tenant, "expired-token").await;
    let id = campaign(&pool, tenant, 6).await;
    whatsapp::start_sending(&pool, tenant, id, 100, 5)
        .await
        .unwrap();
    drain(&deps, tenant, 6).await;
    let s = stats(&pool, tenant, id).await;
    assert_eq!(s.failed, 6);
    assert_eq!(fake.messages().len(), 0);
    assert_eq!(status(&pool, tenant, id).await, CampaignStatus::Completed);
    let failed = messages::failed_recipients(&pool, tenant, id)
        .await
        .unwrap();
    assert_eq!(failed[0].error_code.as_deref(), Some("190"));

    // Paused campaigns send nothing until resumed.
    configure(&pool, tenant, TOKEN).await;
    let (campaign, retried) = whatsapp::retry_failed(&pool, tenant, id).await.unwrap();
    assert_eq!((campaign.status, retried), (CampaignStatus::Sending, 6));
    whatsapp::pause(&pool, tenant, id).await.unwrap();
    drain(&deps, tenant, 6).await;
    assert_eq!(fake.messages().len(), 0);
    assert_eq!(stats(&pool, tenant, id).await.pending, 6);
    whatsapp::resume(&pool, tenant, id).await.unwrap();
    drain(&deps, tenant, 6).await;
    let s = stats(&pool, tenant, id).await;
    assert_eq!((s.sent, s.failed, s.pending), (6, 0, 0), "{s:?}");
    assert_eq!(fake.messages().len(), 6);
    assert_eq!(status(&pool, tenant, id).await, CampaignStatus::Completed);
    // Stopping a completed campaign is refused; a stopped one never sends.
    assert!(whatsapp::stop(&pool, tenant, id).await.is_err());
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_campaign_never_has_more_sends_in_flight_than_its_concurrency(pool: PgPool) {
    const CONCURRENCY: u32 = 3;
    let fake = fake::spawn(MetaFakeConfig {
        tokens: vec![TOKEN.into()],
        ..MetaFakeConfig::default()
    })
    .await
    .unwrap();
    let deps = deps(&pool, &fake, Duration::from_secs(10)).await;
    let tenant = tenant(&pool, "acme").await;
    configure(&pool, tenant, TOKEN).await;
    let id = campaign(&pool, tenant, 30).await;
    whatsapp::start_sending(&pool, tenant, id, 1_000, CONCURRENCY)
        .await
        .unwrap();
    // Meta takes each message and keeps its answer: every send that reaches it stays in flight.
    fake.state().hold_answers();
    let drained = {
        let deps = deps.clone();
        tokio::spawn(async move { drain(&deps, tenant, 12).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fake.state().held_answers() < CONCURRENCY as usize {
        assert!(std::time::Instant::now() < deadline, "no send reached Meta");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Twelve steps keep asking (each refused one comes back every 50 ms) while three hold
    // their slots: none more goes out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.state().held_answers(), CONCURRENCY as usize);
    assert_eq!(fake.messages().len(), CONCURRENCY as usize);
    assert_eq!(
        stats(&pool, tenant, id).await.attempting,
        i64::from(CONCURRENCY)
    );

    fake.state().release_answers();
    let (_, retried) = drained.await.unwrap();
    assert_eq!(retried, 0);
    assert_eq!(fake.messages().len(), 30);
    assert!(per_recipient(&fake).values().all(|n| *n == 1));
    let s = stats(&pool, tenant, id).await;
    assert_eq!((s.sent, s.attempting, s.pending), (30, 0, 0), "{s:?}");
    assert_eq!(status(&pool, tenant, id).await, CampaignStatus::Completed);
}
