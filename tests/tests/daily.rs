//! The daily VA assignment end to end: real `herald-worker` processes (outbox relay, select,
//! distribute, sync) over a private `redis-server` and a fresh Postgres database, pushing to the
//! Airtable fake running in this test process. Effects are counted where they land: records in
//! the fake, rows in Postgres. Handler-level cases (shortfall spreading, 422s, cleanup, a single
//! 429's hold) are in `crates/jobs/tests/daily.rs`; CSV imports in the API and CLI tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use herald_core::TenantId;
use herald_fakes::airtable::{self as fake, AirtableFake, AirtableFakeConfig, FailPlan};
use herald_jobs::daily::{self as jobs, table_name};
use herald_store::daily::{self as store, BatchStatus, Campaign, CampaignId, Shape, Stage};
use herald_store::profiles::{self, InputRow, NewProfile};
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, namespace, wait_until,
};
use uuid::Uuid;

const BASE: &str = "appDailyEndToEnd";
const TOKEN: &str = "patDailyEndToEnd";
const DAILY_QUEUES: &str = "daily_select,daily_distribute,daily_sync";

/// The fake with Airtable's behaviour but limits above herald's pacing in these tests
/// (herald: 200 req/s per base, 400 per token), and a short lock-out should herald overflow.
fn fast_fake() -> AirtableFakeConfig {
    AirtableFakeConfig {
        per_base_rps: 250,
        per_token_rps: 1_000,
        lockout: Duration::from_secs(1),
        tokens: vec![TOKEN.to_owned()],
        bases: Some(vec![BASE.to_owned()]),
        ..AirtableFakeConfig::default()
    }
}

fn date(s: &str) -> NaiveDate {
    s.parse().expect("a valid date")
}

/// One test's world: a private Redis, a fresh database and the Airtable fake.
struct World {
    redis: RedisServer,
    db: TestDb,
    fake: AirtableFake,
    namespace: String,
}

impl World {
    async fn start(fake_config: AirtableFakeConfig) -> Self {
        Self {
            redis: RedisServer::start(),
            db: TestDb::create().await,
            fake: fake::spawn(fake_config).await.expect("the Airtable fake"),
            namespace: namespace(),
        }
    }

    async fn tenant(&self, name: &str) -> TenantId {
        herald_store::tenants::create(&self.db.pool, name, "UTC")
            .await
            .expect("tenant")
            .0
            .id
    }

    /// A worker serving the daily queues with the relay and the reconciler on, talking to the
    /// fake with `token` at 200 req/s per base.
    fn worker_with_token(&self, token: &str) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(&self.redis.url(), &self.db.url, &self.namespace);
        cfg.queues = DAILY_QUEUES.into();
        cfg.concurrency = 10;
        cfg.lease_ms = 3_000;
        cfg.relay = true;
        cfg.reconciler_every_ms = Some(3_000);
        cfg.env = [
            ("AIRTABLE_API_URL", self.fake.base_url()),
            ("AIRTABLE_TOKEN", token.to_owned()),
            ("AIRTABLE_BASE_ID", BASE.to_owned()),
            ("HERALD_AIRTABLE_BASE_RPS", "200".to_owned()),
            ("HERALD_AIRTABLE_TOKEN_RPS", "400".to_owned()),
            ("HERALD_AIRTABLE_LOCKOUT_MS", "300".to_owned()),
            // Paced well under the fake's 250 req/s: a debug build on a busy machine wakes
            // deferred jobs tens of milliseconds late, and the test is about effects, not pace.
            ("HERALD_AIRTABLE_RATE_MARGIN", "0.2".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        cfg
    }

    fn worker(&self) -> WorkerConfig {
        self.worker_with_token(TOKEN)
    }

    async fn import(&self, tenant: TenantId, prefix: &str, n: usize) {
        let rows = (0..n)
            .map(|i| InputRow {
                line: i as u64 + 2,
                profile: Ok(NewProfile {
                    external_id: Some(format!("ext{i}")),
                    username: format!("{prefix}_{i}"),
                    full_name: (i % 3 == 0).then(|| format!("Name {i}")),
                }),
            })
            .collect();
        let report = profiles::import(&self.db.pool, tenant, rows)
            .await
            .expect("import");
        assert_eq!(report.inserted, n as u64);
    }

    async fn start_day(&self, tenant: TenantId, day: &str, shape: Shape) -> CampaignId {
        jobs::start_daily(&self.db.pool, tenant, Some(date(day)), shape)
            .await
            .expect("start the day")
            .campaign
            .id
    }

    async fn campaign(&self, tenant: TenantId, id: CampaignId) -> Campaign {
        herald_tests::retry("read the campaign", || {
            store::get(&self.db.pool, tenant, id)
        })
        .await
    }

    /// Waits for the campaign to be complete or failed, and returns it.
    async fn wait_for_end(&self, tenant: TenantId, id: CampaignId, limit: Duration) -> Campaign {
        let start = Instant::now();
        loop {
            let campaign = self.campaign(tenant, id).await;
            if matches!(campaign.stage, Stage::Complete | Stage::Failed) {
                return campaign;
            }
            assert!(
                start.elapsed() < limit,
                "campaign {id} still {} ({}/{} batches) after {limit:?}",
                campaign.stage,
                campaign.counts.batches_done,
                campaign.counts.batches_total
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn unused(&self, tenant: TenantId) -> i64 {
        profiles::unused_count(&self.db.pool, tenant)
            .await
            .expect("pool stats")
    }

    /// Every record in the fake's daily tables 1..=tables.
    fn records(&self, tables: u32) -> Vec<FakeRecord> {
        let mut all = Vec::new();
        for table_no in 1..=tables {
            for record in self.fake.state().records(BASE, &table_name(table_no)) {
                all.push(FakeRecord {
                    table_no,
                    record_id: record.id,
                    profile_id: record.fields["profile_id"]
                        .as_str()
                        .expect("profile_id is text")
                        .to_owned(),
                    position: record.fields["position"].as_i64().expect("position"),
                });
            }
        }
        all
    }
}

#[derive(Debug, Clone)]
struct FakeRecord {
    table_no: u32,
    record_id: String,
    profile_id: String,
    position: i64,
}

/// The campaign's records are in the fake exactly once each: one record per assignment, in its
/// table at its position, each profile in one table only, and the sync ledger holds the record
/// ids the fake gave. `records` may hold other campaigns' records too.
async fn assert_each_record_once(
    world: &World,
    tenant: TenantId,
    id: CampaignId,
    records: &[FakeRecord],
) {
    let ledger = store::ledger(&world.db.pool, tenant, id)
        .await
        .expect("ledger");
    let by_profile: HashMap<&str, Vec<&FakeRecord>> =
        records.iter().fold(HashMap::new(), |mut map, r| {
            map.entry(r.profile_id.as_str()).or_default().push(r);
            map
        });
    for entry in &ledger {
        let profile = entry.profile_id.to_string();
        let found = by_profile
            .get(profile.as_str())
            .map_or(&[][..], Vec::as_slice);
        assert_eq!(
            found.len(),
            1,
            "profile {profile} has {} records in the fake",
            found.len()
        );
        let record = found[0];
        assert_eq!(
            (record.table_no, record.position),
            (entry.table_no, i64::from(entry.position)),
            "profile {profile} is in its table at its position"
        );
        assert_eq!(
            entry.airtable_record_id.as_deref(),
            Some(&*record.record_id)
        );
        assert!(entry.synced_at.is_some());
    }
}

/// Positions per table among the records of `profiles` (a campaign's profile ids).
fn positions_by_table(
    records: &[FakeRecord],
    profiles: &HashSet<String>,
) -> BTreeMap<u32, Vec<i64>> {
    let mut tables: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for r in records.iter().filter(|r| profiles.contains(&r.profile_id)) {
        tables.entry(r.table_no).or_default().push(r.position);
    }
    for positions in tables.values_mut() {
        positions.sort_unstable();
    }
    tables
}

async fn campaign_profiles(world: &World, tenant: TenantId, id: CampaignId) -> HashSet<String> {
    store::ledger(&world.db.pool, tenant, id)
        .await
        .expect("ledger")
        .into_iter()
        .map(|e| e.profile_id.to_string())
        .collect()
}

/// The seed's day: 15,000 profiles, 14,400 of them to 80 tables × 180 by two worker processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_day_lands_in_eighty_tables_of_one_hundred_eighty() {
    let started = Instant::now();
    let world = World::start(fast_fake()).await;
    let tenant = world.tenant("full-day").await;
    world.import(tenant, "p", 15_000).await;
    let workers = [
        WorkerProcess::spawn(&world.worker()).unwrap(),
        WorkerProcess::spawn(&world.worker()).unwrap(),
    ];
    let sync_from = Instant::now();
    let id = world
        .start_day(tenant, "2026-03-02", Shape::new(14_400, 80, 180).unwrap())
        .await;
    let campaign = world.wait_for_end(tenant, id, DEADLINE).await;
    let took = sync_from.elapsed();
    assert_eq!(campaign.stage, Stage::Complete, "{:?}", campaign.error);
    assert_eq!(campaign.counts.selected, 14_400);
    assert_eq!(campaign.counts.synced, 14_400);
    assert_eq!(campaign.counts.batches_done, 1_440);
    assert_eq!(world.unused(tenant).await, 600);

    let records = world.records(80);
    assert_eq!(records.len(), 14_400);
    let distinct: HashSet<&str> = records.iter().map(|r| r.profile_id.as_str()).collect();
    assert_eq!(distinct.len(), 14_400, "every profile in one table only");
    let all = campaign_profiles(&world, tenant, id).await;
    let tables = positions_by_table(&records, &all);
    assert_eq!(tables.len(), 80);
    for (table_no, positions) in &tables {
        assert_eq!(
            positions,
            &(1..=180).collect::<Vec<i64>>(),
            "table {table_no}: positions 1..180"
        );
    }
    assert_each_record_once(&world, tenant, id, &records).await;

    let stats = world.fake.state().stats();
    eprintln!(
        "full day: 14,400 records in {took:?} from start to complete ({} requests, {} answered \
         429, busiest second {:?} requests); test took {:?}",
        stats.totals.requests,
        stats.totals.rate_limited,
        stats.max_observed_rps_per_base.get(BASE),
        started.elapsed()
    );
    drop(workers);
}

/// The fake answers 429s and 5xx in bursts (and now and then at random) while the day syncs:
/// the campaign still completes and no record is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_429s_and_server_errors_do_not_stop_the_day_or_duplicate_records() {
    let started = Instant::now();
    let world = World::start(AirtableFakeConfig {
        fail_plan: FailPlan {
            base: Some(BASE.to_owned()),
            rate_limit_burst: 5,
            server_error_burst: 5,
            server_error_status: 503,
            rate_limit_probability: 0.02,
            server_error_probability: 0.03,
        },
        ..fast_fake()
    })
    .await;
    let tenant = world.tenant("bursts").await;
    world.import(tenant, "p", 3_000).await;
    let _workers = [
        WorkerProcess::spawn(&world.worker()).unwrap(),
        WorkerProcess::spawn(&world.worker()).unwrap(),
    ];
    let id = world
        .start_day(tenant, "2026-03-02", Shape::new(3_000, 20, 150).unwrap())
        .await;

    // A fresh burst of each kind every half second while the sync runs.
    let mut bursts = 1;
    loop {
        let campaign = world.campaign(tenant, id).await;
        if matches!(campaign.stage, Stage::Complete | Stage::Failed) || bursts >= 6 {
            break;
        }
        if campaign.stage == Stage::Syncing
            && world.fake.state().fail_plans()[0].server_error_burst == 0
        {
            let plan = FailPlan {
                base: Some(BASE.to_owned()),
                rate_limit_burst: 3,
                server_error_burst: 4,
                server_error_status: if bursts % 2 == 0 { 500 } else { 503 },
                rate_limit_probability: 0.02,
                server_error_probability: 0.03,
            };
            world.fake.state().set_fail_plan(plan).unwrap();
            bursts += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let campaign = world.wait_for_end(tenant, id, DEADLINE).await;
    assert_eq!(campaign.stage, Stage::Complete, "{:?}", campaign.error);
    assert_eq!(campaign.counts.synced, 3_000);

    let records = world.records(20);
    assert_eq!(records.len(), 3_000, "none missing, none twice");
    let distinct: HashSet<&str> = records.iter().map(|r| r.profile_id.as_str()).collect();
    assert_eq!(distinct.len(), 3_000);
    assert_each_record_once(&world, tenant, id, &records).await;
    let batches = store::batches(&world.db.pool, tenant, id).await.unwrap();
    assert!(batches.iter().all(|(_, s, _)| *s == BatchStatus::Synced));

    let stats = world.fake.state().stats();
    eprintln!(
        "bursts: {bursts} burst plans; {} requests, {} injected faults, {} answered 429, {} \
         answered 5xx; took {:?}",
        stats.totals.requests,
        stats.totals.injected,
        stats.totals.rate_limited,
        stats.totals.errors_5xx,
        started.elapsed()
    );
    assert!(stats.totals.rate_limited >= 5, "the 429 bursts were served");
    assert!(stats.totals.errors_5xx >= 5, "the 5xx bursts were served");
}

/// One of two workers is killed with SIGKILL while the day syncs, and started again: every
/// record is in the fake once, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_sync_leaves_no_record_missing_or_twice() {
    let started = Instant::now();
    let world = World::start(fast_fake()).await;
    let tenant = world.tenant("kill9").await;
    world.import(tenant, "p", 4_000).await;
    let mut cfg = world.worker();
    cfg.lease_ms = 2_000;
    // Slower than the others, so the sync is still running when the victim dies.
    cfg.env
        .retain(|(k, _)| k != "HERALD_AIRTABLE_BASE_RPS" && k != "HERALD_AIRTABLE_TOKEN_RPS");
    cfg.env
        .push(("HERALD_AIRTABLE_BASE_RPS".into(), "100".into()));
    cfg.env
        .push(("HERALD_AIRTABLE_TOKEN_RPS".into(), "200".into()));
    let mut victim = WorkerProcess::spawn(&cfg).unwrap();
    let survivor = WorkerProcess::spawn(&cfg).unwrap();
    let id = world
        .start_day(tenant, "2026-03-02", Shape::new(4_000, 20, 200).unwrap())
        .await;

    wait_until("a quarter of the batches synced", DEADLINE, || async {
        let c = world.campaign(tenant, id).await;
        c.stage == Stage::Syncing && c.counts.batches_done >= 100
    })
    .await;
    victim.kill9();
    let at_kill = world.campaign(tenant, id).await.counts.batches_done;
    let restarted = WorkerProcess::spawn(&cfg).unwrap();

    let campaign = world.wait_for_end(tenant, id, DEADLINE).await;
    assert_eq!(campaign.stage, Stage::Complete, "{:?}", campaign.error);
    assert_eq!(campaign.counts.synced, 4_000);
    let records = world.records(20);
    assert_eq!(records.len(), 4_000, "none missing, none twice");
    let distinct: HashSet<&str> = records.iter().map(|r| r.profile_id.as_str()).collect();
    assert_eq!(distinct.len(), 4_000);
    assert_each_record_once(&world, tenant, id, &records).await;
    let all = campaign_profiles(&world, tenant, id).await;
    for (table_no, positions) in positions_by_table(&records, &all) {
        assert_eq!(
            positions,
            (1..=200).collect::<Vec<i64>>(),
            "table {table_no}"
        );
    }
    eprintln!(
        "kill9 during sync: victim killed at {at_kill}/400 batches; {} requests to the fake; \
         took {:?}",
        world.fake.state().stats().totals.requests,
        started.elapsed()
    );
    drop((survivor, restarted));
}

/// Two tenants (one of them with two days) start at once, each day asked for twice: one
/// campaign per (tenant, day), no profile in two campaigns, every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_days_of_two_tenants_start_once_and_share_no_profile() {
    let started = Instant::now();
    let world = World::start(fast_fake()).await;
    let a = world.tenant("tenant-a").await;
    let b = world.tenant("tenant-b").await;
    world.import(a, "a", 2_500).await;
    world.import(b, "b", 1_200).await;
    let _workers = [
        WorkerProcess::spawn(&world.worker()).unwrap(),
        WorkerProcess::spawn(&world.worker()).unwrap(),
    ];
    let shape = Shape::new(1_000, 10, 100).unwrap();
    let days = [(a, "2026-03-02"), (a, "2026-03-03"), (b, "2026-03-02")];
    // Every day asked for twice, all at once.
    let starts = days.iter().chain(days.iter()).map(|(t, d)| {
        let pool = world.db.pool.clone();
        let (t, d) = (*t, date(d));
        tokio::spawn(async move { jobs::start_daily(&pool, t, Some(d), shape).await })
    });
    let mut ids: BTreeMap<(Uuid, NaiveDate), HashSet<CampaignId>> = BTreeMap::new();
    let mut created = 0;
    for start in starts {
        let started = start.await.unwrap().expect("start the day");
        created += usize::from(started.created);
        ids.entry((started.campaign.tenant_id.0, started.campaign.date))
            .or_default()
            .insert(started.campaign.id);
    }
    assert_eq!(created, 3, "one campaign per (tenant, day)");
    assert!(ids.values().all(|set| set.len() == 1));

    let mut seen: HashSet<String> = HashSet::new();
    let records = {
        let mut ended = Vec::new();
        for (t, day) in days {
            let id = *ids[&(t.0, date(day))].iter().next().unwrap();
            let campaign = world.wait_for_end(t, id, DEADLINE).await;
            assert_eq!(campaign.stage, Stage::Complete, "{:?}", campaign.error);
            assert_eq!(campaign.counts.synced, 1_000);
            ended.push((t, id));
        }
        let records = world.records(10);
        for (t, id) in ended {
            assert_each_record_once(&world, t, id, &records).await;
            let profiles = campaign_profiles(&world, t, id).await;
            assert_eq!(profiles.len(), 1_000);
            for p in &profiles {
                assert!(seen.insert(p.clone()), "profile {p} is in two campaigns");
            }
            for (table_no, positions) in positions_by_table(&records, &profiles) {
                assert_eq!(
                    positions,
                    (1..=100).collect::<Vec<i64>>(),
                    "table {table_no}"
                );
            }
        }
        records
    };
    assert_eq!(records.len(), 3_000);
    assert_eq!(world.unused(a).await, 500);
    assert_eq!(world.unused(b).await, 200);
    let campaigns: i64 = sqlx::query_scalar("select count(*) from daily_campaigns")
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
    assert_eq!(campaigns, 3);
    eprintln!("two tenants, three days: took {:?}", started.elapsed());
}

/// A day started on an empty pool fails in `selecting` and marks nothing; profiles arrive and
/// it is resumed, only for the sync to fail on a bad token; with the token fixed (a new worker)
/// a second resume finishes it without redoing the selection or the distribution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_stages_resume_where_they_failed() {
    let started = Instant::now();
    let world = World::start(fast_fake()).await;
    let tenant = world.tenant("resume").await;
    let other = world.tenant("other").await;
    world.import(other, "o", 100).await;
    let mut misconfigured = WorkerProcess::spawn(&world.worker_with_token("patWrong")).unwrap();
    let id = world
        .start_day(tenant, "2026-03-02", Shape::new(300, 3, 100).unwrap())
        .await;

    let campaign = world.wait_for_end(tenant, id, DEADLINE).await;
    assert_eq!(
        (campaign.stage, campaign.failed_stage),
        (Stage::Failed, Some(Stage::Selecting))
    );
    assert_eq!(campaign.error.as_deref(), Some("no unused profiles"));
    assert_eq!(
        world.unused(other).await,
        100,
        "another tenant's pool untouched"
    );

    world.import(tenant, "p", 350).await;
    jobs::resume(&world.db.pool, tenant, id).await.unwrap();
    let campaign = world.wait_for_end(tenant, id, DEADLINE).await;
    assert_eq!(
        (campaign.stage, campaign.failed_stage),
        (Stage::Failed, Some(Stage::Syncing)),
        "the bad token fails the sync"
    );
    assert_eq!(campaign.counts.selected, 300);
    wait_until("every batch to fail", DEADLINE, || async {
        store::batches(&world.db.pool, tenant, id)
            .await
            .is_ok_and(|b| b.len() == 30 && b.iter().all(|(_, s, _)| *s == BatchStatus::Failed))
    })
    .await;
    assert!(world.records(3).is_empty());
    misconfigured.sigterm();
    misconfigured.wait_exit(DEADLINE).await;

    let placed = store::placements(&world.db.pool, tenant, id).await.unwrap();
    let _worker = WorkerProcess::spawn(&world.worker()).unwrap();
    jobs::resume(&world.db.pool, tenant, id).await.unwrap();
    let campaign = world.wait_for_end(tenant, id, DEADLINE).await;
    assert_eq!(campaign.stage, Stage::Complete, "{:?}", campaign.error);
    assert_eq!(campaign.counts.synced, 300);
    assert_eq!(campaign.counts.batches_done, 30);
    assert_eq!(
        store::placements(&world.db.pool, tenant, id).await.unwrap(),
        placed,
        "the resume redid neither selection nor distribution"
    );
    assert_eq!(world.unused(tenant).await, 50);
    let records = world.records(3);
    assert_eq!(records.len(), 300);
    assert_each_record_once(&world, tenant, id, &records).await;
    eprintln!("resume: took {:?}", started.elapsed());
}
