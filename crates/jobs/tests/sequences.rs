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
