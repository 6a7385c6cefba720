//! Dead jobs through herald-api: jobs enqueued over HTTP die the way jobs really die (an apalis
//! worker over herald's Redis backend runs them while their provider is down, until their
//! attempts run out), then a tenant lists them, retries one and discards the other over HTTP,
//! another tenant can touch neither, and once the provider is back a worker runs the retried
//! job to completion. Private Redis, random key namespace, fresh database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use herald_api::{ApiConfig, AppState};
use herald_core::{JobError, TenantId};
use herald_jobs::builtin::Probe;
use herald_queue::{Backoff, Client, JobMeta, RedisBackend, WorkerOptions};
use herald_tests::{
    DEADLINE, HttpReply, RedisServer, TestDb, http_request, namespace, queue_client, retry,
    wait_until,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;

/// What the failing provider answers while it is down.
const OUTAGE: &str = "provider unavailable: 503 Service Unavailable";

/// Whether the provider the probe jobs depend on is down.
#[derive(Clone, Default)]
struct Provider {
    down: Arc<AtomicBool>,
}

/// A probe job behind a provider that may be down: while it is, every attempt fails with a
/// retryable error, so a job dies when its attempts run out; once it is back, the job records
/// its effect in Postgres as the built-in probe handler does (one row per effect key, counting
/// runs).
async fn probe_behind_provider(
    job: Probe,
    meta: JobMeta,
    pool: Data<PgPool>,
    provider: Data<Provider>,
) -> Result<(), JobError> {
    if provider.down.load(Ordering::SeqCst) {
        return Err(JobError::retry_after(OUTAGE, Duration::from_millis(20)));
    }
    herald_store::probe::record(&pool, meta.tenant, &job.effect_key)
        .await
        .map_err(|e| JobError::retry(format!("recording the effect failed: {e}")))?;
    Ok(())
}

/// An in-process apalis worker serving the `probe` queue; stopped (bounded) by [`Self::stop`].
struct Worker {
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Worker {
    fn spawn(client: &Client, pool: PgPool, provider: Provider) -> Self {
        let queue = client.queue(&"probe".parse().expect("queue name"));
        let mut options = WorkerOptions::new(WorkerOptions::generate_worker_id());
        options.concurrency = 2;
        options.lease = Duration::from_secs(5);
        options.backoff = Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        };
        let worker = WorkerBuilder::new(format!("dead-jobs-{}", uuid::Uuid::new_v4().simple()))
            .backend(RedisBackend::<Probe>::new(queue, options))
            .data(pool)
            .data(provider)
            .build(probe_behind_provider);
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = stopped.await;
                    Ok::<(), std::io::Error>(())
                })
                .await
                .expect("the worker ran");
        });
        Self {
            stop: Some(stop),
            done,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, self.done)
            .await
            .expect("the worker stops within the deadline")
            .expect("the worker task ended cleanly");
    }
}

/// herald-api's router served over HTTP in this process.
struct Api {
    addr: SocketAddr,
}

impl Api {
    async fn serve(db: &TestDb, client: Client) -> Self {
        let router =
            herald_api::router(AppState::new(db.pool.clone(), client, ApiConfig::default()));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { addr }
    }

    async fn call(&self, method: &str, path: &str, token: &str, body: Option<&Value>) -> Reply {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        let bytes = body.map(Value::to_string).unwrap_or_default();
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let reply: HttpReply = http_request(self.addr, method, path, &headers, bytes.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        Reply {
            status: reply.status,
            body: reply.json(),
            text: reply.body,
        }
    }
}

struct Reply {
    status: u16,
    body: Value,
    text: String,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// The ids in a page of dead jobs, in the order listed.
fn dead_ids(page: &Reply) -> Vec<String> {
    assert_eq!(page.status, 200, "{}", page.text);
    page.body["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs array in {}", page.text))
        .iter()
        .map(|job| job["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Enqueues a probe job over HTTP; returns its id.
async fn enqueue_probe(api: &Api, token: &str, effect_key: &str, max_attempts: u32) -> String {
    let body = json!({"payload": {"effect_key": effect_key}, "max_attempts": max_attempts});
    let reply = api
        .call("POST", "/v1/queues/probe/jobs", token, Some(&body))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(reply.body["duplicate"], false, "{}", reply.text);
    reply.body["id"]
        .as_str()
        .expect("the enqueued job's id")
        .to_owned()
}

async fn tenant(db: &TestDb, name: &str) -> (TenantId, String) {
    let (tenant, token) = herald_store::tenants::create(&db.pool, name, "UTC")
        .await
        .expect("tenant");
    (tenant.id, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_job_is_listed_retried_and_discarded_through_the_api_by_its_tenant_only() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let ns = namespace();
    let client = queue_client(&redis.url(), &ns).await;
    let api = Api::serve(&db, client.clone()).await;
    let (owner, token) = tenant(&db, "acme").await;
    let (_, other_token) = tenant(&db, "globex").await;
    let ops = herald_store::ops_tokens::create(&db.pool)
        .await
        .expect("ops token");

    // Two jobs enqueued over HTTP while their provider is down: one may try twice, the other
    // only once.
    let to_retry = enqueue_probe(&api, &token, "to-retry", 2).await;
    let to_discard = enqueue_probe(&api, &token, "to-discard", 1).await;

    let provider = Provider::default();
    provider.down.store(true, Ordering::SeqCst);
    let worker = Worker::spawn(&client, db.pool.clone(), provider.clone());
    wait_until("both jobs to be dead", DEADLINE, || async {
        let queue = api.call("GET", "/v1/queues/probe", &token, None).await;
        queue.status == 200 && queue.body["counts"]["dead"] == 2
    })
    .await;
    // Stopped, so nothing runs the retried job until the provider is back.
    worker.stop().await;

    let queue = api.call("GET", "/v1/queues/probe", &token, None).await;
    assert_eq!(
        queue.body["counts"],
        json!({"ready": 0, "delayed": 0, "running": 0, "dead": 2, "completed": 0}),
        "{}",
        queue.text
    );

    // The owner's dead list shows both, each with its error and the attempts it spent.
    let dead = api
        .call("GET", "/v1/queues/probe/dead?limit=10", &token, None)
        .await;
    let listed = dead_ids(&dead);
    assert_eq!(listed.len(), 2, "{}", dead.text);
    assert!(listed.contains(&to_retry) && listed.contains(&to_discard));
    assert_eq!(dead.body["offset"], 0);
    assert_eq!(dead.body["limit"], 10);
    assert_eq!(dead.body["next_offset"], Value::Null);
    for job in dead.body["jobs"].as_array().into_iter().flatten() {
        let (key, attempts) = if job["id"] == to_retry.as_str() {
            ("to-retry", 2)
        } else {
            ("to-discard", 1)
        };
        assert_eq!(job["state"], "dead", "{job}");
        assert_eq!(job["queue"], "probe", "{job}");
        assert_eq!(job["tenant"], owner.to_string(), "{job}");
        assert_eq!(job["payload"]["effect_key"], key, "{job}");
        assert_eq!(job["attempts"], attempts, "{job}");
        assert_eq!(job["max_attempts"], attempts, "{job}");
        assert_eq!(job["last_error"], OUTAGE, "{job}");
    }
    let by_ops = api
        .call("GET", "/v1/queues/probe/dead?limit=10", &ops, None)
        .await;
    assert_eq!(dead_ids(&by_ops).len(), 2, "{}", by_ops.text);

    // Another tenant sees neither, and can retry or discard neither.
    let others = api
        .call("GET", "/v1/queues/probe/dead?limit=10", &other_token, None)
        .await;
    assert_eq!(dead_ids(&others), Vec::<String>::new());
    let others_counts = api
        .call("GET", "/v1/queues/probe", &other_token, None)
        .await;
    assert_eq!(
        others_counts.body["counts"]["dead"], 0,
        "{}",
        others_counts.text
    );
    for id in [&to_retry, &to_discard] {
        let retried = api
            .call(
                "POST",
                &format!("/v1/queues/probe/dead/{id}:retry"),
                &other_token,
                None,
            )
            .await;
        assert_eq!(retried.status, 404, "{}", retried.text);
        assert_eq!(retried.code(), "not_found");
        let discarded = api
            .call(
                "DELETE",
                &format!("/v1/queues/probe/dead/{id}"),
                &other_token,
                None,
            )
            .await;
        assert_eq!(discarded.status, 404, "{}", discarded.text);
        assert_eq!(discarded.code(), "not_found");
        let seen = api
            .call(
                "GET",
                &format!("/v1/queues/probe/jobs/{id}"),
                &other_token,
                None,
            )
            .await;
        assert_eq!(seen.status, 404, "{}", seen.text);
    }
    // …and both are still dead, untouched.
    for id in [&to_retry, &to_discard] {
        let job = api
            .call("GET", &format!("/v1/queues/probe/jobs/{id}"), &token, None)
            .await;
        assert_eq!(job.status, 200, "{}", job.text);
        assert_eq!(job.body["state"], "dead", "{}", job.text);
        assert_eq!(job.body["last_error"], OUTAGE, "{}", job.text);
    }
    let dead = api
        .call("GET", "/v1/queues/probe/dead?limit=10", &token, None)
        .await;
    assert_eq!(dead_ids(&dead).len(), 2, "{}", dead.text);

    // The owner retries one: it is ready again with a fresh attempt budget.
    let retried = api
        .call(
            "POST",
            &format!("/v1/queues/probe/dead/{to_retry}:retry"),
            &token,
            None,
        )
        .await;
    assert_eq!(retried.status, 200, "{}", retried.text);
    assert_eq!(retried.body, json!({"id": to_retry, "retried": true}));
    let job = api
        .call(
            "GET",
            &format!("/v1/queues/probe/jobs/{to_retry}"),
            &token,
            None,
        )
        .await;
    assert_eq!(job.status, 200, "{}", job.text);
    assert_eq!(job.body["state"], "ready", "{}", job.text);
    assert_eq!(job.body["attempts"], 0, "{}", job.text);
    assert_eq!(job.body["max_attempts"], 2, "{}", job.text);
    let queue = api.call("GET", "/v1/queues/probe", &token, None).await;
    assert_eq!(
        queue.body["counts"],
        json!({"ready": 1, "delayed": 0, "running": 0, "dead": 1, "completed": 0}),
        "{}",
        queue.text
    );
    let dead = api
        .call("GET", "/v1/queues/probe/dead?limit=10", &token, None)
        .await;
    assert_eq!(dead_ids(&dead), vec![to_discard.clone()]);
    // No longer dead, so a second retry finds nothing.
    let again = api
        .call(
            "POST",
            &format!("/v1/queues/probe/dead/{to_retry}:retry"),
            &token,
            None,
        )
        .await;
    assert_eq!(again.status, 404, "{}", again.text);
    assert_eq!(again.code(), "not_found");

    // The owner discards the other: it is gone.
    let discarded = api
        .call(
            "DELETE",
            &format!("/v1/queues/probe/dead/{to_discard}"),
            &token,
            None,
        )
        .await;
    assert_eq!(discarded.status, 200, "{}", discarded.text);
    assert_eq!(discarded.body, json!({"id": to_discard, "discarded": true}));
    let gone = api
        .call(
            "GET",
            &format!("/v1/queues/probe/jobs/{to_discard}"),
            &token,
            None,
        )
        .await;
    assert_eq!(gone.status, 404, "{}", gone.text);
    assert_eq!(gone.code(), "not_found");
    let dead = api
        .call("GET", "/v1/queues/probe/dead?limit=10", &token, None)
        .await;
    assert_eq!(dead_ids(&dead), Vec::<String>::new());
    let again = api
        .call(
            "DELETE",
            &format!("/v1/queues/probe/dead/{to_discard}"),
            &token,
            None,
        )
        .await;
    assert_eq!(again.status, 404, "{}", again.text);
    let queue = api.call("GET", "/v1/queues/probe", &token, None).await;
    assert_eq!(
        queue.body["counts"],
        json!({"ready": 1, "delayed": 0, "running": 0, "dead": 0, "completed": 0}),
        "{}",
        queue.text
    );

    // The provider is back: a worker runs the retried job, once, and never the discarded one.
    provider.down.store(false, Ordering::SeqCst);
    let worker = Worker::spawn(&client, db.pool.clone(), provider);
    wait_until("the retried job to complete", DEADLINE, || async {
        let job = api
            .call(
                "GET",
                &format!("/v1/queues/probe/jobs/{to_retry}"),
                &token,
                None,
            )
            .await;
        job.status == 200 && job.body["state"] == "completed"
    })
    .await;
    worker.stop().await;
    let job = api
        .call(
            "GET",
            &format!("/v1/queues/probe/jobs/{to_retry}"),
            &token,
            None,
        )
        .await;
    assert_eq!(job.body["attempts"], 1, "{}", job.text);
    let queue = api.call("GET", "/v1/queues/probe", &token, None).await;
    assert_eq!(
        queue.body["counts"],
        json!({"ready": 0, "delayed": 0, "running": 0, "dead": 0, "completed": 1}),
        "{}",
        queue.text
    );
    let effects: Vec<(String, i32)> = retry("the probe effects", || {
        sqlx::query_as(
            "select effect_key, runs from probe_effects where tenant_id = $1 order by effect_key",
        )
        .bind(owner.0)
        .fetch_all(&db.pool)
    })
    .await;
    assert_eq!(effects, vec![("to-retry".to_owned(), 1)]);
}
