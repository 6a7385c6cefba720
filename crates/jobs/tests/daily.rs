//! The daily VA assignment end to end without Redis queues: each test gets a fresh migrated
//! database, a real Redis rate limiter under a random namespace and the Airtable fake on a free
//! port; a small driver runs the outbox's jobs through the handlers' `run_*` functions the way
//! the engine would (defer, retry with attempts, dead-letter), until nothing is left.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use herald_admission::{Admission, Connection, RateLimiter};
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_fakes::airtable::{self as fake, AirtableFake, AirtableFakeConfig, FailPlan};
use herald_jobs::Deps;
use herald_jobs::airtable::{Airtable, AirtableSettings};
use herald_jobs::daily::{
    self, AirtableCleanup, DailyCleanup, DailyDistribute, DailySelect, DailySync, table_name,
};
use herald_store::daily::{self as store, BatchStatus, CampaignId, Shape, Stage};
use herald_store::outbox;
use herald_store::profiles::{self, InputRow, NewProfile};
use herald_store::{PgPool, tenants};
use secrecy::SecretString;
use uuid::Uuid;

const BASE: &str = "appDailyTest";
const TOKEN: &str = "patDailyTest";

/// Airtable's behaviour with limits raised above the test's pacing (200 req/s per base).
fn fast() -> AirtableFakeConfig {
    AirtableFakeConfig {
        per_base_rps: 250,
        per_token_rps: 1_000,
        ..AirtableFakeConfig::default()
    }
}

fn date(s: &str) -> NaiveDate {
    s.parse().expect("a valid date")
}

async fn tenant(pool: &PgPool, name: &str) -> TenantId {
    tenants::create(pool, name, "UTC").await.unwrap().0.id
}

/// Imports `n` profiles named `{prefix}_{i}`; the ones in `with_name` get a full name.
async fn import(pool: &PgPool, tenant: TenantId, prefix: &str, n: usize, with_name: &[usize]) {
    let rows = (0..n)
        .map(|i| InputRow {
            line: i as u64 + 1,
            profile: Ok(NewProfile {
                external_id: Some(format!("ext{i}")),
                username: format!("{prefix}_{i}"),
                full_name: with_name.contains(&i).then(|| format!("Name {i}")),
            }),
        })
        .collect();
    let report = profiles::import(pool, tenant, rows).await.unwrap();
    assert_eq!(report.inserted, n as u64);
}

fn deps(pool: &PgPool, airtable: Option<Airtable>) -> Deps {
    Deps {
        pool: pool.clone(),
        http: reqwest::Client::new(),
        allow_probe_abort: false,
        airtable: airtable.map(Arc::new),
        voice: None,
        whatsapp: None,
        sequences: None,
    }
}

async fn limiter() -> RateLimiter {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = Connection::connect(&url).await.expect("redis reachable");
    let namespace = format!("test-{}", Uuid::new_v4().simple());
    RateLimiter::new(conn, &namespace, DailySync::QUEUE).unwrap()
}

async fn airtable_for(fake: &AirtableFake, base_rps: f64, lockout: Duration) -> Airtable {
    let mut settings = AirtableSettings::new(SecretString::from(TOKEN), BASE);
    settings.api_url = fake.base_url();
    settings.base_rps = base_rps;
    settings.token_rps = base_rps * 2.0;
    settings.lockout = lockout;
    Airtable::new(reqwest::Client::new(), &settings, limiter().await).unwrap()
}

/// What the driver saw.
#[derive(Debug, Default)]
struct Drained {
    runs: HashMap<String, u32>,
    defers: u32,
    retries: u32,
    dead: Vec<(String, String)>,
}

/// Runs every outbox job (and those they create) through its handler until none is left,
/// as the engine would: a deferral waits for its instant without spending an attempt, a retry
/// spends one, a permanent error or the last failed attempt dead-letters.
async fn drain(deps: &Deps) -> Drained {
    let mut drained = Drained::default();
    let mut waiting: Vec<(u64, outbox::OutboxRow, u32)> = Vec::new();
    for _round in 0..10_000 {
        let mut tx = deps.pool.begin().await.unwrap();
        let rows = outbox::claim_unpublished(&mut tx, 1_000).await.unwrap();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        outbox::mark_published(&mut tx, &ids).await.unwrap();
        tx.commit().await.unwrap();
        for row in rows {
            waiting.push((0, row, 1));
        }
        if waiting.is_empty() {
            return drained;
        }
        waiting.sort_by_key(|(at, row, _)| (*at, row.id));
        let (at, row, attempt) = waiting.remove(0);
        let wait = at.saturating_sub(now_ms());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let last_attempt = attempt >= row.max_attempts.unwrap_or(5);
        *drained.runs.entry(row.queue.to_string()).or_default() += 1;
        let result = run(deps, &row, last_attempt).await;
        match result {
            Ok(()) => {
                outbox::mark_completed(&deps.pool, row.tenant_id, row.id)
                    .await
                    .unwrap();
            }
            Err(JobError::Defer { until_ms, .. }) => {
                drained.defers += 1;
                waiting.push((until_ms, row, attempt));
            }
            Err(JobError::Retry { reason, .. }) if !last_attempt => {
                drained.retries += 1;
                let _ = reason;
                waiting.push((now_ms() + 5, row, attempt + 1));
            }
            Err(e) => {
                outbox::mark_dead(&deps.pool, row.tenant_id, row.id, &e.to_string())
                    .await
                    .unwrap();
                drained.dead.push((row.queue.to_string(), e.to_string()));
            }
        }
    }
    panic!("the outbox did not drain");
}

async fn run(deps: &Deps, row: &outbox::OutboxRow, last_attempt: bool) -> Result<(), JobError> {
    let tenant = row.tenant_id;
    let payload = row.payload.clone();
    let parse = |e: serde_json::Error| JobError::permanent(e.to_string());
    match row.queue.as_str() {
        DailySelect::QUEUE => {
            daily::run_select(
                deps,
                tenant,
                &serde_json::from_value(payload).map_err(parse)?,
            )
            .await
        }
        DailyDistribute::QUEUE => {
            let job = serde_json::from_value(payload).map_err(parse)?;
            daily::run_distribute(deps, tenant, &job).await
        }
        DailySync::QUEUE => {
            let job = serde_json::from_value(payload).map_err(parse)?;
            daily::run_sync(deps, tenant, &job, last_attempt).await
        }
        DailyCleanup::QUEUE => {
            let job = serde_json::from_value(payload).map_err(parse)?;
            daily::run_cleanup(deps, tenant, &job).await.map(|_| ())
        }
        AirtableCleanup::QUEUE => {
            let job = serde_json::from_value(payload).map_err(parse)?;
            daily::run_airtable_cleanup(deps, tenant, &job).await
        }
        other => panic!("unexpected queue {other}"),
    }
}

async fn outbox_count(pool: &PgPool, queue: &str) -> i64 {
    sqlx::query_scalar("select count(*) from outbox where queue = $1")
        .bind(queue)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn unused(pool: &PgPool, tenant: TenantId) -> i64 {
    profiles::unused_count(pool, tenant).await.unwrap()
}

/// Every record in the fake's daily tables, as (table, profile_id, position).
fn fake_records(fake: &AirtableFake, tables: u32) -> Vec<(u32, String, i64)> {
    let mut all = Vec::new();
    for t in 1..=tables {
        for record in fake.state().records(BASE, &table_name(t)) {
            all.push((
                t,
                record.fields["profile_id"].as_str().unwrap().to_owned(),
                record.fields["position"].as_i64().unwrap(),
            ));
        }
    }
    all
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn csv_import_inserts_good_rows_and_reports_bad_ones(pool: PgPool) {
    let t = tenant(&pool, "acme").await;
    let csv = "username,full_name,external_id\n\
               alice,Alice,1\n\
               @Bob,Bob,2\n\
               ,No Name,3\n\
               alice,Alice again,4\n\
               bad name!,x,5\n\
               carol,Carol\n\
               dave,Dave,6\n";
    let rows = profiles::parse_csv(csv.as_bytes()).unwrap();
    let report = profiles::import(&pool, t, rows).await.unwrap();
    assert_eq!(report.inserted, 3);
    assert_eq!(report.duplicates, 1);
    assert_eq!(report.duplicate_rows[0].line, 5);
    let rejected: Vec<u64> = report.rejected_rows.iter().map(|r| r.line).collect();
    assert_eq!(rejected, vec![4, 6, 7]);

    // Importing again: everything valid is a duplicate now, nothing is inserted twice.
    let again = profiles::import(
        &pool,
        t,
        profiles::parse_csv(b"username\nALICE\nerin\n").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((again.inserted, again.duplicates), (1, 1));
    let stats = profiles::stats(&pool, t).await.unwrap();
    assert_eq!((stats.total, stats.unused), (4, 4));

    // Not CSV at all: refused whole, nothing stored.
    assert!(profiles::parse_csv(b"\x00\x01binary").is_err());
    // Another tenant sees none of it.
    let other = tenant(&pool, "other").await;
    assert_eq!(profiles::stats(&pool, other).await.unwrap().total, 0);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn the_same_date_gives_the_same_campaign(pool: PgPool) {
    let t = tenant(&pool, "acme").await;
    let shape = Shape::new(100, 4, 25).unwrap();
    let first = daily::start_daily(&pool, t, Some(date("2026-03-02")), shape)
        .await
        .unwrap();
    let second = daily::start_daily(
        &pool,
        t,
        Some(date("2026-03-02")),
        Shape::new(10, 1, 10).unwrap(),
    )
    .await
    .unwrap();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.campaign.id, second.campaign.id);
    assert_eq!(second.campaign.shape, shape);
    assert_eq!(outbox_count(&pool, DailySelect::QUEUE).await, 1);
    let view = store::view(&pool, t, first.campaign.id).await.unwrap();
    assert_eq!(
        (view.status, view.stage, view.progress),
        ("running", Stage::Selecting, 0)
    );
    // Another tenant cannot see it.
    let other = tenant(&pool, "other").await;
    assert!(store::view(&pool, other, first.campaign.id).await.is_err());
    // A day without a date uses today in the tenant's zone.
    let today = daily::start_daily(&pool, t, None, shape).await.unwrap();
    assert_eq!(
        today.campaign.date,
        store::tenant_today(&pool, t).await.unwrap()
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn concurrent_selections_never_share_a_profile(pool: PgPool) {
    let a = tenant(&pool, "a").await;
    let b = tenant(&pool, "b").await;
    import(&pool, a, "a", 300, &[]).await;
    import(&pool, b, "b", 300, &[]).await;
    let shape = Shape::new(100, 4, 25).unwrap();
    let mut campaigns = Vec::new();
    for (t, d) in [
        (a, "2026-03-01"),
        (a, "2026-03-02"),
        (a, "2026-03-03"),
        (b, "2026-03-01"),
    ] {
        let started = daily::start_daily(&pool, t, Some(date(d)), shape)
            .await
            .unwrap();
        campaigns.push((t, started.campaign.id));
    }
    let deps = deps(&pool, None);
    let runs = campaigns.iter().map(|(t, id)| {
        let deps = deps.clone();
        let (t, id) = (*t, *id);
        async move { daily::run_select(&deps, t, &DailySelect { campaign_id: id }).await }
    });
    for result in futures::future::join_all(runs).await {
        result.unwrap();
    }
    let mut seen = HashSet::new();
    for (t, id) in &campaigns {
        let placed = store::placements(&pool, *t, *id).await.unwrap();
        assert_eq!(placed.len(), 100);
        for p in placed {
            assert!(seen.insert(p.profile_id), "a profile was selected twice");
        }
    }
    assert_eq!(unused(&pool, a).await, 0);
    assert_eq!(unused(&pool, b).await, 200);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_short_pool_records_the_shortfall_and_spreads_evenly(pool: PgPool) {
    let t = tenant(&pool, "acme").await;
    import(&pool, t, "p", 70, &[]).await;
    let shape = Shape::new(100, 4, 25).unwrap();
    let id = daily::start_daily(&pool, t, Some(date("2026-03-02")), shape)
        .await
        .unwrap()
        .campaign
        .id;
    let deps = deps(&pool, None);
    daily::run_select(&deps, t, &DailySelect { campaign_id: id })
        .await
        .unwrap();
    let campaign = store::get(&pool, t, id).await.unwrap();
    assert_eq!(campaign.stage, Stage::Distributing);
    assert_eq!(
        (campaign.counts.selected, campaign.counts.shortfall),
        (70, 30)
    );

    let job = DailyDistribute { campaign_id: id };
    daily::run_distribute(&deps, t, &job).await.unwrap();
    let placed = store::placements(&pool, t, id).await.unwrap();
    let mut per_table: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in &placed {
        per_table.entry(p.table_no).or_default().push(p.position);
    }
    // 70 over 4 tables: 18, 18, 17, 17, positions from 1 without gaps.
    let sizes: Vec<usize> = per_table.values().map(Vec::len).collect();
    assert_eq!(sizes, vec![18, 18, 17, 17]);
    for positions in per_table.values() {
        let expected: Vec<u32> = (1..=positions.len() as u32).collect();
        assert_eq!(positions, &expected);
    }
    // Batches of at most 10: 2 per table.
    assert_eq!(outbox_count(&pool, DailySync::QUEUE).await, 8);

    // Running it again changes nothing.
    daily::run_distribute(&deps, t, &job).await.unwrap();
    assert_eq!(store::placements(&pool, t, id).await.unwrap(), placed);
    assert_eq!(outbox_count(&pool, DailySync::QUEUE).await, 8);
    // And so does the select job.
    daily::run_select(&deps, t, &DailySelect { campaign_id: id })
        .await
        .unwrap();
    assert_eq!(outbox_count(&pool, DailyDistribute::QUEUE).await, 1);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_empty_pool_fails_the_campaign_and_resume_continues(pool: PgPool) {
    let t = tenant(&pool, "acme").await;
    let other = tenant(&pool, "other").await;
    import(&pool, other, "o", 50, &[]).await;
    let id = daily::start_daily(
        &pool,
        t,
        Some(date("2026-03-02")),
        Shape::new(20, 2, 10).unwrap(),
    )
    .await
    .unwrap()
    .campaign
    .id;
    let deps = deps(&pool, None);
    daily::run_select(&deps, t, &DailySelect { campaign_id: id })
        .await
        .unwrap();
    let view = store::view(&pool, t, id).await.unwrap();
    assert_eq!(view.status, "failed");
    assert_eq!(view.failed_stage, Some(Stage::Selecting));
    assert_eq!(view.error.as_deref(), Some("no unused profiles"));
    assert_eq!(
        unused(&pool, other).await,
        50,
        "another tenant's pool untouched"
    );
    assert_eq!(outbox_count(&pool, DailyDistribute::QUEUE).await, 0);

    // Profiles arrive; the campaign resumes from selecting.
    import(&pool, t, "p", 20, &[]).await;
    let resumed = daily::resume(&pool, t, id).await.unwrap();
    assert_eq!(resumed.stage, Stage::Selecting);
    assert!(
        daily::resume(&pool, t, id).await.is_err(),
        "only failed campaigns resume"
    );
    let drained = drain(&deps).await;
    assert_eq!(drained.runs[DailySelect::QUEUE], 2);
    let campaign = store::get(&pool, t, id).await.unwrap();
    assert_eq!(campaign.counts.selected, 20);
    // Without Airtable configured the sync jobs cannot finish: they retry, then the batch and
    // the campaign fail in syncing.
    assert_eq!(campaign.stage, Stage::Failed);
    assert_eq!(campaign.failed_stage, Some(Stage::Syncing));
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_campaign_syncs_every_record_once_and_completes_once(pool: PgPool) {
    let fake = fake::spawn(fast()).await.unwrap();
    let t = tenant(&pool, "acme").await;
    import(&pool, t, "p", 130, &[1, 2, 3]).await;
    let airtable = airtable_for(&fake, 200.0, Duration::from_millis(300)).await;
    let deps = deps(&pool, Some(airtable));
    let id = daily::start_daily(
        &pool,
        t,
        Some(date("2026-03-02")),
        Shape::new(120, 4, 30).unwrap(),
    )
    .await
    .unwrap()
    .campaign
    .id;
    let drained = drain(&deps).await;
    assert!(drained.dead.is_empty(), "{:?}", drained.dead);
    assert_eq!(drained.runs[DailySync::QUEUE], 12 + drained.defers);

    let view = store::view(&pool, t, id).await.unwrap();
    assert_eq!((view.status, view.progress), ("complete", 100));
    assert_eq!(view.counts.synced, 120);
    assert_eq!(view.counts.batches_done, 12);
    assert_eq!(unused(&pool, t).await, 10);

    let records = fake_records(&fake, 4);
    assert_eq!(records.len(), 120);
    let distinct: HashSet<&String> = records.iter().map(|(_, p, _)| p).collect();
    assert_eq!(distinct.len(), 120);
    for table in 1..=4 {
        let mut positions: Vec<i64> = records
            .iter()
            .filter(|(t, _, _)| *t == table)
            .map(|(_, _, p)| *p)
            .collect();
        positions.sort_unstable();
        assert_eq!(positions, (1..=30).collect::<Vec<i64>>());
    }
    assert_eq!(fake.state().stats().totals.rate_limited, 0);

    // The ledger holds every record id Airtable gave.
    let ledger = store::ledger(&pool, t, id).await.unwrap();
    let fake_ids: HashSet<String> = (1..=4)
        .flat_map(|n| fake.state().records(BASE, &table_name(n)))
        .map(|r| r.id)
        .collect();
    assert!(ledger.iter().all(|e| e.synced_at.is_some()
        && fake_ids.contains(e.airtable_record_id.as_deref().unwrap_or(""))));

    // Every sync job delivered again (a crash before the ack): nothing changes anywhere.
    let completed_at = store::get(&pool, t, id).await.unwrap().completed_at;
    let requests = fake.state().stats().totals.requests;
    for (batch, _, _) in store::batches(&pool, t, id).await.unwrap() {
        let job = DailySync {
            campaign_id: id,
            table_no: batch.table_no,
            batch_no: batch.batch_no,
        };
        daily::run_sync(&deps, t, &job, false).await.unwrap();
    }
    assert_eq!(fake.state().stats().totals.requests, requests);
    let after = store::get(&pool, t, id).await.unwrap();
    assert_eq!(after.completed_at, completed_at);
    assert_eq!(after.counts.batches_done, 12);
    assert_eq!(fake_records(&fake, 4).len(), 120);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_429_defers_without_an_attempt_and_holds_the_whole_base(pool: PgPool) {
    let fake = fake::spawn(fast()).await.unwrap();
    fake.state()
        .set_fail_plan(FailPlan::rate_limit_burst(BASE, 1))
        .unwrap();
    let t = tenant(&pool, "acme").await;
    import(&pool, t, "p", 40, &[]).await;
    let airtable = airtable_for(&fake, 200.0, Duration::from_millis(400)).await;
    let deps = deps(&pool, Some(airtable.clone()));
    let id = daily::start_daily(
        &pool,
        t,
        Some(date("2026-03-02")),
        Shape::new(40, 2, 20).unwrap(),
    )
    .await
    .unwrap()
    .campaign
    .id;
    daily::run_select(&deps, t, &DailySelect { campaign_id: id })
        .await
        .unwrap();
    daily::run_distribute(&deps, t, &DailyDistribute { campaign_id: id })
        .await
        .unwrap();

    let job = DailySync {
        campaign_id: id,
        table_no: 1,
        batch_no: 1,
    };
    let before = now_ms();
    let err = daily::run_sync(&deps, t, &job, true).await.unwrap_err();
    let JobError::Defer { until_ms, reason } = err else {
        panic!("expected a deferral, got {err:?}");
    };
    assert!(reason.contains("429"), "{reason}");
    assert!(until_ms >= before + 400, "held for the configured lock-out");
    // The whole base is held: another batch is deferred before any request.
    let requests = fake.state().stats().totals.requests;
    let other = DailySync {
        campaign_id: id,
        table_no: 2,
        batch_no: 2,
    };
    match daily::run_sync(&deps, t, &other, false).await {
        Err(JobError::Defer {
            until_ms: other_until,
            ..
        }) => assert!(other_until >= until_ms),
        other => panic!("expected a deferral, got {other:?}"),
    }
    assert_eq!(fake.state().stats().totals.requests, requests);
    assert!(matches!(
        airtable.admit().await.unwrap(),
        Admission::WaitUntil(_)
    ));
    // Even on its "last attempt" the 429 neither failed the batch nor the campaign.
    let (status, _) = store::batch(
        &pool,
        t,
        id,
        herald_store::daily::BatchRef {
            table_no: 1,
            batch_no: 1,
        },
    )
    .await
    .unwrap();
    assert_eq!(status, BatchStatus::Pending);

    // After the hold everything goes through, each record once.
    let drained = drain(&deps).await;
    assert!(drained.dead.is_empty(), "{:?}", drained.dead);
    assert_eq!(
        store::get(&pool, t, id).await.unwrap().stage,
        Stage::Complete
    );
    let records = fake_records(&fake, 2);
    assert_eq!(records.len(), 40);
    assert_eq!(
        records
            .iter()
            .map(|(_, p, _)| p)
            .collect::<HashSet<_>>()
            .len(),
        40
    );
    assert_eq!(fake.state().stats().totals.rate_limited, 1);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn server_errors_are_retried_and_a_422_dead_letters_only_its_batch(pool: PgPool) {
    // The fake knows no `full_name` field: the one batch holding a profile with a full name is
    // refused with 422 UNKNOWN_FIELD_NAME.
    let fake = fake::spawn(AirtableFakeConfig {
        fields: Some(
            ["profile_id", "username", "campaign_date", "status"]
                .map(String::from)
                .to_vec(),
        ),
        numeric_fields: vec!["position".into()],
        fail_plan: FailPlan::server_error_burst(BASE, 2, 503),
        ..fast()
    })
    .await
    .unwrap();
    let t = tenant(&pool, "acme").await;
    import(&pool, t, "p", 60, &[7]).await;
    let deps = deps(
        &pool,
        Some(airtable_for(&fake, 200.0, Duration::from_millis(300)).await),
    );
    let id = daily::start_daily(
        &pool,
        t,
        Some(date("2026-03-02")),
        Shape::new(60, 3, 20).unwrap(),
    )
    .await
    .unwrap()
    .campaign
    .id;
    let drained = drain(&deps).await;
    assert_eq!(drained.retries, 2, "the two 503s were retried");
    assert_eq!(drained.dead.len(), 1, "{:?}", drained.dead);
    assert!(drained.dead[0].1.contains("UNKNOWN_FIELD_NAME"));

    let campaign = store::get(&pool, t, id).await.unwrap();
    assert_eq!(campaign.stage, Stage::Complete);
    assert_eq!(campaign.counts.synced, 50);
    assert_eq!(campaign.counts.rejected, 10);
    let batches = store::batches(&pool, t, id).await.unwrap();
    let rejected: Vec<_> = batches
        .iter()
        .filter(|(_, s, _)| *s == BatchStatus::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1);
    let ledger = store::ledger(&pool, t, id).await.unwrap();
    let refused: Vec<_> = ledger.iter().filter(|e| e.sync_error.is_some()).collect();
    assert_eq!(refused.len(), 10);
    assert!(refused.iter().all(|e| {
        e.airtable_record_id.is_none()
            && e.sync_error
                .as_deref()
                .unwrap_or("")
                .contains("UNKNOWN_FIELD_NAME")
    }));
    assert_eq!(fake_records(&fake, 3).len(), 50);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_sync_that_runs_out_of_attempts_fails_the_campaign_and_resume_finishes_it(pool: PgPool) {
    let fake = fake::spawn(fast()).await.unwrap();
    let t = tenant(&pool, "acme").await;
    import(&pool, t, "p", 30, &[]).await;
    let deps = deps(
        &pool,
        Some(airtable_for(&fake, 200.0, Duration::from_millis(300)).await),
    );
    let id = daily::start_daily(
        &pool,
        t,
        Some(date("2026-03-02")),
        Shape::new(30, 3, 10).unwrap(),
    )
    .await
    .unwrap()
    .campaign
    .id;
    daily::run_select(&deps, t, &DailySelect { campaign_id: id })
        .await
        .unwrap();
    daily::run_distribute(&deps, t, &DailyDistribute { campaign_id: id })
        .await
        .unwrap();
    // Table 2's batch meets a 503 on its last attempt.
    fake.state()
        .set_fail_plan(FailPlan::server_error_burst(BASE, 1, 503))
        .unwrap();
    let job = DailySync {
        campaign_id: id,
        table_no: 2,
        batch_no: 1,
    };
    assert!(matches!(
        daily::run_sync(&deps, t, &job, true).await,
        Err(JobError::Retry { .. })
    ));
    let view = store::view(&pool, t, id).await.unwrap();
    assert_eq!(
        (view.status, view.failed_stage),
        ("failed", Some(Stage::Syncing))
    );
    // The engine dead-letters the job after that attempt; the other batches still finish and
    // the campaign stays failed.
    sqlx::query(
        "update outbox set dead_at = now()
         where queue = $1 and payload->>'table_no' = '2' and payload->>'batch_no' = '1'",
    )
    .bind(DailySync::QUEUE)
    .execute(&pool)
    .await
    .unwrap();
    let drained = drain(&deps).await;
    // Two batches ran to the end; a run the limiter deferred to its reserved slot is not one.
    assert_eq!(drained.runs[DailySync::QUEUE] - drained.defers, 2);
    let campaign = store::get(&pool, t, id).await.unwrap();
    assert_eq!(campaign.stage, Stage::Failed);
    assert_eq!(campaign.counts.batches_done, 2);
    assert_eq!(fake_records(&fake, 3).len(), 20);

    // Resume re-runs only the failed batch; selection and distribution stay as they were.
    let placed = store::placements(&pool, t, id).await.unwrap();
    let resumed = daily::resume(&pool, t, id).await.unwrap();
    assert_eq!(resumed.stage, Stage::Syncing);
    let drained = drain(&deps).await;
    assert_eq!(drained.runs[DailySync::QUEUE] - drained.defers, 1);
    assert!(!drained.runs.contains_key(DailySelect::QUEUE));
    let campaign = store::get(&pool, t, id).await.unwrap();
    assert_eq!(campaign.stage, Stage::Complete);
    assert_eq!(campaign.counts.batches_done, 3);
    assert_eq!(store::placements(&pool, t, id).await.unwrap(), placed);
    assert_eq!(fake_records(&fake, 3).len(), 30);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn cleanup_keeps_a_rolling_seven_day_window(pool: PgPool) {
    let fake = fake::spawn(fast()).await.unwrap();
    let t = tenant(&pool, "acme").await;
    import(&pool, t, "p", 60, &[]).await;
    let deps = deps(
        &pool,
        Some(airtable_for(&fake, 200.0, Duration::from_millis(300)).await),
    );
    let today = date("2026-03-10");
    let mut ids: HashMap<&str, CampaignId> = HashMap::new();
    for d in ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"] {
        let id = daily::start_daily(&pool, t, Some(date(d)), Shape::new(15, 2, 10).unwrap())
            .await
            .unwrap()
            .campaign
            .id;
        ids.insert(d, id);
        drain(&deps).await;
    }
    assert_eq!(fake_records(&fake, 2).len(), 60);

    let summary = daily::run_cleanup(&deps, t, &DailyCleanup { date: Some(today) })
        .await
        .unwrap();
    // 03-03 is 7 days old: unfollow; 03-01 and 03-02 are 8+: deleted; 03-04 untouched.
    assert_eq!(summary.unfollowed, 15);
    assert_eq!(summary.deleted, 30);
    drain(&deps).await;

    let remaining = fake_records(&fake, 2);
    assert_eq!(remaining.len(), 30);
    let statuses: BTreeMap<String, String> = (1..=2)
        .flat_map(|n| fake.state().records(BASE, &table_name(n)))
        .map(|r| {
            (
                r.fields["campaign_date"].as_str().unwrap().to_owned(),
                r.fields["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(statuses["2026-03-03"], "unfollow");
    assert_eq!(statuses["2026-03-04"], "assigned");
    assert!(!statuses.contains_key("2026-03-01"));
    for (d, expected) in [
        ("2026-03-01", 0),
        ("2026-03-02", 0),
        ("2026-03-03", 15),
        ("2026-03-04", 15),
    ] {
        assert_eq!(
            store::ledger(&pool, t, ids[d]).await.unwrap().len(),
            expected,
            "{d}"
        );
    }
    assert!(
        store::ledger(&pool, t, ids["2026-03-03"])
            .await
            .unwrap()
            .iter()
            .all(|e| e.status == "unfollow")
    );
    // Profiles stay used; a second run the same day changes nothing.
    assert_eq!(unused(&pool, t).await, 0);
    let again = daily::run_cleanup(&deps, t, &DailyCleanup { date: Some(today) })
        .await
        .unwrap();
    assert_eq!(
        (again.unfollowed, again.deleted, again.airtable_jobs),
        (0, 0, 0)
    );
}
