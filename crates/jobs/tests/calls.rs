//! Call campaigns end to end without Redis queues: each test gets a fresh migrated database, real
//! Redis slots under a random namespace, the Vapi fake on a free port posting its server messages
//! to a small webhook receiver, and a driver that runs the outbox's jobs through the handlers'
//! `run_*` functions the way the engine would (defer, retry, dead-letter) until every call has
//! ended. Every test counts effects: rows in Postgres, calls at the fake, slots in Redis.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{NaiveTime, Utc};
use herald_admission::{Connection, Slots};
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_fakes::vapi::{self, VapiFake, VapiFakeConfig, WebhookFaults};
use herald_jobs::Deps;
use herald_jobs::calls::{self, CallDispatch, ReleaseSlot, Voice, VoiceSettings};
use herald_store::calls::{self as store, NewCampaign, NewContact};
use herald_store::{PgPool, outbox, tenants};
use serde_json::{Map, Value};
use uuid::Uuid;

const SECRET: &str = "vapi-secret-for-tests";

struct World {
    pool: PgPool,
    tenant: TenantId,
    deps: Deps,
    slots: Slots,
    fake: VapiFake,
    agent: Uuid,
}

#[derive(Clone)]
struct Hook {
    pool: PgPool,
    tenant: TenantId,
}

/// The webhook receiver: the secret, then the message through `on_server_message`.
async fn hook(State(hook): State<Hook>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    if headers.get("x-vapi-secret").and_then(|v| v.to_str().ok()) != Some(SECRET) {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = herald_connectors::voice::parse_server_message(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    match calls::on_server_message(&hook.pool, hook.tenant, event).await {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn world(pool: PgPool, config: VapiFakeConfig, system_limit: u32, lease: Duration) -> World {
    let tenant = tenants::create(&pool, "calls", "UTC").await.unwrap().0.id;
    let fake = vapi::spawn(config).await.unwrap();
    store::put_voice_provider(
        &pool,
        tenant,
        &fake.base_url(),
        "vapi-key",
        SECRET,
        Some(system_limit),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Hook {
            pool: pool.clone(),
            tenant,
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    fake.state()
        .set_webhook(format!("http://{addr}/hook"), SECRET);

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = Connection::connect(&url).await.unwrap();
    let namespace = format!("test-{}", Uuid::new_v4().simple());
    let slots = Slots::new(conn, &namespace, CallDispatch::QUEUE).unwrap();
    let settings = VoiceSettings {
        slot_lease: lease,
        ..VoiceSettings::default()
    };
    let http = reqwest::Client::new();
    let voice = Voice::new(http.clone(), settings, slots.clone());
    let deps = Deps::new(pool.clone(), http, false).with_voice(voice);
    let agent = store::create_agent(&pool, tenant, "Ava", "asst-1", "phone-1")
        .await
        .unwrap()
        .id;
    World {
        pool,
        tenant,
        deps,
        slots,
        fake,
        agent,
    }
}

impl World {
    async fn user(&self, name: &str, limit: u32) -> Uuid {
        store::create_user(&self.pool, self.tenant, name, Some(limit))
            .await
            .unwrap()
            .id
    }

    /// `n` contacts with phones from `first`; those at `named` indexes have a name.
    async fn contacts(&self, first: u64, n: u64, named: impl Fn(u64) -> bool) -> Vec<Uuid> {
        let contacts: Vec<NewContact> = (0..n)
            .map(|i| {
                let name = named(i).then(|| format!("Contact {}", first + i));
                let mut context = Map::new();
                context.insert("index".into(), Value::from(first + i));
                NewContact::new(&format!("+1555{:07}", first + i), name.as_deref(), context)
                    .unwrap()
            })
            .collect();
        let mut conn = self.pool.acquire().await.unwrap();
        store::upsert_contacts(&mut conn, self.tenant, &contacts)
            .await
            .unwrap()
    }

    async fn campaign(
        &self,
        user: Uuid,
        contacts: &[Uuid],
        first: NaiveTime,
        last: NaiveTime,
        start_days_from_today: i64,
    ) -> Uuid {
        let today = Utc::now().date_naive();
        let campaign = NewCampaign {
            name: "campaign".into(),
            user_id: user,
            agent_id: self.agent,
            next_action: Some("book a demo".into()),
            first_call_time: first,
            last_call_time: last,
            time_zone: "UTC".into(),
            start_date: today + chrono::Duration::days(start_days_from_today),
        };
        calls::start_campaign(&self.pool, self.tenant, &campaign, contacts)
            .await
            .unwrap()
            .0
            .id
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .bind(self.tenant.0)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn live_calls(&self) -> i64 {
        self.count(
            "select count(*) from calls where tenant_id = $1
               and state in ('queued', 'dialing', 'in_call')",
        )
        .await
    }

    /// Runs the tenant's due outbox jobs once, as the engine would; returns how many ran.
    async fn run_due(&self, attempts: &mut HashMap<Uuid, u32>) -> usize {
        let due: Vec<(Uuid, String, Value)> = sqlx::query_as(
            "select id, queue, payload from outbox
             where tenant_id = $1 and completed_at is null and dead_at is null
               and (run_at is null or run_at <= now())
             order by created_at limit 50",
        )
        .bind(self.tenant.0)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        for (id, queue, payload) in &due {
            let attempt = {
                let n = attempts.entry(*id).or_insert(0);
                *n += 1;
                *n
            };
            let (result, max) = if queue == CallDispatch::QUEUE {
                (
                    calls::run_dispatch(&self.deps, self.tenant, Utc::now())
                        .await
                        .map(|_| ()),
                    CallDispatch::MAX_ATTEMPTS,
                )
            } else if queue == ReleaseSlot::QUEUE {
                let job: ReleaseSlot = serde_json::from_value(payload.clone()).unwrap();
                (
                    calls::run_release_slot(
                        &self.deps,
                        self.tenant,
                        &job,
                        attempt >= ReleaseSlot::MAX_ATTEMPTS,
                    )
                    .await
                    .map(|_| ()),
                    ReleaseSlot::MAX_ATTEMPTS,
                )
            } else {
                panic!("unexpected queue {queue}");
            };
            let reschedule = |at_ms: u64| async move {
                sqlx::query("update outbox set run_at = $2 where id = $1")
                    .bind(id)
                    .bind(chrono::DateTime::<Utc>::from_timestamp_millis(at_ms as i64))
                    .execute(&self.pool)
                    .await
                    .unwrap();
            };
            match result {
                Ok(()) => {
                    outbox::mark_completed(&self.pool, self.tenant, *id)
                        .await
                        .unwrap();
                }
                Err(JobError::Defer { until_ms, .. }) => {
                    *attempts.get_mut(id).unwrap() -= 1;
                    reschedule(until_ms).await;
                }
                Err(JobError::Retry { after, reason }) if attempt < max => {
                    let _ = reason;
                    let after = after.unwrap_or(Duration::from_millis(50));
                    reschedule(now_ms() + after.as_millis() as u64).await;
                }
                Err(e) => {
                    outbox::mark_dead(&self.pool, self.tenant, *id, &e.to_string())
                        .await
                        .unwrap();
                }
            }
        }
        due.len()
    }

    /// Drives the jobs until every call has ended (or `limit` passes: a failure).
    async fn drive_until_done(&self, limit: Duration) {
        let mut attempts = HashMap::new();
        let started = Instant::now();
        loop {
            let ran = self.run_due(&mut attempts).await;
            if self.live_calls().await == 0 {
                // The jobs the last releases wrote (the final dispatch) still run.
                while self.run_due(&mut attempts).await > 0 {}
                return;
            }
            assert!(
                started.elapsed() < limit,
                "calls still live after {limit:?}: {:?}",
                self.fake.state().stats()
            );
            if ran == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    async fn slots_in_use(&self) -> u64 {
        self.slots
            .tenant_in_use(&self.tenant.0.simple().to_string(), now_ms())
            .await
            .unwrap()
    }
}

/// A window open for the next hours around now (it may cross midnight).
fn open_window() -> (NaiveTime, NaiveTime) {
    let now = Utc::now().time();
    (
        now - chrono::Duration::hours(1),
        now + chrono::Duration::hours(3),
    )
}

/// A window that opens in an hour.
fn closed_window() -> (NaiveTime, NaiveTime) {
    let now = Utc::now().time();
    (
        now + chrono::Duration::hours(1),
        now + chrono::Duration::hours(2),
    )
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn many_calls_never_exceed_the_user_or_the_tenant_limit(pool: PgPool) {
    let config = VapiFakeConfig {
        talk: Duration::from_millis(150)..=Duration::from_millis(400),
        // The account allows more than herald's system limit, so herald's own limit is what
        // is tested.
        concurrency_limit: 50,
        ..VapiFakeConfig::default()
    };
    let world = world(pool, config, 10, Duration::from_secs(600)).await;
    let (first, last) = open_window();
    const PER_CAMPAIGN: u64 = 20;
    let mut total = 0;
    for u in 0..6u64 {
        let user = world.user(&format!("user {u}"), 2).await;
        for c in 0..2u64 {
            let base = (u * 2 + c) * 1_000;
            let contacts = world.contacts(base, PER_CAMPAIGN, |i| i % 3 == 0).await;
            world.campaign(user, &contacts, first, last, -1).await;
            total += PER_CAMPAIGN;
        }
    }
    world.drive_until_done(Duration::from_secs(240)).await;

    let stats = world.fake.state().stats();
    assert_eq!(stats.calls_created, total, "{stats:?}");
    assert_eq!(stats.refused_at_limit, 0);
    // 6 users × 2 could reach 12: the tenant's 10 is the binding limit, and it was reached.
    assert_eq!(stats.max_active, 10, "{stats:?}");
    assert_eq!(stats.max_active_by_group.len(), 6);
    assert!(
        stats.max_active_by_group.values().all(|&n| n <= 2),
        "{stats:?}"
    );
    // Every call ended exactly once, with the provider's id recorded.
    assert_eq!(
        world
            .count(
                "select count(distinct provider_call_id) from calls
                 where tenant_id = $1 and ended_at is not null and attempts = 1"
            )
            .await,
        total as i64
    );
    assert_eq!(
        world
            .count("select count(*) from calls where tenant_id = $1 and state = 'failed'")
            .await,
        0
    );
    assert_eq!(world.slots_in_use().await, 0);
    assert_eq!(
        world
            .count(
                "select count(*) from call_campaigns where tenant_id = $1 and status = 'completed'"
            )
            .await,
        12
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn slots_go_round_robin_across_users_and_by_priority_then_fifo_within_one(pool: PgPool) {
    let config = VapiFakeConfig {
        // Calls outlast the test: only dispatch order is observed.
        talk: Duration::from_secs(60)..=Duration::from_secs(60),
        ..VapiFakeConfig::default()
    };
    let world = world(pool, config, 6, Duration::from_secs(600)).await;
    let (first, last) = open_window();
    let mut users = Vec::new();
    for u in 0..3u64 {
        let user = world.user(&format!("user {u}"), 5).await;
        // Unnamed, named, unnamed, named: named ones go first, each group in order.
        let contacts = world.contacts(u * 100, 4, |i| i % 2 == 1).await;
        world.campaign(user, &contacts, first, last, 0).await;
        users.push(user);
    }
    let summary = calls::run_dispatch(&world.deps, world.tenant, Utc::now())
        .await
        .unwrap();
    assert_eq!(summary.placed.len(), 6);
    let placed = world.fake.state().calls();
    let order: Vec<(String, u64)> = placed
        .iter()
        .map(|c| {
            (
                c.metadata["user_id"].as_str().unwrap().to_owned(),
                c.metadata["context"]["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut sorted = users.clone();
    sorted.sort();
    let user_order: Vec<String> = order.iter().map(|(u, _)| u.clone()).collect();
    let expected: Vec<String> = sorted
        .iter()
        .chain(sorted.iter())
        .map(|u| u.to_string())
        .collect();
    assert_eq!(user_order, expected, "one call per user per turn");
    let mut per_user: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (user, index) in order {
        per_user.entry(user).or_default().push(index % 100);
    }
    for indexes in per_user.values() {
        assert_eq!(indexes, &[1, 3], "named contacts first, in order");
    }
    // The tenant is full: a second run places nothing and leaves a wake-up at the first lease.
    let again = calls::run_dispatch(&world.deps, world.tenant, Utc::now())
        .await
        .unwrap();
    assert!(again.placed.is_empty());
    assert!(again.wake_at_ms.is_some());
    assert_eq!(world.fake.state().stats().calls_created, 6);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn nothing_is_dialled_outside_a_window_and_a_closed_campaign_blocks_no_other(pool: PgPool) {
    let config = VapiFakeConfig {
        talk: Duration::from_millis(10)..=Duration::from_millis(30),
        ..VapiFakeConfig::default()
    };
    let world = world(pool, config, 10, Duration::from_secs(600)).await;
    let user = world.user("owner", 2).await;
    let (closed_first, closed_last) = closed_window();
    let (open_first, open_last) = open_window();
    // The user's first campaign is outside its window; its second is inside.
    let closed = world.contacts(0, 5, |_| true).await;
    let closed_id = world
        .campaign(user, &closed, closed_first, closed_last, 0)
        .await;
    let open = world.contacts(100, 5, |_| false).await;
    world.campaign(user, &open, open_first, open_last, 0).await;
    // A campaign starting tomorrow waits, whatever its window.
    let future_user = world.user("later", 2).await;
    let future = world.contacts(200, 3, |_| true).await;
    world
        .campaign(future_user, &future, open_first, open_last, 1)
        .await;

    let mut attempts = HashMap::new();
    let started = Instant::now();
    while world
        .count("select count(*) from calls where tenant_id = $1 and ended_at is not null")
        .await
        < 5
    {
        assert!(started.elapsed() < Duration::from_secs(60));
        if world.run_due(&mut attempts).await == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    while world.run_due(&mut attempts).await > 0 {}
    let stats = world.fake.state().stats();
    assert_eq!(stats.calls_created, 5, "only the open campaign's calls");
    let untouched = world
        .count(
            "select count(*) from calls where tenant_id = $1 and state = 'queued' and attempts = 0",
        )
        .await;
    assert_eq!(
        untouched, 8,
        "closed and future calls wait without spending an attempt"
    );
    assert!(
        world
            .fake
            .state()
            .calls()
            .iter()
            .all(|c| c.metadata["campaign_id"] != closed_id.to_string())
    );
    // A wake-up dispatch waits for the closed window's opening (about an hour from now).
    let wakes: Vec<chrono::DateTime<Utc>> = sqlx::query_scalar(
        "select run_at from outbox where tenant_id = $1 and queue = 'call_dispatch'
           and completed_at is null and run_at > now()",
    )
    .bind(world.tenant.0)
    .fetch_all(&world.pool)
    .await
    .unwrap();
    let opens = Utc::now().date_naive().and_time(closed_first).and_utc();
    assert!(
        wakes.iter().any(|wake| {
            let diff = (*wake - opens).num_milliseconds().rem_euclid(86_400_000);
            diff <= 1_000 || diff >= 86_399_000
        }),
        "wake-ups {wakes:?}, opening {opens}"
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn duplicate_and_late_webhooks_release_each_slot_once(pool: PgPool) {
    let config = VapiFakeConfig {
        talk: Duration::from_millis(10)..=Duration::from_millis(40),
        faults: WebhookFaults {
            duplicate: 1.0,
            late: 0.5,
            late_by: Duration::from_millis(150),
            drop: 0.0,
        },
        concurrency_limit: 3,
        ..VapiFakeConfig::default()
    };
    let world = world(pool, config, 3, Duration::from_secs(600)).await;
    let (first, last) = open_window();
    for u in 0..2u64 {
        let user = world.user(&format!("user {u}"), 2).await;
        let contacts = world.contacts(u * 100, 15, |i| i % 2 == 0).await;
        world.campaign(user, &contacts, first, last, 0).await;
    }
    world.drive_until_done(Duration::from_secs(120)).await;
    // Let the last duplicates and late messages arrive and their jobs run.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut attempts = HashMap::new();
    while world.run_due(&mut attempts).await > 0 {}

    let stats = world.fake.state().stats();
    assert_eq!(stats.calls_created, 30);
    // Had a duplicate freed a second slot, herald would have gone over the account's 3.
    assert_eq!(stats.refused_at_limit, 0, "{stats:?}");
    assert!(stats.max_active <= 3);
    assert!(stats.webhooks_sent >= 4 * 30, "{stats:?}");
    // One release job per call (the duplicates were de-duplicated by call id), none dead.
    assert_eq!(
        world
            .count(
                "select count(*) from outbox where tenant_id = $1 and queue = 'call_release_slot'"
            )
            .await,
        30
    );
    assert_eq!(
        world
            .count("select count(*) from outbox where tenant_id = $1 and dead_at is not null")
            .await,
        0
    );
    assert_eq!(
        world
            .count("select count(*) from calls where tenant_id = $1 and ended_at is not null")
            .await,
        30
    );
    assert_eq!(world.slots_in_use().await, 0);
    // A release run again for an ended call changes nothing and frees nothing.
    let provider_id: String =
        sqlx::query_scalar("select provider_call_id from calls where tenant_id = $1 limit 1")
            .bind(world.tenant.0)
            .fetch_one(&world.pool)
            .await
            .unwrap();
    let dispatches_before = world
        .count("select count(*) from outbox where tenant_id = $1 and queue = 'call_dispatch'")
        .await;
    let again = calls::run_release_slot(
        &world.deps,
        world.tenant,
        &ReleaseSlot {
            provider_call_id: provider_id,
            ended_reason: Some("customer-ended-call".into()),
            duration_ms: Some(1),
        },
        false,
    )
    .await
    .unwrap();
    assert!(matches!(again, calls::Released::AlreadyEnded { .. }));
    assert_eq!(world.slots_in_use().await, 0);
    assert_eq!(
        world
            .count("select count(*) from outbox where tenant_id = $1 and queue = 'call_dispatch'")
            .await,
        dispatches_before,
        "a repeated release dispatches nothing"
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_lost_webhook_frees_its_slot_when_the_lease_runs_out(pool: PgPool) {
    let config = VapiFakeConfig {
        talk: Duration::from_millis(10)..=Duration::from_millis(20),
        faults: WebhookFaults {
            drop: 1.0,
            ..WebhookFaults::default()
        },
        ..VapiFakeConfig::default()
    };
    let world = world(pool, config, 1, Duration::from_millis(400)).await;
    let (first, last) = open_window();
    let user = world.user("solo", 1).await;
    let contacts = world.contacts(0, 3, |_| true).await;
    world.campaign(user, &contacts, first, last, 0).await;

    let mut attempts = HashMap::new();
    world.run_due(&mut attempts).await;
    assert_eq!(world.fake.state().stats().calls_created, 1);
    assert_eq!(world.slots_in_use().await, 1);
    // No webhook comes; the next call waits for the lease, not forever.
    world.drive_until_done(Duration::from_secs(60)).await;
    let stats = world.fake.state().stats();
    assert_eq!(stats.calls_created, 3);
    assert_eq!(stats.webhooks_dropped, 3);
    assert_eq!(stats.max_active, 1);
    assert_eq!(
        world
            .count(
                "select count(*) from calls where tenant_id = $1 and state = 'failed'
                   and error like 'no call-ended signal%'"
            )
            .await,
        3
    );
    assert_eq!(world.slots_in_use().await, 0);
}

/// Several workers may run the tenant's dispatch jobs at once and offer the same call: the slot
/// id is the call's, so one run acquires it and the other finds it held. Whichever run loses
/// the `dialing` write must leave the slot to the call that holds it.
#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn concurrent_dispatch_runs_never_free_a_slot_a_call_holds(pool: PgPool) {
    let config = VapiFakeConfig {
        talk: Duration::from_millis(30)..=Duration::from_millis(90),
        concurrency_limit: 50,
        ..VapiFakeConfig::default()
    };
    let world = world(pool, config, 4, Duration::from_secs(600)).await;
    let (first, last) = open_window();
    const PER_USER: u64 = 15;
    for u in 0..3u64 {
        let user = world.user(&format!("user {u}"), 2).await;
        let contacts = world.contacts(u * 1_000, PER_USER, |_| true).await;
        world.campaign(user, &contacts, first, last, -1).await;
    }
    let mut attempts = HashMap::new();
    let started = Instant::now();
    while world.live_calls().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{:?}",
            world.fake.state().stats()
        );
        let run = || calls::run_dispatch(&world.deps, world.tenant, Utc::now());
        let (a, b, c, d) = tokio::join!(run(), run(), run(), run());
        for result in [a, b, c, d] {
            result.unwrap();
        }
        world.run_due(&mut attempts).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while world.run_due(&mut attempts).await > 0 {}
    let stats = world.fake.state().stats();
    assert_eq!(stats.calls_created, 3 * PER_USER, "{stats:?}");
    assert!(stats.max_active <= 4, "{stats:?}");
    assert!(
        stats.max_active_by_group.values().all(|&n| n <= 2),
        "{stats:?}"
    );
    assert_eq!(
        world
            .count("select count(*) from calls where tenant_id = $1 and attempts = 1")
            .await,
        (3 * PER_USER) as i64
    );
    assert_eq!(world.slots_in_use().await, 0);
}
