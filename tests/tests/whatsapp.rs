//! WhatsApp template campaigns through real `herald-worker` processes: workers (outbox relay,
//! Redis queues, the `whatsapp_send` job and its fleet-wide limiter) on a private Redis and a
//! fresh database, the Meta Cloud API fake serving over HTTP in this process, and herald-api's
//! router in this process: the test drives the campaign through the API, and the fake posts its
//! status webhooks to it on its own, late, out of order and some twice.
//!
//! Effects are counted at the fake (per recipient and per send id) and in Postgres, and the API's
//! stats must agree with both.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use herald_api::{ApiConfig, AppState};
use herald_core::TenantId;
use herald_fakes::meta::{
    self as fake, Fault, MetaFake, MetaFakeConfig, RecurringFaults, SentMessage, StatusWebhooks,
    WebhookTarget,
};
use herald_tests::{
    DEADLINE, HttpReply, RedisServer, TestDb, WorkerConfig, WorkerProcess, http_request, namespace,
    queue_client, wait_until,
};
use serde_json::{Value, json};
use uuid::Uuid;

const META_TOKEN: &str = "e2e-meta-token";
const APP_SECRET: &str = "e2e-meta-app-secret";
const NUMBER: &str = "106540352242922";
/// Meta's top throughput tier: the fake refuses nothing for speed at the rates used here.
const TIER_MPS: u32 = 1_000;

/// The statuses Meta reports for a recipient, by the last digit of its number: 1 in 10 fails
/// after being sent, 3 in 10 are delivered, the rest read.
fn status_path(to: &str) -> Vec<&'static str> {
    match to.bytes().last().map(|b| b - b'0') {
        Some(0) => vec!["sent", "failed"],
        Some(1..=3) => vec!["sent", "delivered"],
        _ => vec!["sent", "delivered", "read"],
    }
}

/// Where a recipient's status ends, whatever order its events came in.
fn final_status(to: &str) -> &'static str {
    status_path(to).last().copied().unwrap_or("sent")
}

/// The recipients' numbers as herald stores them (country code first).
fn phone(i: usize) -> String {
    format!("1555{i:07}")
}

/// One test's world: Redis, Postgres, the Meta fake, herald-api serving in this process, and a
/// tenant with WhatsApp configured to reach the fake.
struct World {
    redis: RedisServer,
    db: TestDb,
    namespace: String,
    meta: MetaFake,
    api: SocketAddr,
    tenant: TenantId,
    token: String,
}

impl World {
    async fn start(config: MetaFakeConfig) -> Self {
        let redis = RedisServer::start();
        let db = TestDb::create().await;
        let namespace = namespace();
        let (tenant, token) = herald_store::tenants::create(&db.pool, "whatsapp-e2e", "UTC")
            .await
            .unwrap();
        let meta = fake::spawn(config).await.unwrap();
        let queues = queue_client(&redis.url(), &namespace).await;
        let router =
            herald_api::router(AppState::new(db.pool.clone(), queues, ApiConfig::default()));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let api = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let world = Self {
            redis,
            db,
            namespace,
            meta,
            api,
            tenant: tenant.id,
            token,
        };
        let reply = world
            .call(
                "PUT",
                "/v1/providers/whatsapp",
                &json!({"api_url": world.meta.base_url(), "token": META_TOKEN,
                        "phone_number_id": NUMBER, "app_secret": APP_SECRET,
                        "verify_token": "e2e-verify"}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        world
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> HttpReply {
        let auth = format!("Bearer {}", self.token);
        http_request(
            self.api,
            method,
            path,
            &[("authorization", &auth), ("content-type", content_type)],
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    }

    async fn call(&self, method: &str, path: &str, body: &Value) -> HttpReply {
        self.request(
            method,
            path,
            "application/json",
            body.to_string().as_bytes(),
        )
        .await
    }

    /// A draft campaign of `n` recipients (a one-parameter template, uploaded as CSV), then
    /// `POST …/send` at `rate_per_sec` and `concurrency`. Returns the campaign id.
    async fn send_campaign(&self, n: usize, rate_per_sec: u32, concurrency: u32) -> Uuid {
        let template = self
            .call(
                "POST",
                "/v1/templates",
                &json!({"name": "order_update", "language": "en_US", "components": [
                    {"type": "BODY", "text": "Hello {{1}}, your order ships today"}
                ]}),
            )
            .await;
        assert_eq!(template.status, 201, "{}", template.body);
        let template = template.json()["id"].as_str().unwrap().to_owned();
        let mut csv = String::from("country_code,phone_number,body_param_1\n");
        for i in 0..n {
            csv.push_str(&format!("1,{},Customer {i}\n", &phone(i)[1..]));
        }
        let created = self
            .request(
                "POST",
                &format!("/v1/message-campaigns?template_id={template}&name=e2e"),
                "text/csv",
                csv.as_bytes(),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        assert_eq!(created.json()["report"]["accepted"], n);
        let id: Uuid = created.json()["id"].as_str().unwrap().parse().unwrap();
        let sent = self
            .call(
                "POST",
                &format!("/v1/message-campaigns/{id}/send"),
                &json!({"rate_per_sec": rate_per_sec, "concurrency": concurrency}),
            )
            .await;
        assert_eq!(sent.status, 202, "{}", sent.body);
        id
    }

    /// The campaign's stats as the API serves them.
    async fn api_stats(&self, campaign: Uuid) -> Value {
        let reply = self
            .call(
                "GET",
                &format!("/v1/message-campaigns/{campaign}/stats"),
                &json!({}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }

    async fn campaign_status(&self, campaign: Uuid) -> String {
        let reply = self
            .call(
                "GET",
                &format!("/v1/message-campaigns/{campaign}"),
                &json!({}),
            )
            .await;
        reply.json()["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Status webhooks from the fake to this tenant's webhook URL on herald-api.
    fn status_webhooks(&self) -> StatusWebhooks {
        let mut webhooks = StatusWebhooks::new(
            WebhookTarget {
                url: format!("http://{}/v1/webhooks/whatsapp/{}", self.api, self.tenant),
                app_secret: APP_SECRET.into(),
            },
            Arc::new(|m: &SentMessage| status_path(&m.to)),
        );
        // Each event up to half a second late, so statuses overtake one another; a quarter twice.
        webhooks.delay = Duration::ZERO..=Duration::from_millis(500);
        webhooks.duplicate = 0.25;
        webhooks.batch = 40;
        webhooks
    }

    fn workers(&self, n: usize) -> Vec<WorkerProcess> {
        (0..n)
            .map(|_| WorkerProcess::spawn(&self.worker_config()).unwrap())
            .collect()
    }

    fn worker_config(&self) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(&self.redis.url(), &self.db.url, &self.namespace);
        cfg.queues = "whatsapp_send".into();
        cfg.relay = true;
        cfg.concurrency = WORKER_CONCURRENCY;
        cfg
    }

    async fn scalar(&self, sql: &'static str) -> i64 {
        self.db.tenant_count(self.tenant, sql).await
    }

    /// Every recipient's send in Postgres: phone → (send id, status, Meta's message id).
    async fn sends_by_phone(
        &self,
        campaign: Uuid,
    ) -> HashMap<String, (Uuid, String, Option<String>)> {
        let rows: Vec<(String, Uuid, String, Option<String>)> = sqlx::query_as(
            "select r.phone, s.id, s.status, s.provider_message_id
             from message_recipients r join sends s on s.tenant_id = r.tenant_id and s.id = r.send_id
             where r.tenant_id = $1 and r.campaign_id = $2",
        )
        .bind(self.tenant.0)
        .bind(campaign)
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(phone, id, status, wamid)| (phone, (id, status, wamid)))
            .collect()
    }

    /// Waits for the campaign to complete with every recipient at the fake, then for every
    /// send step's outbox row to be finished.
    async fn wait_sent(&self, campaign: Uuid, n: usize, workers: &[WorkerProcess]) {
        let logs = || {
            workers
                .iter()
                .map(WorkerProcess::log_text)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let limit = DEADLINE;
        let started = std::time::Instant::now();
        loop {
            let accepted = self.meta.stats().accepted as usize;
            if accepted >= n && self.campaign_status(campaign).await == "completed" {
                break;
            }
            assert!(
                started.elapsed() < limit,
                "after {limit:?}: {accepted} of {n} at the fake, stats {}\n{}",
                self.api_stats(campaign).await,
                logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_until(
            "every send step's outbox row to finish",
            DEADLINE,
            || async {
                self.scalar(
                    "select count(*) from outbox where tenant_id = $1 and queue = 'whatsapp_send'
                   and completed_at is null and dead_at is null",
                )
                .await
                    == 0
            },
        )
        .await;
    }

    async fn wait_webhooks_posted(&self) {
        wait_until(
            "the fake to post every status webhook",
            DEADLINE,
            || async { self.meta.state().status_webhooks_pending() == 0 },
        )
        .await;
    }
}

/// `whatsapp_send` jobs running at once in each worker process.
const WORKER_CONCURRENCY: usize = 10;

/// The fake's count of messages per recipient and per send id (`biz_opaque_callback_data`).
fn counts(messages: &[SentMessage]) -> (BTreeMap<String, usize>, HashMap<String, usize>) {
    let mut per_recipient = BTreeMap::new();
    let mut per_send = HashMap::new();
    for m in messages {
        *per_recipient.entry(m.to.clone()).or_insert(0) += 1;
        let send = m
            .callback_data
            .clone()
            .expect("every message carries its send id");
        *per_send.entry(send).or_insert(0) += 1;
    }
    (per_recipient, per_send)
}

/// Every recipient messaged exactly once, each message under a send id of its own that
/// Postgres holds for that recipient with Meta's message id and the status its webhooks end at.
async fn assert_each_messaged_once_and_settled(world: &World, campaign: Uuid, n: usize) {
    let messages = world.meta.messages();
    let (per_recipient, per_send) = counts(&messages);
    let expected: HashSet<String> = (0..n).map(phone).collect();
    let twice: Vec<_> = per_recipient.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "messaged more than once: {twice:?}");
    let reached: HashSet<String> = per_recipient.keys().cloned().collect();
    let skipped: Vec<_> = expected.difference(&reached).collect();
    assert!(skipped.is_empty(), "never messaged: {skipped:?}");
    assert_eq!(messages.len(), n);
    assert_eq!(per_send.len(), n, "one send id per message");
    assert!(per_send.values().all(|c| *c == 1));

    let sends = world.sends_by_phone(campaign).await;
    assert_eq!(sends.len(), n);
    for m in &messages {
        let (send_id, status, wamid) = &sends[&m.to];
        assert_eq!(
            m.callback_data.as_deref(),
            Some(send_id.to_string().as_str()),
            "{}",
            m.to
        );
        assert_eq!(wamid.as_deref(), Some(m.wamid.as_str()), "{}", m.to);
        assert_eq!(status, final_status(&m.to), "{}", m.to);
    }
}

/// The stats the fake's messages and webhooks call for, in the API's shape.
fn expected_stats(n: usize) -> Value {
    let (mut failed, mut delivered, mut read) = (0, 0, 0);
    for i in 0..n {
        match final_status(&phone(i)) {
            "failed" => failed += 1,
            "delivered" => delivered += 1,
            _ => read += 1,
        }
    }
    json!({"total": n, "pending": 0, "attempting": 0, "sent": 0, "delivered": delivered,
           "read": read, "failed": failed, "unknown": 0})
}

/// The same counts straight from Postgres.
async fn postgres_stats(world: &World, campaign: Uuid) -> Value {
    json!(
        herald_store::messages::stats(&world.db.pool, world.tenant, campaign)
            .await
            .unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2000_recipient_campaign_messages_each_once_through_throttles_and_shuffled_webhooks() {
    const N: usize = 2_000;
    // Meta's top tier, with a throttling answer every 600th request: 131056, 130429, HTTP 429.
    let world = World::start(MetaFakeConfig {
        per_number_mps: TIER_MPS,
        tokens: vec![META_TOKEN.into()],
        recurring_faults: Some(RecurringFaults {
            every: 600,
            cycle: vec![Fault::PairRate, Fault::Throughput, Fault::TooManyRequests],
        }),
        ..MetaFakeConfig::default()
    })
    .await;
    world
        .meta
        .state()
        .set_status_webhooks(Some(world.status_webhooks()));
    let workers = world.workers(2);

    let campaign = world.send_campaign(N, 800, 20).await;
    world.wait_sent(campaign, N, &workers).await;
    world.wait_webhooks_posted().await;

    assert_each_messaged_once_and_settled(&world, campaign, N).await;
    // Every kind of throttle happened, was waited out and sent later: none is a failure.
    let stats = world.meta.stats();
    assert!(stats.throughput_errors >= 1, "{stats:?}");
    assert!(stats.pair_rate_errors >= 1, "{stats:?}");
    assert!(stats.too_many_requests >= 1, "{stats:?}");
    assert_eq!(stats.accepted, N as u64);
    assert_eq!(
        stats.requests,
        stats.accepted + stats.throttled(),
        "nothing but throttles refused: {stats:?}"
    );
    let codes: HashSet<Option<String>> =
        herald_store::messages::failed_recipients(&world.db.pool, world.tenant, campaign)
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.error_code)
            .collect();
    assert_eq!(
        codes,
        HashSet::from([Some("131026".to_owned())]),
        "only the webhooks' failures"
    );
    // A throttled attempt leaves no send behind; no send step died.
    assert_eq!(
        world
            .scalar("select count(*) from sends where tenant_id = $1")
            .await,
        N as i64
    );
    assert_eq!(
        world
            .scalar("select count(*) from outbox where tenant_id = $1 and dead_at is not null")
            .await,
        0
    );
    // Postgres, the API and the fake agree.
    let expected = expected_stats(N);
    assert_eq!(postgres_stats(&world, campaign).await, expected);
    assert_eq!(world.api_stats(campaign).await, expected);
    assert_eq!(world.campaign_status(campaign).await, "completed");
    // Every send step's outbox row is finished: most by the step's own last statement, the
    // rest by the worker.
    wait_until(
        "every send step finished in the outbox",
        DEADLINE,
        || async {
            world
                .scalar(
                    "select count(*) from outbox where tenant_id = $1
                   and queue = 'whatsapp_send' and completed_at is null",
                )
                .await
                == 0
        },
    )
    .await;
    for worker in &workers {
        worker.sigterm();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sends_in_flight_messages_no_one_twice_and_skips_no_one() {
    const N: usize = 1_000;
    // More sends in flight than one worker runs at once: when the fake holds this many
    // answers, the worker about to die holds at least CONCURRENCY − WORKER_CONCURRENCY of them.
    const CONCURRENCY: u32 = 16;
    let world = World::start(MetaFakeConfig {
        per_number_mps: TIER_MPS,
        tokens: vec![META_TOKEN.into()],
        ..MetaFakeConfig::default()
    })
    .await;
    world
        .meta
        .state()
        .set_status_webhooks(Some(world.status_webhooks()));
    let mut workers = world.workers(2);

    let campaign = world.send_campaign(N, 800, CONCURRENCY).await;
    wait_until("a third of the campaign to be sent", DEADLINE, || async {
        world.meta.stats().accepted >= N as u64 / 3
    })
    .await;
    // From now on Meta takes each message and keeps its answer: the sends are in flight.
    world.meta.state().pause_status_webhooks(true);
    world.meta.state().hold_answers();
    wait_until(
        "the campaign's whole concurrency to be in flight",
        DEADLINE,
        || async { world.meta.state().held_answers() == CONCURRENCY as usize },
    )
    .await;
    assert_eq!(
        world.api_stats(campaign).await["attempting"],
        CONCURRENCY,
        "every attempt in flight has reached Meta"
    );

    workers[0].kill9();
    world.meta.state().release_answers();
    workers.push(WorkerProcess::spawn(&world.worker_config()).unwrap());
    world.wait_sent(campaign, N, &workers[1..]).await;

    // The dead worker's sends went out but it never heard so: their re-delivered jobs marked
    // them unknown instead of sending again.
    let unknown = world.api_stats(campaign).await["unknown"].as_u64().unwrap();
    let least = u64::from(CONCURRENCY) - WORKER_CONCURRENCY as u64;
    assert!(
        unknown >= least,
        "{unknown} unknown; the killed worker had at least {least} sends in flight"
    );
    let (per_recipient, _) = counts(&world.meta.messages());
    assert!(per_recipient.values().all(|c| *c == 1), "none twice");
    assert_eq!(per_recipient.len(), N, "none skipped");

    // Meta's status webhooks carry the send ids and settle every unknown send.
    world.meta.state().pause_status_webhooks(false);
    world.wait_webhooks_posted().await;
    assert_each_messaged_once_and_settled(&world, campaign, N).await;
    let expected = expected_stats(N);
    assert_eq!(postgres_stats(&world, campaign).await, expected);
    assert_eq!(world.api_stats(campaign).await, expected);
    assert_eq!(
        world
            .scalar("select count(*) from outbox where tenant_id = $1 and dead_at is not null")
            .await,
        0
    );
    for worker in &workers[1..] {
        worker.sigterm();
    }
}
