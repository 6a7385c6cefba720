//! What the call-campaign end-to-end tests share (`calls.rs`, `calls_full.rs`, `calls_fleet.rs`,
//! `calls_waiting.rs`): herald-api's router served in the test process for the provider's
//! webhooks and the call views, a tenant's voice account on a Vapi fake, campaigns queued
//! through herald's own library calls, the worker fleet, and bounded reads of Postgres.
//!
//! Each test binary uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use chrono::{NaiveTime, Timelike, Utc};
use herald_api::{ApiConfig, AppState};
use herald_core::TenantId;
use herald_fakes::vapi::{self, VapiFake, VapiFakeConfig};
use herald_store::calls::{self as store, NewCampaign, NewContact};
use herald_tests::{
    RedisServer, TestDb, WorkerConfig, WorkerProcess, namespace, queue_client, retry,
};
use serde_json::Value;
use uuid::Uuid;

/// The webhook secret of every tenant in these tests.
pub const SECRET: &str = "e2e-vapi-webhook-secret";

/// herald-api's router on a free loopback port, in this process: it takes the provider's
/// call-ended webhooks and serves the call views.
pub async fn spawn_api(db: &TestDb, redis_url: &str, namespace: &str) -> SocketAddr {
    let queues = queue_client(redis_url, namespace).await;
    let router = herald_api::router(AppState::new(db.pool.clone(), queues, ApiConfig::default()));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("a loopback port for herald-api");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// The tenant's voice-provider account: a Vapi fake of its own (its concurrency far above
/// herald's limits unless `config` says otherwise), the tenant's system limit, and the fake's
/// webhooks pointed at herald-api.
pub async fn voice_account(
    db: &TestDb,
    tenant: TenantId,
    api: SocketAddr,
    config: VapiFakeConfig,
    system_limit: u32,
) -> VapiFake {
    let fake = vapi::spawn(config).await.expect("the Vapi fake starts");
    store::put_voice_provider(
        &db.pool,
        tenant,
        &fake.base_url(),
        "e2e-key",
        SECRET,
        Some(system_limit),
    )
    .await
    .expect("voice provider stored");
    fake.state()
        .set_webhook(format!("http://{api}/v1/webhooks/voice/{tenant}"), SECRET);
    fake
}

/// One tenant's call campaigns set up end to end: a private Redis, a fresh database, herald-api
/// in this process, the tenant's voice account on a Vapi fake (talking `talk`, its own limit far
/// above herald's, so herald's limits are what is observed) and one agent.
pub struct CallWorld {
    pub redis: RedisServer,
    pub db: TestDb,
    pub tenant: TenantId,
    pub namespace: String,
    pub api: SocketAddr,
    pub fake: VapiFake,
    pub agent: Uuid,
}

pub async fn call_world(talk: RangeInclusive<Duration>, system_limit: u32) -> CallWorld {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let namespace = namespace();
    let api = spawn_api(&db, &redis.url(), &namespace).await;
    let fake = voice_account(
        &db,
        tenant,
        api,
        VapiFakeConfig {
            talk,
            concurrency_limit: 100,
            ..VapiFakeConfig::default()
        },
        system_limit,
    )
    .await;
    let agent = store::create_agent(&db.pool, tenant, "Ava", "asst-e2e", "phone-e2e")
        .await
        .expect("agent stored")
        .id;
    CallWorld {
        redis,
        db,
        tenant,
        namespace,
        api,
        fake,
        agent,
    }
}

/// A window open from an hour ago to three hours ahead, in UTC (crossing midnight if it must).
pub fn open_window() -> (NaiveTime, NaiveTime) {
    let hour = |delta: i64| {
        let h = (i64::from(Utc::now().hour()) + delta).rem_euclid(24) as u32;
        NaiveTime::from_hms_opt(h, 0, 0).expect("an hour")
    };
    (hour(-1), hour(3))
}

/// One campaign of `user` calling `contacts` (stored first, merged by phone) inside
/// `open_window()`, started yesterday; its dispatch job is written with it.
pub async fn queue_campaign(
    db: &TestDb,
    tenant: TenantId,
    user: Uuid,
    agent: Uuid,
    name: &str,
    contacts: &[NewContact],
) -> Uuid {
    let mut conn = db.pool.acquire().await.expect("a connection");
    let ids = store::upsert_contacts(&mut conn, tenant, contacts)
        .await
        .expect("contacts stored");
    drop(conn);
    let (first, last) = open_window();
    let campaign = NewCampaign {
        name: name.to_owned(),
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
        .expect("campaign started")
        .0
        .id
}

/// `n` `herald-worker` processes serving the call queues with the outbox relay, with `env` on
/// top of the test defaults.
pub fn call_workers(
    redis_url: &str,
    db: &TestDb,
    namespace: &str,
    n: usize,
    env: &[(&str, &str)],
) -> Vec<WorkerProcess> {
    let mut cfg = WorkerConfig::new(redis_url, &db.url, namespace);
    cfg.queues = "call_dispatch,call_release_slot".into();
    cfg.relay = true;
    cfg.extra = vec!["--relay-poll-ms".into(), "20".into()];
    cfg.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    (0..n)
        .map(|_| WorkerProcess::spawn(&cfg).expect("herald-worker starts"))
        .collect()
}

/// Every worker's log, for a failure message.
pub fn logs(workers: &[WorkerProcess]) -> String {
    workers
        .iter()
        .map(WorkerProcess::log_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A count from Postgres, retried over a dropped connection.
pub async fn scalar(db: &TestDb, sql: &'static str) -> i64 {
    retry(sql, || {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.pool)
    })
    .await
}

/// A count from Postgres for one tenant (`$1`).
pub async fn tenant_scalar(db: &TestDb, tenant: TenantId, sql: &'static str) -> i64 {
    retry(sql, || {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(tenant.0)
            .fetch_one(&db.pool)
    })
    .await
}

/// `GET path` on herald-api with a bearer token: the status and the JSON body.
pub async fn get_json(api: SocketAddr, path: &str, token: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(api))
            .await
            .expect("herald-api answers within 10 s")
            .expect("herald-api reachable");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 30 s")
        .expect("answer read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}
