//! `herald-bench-assign`: the daily VA assignment's figures, for `make bench-assign`.
//!
//! 1. **select + distribute**: a pool of `--pool` profiles (default 1,000,000, seeded with one
//!    `insert … select generate_series`), then the select and distribute handlers' `run_*`
//!    functions called directly for a campaign of `--target` (default 14,400 over 80 × 180),
//!    each timed; target < 2 s together.
//! 2. **sync**: `--sync-records` (default 1,440 = 144 requests) synced by `--workers`
//!    `herald-worker` processes (found next to this binary) against the Airtable fake in this
//!    process with Airtable's real limits (5 req/s per base, 50 per token, 30 s lock-out after a
//!    429) and herald's default pacing; timed from the campaign entering `syncing` to complete.
//!    The floor is requests ÷ 5 req/s (28.8 s); target ≤ 1.05 × floor with no 429.
//!
//! Each part uses a database of its own (`herald_bench_assign_*`, created, then dropped) and a
//! Redis namespace of its own (deleted at the end), so it never touches the demo's data. Output:
//! a small table, then `bench: <name> <value> <unit>` lines.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::NaiveDate;
use clap::Parser;
use herald_bench::cleanup;
use herald_core::TenantId;
use herald_fakes::airtable::{self as fake, AirtableFakeConfig};
use herald_jobs::Deps;
use herald_jobs::daily::{self as jobs, DailyDistribute, DailySelect};
use herald_store::PgPool;
use herald_store::daily::{self as store, Shape, Stage};

const BASE: &str = "appHeraldBench";
const TOKEN: &str = "patHeraldBench";
/// Airtable's documented limit per base.
const AIRTABLE_BASE_RPS: f64 = 5.0;

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench-assign",
    about = "Daily assignment: select + distribute out of a large pool, and a sync at Airtable's real limit"
)]
struct Args {
    /// Postgres server; the bench creates and drops its own databases on it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Profiles in the pool for the select + distribute run.
    #[arg(long, default_value_t = 1_000_000)]
    pool: u32,
    /// Profiles the campaign takes (over 80 tables of 180 positions).
    #[arg(long, default_value_t = 14_400)]
    target: u32,
    /// Records to sync at Airtable's real limit (tables of 180).
    #[arg(long, default_value_t = 1_440)]
    sync_records: u32,
    /// herald-worker processes for the sync.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Skip the select + distribute run.
    #[arg(long)]
    no_select: bool,
    /// Skip the sync run.
    #[arg(long)]
    no_sync: bool,
}

/// The server URL with the database name replaced by `name`.
fn database_url(server: &str, name: &str) -> anyhow::Result<String> {
    let (scheme, rest) = server
        .split_once("://")
        .context("DATABASE_URL must look like postgres://user@host:port/db")?;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    Ok(format!("{scheme}://{authority}/{name}"))
}

/// A database of the bench's own: dropped if left over from an earlier run, created and
/// migrated; dropped again by [`BenchDb::drop_now`].
struct BenchDb {
    admin_url: String,
    name: String,
    url: String,
    pool: PgPool,
}

impl BenchDb {
    async fn create(server: &str, name: &str) -> anyhow::Result<Self> {
        let admin_url = database_url(server, "postgres")?;
        let url = database_url(server, name)?;
        drop_database(&admin_url, name).await?;
        herald_store::ensure_database(&url)
            .await
            .with_context(|| format!("creating database {name}"))?;
        let pool = herald_store::connect(&url, 8).await?;
        herald_store::migrate(&pool).await?;
        Ok(Self {
            admin_url,
            name: name.to_owned(),
            url,
            pool,
        })
    }

    async fn drop_now(self) -> anyhow::Result<()> {
        self.pool.close().await;
        drop_database(&self.admin_url, &self.name).await
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let admin = herald_store::connect(admin_url, 1).await?;
    sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
        .execute(&admin)
        .await
        .with_context(|| format!("dropping database {name}"))?;
    admin.close().await;
    Ok(())
}

async fn tenant(pool: &PgPool, name: &str) -> anyhow::Result<TenantId> {
    Ok(herald_store::tenants::create(pool, name, "UTC").await?.0.id)
}

/// Seeds `n` profiles in one statement.
async fn seed_profiles(pool: &PgPool, tenant: TenantId, n: u32) -> anyhow::Result<()> {
    sqlx::query(
        "insert into profiles (tenant_id, id, external_id, username, full_name)
         select $1, gen_random_uuid(), 'ext' || g, 'bench_' || g, 'Bench Profile ' || g
         from generate_series(1, $2) as g",
    )
    .bind(tenant.0)
    .bind(i64::from(n))
    .execute(pool)
    .await
    .context("seeding profiles")?;
    sqlx::query("analyze profiles").execute(pool).await?;
    Ok(())
}

fn day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, 2).unwrap_or_default()
}

/// The shape of `records` profiles over tables of 180 positions.
fn shape_of(records: u32) -> anyhow::Result<Shape> {
    let tables = records.div_ceil(180).max(1);
    Ok(Shape::new(records, tables, 180)?)
}

struct SelectFigures {
    seed: Duration,
    select: Duration,
    distribute: Duration,
    selected: u32,
}

async fn select_and_distribute(args: &Args) -> anyhow::Result<SelectFigures> {
    let db = BenchDb::create(&args.database_url, "herald_bench_assign_select").await?;
    let figures = async {
        let tenant = tenant(&db.pool, "bench-select").await?;
        let seeded = Instant::now();
        seed_profiles(&db.pool, tenant, args.pool).await?;
        let seed = seeded.elapsed();
        let shape = shape_of(args.target)?;
        let id = jobs::start_daily(&db.pool, tenant, Some(day()), shape)
            .await?
            .campaign
            .id;
        let deps = Deps::new(db.pool.clone(), reqwest::Client::new(), false);
        let started = Instant::now();
        jobs::run_select(&deps, tenant, &DailySelect { campaign_id: id })
            .await
            .map_err(|e| anyhow::anyhow!("select: {e}"))?;
        let select = started.elapsed();
        let started = Instant::now();
        jobs::run_distribute(&deps, tenant, &DailyDistribute { campaign_id: id })
            .await
            .map_err(|e| anyhow::anyhow!("distribute: {e}"))?;
        let distribute = started.elapsed();
        let campaign = store::get(&db.pool, tenant, id).await?;
        if campaign.stage != Stage::Syncing || campaign.counts.distributed != args.target {
            bail!(
                "after distribute the campaign is {} with {} of {} placed",
                campaign.stage,
                campaign.counts.distributed,
                args.target
            );
        }
        Ok(SelectFigures {
            seed,
            select,
            distribute,
            selected: campaign.counts.selected,
        })
    }
    .await;
    db.drop_now().await?;
    figures
}

/// A `herald-worker` process; killed on drop.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("the bench binary has a directory")?
        .join(format!("herald-worker{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        bail!(
            "{} is missing: build it with the bench (`cargo build --release -p herald-bench -p herald-worker`)",
            bin.display()
        );
    }
    Ok(bin)
}

struct SyncFigures {
    requests: u32,
    sync: Duration,
    total: Duration,
    answered_429: u64,
    lockouts: u64,
    fake_requests: u64,
    busiest_second: u32,
}

async fn sync(args: &Args, namespace: &str) -> anyhow::Result<SyncFigures> {
    let db = BenchDb::create(&args.database_url, "herald_bench_assign_sync").await?;
    let figures = async {
        // Airtable's real limits: 5 req/s per base, 50 per token, 30 s lock-out.
        let fake = fake::spawn(AirtableFakeConfig {
            tokens: vec![TOKEN.to_owned()],
            bases: Some(vec![BASE.to_owned()]),
            ..AirtableFakeConfig::default()
        })
        .await?;
        let tenant = tenant(&db.pool, "bench-sync").await?;
        seed_profiles(&db.pool, tenant, args.sync_records).await?;
        let binary = worker_binary()?;
        let mut workers = Vec::new();
        for n in 0..args.workers {
            let log = std::env::temp_dir().join(format!("herald-bench-assign-worker-{n}.log"));
            let out = std::fs::File::create(&log)?;
            let child = Command::new(&binary)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("DATABASE_URL", &db.url)
                .env("REDIS_URL", &args.redis)
                .env("HERALD_NAMESPACE", namespace)
                .env("AIRTABLE_API_URL", fake.base_url())
                .env("AIRTABLE_TOKEN", TOKEN)
                .env("AIRTABLE_BASE_ID", BASE)
                .env("RUST_LOG", "warn")
                .args(["--queues", "daily_select,daily_distribute,daily_sync"])
                .args(["--metrics-addr", "127.0.0.1:0", "--no-reconciler"])
                .stdout(Stdio::from(out.try_clone()?))
                .stderr(Stdio::from(out))
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            workers.push(Worker(child));
        }
        // Let the workers connect before the clock starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (n, worker) in workers.iter_mut().enumerate() {
            if let Some(status) = worker.0.try_wait()? {
                bail!(
                    "herald-worker {n} exited at start-up ({status}); see its log in the temp dir"
                );
            }
        }

        let shape = shape_of(args.sync_records)?;
        let started = Instant::now();
        let id = jobs::start_daily(&db.pool, tenant, Some(day()), shape)
            .await?
            .campaign
            .id;
        let limit = Duration::from_secs(600);
        let mut syncing_from = None;
        let campaign = loop {
            let campaign = store::get(&db.pool, tenant, id).await?;
            match campaign.stage {
                Stage::Syncing if syncing_from.is_none() => syncing_from = Some(Instant::now()),
                Stage::Complete | Stage::Failed => break campaign,
                _ => {}
            }
            if started.elapsed() > limit {
                bail!("the sync did not finish within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let done = Instant::now();
        if campaign.stage != Stage::Complete {
            bail!("the campaign failed: {:?}", campaign.error);
        }
        let stats = fake.state().stats();
        let syncing_from = syncing_from.unwrap_or(started);
        drop(workers);
        Ok(SyncFigures {
            requests: campaign.counts.batches_total,
            sync: done - syncing_from,
            total: done - started,
            answered_429: stats.totals.rate_limited,
            lockouts: stats.totals.lockouts + stats.token_lockouts,
            fake_requests: stats.totals.requests,
            busiest_second: stats
                .max_observed_rps_per_base
                .get(BASE)
                .copied()
                .unwrap_or(0),
        })
    }
    .await;
    db.drop_now().await?;
    figures
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let namespace = format!("herald-bench-assign-{}", uuid::Uuid::new_v4().simple());

    let select = if args.no_select {
        None
    } else {
        eprintln!(
            "bench-assign: seeding {} profiles, then select + distribute of {}",
            args.pool, args.target
        );
        Some(select_and_distribute(&args).await?)
    };
    let synced = if args.no_sync {
        None
    } else {
        eprintln!(
            "bench-assign: syncing {} records at {AIRTABLE_BASE_RPS} req/s per base with {} herald-worker process(es)",
            args.sync_records, args.workers
        );
        let result = sync(&args, &namespace).await;
        if let Err(e) = cleanup(&args.redis, &namespace).await {
            eprintln!("bench-assign: cleanup of Redis namespace {namespace}: {e:#}");
        }
        Some(result?)
    };

    println!();
    if let Some(s) = &select {
        let both = s.select + s.distribute;
        println!("{:<44} {:>10}", "daily assignment", "seconds");
        println!(
            "{:<44} {:>10.2}",
            format!("seed pool of {} profiles", args.pool),
            secs(s.seed)
        );
        println!(
            "{:<44} {:>10.3}",
            format!("select {} (used + assignments)", s.selected),
            secs(s.select)
        );
        println!(
            "{:<44} {:>10.3}",
            "distribute (shuffle, place, 1,440 sync jobs)",
            secs(s.distribute)
        );
        println!(
            "{:<44} {:>10.3}   target < 2 s",
            "select + distribute",
            secs(both)
        );
    }
    if let Some(s) = &synced {
        let floor = f64::from(s.requests) / AIRTABLE_BASE_RPS;
        println!(
            "{:<44} {:>10.2}   floor {floor:.1} s = {} requests at {AIRTABLE_BASE_RPS} req/s",
            format!("sync of {} records", args.sync_records),
            secs(s.sync),
            s.requests
        );
        println!(
            "{:<44} {:>10.2}",
            "start to complete (incl. select, distribute)",
            secs(s.total)
        );
        println!(
            "{:<44} {:>10.3}   target ≤ 1.05",
            "sync ÷ floor",
            secs(s.sync) / floor
        );
        println!(
            "{:<44} {:>10}   ({} requests, {} lock-outs, busiest second {} requests)",
            "answered 429", s.answered_429, s.fake_requests, s.lockouts, s.busiest_second
        );
    }
    println!();
    if let Some(s) = &select {
        println!(
            "bench: select_distribute_{}_of_{} {:.3} s",
            args.target,
            short_count(args.pool),
            secs(s.select + s.distribute)
        );
    }
    if let Some(s) = &synced {
        let floor = f64::from(s.requests) / AIRTABLE_BASE_RPS;
        println!(
            "bench: sync_{}_seconds {:.2} s",
            args.sync_records,
            secs(s.sync)
        );
        println!("bench: sync_vs_floor {:.3} x", secs(s.sync) / floor);
        println!("bench: sync_429s {} count", s.answered_429);
    }
    Ok(())
}

/// `1000000` → `1m`, `15000` → `15k`.
fn short_count(n: u32) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}m", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}
