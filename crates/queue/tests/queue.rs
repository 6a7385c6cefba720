//! The queue against a real Redis (`REDIS_URL`, default 127.0.0.1:6379). Each test uses its own
//! random key namespace, so tests run in parallel and never flush anything.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use herald_core::{JobError, JobPayload, Priority, TenantId, now_ms};
use herald_queue::{
    Backoff, Client, JobMeta, JobState, NewJob, Queue, QueueSettings, RedisBackend, RedisTarget,
    WorkerOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    n: u32,
    /// What the handler does: "ok", "fail", "fail-then-ok", "permanent", "defer", "sleep", "panic".
    mode: String,
}

impl JobPayload for Work {
    const QUEUE: &'static str = "work";
    const VERSION: u32 = 2;
    const MAX_ATTEMPTS: u32 = 3;
}

#[derive(Default)]
struct Seen {
    order: Mutex<Vec<u32>>,
    runs: AtomicU32,
    attempts: Mutex<Vec<(u32, u32)>>,
    /// Handlers running right now, and the most ever seen at once.
    current: AtomicU32,
    peak: AtomicU32,
}

async fn handler(job: Work, meta: JobMeta, seen: Data<Arc<Seen>>) -> Result<(), JobError> {
    seen.runs.fetch_add(1, Ordering::SeqCst);
    seen.order.lock().unwrap().push(job.n);
    seen.attempts.lock().unwrap().push((job.n, meta.attempt));
    match job.mode.as_str() {
        "fail" => Err(JobError::retry_after(
            "always fails",
            Duration::from_millis(20),
        )),
        "fail-then-ok" if meta.attempt < 2 => Err(JobError::retry_after(
            "first try fails",
            Duration::from_millis(150),
        )),
        "permanent" => Err(JobError::permanent("bad input")),
        "defer" if seen.runs.load(Ordering::SeqCst) < 3 => {
            Err(JobError::defer_until("window closed", now_ms() + 30))
        }
        "sleep" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        }
        "panic" => panic!("handler bug"),
        "hold" => {
            let now = seen.current.fetch_add(1, Ordering::SeqCst) + 1;
            seen.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.current.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A namespace no other test uses.
fn fresh_namespace() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

async fn client() -> Client {
    client_with(QueueSettings {
        namespace: fresh_namespace(),
        ..QueueSettings::default()
    })
    .await
}

async fn client_with(settings: QueueSettings) -> Client {
    Client::connect(RedisTarget::parse(&redis_url()).unwrap(), settings)
        .await
        .expect("redis reachable")
}

fn options() -> WorkerOptions {
    let mut o = WorkerOptions::new(WorkerOptions::generate_worker_id());
    o.concurrency = 4;
    o.lease = Duration::from_millis(600);
    o.timeout = Duration::from_millis(400);
    o.backoff = Backoff {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
    };
    o
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.done)
            .await
            .expect("worker stops within 10 s")
            .unwrap();
    }
}

fn spawn_worker(queue: &Queue, opts: WorkerOptions, seen: Arc<Seen>) -> Running {
    spawn_backend(RedisBackend::<Work>::new(queue.clone(), opts), seen)
}

/// Runs `$handler` on `$backend` with `$seen` until the returned [`Running`] is stopped.
macro_rules! spawn_with {
    ($backend:expr, $seen:expr, $handler:expr) => {{
        let worker = WorkerBuilder::new(format!("w-{}", uuid::Uuid::new_v4()))
            .backend($backend)
            .data($seen)
            .build($handler);
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = rx.await;
                    Ok::<(), std::io::Error>(())
                })
                .await
                .expect("worker ran");
        });
        Running {
            stop: Some(tx),
            done,
        }
    }};
}

fn spawn_backend(backend: RedisBackend<Work>, seen: Arc<Seen>) -> Running {
    spawn_with!(backend, seen, handler)
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn job(tenant: TenantId, n: u32, mode: &str) -> NewJob {
    NewJob::of(
        tenant,
        &Work {
            n,
            mode: mode.into(),
        },
    )
    .unwrap()
}

#[tokio::test]
async fn jobs_complete_and_counts_follow() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let tenant = TenantId::new();
    let other = TenantId::new();
    let jobs: Vec<NewJob> = (0..50).map(|n| job(tenant, n, "ok")).collect();
    let out = q.enqueue_batch(jobs).await.unwrap();
    assert_eq!(out.len(), 50);
    assert!(out.iter().all(|e| !e.duplicate));
    q.enqueue(job(other, 99, "ok")).await.unwrap();
    assert_eq!(q.counts(None).await.unwrap().ready, 51);
    assert_eq!(q.counts(Some(tenant)).await.unwrap().ready, 50);
    assert_eq!(q.counts(Some(other)).await.unwrap().ready, 1);

    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("51 completed", Duration::from_secs(10), || async {
        q.counts(None).await.unwrap().completed == 51
    })
    .await;
    w.stop().await;
    assert_eq!(seen.runs.load(Ordering::SeqCst), 51);
    let c = q.counts(Some(tenant)).await.unwrap();
    assert_eq!((c.ready, c.running, c.completed), (0, 0, 50));
    let info = q.job(&out[0].id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Completed);
    assert_eq!(info.attempts, 1);
    assert_eq!(info.tenant, tenant);
    assert_eq!(info.payload_version, 2);
    assert!(!info.durable);
    let durable = q.enqueue(job(tenant, 7, "ok").durable(true)).await.unwrap();
    assert!(q.job(&durable.id).await.unwrap().unwrap().durable);
    let ghost = herald_core::JobId::generate();
    assert_eq!(
        q.missing(&[durable.id.clone(), ghost.clone()])
            .await
            .unwrap(),
        vec![ghost]
    );
}

#[tokio::test]
async fn duplicate_keys_are_reported_while_pending_and_after_completion() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let tenant = TenantId::new();
    let first = q
        .enqueue(job(tenant, 1, "ok").key("order-1"))
        .await
        .unwrap();
    let again = q
        .enqueue(job(tenant, 2, "ok").key("order-1"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    // The same key of another tenant is another job.
    let other = q
        .enqueue(job(TenantId::new(), 3, "ok").key("order-1"))
        .await
        .unwrap();
    assert!(!other.duplicate);

    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("2 completed", Duration::from_secs(10), || async {
        q.counts(None).await.unwrap().completed == 2
    })
    .await;
    let after = q
        .enqueue(job(tenant, 4, "ok").key("order-1"))
        .await
        .unwrap();
    assert!(
        after.duplicate,
        "a completed job's key is held for the key retention"
    );
    w.stop().await;
    assert_eq!(seen.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn priorities_then_fifo() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let mut jobs = Vec::new();
    for n in 0..5 {
        jobs.push(job(t, 200 + n, "ok").priority(Priority::Low));
    }
    for n in 0..5 {
        jobs.push(job(t, 100 + n, "ok"));
    }
    for n in 0..5 {
        jobs.push(job(t, n, "ok").priority(Priority::High));
    }
    q.enqueue_batch(jobs).await.unwrap();
    let seen = Arc::new(Seen::default());
    let mut opts = options();
    opts.concurrency = 1;
    let w = spawn_worker(&q, opts, seen.clone());
    wait_until("15 completed", Duration::from_secs(10), || async {
        q.counts(None).await.unwrap().completed == 15
    })
    .await;
    w.stop().await;
    let order = seen.order.lock().unwrap().clone();
    assert_eq!(
        order,
        vec![
            0, 1, 2, 3, 4, 100, 101, 102, 103, 104, 200, 201, 202, 203, 204
        ]
    );
}

#[tokio::test]
async fn delayed_jobs_wait_for_their_time() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    let at = now_ms() + 300;
    let e = q.enqueue(job(t, 1, "ok").run_at_ms(at)).await.unwrap();
    let info = q.job(&e.id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Delayed);
    assert_eq!(info.run_at_ms, Some(at));
    wait_until("delayed job done", Duration::from_secs(5), || async {
        q.counts(None).await.unwrap().completed == 1
    })
    .await;
    let done = q.job(&e.id).await.unwrap().unwrap();
    assert!(done.finished_at_ms.unwrap() >= at, "ran before its time");
    w.stop().await;
}

#[tokio::test]
async fn retries_count_attempts_and_dead_letter_with_the_last_error() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let failing = q.enqueue(job(t, 1, "fail")).await.unwrap();
    let flaky = q.enqueue(job(t, 2, "fail-then-ok")).await.unwrap();
    let bad = q.enqueue(job(t, 3, "permanent")).await.unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("2 dead, 1 completed", Duration::from_secs(10), || async {
        let c = q.counts(None).await.unwrap();
        c.dead == 2 && c.completed == 1
    })
    .await;
    w.stop().await;
    let dead = q.job(&failing.id).await.unwrap().unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.attempts, 3, "max_attempts of the job type");
    assert_eq!(dead.last_error.as_deref(), Some("always fails"));
    let perm = q.job(&bad.id).await.unwrap().unwrap();
    assert_eq!((perm.state, perm.attempts), (JobState::Dead, 1));
    let ok = q.job(&flaky.id).await.unwrap().unwrap();
    assert_eq!((ok.state, ok.attempts), (JobState::Completed, 2));
    // The retry-after hint (150 ms) was honoured between the two runs of the flaky job.
    let attempts = seen.attempts.lock().unwrap().clone();
    assert_eq!(attempts.iter().filter(|(n, _)| *n == 2).count(), 2);

    // Dead-set operations are tenant-scoped.
    assert_eq!(q.dead(Some(t), 0, 10).await.unwrap().len(), 2);
    assert!(
        q.dead(Some(TenantId::new()), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!q.retry_dead(&bad.id, Some(TenantId::new())).await.unwrap());
    assert!(q.discard_dead(&bad.id, Some(t)).await.unwrap());
    assert!(q.job(&bad.id).await.unwrap().is_none());
    assert!(q.retry_dead(&failing.id, Some(t)).await.unwrap());
    let retried = q.job(&failing.id).await.unwrap().unwrap();
    assert_eq!((retried.state, retried.attempts), (JobState::Ready, 0));
    assert_eq!(q.counts(Some(t)).await.unwrap().dead, 0);
}

#[tokio::test]
async fn deferral_does_not_spend_attempts() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let e = q.enqueue(job(t, 1, "defer").max_attempts(1)).await.unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("deferred job done", Duration::from_secs(5), || async {
        q.counts(None).await.unwrap().completed == 1
    })
    .await;
    w.stop().await;
    assert_eq!(
        seen.runs.load(Ordering::SeqCst),
        3,
        "deferred twice, then ran"
    );
    let info = q.job(&e.id).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Completed, 1));
}

#[tokio::test]
async fn timeouts_and_panics_are_failed_attempts() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let slow = q.enqueue(job(t, 1, "sleep").max_attempts(2)).await.unwrap();
    let panicky = q.enqueue(job(t, 2, "panic").max_attempts(2)).await.unwrap();
    let fine = q.enqueue(job(t, 3, "ok")).await.unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("2 dead", Duration::from_secs(10), || async {
        q.counts(None).await.unwrap().dead == 2
    })
    .await;
    w.stop().await;
    let s = q.job(&slow.id).await.unwrap().unwrap();
    assert_eq!(s.attempts, 2);
    assert!(
        s.last_error.unwrap().contains("timed out"),
        "timeout recorded"
    );
    let p = q.job(&panicky.id).await.unwrap().unwrap();
    assert!(p.last_error.unwrap().contains("panicked"));
    assert_eq!(
        q.job(&fine.id).await.unwrap().unwrap().state,
        JobState::Completed
    );
}

#[tokio::test]
async fn paused_queue_is_not_fetched_until_resumed() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    q.pause().await.unwrap();
    assert!(q.is_paused().await.unwrap());
    q.enqueue(job(t, 1, "ok")).await.unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.runs.load(Ordering::SeqCst),
        0,
        "paused queue was fetched"
    );
    q.resume().await.unwrap();
    wait_until("resumed job done", Duration::from_secs(5), || async {
        q.counts(None).await.unwrap().completed == 1
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn newer_payload_versions_wait_and_undecodable_payloads_die() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let newer = q
        .enqueue(NewJob::raw(t, r#"{"n":1,"mode":"ok"}"#.into(), 3, 3))
        .await
        .unwrap();
    let garbage = q
        .enqueue(NewJob::raw(t, r#"{"nope":true}"#.into(), 2, 3))
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("garbage dead", Duration::from_secs(5), || async {
        q.counts(None).await.unwrap().dead == 1
    })
    .await;
    wait_until("newer deferred", Duration::from_secs(5), || async {
        q.job(&newer.id).await.unwrap().unwrap().state == JobState::Delayed
    })
    .await;
    w.stop().await;
    let n = q.job(&newer.id).await.unwrap().unwrap();
    assert_eq!(n.attempts, 0, "waiting for an upgrade spends no attempt");
    assert!(n.waiting_reason.unwrap().contains("newer"));
    let g = q.job(&garbage.id).await.unwrap().unwrap();
    assert!(g.last_error.unwrap().contains("does not decode"));
    assert_eq!(seen.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn idle_worker_picks_up_a_push_quickly() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    // Let the worker go idle (it blocks on the wake-up list).
    tokio::time::sleep(Duration::from_millis(300)).await;
    q.enqueue(job(t, 1, "ok")).await.unwrap();
    // Correctness only: it must be picked up long before the 1 s idle poll would fire.
    // (Latency figures are measured by `make bench-queue`, not asserted here.)
    wait_until("pushed job done", Duration::from_secs(5), || async {
        seen.runs.load(Ordering::SeqCst) == 1
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn graceful_stop_releases_unstarted_jobs() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, options(), seen.clone());
    w.stop().await;
    q.enqueue_batch((0..20).map(|n| job(t, n, "ok")).collect())
        .await
        .unwrap();
    let c = q.counts(None).await.unwrap();
    assert_eq!((c.ready, c.running), (20, 0));
    assert!(
        q.workers(Duration::from_secs(60)).await.unwrap().is_empty(),
        "stopped worker deregistered"
    );
}

#[tokio::test]
async fn prefetched_jobs_wait_for_a_slot_and_are_released_at_shutdown() {
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let seen = Arc::new(Seen::default());
    q.enqueue_batch((0..6).map(|n| job(t, n, "hold")).collect())
        .await
        .unwrap();
    let mut opts = options();
    opts.concurrency = 2;
    opts.prefetch = 4;
    let backend = RedisBackend::<Work>::new(q.clone(), opts);
    let drain = backend.drain_handle();
    let w = spawn_backend(backend, seen.clone());
    wait_until(
        "all six held jobs done",
        Duration::from_secs(10),
        || async { seen.runs.load(Ordering::SeqCst) == 6 },
    )
    .await;
    // Six fetched at once, never more than two running.
    assert_eq!(seen.peak.load(Ordering::SeqCst), 2);

    // Now stop while prefetched jobs wait: they go back unstarted, their attempt not counted.
    let second = q
        .enqueue_batch((10..16).map(|n| job(t, n, "hold")).collect())
        .await
        .unwrap();
    wait_until(
        "a second round started",
        Duration::from_secs(10),
        || async { seen.runs.load(Ordering::SeqCst) >= 7 },
    )
    .await;
    // As herald-worker does on SIGTERM: stop fetching first, then let apalis drain.
    drain.stop_fetching();
    w.stop().await;
    let runs = seen.runs.load(Ordering::SeqCst);
    assert!(
        runs < 12,
        "the drain must not start prefetched jobs: {runs} runs"
    );
    let counts = q.counts(None).await.unwrap();
    assert_eq!(counts.running, 0, "{counts:?}");
    assert_eq!(counts.ready as u32, 12 - runs, "{counts:?}");
    for e in &second {
        let info = q.job(&e.id).await.unwrap().expect("job exists");
        if info.state == JobState::Ready {
            assert_eq!(info.attempts, 0, "released job {} kept an attempt", e.id);
        }
    }
}

#[tokio::test]
async fn with_no_completed_jobs_kept_a_job_goes_at_once_but_its_key_stays() {
    let client = client_with(QueueSettings {
        namespace: fresh_namespace(),
        keep_completed: 0,
        ..QueueSettings::default()
    })
    .await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let seen = Arc::new(Seen::default());
    let first = q.enqueue(job(t, 1, "ok").key("once")).await.unwrap();
    let w = spawn_worker(&q, options(), seen.clone());
    wait_until("job done", Duration::from_secs(5), || async {
        q.counts(None).await.unwrap().running == 0 && seen.runs.load(Ordering::SeqCst) == 1
    })
    .await;
    w.stop().await;
    assert!(
        q.job(&first.id).await.unwrap().is_none(),
        "completed job kept"
    );
    let counts = q.counts(Some(t)).await.unwrap();
    assert_eq!(
        (counts.ready, counts.running, counts.completed),
        (0, 0, 0),
        "{counts:?}"
    );
    let again = q.enqueue(job(t, 2, "ok").key("once")).await.unwrap();
    assert!(again.duplicate, "the key outlives the deleted job");
    assert_eq!(again.id, first.id);
}

#[tokio::test]
async fn a_periodic_job_is_enqueued_once_per_period_whatever_the_number_of_schedulers() {
    use herald_queue::periodic::Periodic;
    let client = client().await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    // Three schedulers (three workers) of the same every-minute job.
    let schedulers: Vec<Periodic> = (0..3)
        .map(|_| Periodic::new("tick", "0 * * * * *", q.clone(), job(t, 7, "ok")).unwrap())
        .collect();
    let period = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:15:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut created = 0;
    for s in &schedulers {
        if s.enqueue_period(period).await.unwrap() {
            created += 1;
        }
    }
    assert_eq!(created, 1, "one job for the period across the fleet");
    let next = period + chrono::Duration::minutes(1);
    let mut created_next = 0;
    for s in &schedulers {
        if s.enqueue_period(next).await.unwrap() {
            created_next += 1;
        }
    }
    assert_eq!(created_next, 1, "the next period gets its own job");
    let counts = q.counts(Some(t)).await.unwrap();
    assert_eq!(counts.ready + counts.delayed, 2, "{counts:?}");
    assert!(Periodic::new("bad", "not cron", q.clone(), job(t, 1, "ok")).is_err());
}

/// A job type that must start when due ([`JobPayload::PUNCTUAL`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OnTime {
    n: u32,
}

impl JobPayload for OnTime {
    const QUEUE: &'static str = "on_time";
    const PUNCTUAL: bool = true;
}

async fn hold_on_time(_job: OnTime, seen: Data<Arc<Seen>>) -> Result<(), JobError> {
    seen.runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// The most jobs `q` had leased at once (running or fetched ahead) while `until` held false.
async fn peak_leased<F: Fn() -> bool>(q: &Queue, until: F) -> u64 {
    let start = Instant::now();
    let mut peak = 0;
    while !until() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out");
        peak = peak.max(q.counts(None).await.unwrap().running);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    peak
}

#[tokio::test]
async fn punctual_jobs_are_never_fetched_ahead_of_a_free_handler() {
    let client = client().await;
    let t = TenantId::new();
    let mut opts = options();
    opts.concurrency = 2;
    opts.prefetch = 4;

    // An ordinary job type fetches ahead: more leased than running.
    let q = client.queue(&"work".parse().unwrap());
    q.enqueue_batch((0..8).map(|n| job(t, n, "hold")).collect())
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_worker(&q, opts.clone(), seen.clone());
    let ahead = peak_leased(&q, || seen.runs.load(Ordering::SeqCst) >= 8).await;
    w.stop().await;
    assert!(ahead > 2, "an ordinary queue fetched only {ahead} at once");

    // A punctual one, with the same options, leases no more than it runs.
    let q = client.queue(&"on_time".parse().unwrap());
    let jobs = (0..8)
        .map(|n| NewJob::of(t, &OnTime { n }).unwrap())
        .collect();
    q.enqueue_batch(jobs).await.unwrap();
    let seen = Arc::new(Seen::default());
    let w = spawn_with!(
        RedisBackend::<OnTime>::new(q.clone(), opts),
        seen.clone(),
        hold_on_time
    );
    let peak = peak_leased(&q, || seen.runs.load(Ordering::SeqCst) >= 8).await;
    w.stop().await;
    assert!(
        peak <= 2,
        "{peak} punctual jobs leased at once by two handlers"
    );
}

#[tokio::test]
async fn a_delayed_job_wakes_an_idle_worker_to_learn_its_due_time() {
    let namespace = fresh_namespace();
    let client = client_with(QueueSettings {
        namespace: namespace.clone(),
        ..QueueSettings::default()
    })
    .await;
    let q = client.queue(&"work".parse().unwrap());
    let t = TenantId::new();
    let notify = format!(
        "{namespace}:{}:{{work}}:notify",
        herald_queue::LAYOUT_VERSION
    );
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let tokens = |redis: &mut redis::aio::MultiplexedConnection| {
        let mut redis = redis.clone();
        let notify = notify.clone();
        async move {
            redis::cmd("LLEN")
                .arg(&notify)
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };
    assert_eq!(tokens(&mut redis).await, 0);
    q.enqueue(job(t, 1, "ok").delay(Duration::from_secs(30)))
        .await
        .unwrap();
    // An idle worker blocks on this list and otherwise looks again only at its idle check: it
    // learns of the job's due time at once instead of up to a second late.
    assert_eq!(tokens(&mut redis).await, 1);
}
