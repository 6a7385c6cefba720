//! Redis loses everything mid-run (`FLUSHALL` on a private `redis-server`): jobs that came
//! through the Postgres outbox are re-derived by the reconciler (run by the worker once per
//! period) and every job still completes exactly once in effect.

use std::time::Instant;

use herald_jobs::builtin::Probe;
use herald_store::outbox::{self, NewOutboxJob};
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, namespace, queue_client, retry,
    wait_until,
};

async fn scalar(db: &TestDb, sql: &'static str) -> i64 {
    retry(sql, || {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.pool)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_mid_run_is_repaired_by_the_reconciler() {
    const N: usize = 1_000;
    let started = Instant::now();
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();

    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..N {
        let job = NewOutboxJob::for_payload(&Probe {
            effect_key: format!("effect-{i}"),
            sleep_ms: 20,
            abort: false,
        })
        .unwrap();
        outbox::insert(&mut tx, tenant, &job).await.unwrap();
    }
    tx.commit().await.unwrap();

    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.concurrency = 5;
    cfg.relay = true;
    cfg.reconciler_every_ms = Some(1_000);
    let worker = WorkerProcess::spawn(&cfg).unwrap();

    wait_until("the relay to publish every row", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from outbox where published_at is null",
        )
        .await
            == 0
    })
    .await;
    wait_until("a third of the effects", DEADLINE, || async {
        herald_store::probe::count(&db.pool, tenant)
            .await
            .unwrap_or(0)
            >= (N / 3) as i64
    })
    .await;
    let mut admin = redis.raw().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let at_flush = herald_store::probe::count(&db.pool, tenant).await.unwrap();
    assert!(
        at_flush < N as i64,
        "the flush must come while jobs are pending (at {at_flush} of {N})"
    );
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"probe".parse().unwrap());
    assert_eq!(
        q.counts(None).await.unwrap().ready,
        0,
        "Redis lost the queue"
    );

    wait_until("every outbox row completed", DEADLINE * 2, || async {
        scalar(
            &db,
            "select count(*) from outbox where completed_at is null",
        )
        .await
            == 0
    })
    .await;
    let effects = herald_store::probe::count(&db.pool, tenant).await.unwrap();
    let runs = herald_store::probe::total_runs(&db.pool, tenant)
        .await
        .unwrap();
    let dead = scalar(&db, "select count(*) from outbox where dead_at is not null").await;
    eprintln!(
        "reconciler: flushed at {at_flush} of {N} effects; {effects} effects, {runs} runs; took {:?}",
        started.elapsed()
    );
    assert_eq!(effects, N as i64, "every job's effect, once");
    assert_eq!(dead, 0);
    assert!(
        worker.log_text().contains("reconciler re-published"),
        "the reconciler did the repair"
    );
}
