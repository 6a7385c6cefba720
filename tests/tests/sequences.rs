//! A multichannel sequence over 500 leads through real `herald-worker` processes: workers (outbox
//! relay, Redis queues, the `sequence_step` job) on a private Redis and a fresh database, the
//! LinkedIn and email provider fakes serving over HTTP in this process, and herald-api's router
//! in this process. The test drives the sequence through the API; the LinkedIn fake posts its
//! events (accepted invitations, replies) to the API's sequence webhook on its own, late, out of
//! order and some twice, and herald's own services report the other replies through the same
//! webhook, signed with the tenant's HMAC secret.
//!
//! The sequence: 0 `linkedin_connect`, 1 `delay` of a day, 2 `condition` on `connected`
//! (yes → 3, no → 4), 3 `linkedin_message`, 4 `email_send`. A worker is killed (SIGKILL) with
//! invitations in flight and another started. Effects are counted at the fakes (per send id and
//! per recipient) and in Postgres: each lead's activities are exactly its branch's steps, in
//! order, once each; a reply stops its lead; no provider saw an action twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use herald_core::TenantId;
use herald_fakes::email::{self as email_fake, EmailFakeConfig};
use herald_fakes::linkedin::{self as linkedin_fake, LinkedinFakeConfig};
use herald_fakes::outreach::{self, Fault, Limit, ProviderFake, WebhookPlan, WebhookTarget};
use herald_tests::{
    DEADLINE, HttpReply, RedisServer, TestDb, WorkerConfig, WorkerProcess, http_request, namespace,
    serve_api, wait_until,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// Leads in the sequence.
const N: usize = 500;
/// `sequence_step` jobs running at once in each worker process.
const WORKER_CONCURRENCY: usize = 10;
/// Invitations the LinkedIn fake accepts and then answers too late (after the client's 20 s
/// timeout): as many as both workers run at once, so the worker about to be killed holds some.
const STALLS: usize = 2 * WORKER_CONCURRENCY;
/// Longer than `herald_connectors::rest::DEFAULT_TIMEOUT` (20 s): the client gives up first.
const STALL: Duration = Duration::from_secs(25);
/// The longest the test waits for the fakes' events to reach herald.
const SETTLE: Duration = Duration::from_secs(30);

const LINKEDIN_KEY: &str = "e2e-linkedin-key";
const LINKEDIN_SECRET: &str = "e2e-linkedin-webhook-secret";
const EMAIL_KEY: &str = "e2e-email-key";
const EMAIL_SECRET: &str = "e2e-email-webhook-secret";
const LINKEDIN_ACCOUNT: &str = "sales-1";
const MAILBOX: &str = "sales@acme.test";

/// The steps every lead walks.
fn steps() -> Value {
    json!([
        {"type": "linkedin_connect", "note": "Hi {{first_name}}"},
        {"type": "delay", "days": 1},
        {"type": "condition", "if": "connected", "yes": 3, "no": 4},
        {"type": "linkedin_message", "message": "Thanks for connecting, {{first_name}}"},
        {"type": "email_send", "subject": "Hi {{first_name}}", "body": "Hello from {{company_name}}"}
    ])
}

fn profile_url(i: usize) -> String {
    format!("https://www.linkedin.com/in/lead{i}")
}

fn address(i: usize) -> String {
    format!("lead{i}@example.test")
}

/// Leads whose invitation is accepted (a `connected` event from the LinkedIn fake).
fn connects(i: usize) -> bool {
    i.is_multiple_of(3)
}

/// Leads that reply during the delay.
fn replies(i: usize) -> bool {
    i % 10 == 1
}

/// Of the replying leads, those whose reply the LinkedIn fake reports (about the invitation's
/// send); the others' replies come from herald's own services, keyed by lead id.
fn reply_via_provider(i: usize) -> bool {
    i % 20 == 1
}

/// Events a little late, some twice, out of order.
fn unruly() -> WebhookPlan {
    WebhookPlan {
        delay: Duration::ZERO..=Duration::from_millis(200),
        duplicate: 0.3,
        shuffle: true,
        batch: 20,
    }
}

/// One test's world: Redis, Postgres, the LinkedIn and email fakes, herald-api serving in this
/// process, and a tenant whose LinkedIn and email accounts point at the fakes.
struct World {
    redis: RedisServer,
    db: TestDb,
    namespace: String,
    linkedin: ProviderFake,
    email: ProviderFake,
    api: SocketAddr,
    tenant: TenantId,
    token: String,
}

impl World {
    async fn start() -> Self {
        let redis = RedisServer::start();
        let db = TestDb::create().await;
        let namespace = namespace();
        let (tenant, token) = herald_store::tenants::create(&db.pool, "sequences-e2e", "UTC")
            .await
            .unwrap();
        // No provider-side limit gets in the way at this scale: the provider limits and their
        // deferrals are `crates/jobs/tests/sequences.rs`'s subject. Invitations are accepted
        // only on demand, so the test knows each lead's branch.
        let linkedin = linkedin_fake::spawn(LinkedinFakeConfig {
            rate: Limit::unlimited(),
            invitations_per_day: 0,
            invitations_per_week: 0,
            accept_rate: 0.0,
            api_keys: vec![LINKEDIN_KEY.into()],
            accounts: vec![LINKEDIN_ACCOUNT.into()],
            plan: unruly(),
            ..LinkedinFakeConfig::default()
        })
        .await
        .unwrap();
        let email = email_fake::spawn(EmailFakeConfig {
            rate: Limit::unlimited(),
            api_keys: vec![EMAIL_KEY.into()],
            open_rate: 0.0,
            click_rate: 0.0,
            plan: unruly(),
            ..EmailFakeConfig::default()
        })
        .await
        .unwrap();
        let api = serve_api(&db.pool, &redis.url(), &namespace).await;
        let world = Self {
            redis,
            db,
            namespace,
            linkedin,
            email,
            api,
            tenant: tenant.id,
            token,
        };
        let webhook = format!("http://{api}/v1/webhooks/sequences/{}", world.tenant);
        for (channel, fake, key, secret) in [
            ("linkedin", &world.linkedin, LINKEDIN_KEY, LINKEDIN_SECRET),
            ("email", &world.email, EMAIL_KEY, EMAIL_SECRET),
        ] {
            let reply = world
                .call(
                    "PUT",
                    &format!("/v1/providers/{channel}"),
                    &json!({"api_url": fake.base_url(), "api_key": key, "webhook_secret": secret}),
                )
                .await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            fake.set_webhook(WebhookTarget {
                url: webhook.clone(),
                secret: secret.into(),
            });
        }
        world
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpReply {
        http_request(self.api, method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    }

    async fn call(&self, method: &str, path: &str, body: &Value) -> HttpReply {
        let auth = format!("Bearer {}", self.token);
        self.request(
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await
    }

    /// Creates the sequence, adds `n` leads and starts it, all through the API. Returns the
    /// sequence id and the leads' ids in order.
    async fn start_sequence(&self, n: usize) -> (Uuid, Vec<Uuid>) {
        let created = self
            .call(
                "POST",
                "/v1/sequences",
                &json!({"name": "e2e", "steps": steps(),
                        "senders": {"linkedin": LINKEDIN_ACCOUNT, "email": MAILBOX}}),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id: Uuid = created.json()["id"].as_str().unwrap().parse().unwrap();
        let leads: Vec<Value> = (0..n)
            .map(|i| {
                json!({"external_id": format!("p{i}"), "first_name": format!("Ann{i}"),
                       "company_name": "Acme", "email": address(i),
                       "linkedin_url": profile_url(i)})
            })
            .collect();
        let added = self
            .call(
                "POST",
                &format!("/v1/sequences/{id}/leads"),
                &json!({ "leads": leads }),
            )
            .await;
        assert_eq!(added.status, 201, "{}", added.body);
        let ids: Vec<Uuid> = added.json()["added"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids.len(), n);
        let started = self
            .call("POST", &format!("/v1/sequences/{id}/start"), &json!({}))
            .await;
        assert_eq!(started.status, 200, "{}", started.body);
        assert_eq!(started.json()["status"], "active");
        (id, ids)
    }

    fn worker_config(&self) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(&self.redis.url(), &self.db.url, &self.namespace);
        cfg.queues = "sequence_step".into();
        cfg.relay = true;
        cfg.concurrency = WORKER_CONCURRENCY;
        cfg
    }

    fn workers(&self, n: usize) -> Vec<WorkerProcess> {
        (0..n)
            .map(|_| WorkerProcess::spawn(&self.worker_config()).unwrap())
            .collect()
    }

    async fn scalar(&self, sql: &'static str) -> i64 {
        self.db.tenant_count(self.tenant, sql).await
    }

    /// Waits (at most [`DEADLINE`]) until `sql` (bound to the tenant) counts `want`; fails with
    /// what it counted and the workers' logs.
    async fn wait_count(
        &self,
        what: &str,
        sql: &'static str,
        want: i64,
        workers: &[WorkerProcess],
    ) {
        let started = std::time::Instant::now();
        loop {
            let got = self.scalar(sql).await;
            if got == want {
                return;
            }
            if started.elapsed() > DEADLINE {
                let logs: Vec<String> = workers.iter().map(WorkerProcess::log_text).collect();
                panic!(
                    "timed out after {DEADLINE:?} waiting for {what}: {got} of {want}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A reply reported by herald's own services: `{"lead_id", "event": "replied"}` signed with
    /// the tenant's HMAC secret.
    async fn report_reply(&self, lead: Uuid) {
        let secret = herald_store::tenants::hmac_secret(&self.db.pool, self.tenant)
            .await
            .unwrap();
        let body = json!({"lead_id": lead, "event": "replied"}).to_string();
        let signature = outreach::signature(&secret, body.as_bytes());
        let reply = self
            .request(
                "POST",
                &format!("/v1/webhooks/sequences/{}", self.tenant),
                &[
                    ("content-type", "application/json"),
                    (outreach::SIGNATURE_HEADER, &signature),
                ],
                body.as_bytes(),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    /// Makes the day-long delay end now, as an operator could: every step job the delay wrote
    /// is due now in Postgres (the outbox row's `run_at`, the lead's `next_run_at`) and in the
    /// Redis schedule the relay published it to.
    ///
    /// Why this is faithful: the relay publishes an outbox row as soon as it is committed, a
    /// future `run_at` becoming the job's score in the queue's `delayed` sorted set (the row
    /// does not wait in Postgres until due); workers move a job to `ready` once its score is
    /// past. The step that runs then does not look at the clock or at `next_run_at` (only at
    /// the lead's state and `current_step`), so a job whose score was moved to now is run
    /// exactly as it would be a day later: same job id, same attempt budget, same checks. The
    /// `delay` step itself ran for real (its activity and its day-long `run_at` are asserted
    /// first); nothing is skipped but the waiting. Delays shorter than an hour are not part of
    /// the public step model, on purpose.
    async fn end_the_delay_now(&self) -> usize {
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "update outbox set run_at = now()
             where tenant_id = $1 and queue = 'sequence_step' and completed_at is null
               and dead_at is null and run_at > now() + interval '23 hours'
             returning id",
        )
        .bind(self.tenant.0)
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        sqlx::query(
            "update sequence_leads set next_run_at = now()
             where tenant_id = $1 and state = 'active' and next_run_at > now() + interval '23 hours'",
        )
        .bind(self.tenant.0)
        .execute(&self.db.pool)
        .await
        .unwrap();
        let delayed = format!(
            "{}:{}:{{sequence_step}}:delayed",
            self.namespace,
            herald_queue::LAYOUT_VERSION
        );
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut redis = self.redis.raw().await;
        let mut moved = 0usize;
        for chunk in rows.chunks(100) {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&delayed).arg("XX").arg("CH");
            for id in chunk {
                cmd.arg(now_ms).arg(id.simple().to_string());
            }
            let changed: usize = cmd.query_async(&mut redis).await.unwrap();
            moved += changed;
        }
        assert_eq!(
            moved,
            rows.len(),
            "every delayed job was in the Redis schedule"
        );
        moved
    }

    /// Each lead's activities: step → (outcome, send id), in the order they were recorded.
    async fn activities(&self) -> HashMap<Uuid, Vec<(i32, String, Option<Uuid>)>> {
        let rows: Vec<(Uuid, i32, String, Option<Uuid>)> = sqlx::query_as(
            "select lead_id, step, outcome, send_id from sequence_activities
             where tenant_id = $1 order by created_at, step",
        )
        .bind(self.tenant.0)
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        let mut by_lead: HashMap<Uuid, Vec<(i32, String, Option<Uuid>)>> = HashMap::new();
        for (lead, step, outcome, send) in rows {
            by_lead.entry(lead).or_default().push((step, outcome, send));
        }
        by_lead
    }

    /// Every send's status.
    async fn send_statuses(&self) -> HashMap<Uuid, String> {
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("select id, status from sends where tenant_id = $1")
                .bind(self.tenant.0)
                .fetch_all(&self.db.pool)
                .await
                .unwrap();
        rows.into_iter().collect()
    }
}

/// Actions the fake accepted per (kind, recipient).
fn per_recipient(fake: &ProviderFake) -> HashMap<(String, String), usize> {
    let mut counts = HashMap::new();
    for action in fake.actions() {
        *counts.entry((action.kind, action.target)).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_leads_walk_their_branch_once_through_a_killed_worker_and_replies() {
    let world = World::start().await;
    let mut workers = world.workers(2);
    let (sequence, leads) = world.start_sequence(N).await;

    // A third of the invitations out, then the next STALLS are accepted but their answers held
    // past the client's timeout: every slot of both workers waits on one. One worker dies with
    // its share in flight; a new one takes its place.
    wait_until("a third of the invitations", DEADLINE, || async {
        world.linkedin.stats().accepted >= (N / 3) as u64
    })
    .await;
    let before = world.linkedin.stats().accepted;
    world
        .linkedin
        .state()
        .inject(std::iter::repeat_n(Fault::AcceptThenStall(STALL), STALLS));
    wait_until(
        "the stalled invitations to be in flight",
        DEADLINE,
        || async { world.linkedin.stats().accepted >= before + STALLS as u64 },
    )
    .await;
    workers[0].kill9();
    workers.push(WorkerProcess::spawn(&world.worker_config()).unwrap());

    // Every lead does its invitation and its delay, then waits a day at the condition.
    world
        .wait_count(
            "every lead to wait at the condition",
            "select count(*) from sequence_leads
             where tenant_id = $1 and state = 'active' and current_step = 2
               and next_run_at > now() + interval '23 hours'",
            N as i64,
            &workers[1..],
        )
        .await;
    world
        .wait_count(
            "the delayed jobs to reach the Redis schedule",
            "select count(*) from outbox where tenant_id = $1 and published_at is null",
            0,
            &workers[1..],
        )
        .await;
    let walked = world.activities().await;
    let statuses = world.send_statuses().await;
    let at_linkedin = world.linkedin.counts();
    let mut invitation = HashMap::new();
    let mut unknown = 0;
    for (i, lead) in leads.iter().enumerate() {
        let steps = &walked[lead];
        let shape: Vec<(i32, &str)> = steps.iter().map(|(s, o, _)| (*s, o.as_str())).collect();
        assert_eq!(shape, vec![(0, "executed"), (1, "waited")], "lead {i}");
        let send = steps[0].2.expect("the invitation's send");
        let reached = at_linkedin.get(&send.to_string()).copied().unwrap_or(0);
        // Each invitation reached LinkedIn at most once. One herald heard back about is `sent`
        // and reached it exactly once; one whose answer was lost (held past the timeout, or
        // its worker killed) is `unknown` and was never asked again.
        match statuses[&send].as_str() {
            "sent" => assert_eq!(
                reached, 1,
                "lead {i}: a sent invitation reached LinkedIn once"
            ),
            "unknown" => {
                assert!(reached <= 1, "lead {i}: an unknown invitation was repeated");
                unknown += 1;
            }
            other => panic!("lead {i}: invitation {send} is {other}"),
        }
        invitation.insert(i, send);
    }
    assert!(
        unknown >= STALLS,
        "{unknown} unknown invitations; {STALLS} answers were held past the timeout"
    );
    assert_eq!(
        at_linkedin.values().sum::<usize>(),
        world.linkedin.actions().len()
    );
    assert!(
        at_linkedin.values().all(|c| *c == 1),
        "an invitation was sent twice"
    );
    assert_eq!(
        world
            .scalar("select count(*) from sends where tenant_id = $1")
            .await,
        N as i64,
        "one send per invitation: no attempt left behind"
    );

    // During the delay: some invitations are accepted, some leads reply.
    let mut connected = HashSet::new();
    for i in (0..N).filter(|i| connects(*i)) {
        if world
            .linkedin
            .emit(&invitation[&i].to_string(), "connected")
        {
            connected.insert(i);
        }
    }
    for i in (0..N).filter(|i| replies(*i)) {
        let by_provider =
            reply_via_provider(i) && world.linkedin.reply(&invitation[&i].to_string());
        if !by_provider {
            world.report_reply(leads[i]).await;
        }
    }
    assert!(
        world.linkedin.settle(SETTLE).await,
        "the LinkedIn fake's events did not reach herald"
    );
    let repliers = (0..N).filter(|i| replies(*i)).count() as i64;
    assert_eq!(
        world
            .scalar(
                "select count(*) from sequence_leads l join sequence_signals g
                   on g.tenant_id = l.tenant_id and g.lead_id = l.id and g.signal = 'replied'
                 where l.tenant_id = $1 and l.state = 'replied'"
            )
            .await,
        repliers
    );
    assert_eq!(
        world
            .scalar("select count(*) from sequence_signals where tenant_id = $1 and signal = 'connected'")
            .await,
        connected.len() as i64
    );

    // A day later: the condition picks each lead's branch.
    let moved = world.end_the_delay_now().await;
    assert_eq!(moved, N, "one delayed job per lead, replied or not");
    world
        .wait_count(
            "every lead to finish its sequence",
            "select count(*) from sequence_leads where tenant_id = $1 and state = 'active'",
            0,
            &workers[1..],
        )
        .await;
    world
        .wait_count(
            "every step job to finish",
            "select count(*) from outbox where tenant_id = $1 and queue = 'sequence_step'
               and completed_at is null and dead_at is null",
            0,
            &workers[1..],
        )
        .await;
    assert!(world.linkedin.settle(SETTLE).await);
    assert!(world.email.settle(SETTLE).await);

    // Each lead walked exactly its branch, in order, each step once; a reply ended the walk.
    let walked = world.activities().await;
    let statuses = world.send_statuses().await;
    let at_linkedin = world.linkedin.counts();
    let at_email = world.email.counts();
    let linkedin_to = per_recipient(&world.linkedin);
    let email_to = per_recipient(&world.email);
    let mut expected_yes = 0u64;
    for (i, lead) in leads.iter().enumerate() {
        let steps = &walked[lead];
        let shape: Vec<(i32, &str)> = steps.iter().map(|(s, o, _)| (*s, o.as_str())).collect();
        let state = herald_store::sequences::lead(&world.db.pool, world.tenant, *lead)
            .await
            .unwrap()
            .state;
        let (branch, want_state) = if replies(i) {
            (vec![(0, "executed"), (1, "waited")], "replied")
        } else if connected.contains(&i) {
            expected_yes += 1;
            (
                vec![
                    (0, "executed"),
                    (1, "waited"),
                    (2, "yes"),
                    (3, "executed"),
                    (4, "executed"),
                ],
                "completed",
            )
        } else {
            (
                vec![(0, "executed"), (1, "waited"), (2, "no"), (4, "executed")],
                "completed",
            )
        };
        assert_eq!(shape, branch, "lead {i}");
        assert_eq!(state.as_str(), want_state, "lead {i}");
        // Every action after the invitation reached its provider exactly once and was settled.
        for (step, _, send) in steps.iter().filter(|(s, _, _)| *s >= 3) {
            let send = send.expect("an action's send").to_string();
            let counts = if *step == 3 { &at_linkedin } else { &at_email };
            assert_eq!(counts.get(&send), Some(&1), "lead {i} step {step}");
            let status = statuses[&send.parse::<Uuid>().unwrap()].as_str();
            assert!(
                ["sent", "delivered", "read"].contains(&status),
                "lead {i} step {step}: send {status}"
            );
        }
        // And per recipient: one invitation at most, a message only on the yes branch, an email
        // unless the lead replied.
        let url = profile_url(i);
        let count = |map: &HashMap<(String, String), usize>, kind: &str, to: &str| {
            map.get(&(kind.to_owned(), to.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        assert!(count(&linkedin_to, "connect", &url) <= 1, "lead {i}");
        assert_eq!(
            count(&linkedin_to, "message", &url),
            usize::from(shape.contains(&(3, "executed"))),
            "lead {i}"
        );
        assert_eq!(
            count(&email_to, "email", &address(i)),
            usize::from(!replies(i)),
            "lead {i}"
        );
    }
    assert!(
        at_linkedin.values().all(|c| *c == 1),
        "a LinkedIn action was repeated"
    );
    assert!(
        at_email.values().all(|c| *c == 1),
        "an email was sent twice"
    );
    let messages = (0..N)
        .filter(|i| !replies(*i) && connected.contains(i))
        .count();
    let emails = (0..N).filter(|i| !replies(*i)).count();
    assert_eq!(world.email.actions().len(), emails);
    assert_eq!(
        world.linkedin.actions().len(),
        at_linkedin.len(),
        "every LinkedIn action carried a send id of its own"
    );
    assert_eq!(
        world
            .linkedin
            .actions()
            .iter()
            .filter(|a| a.kind == "message")
            .count(),
        messages
    );

    // An `unknown` invitation stays unknown only until the provider says more: the accepted
    // ones are now `read`; the rest are counted, never repeated.
    let still_unknown = invitation
        .iter()
        .filter(|(_, send)| statuses[*send] == "unknown")
        .map(|(i, _)| *i)
        .collect::<Vec<_>>();
    assert!(
        still_unknown.iter().all(|i| !connected.contains(i)),
        "a connected lead's invitation is settled"
    );
    eprintln!(
        "{unknown} invitations unknown after the kill, {} still unknown after the events; \
         {} connected, {repliers} replied",
        still_unknown.len(),
        connected.len()
    );
    assert_eq!(
        world
            .scalar("select count(*) from sends where tenant_id = $1 and status = 'attempting'")
            .await,
        0
    );
    assert_eq!(
        world
            .scalar("select count(*) from outbox where tenant_id = $1 and dead_at is not null")
            .await,
        0
    );

    // The API's stats agree with Postgres and the fakes.
    let stats = world
        .call(
            "GET",
            &format!("/v1/sequences/{sequence}/stats"),
            &json!({}),
        )
        .await;
    assert_eq!(stats.status, 200, "{}", stats.body);
    let stats = stats.json();
    let leads_by_state: BTreeMap<String, u64> =
        serde_json::from_value(stats["leads"].clone()).unwrap();
    assert_eq!(leads_by_state["replied"], repliers as u64);
    assert_eq!(leads_by_state["completed"], (N as i64 - repliers) as u64);
    assert_eq!(stats["steps"][2]["yes"], expected_yes);
    assert_eq!(stats["steps"][2]["no"], emails as u64 - expected_yes);
    assert_eq!(stats["steps"][4]["executed"], emails as u64);
    for worker in &workers[1..] {
        worker.sigterm();
    }
}
