//! herald on a Redis Cluster: three `redis-server --cluster-enabled yes` masters on loopback
//! ports, joined with `redis-cli --cluster create`, then a `herald-worker` process serving two
//! queues (each queue's keys share one hash tag, so each lives on one slot) through a
//! `redis+cluster://` target: jobs complete, a delayed job waits for its time, a duplicate key
//! is reported, a failing job reaches the dead set and can be retried.

use std::process::Command;
use std::time::{Duration, Instant};

use herald_core::{TenantId, now_ms};
use herald_jobs::builtin::{Noop, Probe};
use herald_queue::{Client, JobState, NewJob, QueueSettings, RedisTarget};
use herald_tests::{
    DEADLINE, RedisServer, TestDb, WorkerConfig, WorkerProcess, free_port, namespace, retry,
    wait_until,
};

struct Cluster {
    nodes: Vec<RedisServer>,
}

impl Cluster {
    fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(
                    free_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.is_ok() {
            assert!(Instant::now() < deadline, "cluster_state never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn is_ok(&self) -> bool {
        self.nodes.iter().all(|n| {
            Command::new("redis-cli")
                .args(["-p", &n.port.to_string(), "cluster", "info"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                .unwrap_or(false)
        })
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

fn probe(tenant: TenantId, key: &str) -> NewJob {
    NewJob::of(
        tenant,
        &Probe {
            effect_key: key.into(),
            sleep_ms: 0,
            abort: false,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_runs_on_a_three_master_cluster() {
    let started = Instant::now();
    let cluster = Cluster::start();
    let db = TestDb::create().await;
    let tenant = db.tenant().await;
    let ns = namespace();
    let target = RedisTarget::parse(&cluster.url()).unwrap();
    assert!(target.cluster, "a redis+cluster:// URL means cluster mode");
    let client = Client::connect(
        target,
        QueueSettings {
            namespace: ns.clone(),
            ..QueueSettings::default()
        },
    )
    .await
    .expect("cluster reachable");
    client
        .check_memory_policy()
        .await
        .expect("memory policy readable on a cluster");
    let probes = client.queue(&"probe".parse().unwrap());
    let noops = client.queue(&"noop".parse().unwrap());

    let ids: Vec<_> = probes
        .enqueue_batch((0..100).map(|i| probe(tenant, &format!("e-{i}"))).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    noops
        .enqueue_batch(vec![NewJob::of(tenant, &Noop {}).unwrap(); 100])
        .await
        .unwrap();
    let first = probes
        .enqueue(probe(tenant, "keyed").key("order-1"))
        .await
        .unwrap();
    let again = probes
        .enqueue(probe(tenant, "keyed-again").key("order-1"))
        .await
        .unwrap();
    assert!(!first.duplicate && again.duplicate && again.id == first.id);
    let at = now_ms() + 1_000;
    let delayed = probes
        .enqueue(probe(tenant, "delayed").run_at_ms(at))
        .await
        .unwrap()
        .id;
    assert_eq!(
        probes.job(&delayed).await.unwrap().unwrap().state,
        JobState::Delayed
    );
    // A probe that asks to abort is refused by a worker without test jobs enabled: a permanent
    // failure, so it goes straight to the dead set.
    let doomed = probes
        .enqueue(
            NewJob::of(
                tenant,
                &Probe {
                    effect_key: "doomed".into(),
                    sleep_ms: 0,
                    abort: true,
                },
            )
            .unwrap(),
        )
        .await
        .unwrap()
        .id;

    let mut cfg = WorkerConfig::new(&cluster.url(), &db.url, &ns);
    cfg.queues = "probe,noop".into();
    let worker = WorkerProcess::spawn(&cfg).unwrap();

    wait_until("every job settled", DEADLINE, || async {
        let (p, n) = (probes.counts(None).await, noops.counts(None).await);
        matches!((p, n), (Ok(p), Ok(n))
            if p.completed == 102 && p.dead == 1 && n.completed == 100
                && p.ready + p.delayed + p.running + n.ready + n.running == 0)
    })
    .await;
    assert_eq!(
        herald_store::probe::count(&db.pool, tenant).await.unwrap(),
        102
    );
    for id in &ids {
        assert_eq!(
            probes.job(id).await.unwrap().unwrap().state,
            JobState::Completed
        );
    }
    let d = probes.job(&delayed).await.unwrap().unwrap();
    assert!(d.finished_at_ms.unwrap() >= at, "the delayed job waited");
    let dead = probes.dead(Some(tenant), 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, doomed);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("refused")
    );
    assert!(probes.retry_dead(&doomed, Some(tenant)).await.unwrap());
    wait_until("the retried job to die again", DEADLINE, || async {
        matches!(probes.job(&doomed).await, Ok(Some(ref i)) if i.state == JobState::Dead && i.attempts == 1)
    })
    .await;
    let workers = retry("workers", || probes.workers(Duration::from_secs(60))).await;
    assert!(
        workers.iter().any(|w| w.id == worker.worker_id),
        "heartbeat visible on the cluster"
    );
    assert!(
        worker
            .metric("herald_jobs_completed_total", "noop")
            .unwrap()
            .unwrap()
            >= 100.0
    );
    eprintln!("cluster: took {:?}", started.elapsed());
}
