//! Fault tests with real processes: `herald-worker` binaries killed with SIGKILL, aborting on a
//! poison job, cut off from Redis, facing a Redis restart, and draining on SIGTERM. Each test has
//! a private `redis-server` and a fresh Postgres database; effects are rows in Postgres.

use std::time::{Duration, Instant};

use herald_core::{JobId, TenantId};
use herald_jobs::builtin::Probe;
use herald_queue::{JobState, NewJob, Queue};
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, namespace, queue_client, retry,
    wait_until,
};

fn probe(tenant: TenantId, key: String, sleep_ms: u64) -> NewJob {
    NewJob::of(
        tenant,
        &Probe {
            effect_key: key,
            sleep_ms,
            abort: false,
        },
    )
    .expect("probe payload")
}

async fn effects(db: &TestDb, tenant: TenantId) -> i64 {
    retry("count effects", || {
        herald_store::probe::count(&db.pool, tenant)
    })
    .await
}

async fn total_runs(db: &TestDb, tenant: TenantId) -> i64 {
    retry("count runs", || {
        herald_store::probe::total_runs(&db.pool, tenant)
    })
    .await
}

/// Every job of `ids` as Redis has it: (completed, max attempts seen, jobs delivered more than once).
async fn job_records(q: &Queue, ids: &[JobId]) -> (usize, u32, usize) {
    let (mut completed, mut max_attempts, mut redelivered) = (0, 0, 0);
    for id in ids {
        let info = retry("read a job", || q.job(id)).await;
        let info = info.unwrap_or_else(|| panic!("job {id} vanished from Redis"));
        if info.state == JobState::Completed {
            completed += 1;
        }
        max_attempts = max_attempts.max(info.attempts);
        if info.attempts > 1 {
            redelivered += 1;
        }
    }
    (completed, max_attempts, redelivered)
}

async fn queue_is_empty(q: &Queue) -> bool {
    match q.counts(None).await {
        Ok(c) => c.ready == 0 && c.delayed == 0 && c.running == 0,
        Err(_) => false,
    }
}

/// 5,000 jobs, two workers, one killed with SIGKILL mid-run and started again: every effect
/// happens, exactly one row per effect key, and Redis shows the re-delivered attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_run_loses_no_job_and_redelivers_its_leases() {
    const N: usize = 5_000;
    let started = Instant::now();
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"probe".parse().unwrap());
    let jobs = (0..N)
        .map(|i| probe(tenant, format!("effect-{i}"), 20).max_attempts(10))
        .collect();
    let ids: Vec<JobId> = q
        .enqueue_batch(jobs)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();

    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.concurrency = 20;
    cfg.lease_ms = 2_000;
    let mut victim = WorkerProcess::spawn(&cfg).unwrap();
    let survivor = WorkerProcess::spawn(&cfg).unwrap();

    wait_until("a quarter of the effects", DEADLINE, || async {
        effects(&db, tenant).await >= (N / 4) as i64
    })
    .await;
    // Make sure the victim holds leases at the moment it dies.
    wait_until("the victim to hold running jobs", DEADLINE, || async {
        match q.counts(None).await {
            Ok(c) => c.running > 0,
            Err(_) => false,
        }
    })
    .await;
    victim.kill9();
    let at_kill = effects(&db, tenant).await;
    let restarted = WorkerProcess::spawn(&cfg).unwrap();

    wait_until("every job finished", DEADLINE * 2, || async {
        queue_is_empty(&q).await
    })
    .await;
    let count = effects(&db, tenant).await;
    let runs = total_runs(&db, tenant).await;
    let (completed, max_attempts, redelivered) = job_records(&q, &ids).await;
    eprintln!(
        "kill9: {N} jobs, victim killed at {at_kill} effects; {count} effects, {runs} runs, \
         {redelivered} jobs re-delivered (max attempt {max_attempts}); took {:?}",
        started.elapsed()
    );
    assert_eq!(count, N as i64, "one effect row per job, none missing");
    assert_eq!(completed, N, "every job completed in Redis");
    assert_eq!(q.counts(None).await.unwrap().dead, 0);
    assert!(
        redelivered > 0 || runs > N as i64,
        "the killed worker's leased jobs were re-delivered (attempts > 1)"
    );
    assert!(max_attempts >= 2);
    drop((survivor, restarted));
}

/// A poison job that aborts its worker process on every delivery ends in the dead set after
/// `max_attempts` deliveries (each crash is noticed by lease expiry), while the worker —
/// restarted by the test each time it dies, as a supervisor would — completes every other job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_job_is_dead_lettered_after_max_attempts_and_others_complete() {
    const GOOD: usize = 60;
    let started = Instant::now();
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"probe".parse().unwrap());
    // Innocent jobs may share a process with the poison job and lose a delivery with it, so they
    // get a larger attempt budget; the poison job has 3.
    let good: Vec<NewJob> = (0..GOOD)
        .map(|i| probe(tenant, format!("good-{i}"), 50).max_attempts(20))
        .collect();
    let good_ids: Vec<JobId> = q
        .enqueue_batch(good)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let poison = NewJob::of(
        tenant,
        &Probe {
            effect_key: "poison".into(),
            sleep_ms: 0,
            abort: true,
        },
    )
    .unwrap()
    .max_attempts(3);
    let poison = q.enqueue(poison).await.unwrap().id;

    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.concurrency = 4;
    cfg.lease_ms = 1_000;
    cfg.allow_probe_abort = true;
    let mut worker = WorkerProcess::spawn(&cfg).unwrap();
    let mut crashes = 0;
    let deadline = Instant::now() + DEADLINE * 2;
    loop {
        let dead = matches!(
            q.job(&poison).await,
            Ok(Some(ref info)) if info.state == JobState::Dead
        );
        if dead && effects(&db, tenant).await == GOOD as i64 && queue_is_empty(&q).await {
            break;
        }
        if let Some(status) = worker.try_wait() {
            assert!(!status.success(), "the worker only dies by the poison job");
            crashes += 1;
            assert!(
                crashes <= 3,
                "the poison job was delivered more than max_attempts times"
            );
            worker = WorkerProcess::spawn(&cfg).unwrap();
        }
        assert!(Instant::now() < deadline, "poison test did not settle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = q.job(&poison).await.unwrap().unwrap();
    eprintln!(
        "poison: dead after {} attempts, {crashes} crashes, last error {:?}; took {:?}",
        info.attempts,
        info.last_error,
        started.elapsed()
    );
    assert_eq!(info.state, JobState::Dead);
    assert_eq!(
        info.attempts, 3,
        "dead after exactly max_attempts deliveries"
    );
    assert_eq!(crashes, 3, "one crash per delivery");
    assert!(
        info.last_error
            .unwrap_or_default()
            .contains("lease expired"),
        "the dead job says why"
    );
    assert_eq!(q.dead(None, 0, 10).await.unwrap().len(), 1);
    let (completed, _, _) = job_records(&q, &good_ids).await;
    assert_eq!(completed, GOOD, "every other job completed");
    assert_eq!(effects(&db, tenant).await, GOOD as i64);
    assert!(
        worker.try_wait().is_none(),
        "the last worker is still serving"
    );
}

/// `CLIENT KILL TYPE normal` (every client connection dropped, several times) mid-run: the
/// worker process survives, reconnects and every job completes, each effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_connections_do_not_kill_the_worker() {
    const N: usize = 2_000;
    let started = Instant::now();
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"probe".parse().unwrap());
    let ids: Vec<JobId> = q
        .enqueue_batch(
            (0..N)
                .map(|i| probe(tenant, format!("e-{i}"), 5).max_attempts(10))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.concurrency = 10;
    let mut worker = WorkerProcess::spawn(&cfg).unwrap();
    wait_until("a quarter of the effects", DEADLINE, || async {
        effects(&db, tenant).await >= (N / 4) as i64
    })
    .await;
    let mut admin = redis.raw().await;
    let mut killed = 0;
    for _ in 0..5 {
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut admin)
            .await
            .expect("CLIENT KILL");
        killed += n;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(killed > 0, "there were connections to kill");
    wait_until("every job finished", DEADLINE, || async {
        queue_is_empty(&q).await
    })
    .await;
    assert!(worker.try_wait().is_none(), "the worker survived");
    let (completed, _, _) = job_records(&q, &ids).await;
    let errors = worker
        .metric("herald_redis_errors_total", "probe")
        .unwrap()
        .unwrap_or(0.0);
    eprintln!(
        "client kill: {killed} connections killed, {errors} redis errors absorbed; took {:?}",
        started.elapsed()
    );
    assert_eq!(completed, N);
    assert_eq!(effects(&db, tenant).await, N as i64);
}

/// The private Redis is killed and started again on the same port with no data: the worker
/// process survives, reconnects, and serves jobs enqueued afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_a_redis_restart_with_data_loss() {
    const N: usize = 200;
    let started = Instant::now();
    let mut redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"probe".parse().unwrap());
    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.concurrency = 10;
    let mut worker = WorkerProcess::spawn(&cfg).unwrap();
    q.enqueue_batch(
        (0..N)
            .map(|i| probe(tenant, format!("before-{i}"), 2))
            .collect(),
    )
    .await
    .unwrap();
    wait_until("the first batch", DEADLINE, || async {
        effects(&db, tenant).await == N as i64
    })
    .await;

    redis.restart();
    assert_eq!(
        retry("count after restart", || q.counts(None))
            .await
            .completed,
        0,
        "the restarted Redis has no data"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        worker.try_wait().is_none(),
        "the worker survived the restart"
    );

    let ids: Vec<JobId> = retry("enqueue after restart", || {
        q.enqueue_batch(
            (0..N)
                .map(|i| probe(tenant, format!("after-{i}"), 2))
                .collect(),
        )
    })
    .await
    .into_iter()
    .map(|e| e.id)
    .collect();
    wait_until("the batch enqueued after the restart", DEADLINE, || async {
        effects(&db, tenant).await == 2 * N as i64
    })
    .await;
    wait_until("the queue to drain", DEADLINE, || async {
        queue_is_empty(&q).await
    })
    .await;
    let (completed, _, _) = job_records(&q, &ids).await;
    assert_eq!(completed, N);
    assert!(worker.try_wait().is_none(), "the worker is still serving");
    eprintln!("redis restart: took {:?}", started.elapsed());
}

/// SIGTERM while a long job runs: the worker stops fetching at once (jobs left in the queue wait
/// for other workers, not for this one's drain), finishes the running job, and exits 0. No job
/// is re-delivered by lease expiry: every job completes on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_jobs_and_leaves_the_rest_to_other_workers() {
    const SHORT: usize = 40;
    let started = Instant::now();
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"probe".parse().unwrap());
    let long = q
        .enqueue(probe(tenant, "long".into(), 8_000))
        .await
        .unwrap()
        .id;
    let mut ids: Vec<JobId> = q
        .enqueue_batch(
            (0..SHORT)
                .map(|i| probe(tenant, format!("short-{i}"), 300))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    ids.push(long.clone());

    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.concurrency = 4;
    cfg.lease_ms = 1_500;
    cfg.drain_secs = 60;
    // Jobs fetched ahead of a free slot are the "buffered, unstarted" ones a drain hands back.
    cfg.extra = vec!["--prefetch".into(), "8".into()];
    let mut draining = WorkerProcess::spawn(&cfg).unwrap();
    wait_until("the long job to run", DEADLINE, || async {
        matches!(q.job(&long).await, Ok(Some(ref i)) if i.state == JobState::Running)
    })
    .await;
    draining.sigterm();

    // While it drains, it fetches nothing more even though ready jobs wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fetched = draining
        .metric("herald_jobs_fetched_total", "probe")
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = q.counts(None).await.unwrap().ready;
    assert!(ready > 0, "jobs are waiting for another worker");
    assert_eq!(
        draining
            .metric("herald_jobs_fetched_total", "probe")
            .unwrap()
            .unwrap(),
        fetched,
        "a draining worker fetches nothing"
    );
    assert!(draining.try_wait().is_none(), "still draining the long job");

    let released: u64 = draining
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "released unstarted jobs")
        .filter_map(|v| v["fields"]["released"].as_u64())
        .sum();
    assert!(
        released > 0,
        "the prefetched, unstarted jobs were handed back when the drain began"
    );

    let other = WorkerProcess::spawn(&cfg).unwrap();
    let status = draining.wait_exit(DEADLINE).await;
    assert!(status.success(), "drained worker exits 0, got {status}");
    let info = q.job(&long).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Completed, "the running job finished");
    wait_until("every job", DEADLINE, || async { queue_is_empty(&q).await }).await;
    for id in &ids {
        let info = q.job(id).await.unwrap().unwrap();
        assert_eq!(info.state, JobState::Completed);
        assert_eq!(
            info.attempts, 1,
            "job {id} was re-delivered after a lease expiry"
        );
    }
    assert_eq!(effects(&db, tenant).await, SHORT as i64 + 1);
    assert_eq!(total_runs(&db, tenant).await, SHORT as i64 + 1);
    eprintln!(
        "sigterm drain: {fetched} fetched by the draining worker, {released} released at once; took {:?}",
        started.elapsed()
    );
    drop(other);
}
