//! `herald-bench`: the herald side of `make bench-queue`.
//!
//! In one process, against the given Redis and a namespace of its own:
//! 1. bulk-enqueues `--jobs` no-op jobs (chunks of `--chunk`, awaited one after another);
//! 2. drains them with one worker of `--concurrency`, timed from the worker's start until every
//!    job's acknowledgement is confirmed by Redis;
//! 3. with `--idle-samples N`, measures idle pickup: the worker sits idle, one job is pushed,
//!    and the time from just before the push until the handler starts is recorded, N times.
//!
//! Output is `herald: <key> <value>` lines (the last ones are the figures), and the namespace's
//! keys are deleted at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use clap::Parser;
use herald_bench::cleanup;
use herald_core::{JobError, JobPayload, TenantId};
use herald_queue::{
    Client, NewJob, Queue, QueueSettings, RedisBackend, RedisTarget, WorkerOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench",
    about = "Queue throughput and idle pickup latency of herald"
)]
struct Args {
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// No-op jobs to enqueue and drain (0 skips the throughput run).
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Jobs running at once in the worker.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Jobs per enqueue call.
    #[arg(long, default_value_t = 1_000)]
    chunk: usize,
    /// Jobs fetched per round trip (default: the worker's default).
    #[arg(long)]
    fetch_batch: Option<usize>,
    /// Jobs fetched ahead of a free slot (default: the worker's default).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Completed jobs kept for inspection. 0 (the default) deletes a job as it completes, like
    /// the BullMQ peer's `removeOnComplete: true`; herald's own default is 10,000.
    #[arg(long, default_value_t = 0)]
    keep_completed: u64,
    /// Idle pickup samples to take after the drain (0 skips it).
    #[arg(long, default_value_t = 0)]
    idle_samples: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchNoop {
    i: u64,
}

impl JobPayload for BenchNoop {
    const QUEUE: &'static str = "noop";
}

#[derive(Default)]
struct Probe {
    started: AtomicU64,
    /// Wakes the idle-latency sampler when a job starts.
    started_tx: std::sync::Mutex<Option<mpsc::UnboundedSender<Instant>>>,
    notify: Notify,
}

async fn handler(_job: BenchNoop, probe: Data<Arc<Probe>>) -> Result<(), JobError> {
    let now = Instant::now();
    probe.started.fetch_add(1, Ordering::Relaxed);
    if let Some(tx) = probe.started_tx.lock().ok().and_then(|g| g.clone()) {
        let _ = tx.send(now);
    }
    probe.notify.notify_one();
    Ok(())
}

fn out(key: &str, value: impl std::fmt::Display) {
    println!("herald: {key} {value}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.chunk == 0 || args.concurrency == 0 {
        bail!("--chunk and --concurrency must be at least 1");
    }
    let namespace = format!("herald-bench-{}", uuid::Uuid::new_v4().simple());
    let settings = QueueSettings {
        namespace: namespace.clone(),
        keep_completed: args.keep_completed,
        ..QueueSettings::default()
    };
    let target = RedisTarget::parse(&args.redis).context("--redis")?;
    let client = Client::connect(target, settings)
        .await
        .context("connecting to Redis")?;
    let queue = client.queue(&BenchNoop::QUEUE.parse()?);
    out("redis", &args.redis);
    out("namespace", &namespace);
    out("jobs", args.jobs);
    out("concurrency", args.concurrency);

    let result = run(&args, &queue).await;
    let deleted = cleanup(&args.redis, &namespace).await;
    match deleted {
        Ok(n) => out("keys_deleted", n),
        Err(e) => eprintln!("herald-bench: cleanup of {namespace}: {e:#}"),
    }
    result
}

async fn run(args: &Args, queue: &Queue) -> anyhow::Result<()> {
    let tenant = TenantId::new();
    let probe = Arc::new(Probe::default());
    let mut opts = WorkerOptions::new(WorkerOptions::generate_worker_id());
    opts.concurrency = args.concurrency;
    if let Some(b) = args.fetch_batch {
        opts.fetch_batch = b;
    }
    if let Some(p) = args.prefetch {
        opts.prefetch = p;
    }
    let deadline = Duration::from_secs(args.timeout);

    if args.jobs > 0 {
        // (1) bulk enqueue
        let t0 = Instant::now();
        let mut i = 0u64;
        while i < args.jobs {
            let n = (args.chunk as u64).min(args.jobs - i);
            let batch = (i..i + n)
                .map(|i| NewJob::of(tenant, &BenchNoop { i }))
                .collect::<Result<Vec<_>, _>>()?;
            queue.enqueue_batch(batch).await?;
            i += n;
        }
        let enqueue_secs = t0.elapsed().as_secs_f64();
        let ready = queue.counts(None).await?.ready;
        if ready != args.jobs {
            bail!(
                "expected {} ready jobs after enqueue, found {ready}",
                args.jobs
            );
        }

        // (2) drain with one worker
        let t1 = Instant::now();
        let backend = RedisBackend::<BenchNoop>::new(queue.clone(), opts.clone());
        let stats = backend.stats();
        let (stop, running) = spawn(backend, probe.clone());
        let waited = tokio::time::timeout(deadline, async {
            while stats.completed.load(Ordering::Relaxed) < args.jobs {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        let process_secs = t1.elapsed().as_secs_f64();
        let _ = stop.send(());
        running.await.context("worker task")??;
        if waited.is_err() {
            bail!(
                "timed out after {}s: {} of {} jobs completed",
                args.timeout,
                stats.completed.load(Ordering::Relaxed),
                args.jobs
            );
        }
        let counts = queue.counts(None).await?;
        if counts.ready + counts.running + counts.delayed + counts.dead != 0 {
            bail!("jobs left behind after the drain: {counts:?}");
        }
        out("round_trips", stats.round_trips.load(Ordering::Relaxed));
        out("enqueue_seconds", format!("{enqueue_secs:.3}"));
        out("process_seconds", format!("{process_secs:.3}"));
        out(
            "enqueue_jobs_per_sec",
            format!("{:.1}", args.jobs as f64 / enqueue_secs),
        );
        out(
            "process_jobs_per_sec",
            format!("{:.1}", args.jobs as f64 / process_secs),
        );
    }

    if args.idle_samples > 0 {
        // (3) idle pickup latency
        let (tx, mut rx) = mpsc::unbounded_channel();
        *probe.started_tx.lock().expect("not poisoned") = Some(tx);
        let backend = RedisBackend::<BenchNoop>::new(queue.clone(), opts);
        let (stop, running) = spawn(backend, probe.clone());
        let mut samples = Vec::with_capacity(args.idle_samples);
        for i in 0..args.idle_samples as u64 {
            // Long enough for the worker to be blocked waiting again, and not in step with it.
            let pause = 150 + (i * 37) % 200;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let pushed = Instant::now();
            queue.enqueue(NewJob::of(tenant, &BenchNoop { i })?).await?;
            let started = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("an idle worker did not start a pushed job within 10 s")?
                .context("worker stopped")?;
            samples.push(started.saturating_duration_since(pushed));
        }
        let _ = stop.send(());
        running.await.context("worker task")??;
        samples.sort();
        let pct = |p: f64| {
            let idx = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[idx].as_secs_f64() * 1000.0
        };
        out("idle_samples", samples.len());
        out("idle_pickup_p50_ms", format!("{:.2}", pct(0.50)));
        out("idle_pickup_p99_ms", format!("{:.2}", pct(0.99)));
        out("idle_pickup_max_ms", format!("{:.2}", pct(1.0)));
    }
    Ok(())
}

type Running = tokio::task::JoinHandle<anyhow::Result<()>>;

fn spawn(backend: RedisBackend<BenchNoop>, probe: Arc<Probe>) -> (oneshot::Sender<()>, Running) {
    let worker = WorkerBuilder::new(format!("bench-{}", uuid::Uuid::new_v4().simple()))
        .backend(backend)
        .data(probe)
        .build(handler);
    let (tx, rx) = oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        worker
            .run_until(async move {
                let _ = rx.await;
                Ok::<(), std::io::Error>(())
            })
            .await
            .map_err(|e| anyhow::anyhow!("worker failed: {e}"))
    });
    (tx, running)
}
