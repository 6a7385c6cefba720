//! A call campaign through real `herald-worker` processes: two workers (outbox relay, Redis
//! queues, fleet-wide slots) on a private Redis and a fresh database, the Vapi fake serving over
//! HTTP in this process, and herald-api's router in this process taking the fake's call-ended
//! webhooks. Counts the calls at the fake and in Postgres: every call placed once and ended
//! once, the user and tenant limits held across both processes, one release per call.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{NaiveTime, Timelike, Utc};
use herald_api::{ApiConfig, AppState};
use herald_fakes::vapi::{self, VapiFakeConfig};
use herald_store::calls::{self as store, NewCampaign, NewContact};
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, namespace, queue_client, retry,
    wait_until,
};
use serde_json::Map;

const SECRET: &str = "e2e-vapi-webhook-secret";
const USERS: u64 = 3;
const PER_USER: u64 = 20;
const USER_LIMIT: u32 = 2;
const SYSTEM_LIMIT: u32 = 4;

async fn scalar(db: &TestDb, sql: &'static str) -> i64 {
    retry(sql, || {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.pool)
    })
    .await
}

/// A window open from an hour ago to three hours ahead, in UTC (crossing midnight if it must).
fn open_window() -> (NaiveTime, NaiveTime) {
    let hour = |delta: i64| {
        let h = (i64::from(Utc::now().hour()) + delta).rem_euclid(24) as u32;
        NaiveTime::from_hms_opt(h, 0, 0).expect("an hour")
    };
    (hour(-1), hour(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_runs_through_two_worker_processes_within_the_limits() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();

    let fake = vapi::spawn(VapiFakeConfig {
        talk: Duration::from_millis(30)..=Duration::from_millis(120),
        // Far above herald's limit: herald's own limits are what is observed.
        concurrency_limit: 100,
        ..VapiFakeConfig::default()
    })
    .await
    .unwrap();
    store::put_voice_provider(
        &db.pool,
        tenant,
        &fake.base_url(),
        "e2e-key",
        SECRET,
        Some(SYSTEM_LIMIT),
    )
    .await
    .unwrap();

    // herald-api in this process, for the webhooks.
    let queues = queue_client(&redis.url(), &ns).await;
    let router = herald_api::router(AppState::new(db.pool.clone(), queues, ApiConfig::default()));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let api_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    fake.state().set_webhook(
        format!("http://{api_addr}/v1/webhooks/voice/{tenant}"),
        SECRET,
    );

    let agent = store::create_agent(&db.pool, tenant, "Ava", "asst-e2e", "phone-e2e")
        .await
        .unwrap()
        .id;
    let (first, last) = open_window();
    for u in 0..USERS {
        let user = store::create_user(&db.pool, tenant, &format!("user {u}"), Some(USER_LIMIT))
            .await
            .unwrap()
            .id;
        let contacts: Vec<NewContact> = (0..PER_USER)
            .map(|i| {
                NewContact::new(
                    &format!("+1555{:07}", u * 1_000 + i),
                    (i % 2 == 0).then_some("Named"),
                    Map::new(),
                )
                .unwrap()
            })
            .collect();
        let mut conn = db.pool.acquire().await.unwrap();
        let ids = store::upsert_contacts(&mut conn, tenant, &contacts)
            .await
            .unwrap();
        drop(conn);
        let campaign = NewCampaign {
            name: format!("campaign {u}"),
            user_id: user,
            agent_id: agent,
            next_action: None,
            first_call_time: first,
            last_call_time: last,
            time_zone: "UTC".into(),
            start_date: Utc::now().date_naive() - chrono::Duration::days(1),
        };
        herald_jobs::calls::start_campaign(&db.pool, tenant, &campaign, &ids)
            .await
            .unwrap();
    }

    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.queues = "call_dispatch,call_release_slot".into();
    cfg.relay = true;
    cfg.extra = vec!["--relay-poll-ms".into(), "20".into()];
    let workers = [
        WorkerProcess::spawn(&cfg).unwrap(),
        WorkerProcess::spawn(&cfg).unwrap(),
    ];

    wait_until("every call to end", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from calls where state in ('queued', 'dialing', 'in_call')",
        )
        .await
            == 0
    })
    .await;
    wait_until("every campaign to complete", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from call_campaigns where status <> 'completed'",
        )
        .await
            == 0
    })
    .await;

    let total = USERS * PER_USER;
    let stats = fake.state().stats();
    let logs = || {
        workers
            .iter()
            .map(WorkerProcess::log_text)
            .collect::<Vec<_>>()
            .join("\n")
    };
    // At the fake: every call placed once, the limits held across both processes.
    assert_eq!(stats.calls_created, total, "{stats:?}\n{}", logs());
    assert_eq!(stats.calls_ended, total);
    assert_eq!(stats.refused_at_limit, 0);
    assert!(
        stats.max_active <= SYSTEM_LIMIT as usize,
        "{stats:?}\n{}",
        logs()
    );
    assert!(
        stats
            .max_active_by_group
            .values()
            .all(|&n| n <= USER_LIMIT as usize),
        "{stats:?}"
    );
    let numbers: std::collections::HashSet<String> =
        fake.state().calls().into_iter().map(|c| c.number).collect();
    assert_eq!(numbers.len() as u64, total);
    // In Postgres: every call ended once with one attempt and the provider's id.
    assert_eq!(
        scalar(
            &db,
            "select count(distinct provider_call_id) from calls
             where attempts = 1 and ended_at is not null and outcome is not null"
        )
        .await,
        total as i64
    );
    assert_eq!(
        scalar(&db, "select count(*) from calls where state = 'failed'").await,
        0
    );
    // One release job per call, each finished.
    wait_until("every release job to finish", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from outbox where queue = 'call_release_slot'
               and completed_at is not null",
        )
        .await
            == total as i64
    })
    .await;
    assert_eq!(
        scalar(
            &db,
            "select count(*) from outbox where queue = 'call_release_slot'"
        )
        .await,
        total as i64
    );
    for worker in &workers {
        worker.sigterm();
    }
}
