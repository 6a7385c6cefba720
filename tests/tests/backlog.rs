//! A backlog of no-op jobs all due at once (`HERALD_BACKLOG_JOBS`, default 100,000;
//! `make test-scale` runs 1,000,000 in release) enqueued in batches on a private `redis-server`
//! and drained by one `herald-worker` process. Every Redis call does bounded work, so the size
//! of the backlog changes only how long it takes.

use std::time::Instant;

use herald_core::TenantId;
use herald_jobs::builtin::Noop;
use herald_queue::NewJob;
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, namespace, queue_client, wait_until,
};

const BATCH: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_all_due_at_once_drains_completely() {
    let n: usize = std::env::var("HERALD_BACKLOG_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"noop".parse().unwrap());
    let tenant = TenantId::new();
    let job = NewJob::of(tenant, &Noop {}).unwrap();

    let enqueue_started = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        q.enqueue_batch(vec![job.clone(); k]).await.unwrap();
        left -= k;
    }
    let enqueued_in = enqueue_started.elapsed();
    assert_eq!(
        q.counts(None).await.unwrap().ready,
        n as u64,
        "all due at once"
    );

    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.queues = "noop".into();
    cfg.concurrency = 200;
    cfg.lease_ms = 30_000;
    cfg.extra = vec!["--fetch-batch".into(), "200".into()];
    let drain_started = Instant::now();
    let worker = WorkerProcess::spawn(&cfg).unwrap();
    // Generous: the scale run is a million jobs. The test checks completion, not speed.
    let limit = DEADLINE * (1 + (n / 20_000) as u32);
    wait_until(&format!("{n} jobs completed"), limit, || async {
        worker
            .metric("herald_jobs_completed_total", "noop")
            .ok()
            .flatten()
            .is_some_and(|c| c as usize >= n)
    })
    .await;
    let drained_in = drain_started.elapsed();
    let c = q.counts(None).await.unwrap();
    eprintln!(
        "backlog: {n} jobs enqueued in {enqueued_in:?} ({:.0}/s), drained in {drained_in:?} ({:.0}/s); counts {c:?}",
        n as f64 / enqueued_in.as_secs_f64(),
        n as f64 / drained_in.as_secs_f64()
    );
    assert_eq!(
        (c.ready, c.delayed, c.running, c.dead),
        (0, 0, 0, 0),
        "nothing left, nothing dead"
    );
    assert_eq!(
        worker
            .metric("herald_jobs_completed_total", "noop")
            .unwrap()
            .unwrap() as usize,
        n,
        "each job completed exactly once"
    );
    assert_eq!(
        worker
            .metric("herald_jobs_fetched_total", "noop")
            .unwrap()
            .unwrap() as usize,
        n,
        "no job fetched twice"
    );
}
