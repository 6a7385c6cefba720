//! The `herald-worker` binary's contract: `--help`, refusing bad flags and an evicting Redis with
//! a one-line reason and a non-zero exit, and its `/healthz` and `/metrics` pages.

use std::process::Command;

use herald_core::TenantId;
use herald_jobs::builtin::Noop;
use herald_queue::NewJob;
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, free_port, http_get, namespace,
    parse_metric, queue_client, wait_until, worker_binary,
};

#[test]
fn help_lists_the_flags() {
    let out = Command::new(worker_binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--queues",
        "--concurrency",
        "--queue-concurrency",
        "--lease-ms",
        "--fetch-batch",
        "--drain-secs",
        "--metrics-addr",
        "--json-logs",
        "--pg-pool-size",
        "--no-relay",
        "--no-reconciler",
        "--reconcile-every-ms",
        "HERALD_METRICS_ADDR",
        "DATABASE_URL",
        "REDIS_URL",
        "HERALD_NAMESPACE",
    ] {
        assert!(text.contains(flag), "--help does not mention {flag}");
    }
}

fn stderr_of(args: &[&str], env: &[(&str, String)]) -> (bool, String) {
    let mut cmd = Command::new(worker_binary());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn an_unknown_queue_is_refused_with_one_line() {
    let (ok, err) = stderr_of(&["--queues", "noop,nope"], &[]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("unknown queue \"nope\""), "{err}");
}

#[tokio::test]
async fn an_evicting_redis_is_refused() {
    let redis = RedisServer::start_with(free_port(), &["--maxmemory-policy", "allkeys-lru"]);
    let db = TestDb::create().await;
    let (ok, err) = stderr_of(
        &["--metrics-addr", "127.0.0.1:0"],
        &[("REDIS_URL", redis.url()), ("DATABASE_URL", db.url.clone())],
    );
    assert!(!ok, "started on an evicting Redis");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("allkeys-lru") && last.contains("noeviction"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_report_the_queue() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let q = client.queue(&"noop".parse().unwrap());
    q.pause().await.unwrap();
    q.enqueue_batch(vec![NewJob::of(TenantId::new(), &Noop {}).unwrap(); 7])
        .await
        .unwrap();
    let mut cfg = WorkerConfig::new(&redis.url(), &db.url, &ns);
    cfg.queues = "noop".into();
    let worker = WorkerProcess::spawn(&cfg).unwrap();
    assert_eq!(
        http_get(worker.metrics_addr, "/healthz").unwrap().trim(),
        "ok"
    );

    let page = worker.metrics().unwrap();
    let m = |name: &str| parse_metric(&page, name, "noop");
    assert_eq!(m("herald_queue_ready_jobs"), Some(7.0));
    assert_eq!(m("herald_queue_paused"), Some(1.0));
    assert_eq!(
        m("herald_queue_runnable_jobs"),
        Some(0.0),
        "a paused queue is not runnable: more workers would not help"
    );
    assert_eq!(m("herald_worker_concurrency"), Some(10.0));
    assert!(page.contains("herald_redis_up 1"));
    assert!(page.contains(&format!("worker_id=\"{}\"", worker.worker_id)));

    q.resume().await.unwrap();
    wait_until("the jobs to complete", DEADLINE, || async {
        worker
            .metric("herald_jobs_completed_total", "noop")
            .ok()
            .flatten()
            == Some(7.0)
    })
    .await;
    let page = worker.metrics().unwrap();
    assert_eq!(
        parse_metric(&page, "herald_queue_runnable_jobs", "noop"),
        Some(0.0)
    );
    assert_eq!(
        parse_metric(&page, "herald_queue_completed_jobs", "noop"),
        Some(7.0)
    );
}
