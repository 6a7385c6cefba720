//! Multichannel sequences without Redis queues: each test gets a fresh migrated database and an
//! in-process channel connector that counts what it was asked to do; a small driver runs the
//! outbox's due `sequence_step` jobs through `run_step` the way the engine would. Effects are
//! counted in Postgres (activities, sends, outbox rows) and in the connector.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;
use herald_core::{JobError, TenantId};
use herald_jobs::Deps;
use herald_jobs::sequences::{
    self, ChannelConnector, ChannelError, Connectors, OutboundAction, SequenceStep,
};
use herald_store::sequences::steps::{self, Channel, Signal};
use herald_store::sequences::{self as store, LeadState, NewLead, NewSequence};
use herald_store::{PgPool, outbox, tenants};
use serde_json::{Value, json};
use uuid::Uuid;

/// An in-process channel: records every action; can "crash" (panic) right after acting.
#[derive(Default)]
struct RecordingChannel {
    actions: Mutex<Vec<OutboundAction>>,
    crash_after_act: AtomicBool,
}

impl ChannelConnector for RecordingChannel {
    fn act<'a>(
        &'a self,
        action: &'a OutboundAction,
    ) -> BoxFuture<'a, Result<String, ChannelError>> {
        Box::pin(async move {
            self.actions.lock().unwrap().push(action.clone());
            if self.crash_after_act.swap(false, Ordering::SeqCst) {
                panic!("worker died after the provider acted");
            }
            Ok(format!("prov-{}", action.send_id.simple()))
        })
    }
}

impl RecordingChannel {
    fn count(&self, step_type: &str) -> usize {
        self.actions
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.step_type == step_type)
            .count()
    }
}

fn deps(pool: &PgPool, channel: &Arc<RecordingChannel>) -> Deps {
    let connectors = Connectors::default()
        .with(Channel::Email, channel.clone())
        .with(Channel::Linkedin, channel.clone())
        .with(Channel::Instagram, channel.clone());
    Deps::new(pool.clone(), reqwest::Client::new(), false).with_sequence_connectors(connectors)
}

async fn tenant(pool: &PgPool) -> TenantId {
    tenants::create(pool, "acme", "UTC").await.unwrap().0.id
}

async fn sequence(pool: &PgPool, tenant: TenantId, steps_json: Value, rules: Value) -> Uuid {
    let new = NewSequence {
        name: "outreach".into(),
        steps: steps::parse_steps(&steps_json).unwrap(),
        rules: steps::parse_rules(Some(&rules)).unwrap(),
        senders: BTreeMap::from([(Channel::Linkedin, "sales-1".to_owned())]),
    };
    store::create(pool, tenant, &new).await.unwrap().id
}

fn lead(i: usize) -> NewLead {
    NewLead {
        external_id: Some(format!("p{i}")),
        variables: BTreeMap::from([
            ("first_name".to_owned(), format!("Ann{i}")),
            ("company_name".to_owned(), "Acme".to_owned()),
            ("email".to_owned(), format!("ann{i}@example.test")),
            (
                "linkedin_url".to_owned(),
                format!("https://linkedin.example/in/ann{i}"),
            ),
        ]),
    }
}

/// The pending step jobs: (outbox id, payload, run_at).
async fn pending(
    pool: &PgPool,
    tenant: TenantId,
) -> Vec<(Uuid, SequenceStep, Option<DateTime<Utc>>)> {
    let rows: Vec<(Uuid, Value, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select id, payload, run_at from outbox where tenant_id = $1 and queue = 'sequence_step'
           and completed_at is null and dead_at is null order by id",
    )
    .bind(tenant.0)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, p, at)| (id, serde_json::from_value(p).unwrap(), at))
        .collect()
}

/// Runs every pending step job as if its due time had come (the clock jumps to each job's
/// run_at), until none is left; returns the deferrals seen.
async fn drain(deps: &Deps, tenant: TenantId) -> Vec<String> {
    let mut deferred = Vec::new();
    for _ in 0..50 {
        let jobs = pending(&deps.pool, tenant).await;
        if jobs.is_empty() {
            return deferred;
        }
        for (id, job, run_at) in jobs {
            let now = run_at.unwrap_or_else(Utc::now).max(Utc::now());
            match sequences::run_step(deps, tenant, &id.simple().to_string(), &job, false, now)
                .await
            {
                Ok(()) => {}
                Err(JobError::Defer { reason, .. }) => {
                    deferred.push(reason);
                    outbox::mark_completed(&deps.pool, tenant, id)
                        .await
                        .unwrap();
                    continue;
                }
                Err(e) => panic!("step failed: {e}"),
            }
            outbox::mark_completed(&deps.pool, tenant, id)
                .await
                .unwrap();
        }
    }
    panic!("the sequence did not settle");
}

async fn count(pool: &PgPool, sql: &str, tenant: TenantId) -> i64 {
    sqlx::query_scalar(sql)
        .bind(tenant.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn walk() -> Value {
    json!([
        {"type": "email_send", "subject": "Hi {{first_name}}", "body": "Hello from {{company_name}}"},
        {"type": "delay", "days": 2},
        {"type": "condition", "if": "opened", "yes": 3, "no": 4},
        {"type": "linkedin_connect", "note": "Hi {{first_name}}"},
        {"type": "linkedin_visit"}
    ])
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn leads_walk_their_branch_once_each_with_the_delay_as_a_scheduled_job(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(&pool, tenant, walk(), json!({})).await;
    let added = sequences::add_leads(&pool, tenant, seq, &[lead(0), lead(1)])
        .await
        .unwrap();
    assert_eq!(added.added.len(), 2);
    sequences::start(&pool, tenant, seq).await.unwrap();

    // Step 0 for both leads; the delay then writes step 2's job two days ahead.
    for (id, job, _) in pending(&pool, tenant).await {
        sequences::run_step(
            &deps,
            tenant,
            &id.simple().to_string(),
            &job,
            false,
            Utc::now(),
        )
        .await
        .unwrap();
        outbox::mark_completed(&pool, tenant, id).await.unwrap();
    }
    let before_delay = Utc::now();
    for (id, job, _) in pending(&pool, tenant).await {
        assert_eq!(job.step, 1);
        sequences::run_step(
            &deps,
            tenant,
            &id.simple().to_string(),
            &job,
            false,
            before_delay,
        )
        .await
        .unwrap();
        outbox::mark_completed(&pool, tenant, id).await.unwrap();
    }
    let scheduled = pending(&pool, tenant).await;
    assert_eq!(scheduled.len(), 2);
    for (_, job, run_at) in &scheduled {
        assert_eq!(job.step, 2);
        let run_at = run_at.expect("the delay's next step has a run_at");
        assert!(
            run_at >= before_delay + Duration::days(2) - Duration::seconds(1),
            "{run_at}"
        );
    }
    // Lead 0 opened the email: yes-branch (connect, then visit); lead 1: no-branch (visit).
    sequences::apply_signal(&pool, tenant, added.added[0], Signal::Opened)
        .await
        .unwrap();
    drain(&deps, tenant).await;

    assert_eq!(channel.count("email_send"), 2);
    assert_eq!(channel.count("linkedin_connect"), 1);
    assert_eq!(channel.count("linkedin_visit"), 2);
    let yes_steps: Vec<i32> = sqlx::query_scalar(
        "select step from sequence_activities where tenant_id = $1 and lead_id = $2 order by step",
    )
    .bind(tenant.0)
    .bind(added.added[0])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(yes_steps, vec![0, 1, 2, 3, 4]);
    let no_steps: Vec<i32> = sqlx::query_scalar(
        "select step from sequence_activities where tenant_id = $1 and lead_id = $2 order by step",
    )
    .bind(tenant.0)
    .bind(added.added[1])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(no_steps, vec![0, 1, 2, 4]);
    for id in &added.added {
        assert_eq!(
            store::lead(&pool, tenant, *id).await.unwrap().state,
            LeadState::Completed
        );
    }
    assert_eq!(
        count(
            &pool,
            "select count(*) from sends where tenant_id = $1 and status = 'sent'",
            tenant
        )
        .await,
        5
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_step_run_twice_acts_and_records_once(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(
        &pool,
        tenant,
        json!([{"type": "linkedin_visit"}, {"type": "linkedin_follow"}]),
        json!({}),
    )
    .await;
    sequences::add_leads(&pool, tenant, seq, &[lead(0)])
        .await
        .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    let (id, job, _) = pending(&pool, tenant).await.remove(0);
    let job_id = id.simple().to_string();
    sequences::run_step(&deps, tenant, &job_id, &job, false, Utc::now())
        .await
        .unwrap();
    // The same job again (re-delivered after the ack was lost), and a duplicate job.
    sequences::run_step(&deps, tenant, &job_id, &job, false, Utc::now())
        .await
        .unwrap();
    sequences::run_step(&deps, tenant, "another-job", &job, false, Utc::now())
        .await
        .unwrap();
    assert_eq!(channel.count("linkedin_visit"), 1);
    assert_eq!(
        count(
            &pool,
            "select count(*) from sequence_activities where tenant_id = $1 and step = 0",
            tenant
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &pool,
            "select count(*) from sends where tenant_id = $1",
            tenant
        )
        .await,
        1
    );
    // Step 1's job was written once.
    assert_eq!(
        count(
            &pool,
            "select count(*) from outbox where tenant_id = $1 and payload->>'step' = '1'",
            tenant
        )
        .await,
        1
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_reply_stops_the_lead(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(&pool, tenant, walk(), json!({})).await;
    let added = sequences::add_leads(&pool, tenant, seq, &[lead(0)])
        .await
        .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    let (id, job, _) = pending(&pool, tenant).await.remove(0);
    sequences::run_step(
        &deps,
        tenant,
        &id.simple().to_string(),
        &job,
        false,
        Utc::now(),
    )
    .await
    .unwrap();
    outbox::mark_completed(&pool, tenant, id).await.unwrap();
    assert!(
        sequences::apply_signal(&pool, tenant, added.added[0], Signal::Replied)
            .await
            .unwrap()
    );
    assert!(
        !sequences::apply_signal(&pool, tenant, added.added[0], Signal::Replied)
            .await
            .unwrap()
    );
    drain(&deps, tenant).await;
    assert_eq!(
        store::lead(&pool, tenant, added.added[0])
            .await
            .unwrap()
            .state,
        LeadState::Replied
    );
    assert_eq!(
        count(
            &pool,
            "select count(*) from sequence_activities where tenant_id = $1",
            tenant
        )
        .await,
        1
    );
    assert_eq!(channel.actions.lock().unwrap().len(), 1);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_reached_daily_cap_defers_to_the_next_day(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(
        &pool,
        tenant,
        json!([{"type": "linkedin_connect"}]),
        json!({"caps": [{"action": "linkedin_connect", "daily": 2, "weekly": 200}]}),
    )
    .await;
    sequences::add_leads(&pool, tenant, seq, &[lead(0), lead(1), lead(2)])
        .await
        .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    let now = Utc::now();
    let mut deferred = Vec::new();
    for (id, job, _) in pending(&pool, tenant).await {
        match sequences::run_step(&deps, tenant, &id.simple().to_string(), &job, false, now).await {
            Ok(()) => {}
            Err(JobError::Defer { reason, until_ms }) => deferred.push((reason, until_ms)),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(channel.count("linkedin_connect"), 2);
    assert_eq!(deferred.len(), 1);
    assert!(deferred[0].0.contains("daily"), "{}", deferred[0].0);
    let next_day = steps::cap_periods(herald_admission::window::Tz::UTC, now).next_day;
    assert_eq!(deferred[0].1, next_day.timestamp_millis() as u64);
    assert_eq!(
        count(
            &pool,
            "select count(*) from sends where tenant_id = $1",
            tenant
        )
        .await,
        2
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn outside_the_window_a_step_waits_for_the_opening(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(
        &pool,
        tenant,
        json!([{"type": "email_send", "subject": "Hi", "body": "Hello {{first_name}}"}]),
        json!({"time_zone": "Europe/London", "window": {"start": "09:00", "end": "18:00"}}),
    )
    .await;
    sequences::add_leads(&pool, tenant, seq, &[lead(0)])
        .await
        .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    let (id, job, _) = pending(&pool, tenant).await.remove(0);
    let night: DateTime<Utc> = "2026-03-03T21:30:00Z".parse().unwrap();
    let err = sequences::run_step(&deps, tenant, &id.simple().to_string(), &job, false, night)
        .await
        .unwrap_err();
    let opens: DateTime<Utc> = "2026-03-04T09:00:00Z".parse().unwrap();
    assert!(
        matches!(&err, JobError::Defer { until_ms, .. } if *until_ms == opens.timestamp_millis() as u64),
        "{err:?}"
    );
    assert_eq!(channel.actions.lock().unwrap().len(), 0);
    assert_eq!(
        count(
            &pool,
            "select count(*) from sequence_activities where tenant_id = $1",
            tenant
        )
        .await,
        0
    );
    sequences::run_step(&deps, tenant, &id.simple().to_string(), &job, false, opens)
        .await
        .unwrap();
    assert_eq!(channel.count("email_send"), 1);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_crash_between_the_attempt_and_its_record_leaves_the_send_unknown(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(&pool, tenant, json!([{"type": "linkedin_message", "message": "Hi {{first_name}}"}, {"type": "linkedin_visit"}]), json!({})).await;
    let added = sequences::add_leads(&pool, tenant, seq, &[lead(0)])
        .await
        .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    let (id, job, _) = pending(&pool, tenant).await.remove(0);
    let job_id = id.simple().to_string();
    channel.crash_after_act.store(true, Ordering::SeqCst);
    let crashed = {
        let (deps, job, job_id) = (deps.clone(), job.clone(), job_id.clone());
        tokio::spawn(async move {
            sequences::run_step(&deps, tenant, &job_id, &job, false, Utc::now()).await
        })
        .await
    };
    assert!(crashed.is_err(), "the run should have died");
    assert_eq!(
        count(
            &pool,
            "select count(*) from sends where tenant_id = $1 and status = 'attempting'",
            tenant
        )
        .await,
        1
    );
    // Re-delivered: the send becomes unknown, nothing is sent again, the lead moves on.
    sequences::run_step(&deps, tenant, &job_id, &job, false, Utc::now())
        .await
        .unwrap();
    assert_eq!(channel.count("linkedin_message"), 1);
    assert_eq!(
        count(
            &pool,
            "select count(*) from sends where tenant_id = $1 and status = 'unknown'",
            tenant
        )
        .await,
        1
    );
    assert_eq!(
        store::lead(&pool, tenant, added.added[0])
            .await
            .unwrap()
            .current_step,
        1
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_step_that_no_longer_validates_fails_the_lead_naming_the_step(pool: PgPool) {
    let tenant = tenant(&pool).await;
    let channel = Arc::new(RecordingChannel::default());
    let deps = deps(&pool, &channel);
    let seq = sequence(
        &pool,
        tenant,
        json!([{"type": "linkedin_visit"}]),
        json!({}),
    )
    .await;
    let added = sequences::add_leads(&pool, tenant, seq, &[lead(0)])
        .await
        .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    sqlx::query("update sequences set steps = '[{\"type\": \"email_send\", \"body\": \"x\"}]' where tenant_id = $1")
        .bind(tenant.0)
        .execute(&pool)
        .await
        .unwrap();
    let (id, job, _) = pending(&pool, tenant).await.remove(0);
    let err = sequences::run_step(
        &deps,
        tenant,
        &id.simple().to_string(),
        &job,
        false,
        Utc::now(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, JobError::Permanent { reason } if reason.contains("step 0 (email_send): subject")),
        "{err:?}"
    );
    let lead = store::lead(&pool, tenant, added.added[0]).await.unwrap();
    assert_eq!(lead.state, LeadState::Failed);
    assert_eq!(channel.actions.lock().unwrap().len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Through the provider fakes: the HTTP connectors of `herald_jobs::channels`, and the fakes'
// events coming back through `herald_jobs::sequence_events` (the code herald-api serves at
// `POST /v1/webhooks/sequences/{tenant_id}`), on a simulated clock that the fakes follow.

mod through_fakes {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::time::Duration as StdDuration;

    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use chrono::{DateTime, Duration, Utc};
    use futures::StreamExt as _;
    use herald_core::{JobError, TenantId};
    use herald_fakes::email::{self as email_fake, EmailFakeConfig};
    use herald_fakes::instagram::{self as instagram_fake, InstagramFakeConfig};
    use herald_fakes::linkedin::{self as linkedin_fake, LinkedinFakeConfig};
    use herald_fakes::outreach::{Fault, Limit, ProviderFake, WebhookPlan, WebhookTarget};
    use herald_jobs::Deps;
    use herald_jobs::channels::{self, ChannelSettings, ProviderDefaults};
    use herald_jobs::sequence_events::{self, WebhookError};
    use herald_jobs::sequences;
    use herald_store::sequences::providers::{self, ChannelProvider};
    use herald_store::sequences::steps::{self, Channel};
    use herald_store::sequences::{self as store, LeadState, NewLead, NewSequence};
    use herald_store::{PgPool, outbox};
    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::{count, pending, tenant};

    /// A Monday morning, so days and weeks in the assertions do not depend on today.
    const START: &str = "2030-01-07T08:00:00Z";
    /// The longest a test waits for the fakes' events to reach herald.
    const SETTLE: StdDuration = StdDuration::from_secs(30);

    /// herald's sequence webhook on a local port, for the fakes to post to.
    async fn webhook_url(pool: &PgPool, tenant: TenantId) -> String {
        let pool = pool.clone();
        let app = axum::Router::new().route(
            "/v1/webhooks/sequences/{tenant}",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let pool = pool.clone();
                async move {
                    let signature = headers
                        .get(sequence_events::SIGNATURE_HEADER)
                        .and_then(|v| v.to_str().ok());
                    match sequence_events::receive(&pool, tenant, signature, &body).await {
                        Ok(answer) => (StatusCode::OK, axum::Json(answer)).into_response(),
                        Err(WebhookError::Unauthorized) => StatusCode::UNAUTHORIZED.into_response(),
                        Err(WebhookError::Store(e)) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).into_response(),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/v1/webhooks/sequences/{tenant}")
    }

    /// Events a little late, some twice, out of order.
    fn unruly() -> WebhookPlan {
        WebhookPlan {
            delay: StdDuration::ZERO..=StdDuration::from_millis(20),
            duplicate: 0.3,
            shuffle: true,
            batch: 10,
        }
    }

    /// The tenant's account at `channel`'s provider, pointing at `fake`; returns the target the
    /// fake signs its events for.
    async fn provider_account(
        pool: &PgPool,
        tenant: TenantId,
        channel: Channel,
        fake: &ProviderFake,
        webhook: &str,
    ) -> WebhookTarget {
        let secret = format!("whsec-{channel}");
        providers::put(
            pool,
            tenant,
            &ChannelProvider {
                channel,
                api_url: Some(fake.base_url()),
                api_key: format!("key-{channel}"),
                webhook_secret: secret.clone(),
            },
        )
        .await
        .unwrap();
        WebhookTarget {
            url: webhook.to_owned(),
            secret,
        }
    }

    fn deps(pool: &PgPool, settings: &ChannelSettings) -> Deps {
        let http = reqwest::Client::new();
        Deps::new(pool.clone(), http.clone(), false).with_sequence_connectors(channels::connectors(
            http,
            pool.clone(),
            settings,
        ))
    }

    async fn sequence(pool: &PgPool, tenant: TenantId, steps_json: Value, rules: Value) -> Uuid {
        let new = NewSequence {
            name: "through the fakes".into(),
            steps: steps::parse_steps(&steps_json).unwrap(),
            rules: steps::parse_rules(Some(&rules)).unwrap(),
            senders: BTreeMap::from([
                (Channel::Email, "sales@acme.test".to_owned()),
                (Channel::Linkedin, "sales-1".to_owned()),
                (Channel::Instagram, "acme.brand".to_owned()),
            ]),
        };
        store::create(pool, tenant, &new).await.unwrap().id
    }

    fn lead(i: usize, email_domain: &str) -> NewLead {
        NewLead {
            external_id: Some(format!("p{i}")),
            variables: BTreeMap::from([
                ("first_name".to_owned(), format!("Ann{i}")),
                ("company_name".to_owned(), "Acme".to_owned()),
                ("email".to_owned(), format!("ann{i}@{email_domain}")),
                (
                    "linkedin_url".to_owned(),
                    format!("https://www.linkedin.com/in/ann{i}"),
                ),
                ("instagram_handle".to_owned(), format!("@ann_{i}")),
            ]),
        }
    }

    /// Runs the tenant's step jobs on a simulated clock, the way the engine would: each round
    /// waits for the fakes' events to reach herald, jumps the clock (and the fakes', pinned to
    /// it) to the earliest due job, runs every due job (16 at a time), completes them, and re-schedules a
    /// deferred one at its deferral instant. Stops when nothing is pending, or before running
    /// jobs due after `until`. Returns the deferral reasons.
    async fn drive(
        deps: &Deps,
        tenant: TenantId,
        clock: &mut DateTime<Utc>,
        fakes: &[&ProviderFake],
        until: Option<DateTime<Utc>>,
    ) -> Vec<String> {
        let mut deferred = Vec::new();
        for _ in 0..5_000 {
            for fake in fakes {
                assert!(
                    fake.settle(SETTLE).await,
                    "the fake's events did not reach herald"
                );
            }
            let jobs = pending(&deps.pool, tenant).await;
            let Some(next) = jobs.iter().map(|(_, _, at)| at.unwrap_or(*clock)).min() else {
                return deferred;
            };
            if until.is_some_and(|until| next > until) {
                return deferred;
            }
            *clock = (*clock).max(next);
            let now = *clock;
            for fake in fakes {
                fake.state().pin(now);
            }
            let due: Vec<_> = jobs
                .into_iter()
                .filter(|(_, _, at)| at.unwrap_or(now) <= now)
                .collect();
            let results: Vec<_> = futures::stream::iter(due)
                .map(|(id, job, _)| async move {
                    let job_id = id.simple().to_string();
                    (
                        id,
                        sequences::run_step(deps, tenant, &job_id, &job, false, now).await,
                    )
                })
                .buffer_unordered(16)
                .collect()
                .await;
            for (id, result) in results {
                match result {
                    Ok(()) => {
                        outbox::mark_completed(&deps.pool, tenant, id)
                            .await
                            .unwrap();
                    }
                    Err(JobError::Defer { reason, until_ms }) => {
                        deferred.push(reason);
                        sqlx::query(
                            "update outbox set run_at = to_timestamp($3::float8 / 1000)
                             where tenant_id = $1 and id = $2",
                        )
                        .bind(tenant.0)
                        .bind(id)
                        .bind(until_ms as f64)
                        .execute(&deps.pool)
                        .await
                        .unwrap();
                    }
                    Err(e) => panic!("a step failed: {e}"),
                }
            }
        }
        panic!("the sequence did not settle");
    }

    /// Each lead's activities: step → (outcome, send id).
    async fn activities(
        pool: &PgPool,
        tenant: TenantId,
    ) -> HashMap<Uuid, BTreeMap<i32, (String, Option<Uuid>)>> {
        let rows: Vec<(Uuid, i32, String, Option<Uuid>)> = sqlx::query_as(
            "select lead_id, step, outcome, send_id from sequence_activities where tenant_id = $1",
        )
        .bind(tenant.0)
        .fetch_all(pool)
        .await
        .unwrap();
        let mut by_lead: HashMap<Uuid, BTreeMap<i32, (String, Option<Uuid>)>> = HashMap::new();
        for (lead, step, outcome, send) in rows {
            by_lead
                .entry(lead)
                .or_default()
                .insert(step, (outcome, send));
        }
        by_lead
    }

    /// The send ids the fake sent `event` about.
    fn events_of(fake: &ProviderFake, event: &str) -> HashSet<Uuid> {
        fake.state()
            .delivered_events()
            .into_iter()
            .filter(|e| e.event == event)
            .filter_map(|e| e.send_id.parse().ok())
            .collect()
    }

    /// Accepted actions per UTC day of the fake's clock, for `kind`.
    fn per_day(fake: &ProviderFake, kind: &str) -> BTreeMap<chrono::NaiveDate, usize> {
        let mut days = BTreeMap::new();
        for action in fake.actions().into_iter().filter(|a| a.kind == kind) {
            *days.entry(action.at.date_naive()).or_default() += 1;
        }
        days
    }

    #[sqlx::test(migrator = "herald_store::MIGRATOR")]
    async fn two_hundred_leads_follow_the_providers_signals_once_each(pool: PgPool) {
        let tenant = tenant(&pool).await;
        let webhook = webhook_url(&pool, tenant).await;
        let email = email_fake::spawn(EmailFakeConfig {
            rate: Limit::per_second(50),
            api_keys: vec!["key-email".into()],
            open_rate: 0.5,
            click_rate: 0.0,
            plan: unruly(),
            ..EmailFakeConfig::default()
        })
        .await
        .unwrap();
        let linkedin = linkedin_fake::spawn(LinkedinFakeConfig {
            rate: Limit::unlimited(),
            api_keys: vec!["key-linkedin".into()],
            accounts: vec!["sales-1".into()],
            accept_rate: 0.5,
            plan: unruly(),
            ..LinkedinFakeConfig::default()
        })
        .await
        .unwrap();
        email.set_webhook(provider_account(&pool, tenant, Channel::Email, &email, &webhook).await);
        linkedin.set_webhook(
            provider_account(&pool, tenant, Channel::Linkedin, &linkedin, &webhook).await,
        );
        let deps = deps(&pool, &ChannelSettings::default());
        let seq = sequence(
            &pool,
            tenant,
            json!([
                {"type": "email_send", "subject": "Hi {{first_name}}", "body": "Hello from {{company_name}}"},
                {"type": "delay", "days": 1},
                {"type": "condition", "if": "opened", "yes": 3, "no": 4},
                {"type": "email_followup", "body": "Following up, {{first_name}}"},
                {"type": "linkedin_connect", "note": "Hi {{first_name}}"},
                {"type": "delay", "days": 2},
                {"type": "condition", "if": "connected", "yes": 7, "no": 8},
                {"type": "linkedin_message", "message": "Thanks for connecting, {{first_name}}"}
            ]),
            json!({"caps": [{"action": "linkedin_connect", "daily": 100, "weekly": 200}]}),
        )
        .await;
        // The last ten addresses bounce: no opens, so no follow-up to them.
        let leads: Vec<NewLead> = (0..200)
            .map(|i| {
                lead(
                    i,
                    if i >= 190 {
                        "bounce.test"
                    } else {
                        "example.test"
                    },
                )
            })
            .collect();
        let added = sequences::add_leads(&pool, tenant, seq, &leads)
            .await
            .unwrap();
        assert_eq!(added.added.len(), 200);
        sequences::start(&pool, tenant, seq).await.unwrap();

        // Day 0: the first email to everyone (throttled by the provider's rate on the way).
        let mut clock: DateTime<Utc> = START.parse().unwrap();
        let fakes = [&email, &linkedin];
        let mut deferred = drive(
            &deps,
            tenant,
            &mut clock,
            &fakes,
            Some(START.parse::<DateTime<Utc>>().unwrap() + Duration::hours(1)),
        )
        .await;
        assert_eq!(email.actions().len(), 200);
        assert!(email.stats().errors_of("rate_limited") > 0);
        // Twenty leads reply to it: they stop.
        let before = activities(&pool, tenant).await;
        let repliers = &added.added[..20];
        for lead in repliers {
            let (_, send) = &before[lead][&0];
            assert!(email.reply(&send.unwrap().to_string()));
        }
        deferred.extend(drive(&deps, tenant, &mut clock, &fakes, None).await);

        // No action twice: every send id reached its provider once, and each one belongs to an
        // activity (one per lead and step).
        let walked = activities(&pool, tenant).await;
        let sends: Vec<Uuid> = walked
            .values()
            .flat_map(|steps| steps.values().filter_map(|(_, send)| *send))
            .collect();
        let mut at_fakes: HashMap<String, usize> = email.counts();
        at_fakes.extend(linkedin.counts());
        assert!(at_fakes.values().all(|n| *n == 1), "an action was repeated");
        assert_eq!(at_fakes.len(), sends.len());
        for send in &sends {
            assert_eq!(at_fakes.get(&send.to_string()), Some(&1), "send {send}");
        }

        // Each lead followed the signals the providers sent.
        let opened = events_of(&email, "opened");
        let connected = events_of(&linkedin, "connected");
        let bounced = events_of(&email, "bounced");
        assert_eq!(bounced.len(), 10);
        for (i, lead) in added.added.iter().enumerate() {
            let steps = &walked[lead];
            let state = store::lead(&pool, tenant, *lead).await.unwrap().state;
            if i < 20 {
                assert_eq!(state, LeadState::Replied, "lead {i}");
                assert_eq!(
                    steps.keys().copied().collect::<Vec<_>>(),
                    vec![0, 1],
                    "lead {i}"
                );
                continue;
            }
            assert_eq!(state, LeadState::Completed, "lead {i}");
            let first_email = steps[&0].1.unwrap();
            let was_opened = opened.contains(&first_email);
            assert!(!(i >= 190 && was_opened));
            assert_eq!(
                steps[&2].0,
                if was_opened { "yes" } else { "no" },
                "lead {i}"
            );
            assert_eq!(steps.contains_key(&3), was_opened, "lead {i}");
            let invitation = steps[&4].1.unwrap();
            let was_connected = connected.contains(&invitation);
            assert_eq!(
                steps[&6].0,
                if was_connected { "yes" } else { "no" },
                "lead {i}"
            );
            assert_eq!(steps.contains_key(&7), was_connected, "lead {i}");
        }
        assert!(!opened.is_empty() && !connected.is_empty());

        // The providers' statuses settled the sends: bounces failed, opens read.
        assert_eq!(
            count(
                &pool,
                "select count(*) from sends where tenant_id = $1 and status = 'failed' and error_code = 'bounced'",
                tenant
            )
            .await,
            10
        );
        assert_eq!(
            count(
                &pool,
                "select count(*) from sends where tenant_id = $1 and status in ('attempting', 'unknown')",
                tenant
            )
            .await,
            0
        );
        let lead_of: HashMap<Uuid, Uuid> = walked
            .iter()
            .flat_map(|(lead, steps)| {
                steps
                    .values()
                    .filter_map(|(_, send)| send.map(|s| (s, *lead)))
            })
            .collect();
        let opened_leads: HashSet<Uuid> = opened
            .iter()
            .filter_map(|s| lead_of.get(s))
            .copied()
            .collect();
        assert_eq!(
            count(
                &pool,
                "select count(*) from sequence_signals where tenant_id = $1 and signal = 'opened'",
                tenant,
            )
            .await as usize,
            opened_leads.len()
        );

        // LinkedIn: herald's daily cap kept the account under the provider's limit, so the
        // provider never refused an invitation; the connects spread over two days.
        assert_eq!(linkedin.stats().errors_of("invitation_limit_exceeded"), 0);
        let days = per_day(&linkedin, "connect");
        assert_eq!(days.values().sum::<usize>(), 180);
        assert!(days.values().all(|n| *n <= 100), "{days:?}");
        assert!(
            deferred
                .iter()
                .any(|r| r.contains("daily linkedin_connect cap"))
        );
        assert!(deferred.iter().any(|r| r.contains("rate limit: email")));
        assert_eq!(
            count(
                &pool,
                "select count(*) from sequence_leads where tenant_id = $1 and state = 'failed'",
                tenant
            )
            .await,
            0
        );
    }

    #[sqlx::test(migrator = "herald_store::MIGRATOR")]
    async fn the_providers_invitation_limit_defers_without_failing(pool: PgPool) {
        let tenant = tenant(&pool).await;
        let webhook = webhook_url(&pool, tenant).await;
        let linkedin = linkedin_fake::spawn(LinkedinFakeConfig {
            rate: Limit::unlimited(),
            accept_rate: 0.0,
            ..LinkedinFakeConfig::default()
        })
        .await
        .unwrap();
        linkedin.set_webhook(
            provider_account(&pool, tenant, Channel::Linkedin, &linkedin, &webhook).await,
        );
        let deps = deps(&pool, &ChannelSettings::default());
        // No cap in herald's rules: the provider's limit is what stops the 101st invitation.
        let seq = sequence(
            &pool,
            tenant,
            json!([{"type": "linkedin_connect"}]),
            json!({}),
        )
        .await;
        let leads: Vec<NewLead> = (0..150).map(|i| lead(i, "example.test")).collect();
        sequences::add_leads(&pool, tenant, seq, &leads)
            .await
            .unwrap();
        sequences::start(&pool, tenant, seq).await.unwrap();
        let mut clock: DateTime<Utc> = START.parse().unwrap();
        let deferred = drive(&deps, tenant, &mut clock, &[&linkedin], None).await;

        // Fifty invitations were refused once each on the first day, deferred to the reset, and
        // sent the next day; none failed and none went twice.
        assert_eq!(linkedin.stats().errors_of("invitation_limit_exceeded"), 50);
        assert_eq!(deferred.len(), 50);
        assert!(deferred.iter().all(|r| r.contains("rate limit: linkedin")));
        let days = per_day(&linkedin, "connect");
        assert_eq!(days.values().copied().collect::<Vec<_>>(), vec![100, 50]);
        assert!(linkedin.counts().values().all(|n| *n == 1));
        assert_eq!(
            count(
                &pool,
                "select count(*) from sends where tenant_id = $1 and status = 'sent'",
                tenant
            )
            .await,
            150
        );
        assert_eq!(
            count(
                &pool,
                "select count(*) from sequence_leads where tenant_id = $1 and state = 'completed'",
                tenant
            )
            .await,
            150
        );
    }

    #[sqlx::test(migrator = "herald_store::MIGRATOR")]
    async fn the_workers_own_account_serves_tenants_without_one(pool: PgPool) {
        let tenant = tenant(&pool).await;
        let secret = herald_store::tenants::hmac_secret(&pool, tenant)
            .await
            .unwrap();
        let instagram = instagram_fake::spawn(InstagramFakeConfig {
            rate: Limit::per_hour(60),
            api_keys: vec!["worker-key".into()],
            webhook: Some(WebhookTarget {
                url: webhook_url(&pool, tenant).await,
                // A worker-wide account signs with the tenant's own secret.
                secret,
            }),
            plan: unruly(),
            ..InstagramFakeConfig::default()
        })
        .await
        .unwrap();
        let seq = sequence(
            &pool,
            tenant,
            json!([
                {"type": "instagram_follow"},
                {"type": "instagram_dm", "message": "Hi {{first_name}}!"},
                {"type": "delay", "hours": 12},
                {"type": "instagram_like"}
            ]),
            json!({}),
        )
        .await;
        let added =
            sequences::add_leads(&pool, tenant, seq, &[lead(0, "x.test"), lead(1, "x.test")])
                .await
                .unwrap();
        sequences::start(&pool, tenant, seq).await.unwrap();

        // Without any account the step waits for one, recording nothing.
        let unconfigured = deps(&pool, &ChannelSettings::default());
        let (id, job, _) = pending(&pool, tenant).await.remove(0);
        let start: DateTime<Utc> = START.parse().unwrap();
        let err = sequences::run_step(
            &unconfigured,
            tenant,
            &id.simple().to_string(),
            &job,
            false,
            start,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, JobError::Retry { reason, .. } if reason.contains("PUT /v1/providers/instagram") && reason.contains("INSTAGRAM_API_URL")),
            "{err:?}"
        );
        assert_eq!(
            count(
                &pool,
                "select count(*) from sequence_activities where tenant_id = $1",
                tenant
            )
            .await,
            0
        );

        // With the worker's account (INSTAGRAM_API_URL, INSTAGRAM_API_KEY).
        let settings = ChannelSettings {
            instagram: ProviderDefaults {
                api_url: Some(instagram.base_url()),
                api_key: Some("worker-key".to_owned().into()),
            },
            ..ChannelSettings::default()
        };
        let deps = deps(&pool, &settings);
        let mut clock = start;
        drive(
            &deps,
            tenant,
            &mut clock,
            &[&instagram],
            Some(start + Duration::hours(1)),
        )
        .await;
        // Lead 0 answers the DM before the like: it gets no like.
        let walked = activities(&pool, tenant).await;
        let dm = walked[&added.added[0]][&1].1.unwrap();
        assert!(instagram.reply(&dm.to_string()));
        drive(&deps, tenant, &mut clock, &[&instagram], None).await;

        let kinds = |target: &str| -> Vec<String> {
            instagram
                .actions()
                .into_iter()
                .filter(|a| a.target == target)
                .map(|a| a.kind)
                .collect()
        };
        assert_eq!(kinds("ann_0"), vec!["follow", "dm"]);
        assert_eq!(kinds("ann_1"), vec!["follow", "dm", "like"]);
        assert!(instagram.counts().values().all(|n| *n == 1));
        assert_eq!(
            store::lead(&pool, tenant, added.added[0])
                .await
                .unwrap()
                .state,
            LeadState::Replied
        );
        // The reply also settled the DM's send as read.
        assert_eq!(
            herald_store::sends::get(&pool, tenant, dm)
                .await
                .unwrap()
                .unwrap()
                .status,
            herald_store::sends::SendStatus::Read
        );
    }

    #[sqlx::test(migrator = "herald_store::MIGRATOR")]
    async fn a_lost_answer_leaves_the_send_unknown_until_the_provider_says_delivered(pool: PgPool) {
        let tenant = tenant(&pool).await;
        let webhook = webhook_url(&pool, tenant).await;
        let email = email_fake::spawn(EmailFakeConfig {
            open_rate: 0.0,
            ..EmailFakeConfig::default()
        })
        .await
        .unwrap();
        let target = provider_account(&pool, tenant, Channel::Email, &email, &webhook).await;
        let deps = deps(
            &pool,
            &ChannelSettings {
                timeout: StdDuration::from_millis(300),
                ..ChannelSettings::default()
            },
        );
        let seq = sequence(
            &pool,
            tenant,
            json!([
                {"type": "email_send", "subject": "Hi", "body": "Hello {{first_name}}"},
                {"type": "email_followup", "body": "Again, {{first_name}}"}
            ]),
            json!({}),
        )
        .await;
        let added = sequences::add_leads(&pool, tenant, seq, &[lead(0, "example.test")])
            .await
            .unwrap();
        sequences::start(&pool, tenant, seq).await.unwrap();
        // The provider sends the email but its answer never arrives in time.
        email
            .state()
            .inject([Fault::AcceptThenStall(StdDuration::from_secs(3))]);
        let (id, job, _) = pending(&pool, tenant).await.remove(0);
        let job_id = id.simple().to_string();
        let now: DateTime<Utc> = START.parse().unwrap();
        sequences::run_step(&deps, tenant, &job_id, &job, false, now)
            .await
            .unwrap();
        let send = activities(&pool, tenant).await[&added.added[0]][&0]
            .1
            .unwrap();
        let status = || async {
            herald_store::sends::get(&pool, tenant, send)
                .await
                .unwrap()
                .unwrap()
                .status
        };
        assert_eq!(status().await, herald_store::sends::SendStatus::Unknown);
        // Not sent again, even when the job runs again; the lead moved on.
        sequences::run_step(&deps, tenant, &job_id, &job, false, now)
            .await
            .unwrap();
        assert_eq!(email.state().count(&send.to_string()), 1);
        // The provider's event (held until now) settles it.
        email.set_webhook(target);
        assert!(email.settle(SETTLE).await);
        assert_eq!(status().await, herald_store::sends::SendStatus::Delivered);
    }
}
