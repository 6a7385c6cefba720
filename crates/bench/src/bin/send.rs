//! `herald-bench-send`: WhatsApp template campaigns' send rate, for `make bench-send`.
//!
//! Two runs, each with a campaign of `--recipients` (default 10,000) sent by real
//! `herald-worker` processes (found next to this binary: outbox relay, Redis queues, the
//! `whatsapp_send` job and its fleet-wide limiter) to the Meta Cloud API fake in this process,
//! which stands for a number at the 1,000 msg/s tier (`--fake-mps`):
//!
//! 1. **paced**: the campaign configured at `--rate` (default 50 msg/s) with `--workers`
//!    processes; the achieved rate and its error against the configured one (target ±5 %);
//! 2. **fast**: the campaign configured at `--fast-rate` (default 1,000 msg/s) with
//!    `--fast-workers` processes (default 2); the achieved rate (goal ≥ 950 msg/s) and how often
//!    the fake answered with a throttling error (130429, 131056, HTTP 429).
//!
//! The achieved rate is measured at the fake, from the first message it accepted to the last:
//! `(messages − 1) ÷ (last − first)`. Each run also checks that every recipient was messaged
//! exactly once and that Postgres records every send.
//!
//! Everything happens in a database of the bench's own (`herald_bench_send_<random>`: created,
//! migrated, dropped) and a Redis namespace of its own (deleted at the end). Output: a table,
//! then `bench: <name> <value> <unit>` lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use herald_bench::cleanup;
use herald_core::TenantId;
use herald_fakes::meta::{self as fake, MetaFakeConfig, SentMessage};
use herald_store::PgPool;
use herald_store::messages::{self, CampaignStatus, NewRecipient, RecipientRow};
use serde_json::json;
use uuid::Uuid;

const TOKEN: &str = "bench-send-token";

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench-send",
    about = "WhatsApp sends: achieved rate against the configured one, through real herald-worker processes and the Meta fake"
)]
struct Args {
    /// Postgres server; the bench creates and drops a database of its own on it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Recipients of each run's campaign.
    #[arg(long, default_value_t = 10_000)]
    recipients: u32,
    /// The paced run's configured rate, msg/s (1 to 1,000).
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// herald-worker processes for the paced run.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The fast run's configured rate, msg/s (1 to 1,000).
    #[arg(long, default_value_t = 1_000)]
    fast_rate: u32,
    /// herald-worker processes for the fast run.
    #[arg(long, default_value_t = 2)]
    fast_workers: usize,
    /// The campaigns' concurrency (sends in flight at once, 1 to 100).
    #[arg(long, default_value_t = 100)]
    concurrency: u32,
    /// `whatsapp_send` jobs running at once in each worker process (its --concurrency).
    #[arg(long, default_value_t = 50)]
    worker_concurrency: usize,
    /// The fake's throughput per sender number, msg/s: Meta's tier.
    #[arg(long, default_value_t = 1_000)]
    fake_mps: u32,
    /// Skip the paced run.
    #[arg(long)]
    no_paced: bool,
    /// Skip the fast run.
    #[arg(long)]
    no_fast: bool,
    /// The workers' log filter (RUST_LOG; `herald_worker=info` is always added, the bench reads
    /// the start-up line); their logs are in the temporary directory, named
    /// `herald-bench-send-<run>-<n>.log`. `herald_queue=debug` logs every deferral's reason.
    #[arg(long, default_value = "warn")]
    worker_log: String,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// The server URL with the database name replaced by `name`.
fn database_url(server: &str, name: &str) -> anyhow::Result<String> {
    let (scheme, rest) = server
        .split_once("://")
        .context("DATABASE_URL must look like postgres://user@host:port/db")?;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    Ok(format!("{scheme}://{authority}/{name}"))
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

/// A `herald-worker` process; killed on drop.
struct Worker {
    child: Child,
    log: PathBuf,
    /// Where it serves `/metrics` (from its "started" log line).
    metrics: Option<std::net::SocketAddr>,
}

impl Worker {
    /// `name{queue="whatsapp_send"}` from the worker's `/metrics` page (0 if unreadable).
    fn metric(&self, name: &str) -> f64 {
        use std::io::{Read as _, Write as _};
        let Some(addr) = self.metrics else {
            return 0.0;
        };
        let page = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut page = String::new();
            s.read_to_string(&mut page)?;
            Ok(page)
        })()
        .unwrap_or_default();
        let prefix = format!("{name}{{queue=\"whatsapp_send\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// The metrics address in a worker's JSON "started" line.
fn started_metrics_addr(log: &str) -> Option<Option<std::net::SocketAddr>> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["fields"]["message"] == "herald-worker started").then(|| {
            v["fields"]["metrics_addr"]
                .as_str()
                .and_then(|a| a.parse().ok())
        })
    })
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the workers of one run are started.
struct Fleet<'a> {
    binary: &'a Path,
    database_url: &'a str,
    redis: &'a str,
    namespace: &'a str,
    api_url: String,
    concurrency: usize,
    log_filter: &'a str,
}

impl Fleet<'_> {
    /// Starts `n` workers serving `whatsapp_send` (with the relay) and waits until each has
    /// logged that it started.
    fn start(&self, label: &str, n: usize) -> anyhow::Result<Vec<Worker>> {
        let mut workers = Vec::new();
        for i in 0..n {
            let log = std::env::temp_dir().join(format!("herald-bench-send-{label}-{i}.log"));
            let out = std::fs::File::create(&log)?;
            let child = Command::new(self.binary)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("DATABASE_URL", self.database_url)
                .env("REDIS_URL", self.redis)
                .env("HERALD_NAMESPACE", self.namespace)
                .env("WHATSAPP_API_URL", &self.api_url)
                .env(
                    "RUST_LOG",
                    format!("{},herald_worker=info", self.log_filter),
                )
                .args(["--queues", "whatsapp_send", "--json-logs"])
                .args(["--concurrency", &self.concurrency.to_string()])
                .args(["--pg-pool-size", "10"])
                .args(["--metrics-addr", "127.0.0.1:0", "--no-reconciler"])
                .stdout(Stdio::from(out.try_clone()?))
                .stderr(Stdio::from(out))
                .spawn()
                .with_context(|| format!("starting {}", self.binary.display()))?;
            workers.push(Worker {
                child,
                log,
                metrics: None,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for worker in &mut workers {
            loop {
                let text = std::fs::read_to_string(&worker.log).unwrap_or_default();
                if let Some(addr) = started_metrics_addr(&text) {
                    worker.metrics = addr;
                    break;
                }
                if let Some(status) = worker.child.try_wait()? {
                    bail!(
                        "herald-worker exited at start-up ({status}); log {}:\n{text}",
                        worker.log.display()
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "herald-worker did not start within 60 s; log {}",
                        worker.log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(workers)
    }
}

/// A tenant with WhatsApp configured (the workers' `WHATSAPP_API_URL`) and a draft campaign of
/// `n` recipients of a one-parameter template.
async fn draft_campaign(
    pool: &PgPool,
    label: &str,
    n: u32,
) -> anyhow::Result<(TenantId, Uuid, String)> {
    let tenant = herald_store::tenants::create(pool, &format!("bench-send-{label}"), "UTC")
        .await?
        .0
        .id;
    let number = match label {
        "paced" => "106540352241",
        _ => "106540352242",
    }
    .to_owned();
    messages::put_settings(
        pool,
        tenant,
        &messages::WhatsAppSettings {
            api_url: None,
            token: TOKEN.into(),
            phone_number_id: number.clone(),
            app_secret: "bench-send-app-secret".into(),
            verify_token: "bench-send-verify".into(),
        },
    )
    .await?;
    let template = messages::create_template(
        pool,
        tenant,
        "bench_update",
        "en_US",
        &json!([{"type": "BODY", "text": "Hello {{1}}, your order ships today"}]),
    )
    .await?;
    let rows = (0..n)
        .map(|i| RecipientRow {
            line: u64::from(i) + 2,
            recipient: Ok(NewRecipient {
                country_code: "1".into(),
                phone: format!("1555{:07}", i),
                params: vec![format!("Ann {i}")],
            }),
        })
        .collect();
    let (campaign, report) =
        messages::create_campaign(pool, tenant, &format!("bench {label}"), &template, rows).await?;
    ensure!(
        report.accepted == u64::from(n),
        "the campaign took {} of {n} recipients",
        report.accepted
    );
    Ok((tenant, campaign.id, number))
}

/// What one run measured.
struct RunFigures {
    /// The paced run (target ±5 %), else the fast one (goal ≥ 95 %).
    paced: bool,
    configured: u32,
    workers: usize,
    messages: usize,
    /// From the first message the fake accepted to the last.
    span: Duration,
    /// From `POST …/send` (the library call behind it) to the first message at the fake.
    first_after: Duration,
    achieved: f64,
    busiest_second: usize,
    longest_pause: Duration,
    throttled: u64,
    requests: u64,
    duplicates: usize,
    /// Send step runs (fetches) and deferrals across the run's workers.
    runs: f64,
    deferrals: f64,
    sent_in_postgres: i64,
    unknown: i64,
    failed: i64,
}

impl RunFigures {
    fn error_percent(&self) -> f64 {
        (self.achieved / f64::from(self.configured) - 1.0) * 100.0
    }
}

/// The most messages in any one-second window, by the fake's clock.
/// The longest time the fake went without a message, between the first and the last.
fn longest_pause(messages: &[SentMessage]) -> Duration {
    let mut at: Vec<u64> = messages.iter().map(|m| m.at_ms).collect();
    at.sort_unstable();
    Duration::from_millis(at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
}

fn busiest_second(messages: &[SentMessage]) -> usize {
    let mut at: Vec<u64> = messages.iter().map(|m| m.at_ms).collect();
    at.sort_unstable();
    let (mut best, mut start) = (0, 0);
    for end in 0..at.len() {
        while at[end] - at[start] >= 1_000 {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

async fn run(
    args: &Args,
    pool: &PgPool,
    fleet: &mut Fleet<'_>,
    label: &str,
    rate: u32,
    workers: usize,
) -> anyhow::Result<RunFigures> {
    ensure!(
        (1..=1_000).contains(&rate),
        "a campaign's rate is 1 to 1,000 msg/s, not {rate}"
    );
    let meta = fake::spawn(MetaFakeConfig {
        per_number_mps: args.fake_mps,
        tokens: vec![TOKEN.into()],
        ..MetaFakeConfig::default()
    })
    .await?;
    // The fake's clock (`at_ms`) starts about now.
    let fake_epoch = Instant::now();
    fleet.api_url = meta.base_url();
    let (tenant, campaign, _number) = draft_campaign(pool, label, args.recipients).await?;
    let running = fleet.start(label, workers)?;
    let n = args.recipients as usize;
    eprintln!(
        "bench-send: {label}: {n} recipients at {rate} msg/s, {workers} herald-worker process(es), the fake at {} msg/s",
        args.fake_mps
    );

    let started = Instant::now();
    herald_jobs::whatsapp::start_sending(pool, tenant, campaign, rate, args.concurrency).await?;
    let limit = Duration::from_secs(args.timeout);
    let mut reported = Instant::now();
    loop {
        let accepted = meta.stats().accepted as usize;
        let mut conn = pool.acquire().await?;
        let status = messages::campaign(&mut conn, tenant, campaign, false)
            .await?
            .status;
        drop(conn);
        if accepted >= n && status == CampaignStatus::Completed {
            break;
        }
        if started.elapsed() > limit {
            bail!(
                "{label}: {accepted} of {n} messages after {limit:?} (campaign {status:?}); worker logs: {}",
                running
                    .iter()
                    .map(|w| w.log.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "bench-send: {label}: {accepted} of {n} sent after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runs: f64 = running
        .iter()
        .map(|w| w.metric("herald_jobs_fetched_total"))
        .sum();
    let deferrals: f64 = running
        .iter()
        .map(|w| w.metric("herald_jobs_deferred_total"))
        .sum();
    drop(running);

    let messages = meta.messages();
    let stats = meta.stats();
    let mut per_recipient: HashMap<&str, usize> = HashMap::new();
    for m in &messages {
        *per_recipient.entry(m.to.as_str()).or_default() += 1;
    }
    let duplicates = per_recipient.values().map(|c| c - 1).sum();
    let first = messages.iter().map(|m| m.at_ms).min().unwrap_or(0);
    let last = messages.iter().map(|m| m.at_ms).max().unwrap_or(0);
    let span = Duration::from_millis(last - first);
    let achieved = if messages.len() > 1 && last > first {
        (messages.len() - 1) as f64 / span.as_secs_f64()
    } else {
        0.0
    };
    let send_at_ms = started.duration_since(fake_epoch).as_millis() as u64;
    let first_after = Duration::from_millis(first.saturating_sub(send_at_ms));
    let counts = messages::stats(pool, tenant, campaign).await?;
    meta.shutdown().await?;
    Ok(RunFigures {
        paced: label == "paced",
        configured: rate,
        workers,
        messages: messages.len(),
        span,
        first_after,
        achieved,
        busiest_second: busiest_second(&messages),
        longest_pause: longest_pause(&messages),
        throttled: stats.throttled(),
        requests: stats.requests,
        duplicates,
        runs,
        deferrals,
        sent_in_postgres: counts.sent + counts.delivered + counts.read,
        unknown: counts.unknown,
        failed: counts.failed,
    })
}

async fn bench(args: &Args, database: &str, namespace: &str) -> anyhow::Result<Vec<RunFigures>> {
    let url = database_url(&args.database_url, database)?;
    herald_store::ensure_database(&url)
        .await
        .with_context(|| format!("creating database {database}"))?;
    let pool = herald_store::connect(&url, 8).await?;
    herald_store::migrate(&pool).await?;
    let binary = worker_binary()?;
    let mut fleet = Fleet {
        binary: &binary,
        database_url: &url,
        redis: &args.redis,
        namespace,
        api_url: String::new(),
        concurrency: args.worker_concurrency,
        log_filter: &args.worker_log,
    };
    let mut figures = Vec::new();
    if !args.no_paced {
        figures.push(run(args, &pool, &mut fleet, "paced", args.rate, args.workers).await?);
    }
    if !args.no_fast {
        figures.push(
            run(
                args,
                &pool,
                &mut fleet,
                "fast",
                args.fast_rate,
                args.fast_workers,
            )
            .await?,
        );
    }
    pool.close().await;
    Ok(figures)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.recipients >= 2, "--recipients must be at least 2");
    ensure!(
        args.workers > 0 && args.fast_workers > 0 && args.worker_concurrency > 0,
        "--workers, --fast-workers and --worker-concurrency must be positive"
    );
    let suffix = Uuid::new_v4().simple().to_string();
    let database = format!("herald_bench_send_{suffix}");
    let namespace = format!("herald-bench-send-{suffix}");

    let result = bench(&args, &database, &namespace).await;

    if let Err(e) = cleanup(&args.redis, &namespace).await {
        eprintln!("bench-send: cleanup of Redis namespace {namespace}: {e:#}");
    }
    if let Err(e) = drop_database(&database_url(&args.database_url, "postgres")?, &database).await {
        eprintln!("bench-send: dropping {database}: {e:#}");
    }
    let figures = result?;

    println!();
    println!(
        "{:<34} {:>10} {:>10} {:>8}   target",
        format!("WhatsApp sends ({} recipients)", args.recipients),
        "configured",
        "achieved",
        "ratio"
    );
    for f in &figures {
        let target = if f.paced {
            format!(
                "±5 %: {:.1} to {:.1}",
                f64::from(f.configured) * 0.95,
                f64::from(f.configured) * 1.05
            )
        } else {
            format!("≥ {:.0}", f64::from(f.configured) * 0.95)
        };
        println!(
            "{:<34} {:>10} {:>10.1} {:>8.3}   {target}",
            format!("{} msg/s, {} worker process(es)", f.configured, f.workers),
            f.configured,
            f.achieved,
            f.achieved / f64::from(f.configured),
        );
    }
    println!();
    for f in &figures {
        println!(
            "at {} msg/s: {} messages over {:.2} s (first after {:.2} s), busiest second {}, longest pause {} ms, {} requests, {} throttled, {} duplicates; {:.1} send step runs and {:.1} deferrals per message; Postgres: {} sent, {} unknown, {} failed",
            f.configured,
            f.messages,
            f.span.as_secs_f64(),
            f.first_after.as_secs_f64(),
            f.busiest_second,
            f.longest_pause.as_millis(),
            f.requests,
            f.throttled,
            f.duplicates,
            f.runs / f.messages.max(1) as f64,
            f.deferrals / f.messages.max(1) as f64,
            f.sent_in_postgres,
            f.unknown,
            f.failed,
        );
    }
    println!();
    for f in &figures {
        if f.paced {
            println!(
                "bench: send_rate_error_{} {:+.2} %",
                f.configured,
                f.error_percent()
            );
        } else {
            println!("bench: send_rate_{} {:.1} msg/s", f.configured, f.achieved);
            println!(
                "bench: send_throttled_{} {} count",
                f.configured, f.throttled
            );
        }
    }
    Ok(())
}
