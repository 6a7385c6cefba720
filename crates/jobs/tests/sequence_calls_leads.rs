//! Sequences' `voice_agent_call` and `lead_generation` steps, with a fresh migrated database per
//! test. Call steps go through the real call path: Redis slots under a random namespace, the
//! Vapi fake placing the calls, and the provider's call-ended messages taken by
//! `on_server_message` and released by `run_release_slot`, as the webhook and the worker would;
//! the fake's calls talk for minutes, so every end is the test's. Lead generation runs its job's
//! `run_lead_generation` at explicit instants (days pass by changing `now`, not by waiting).
//! Effects are counted in Postgres (calls, activities, leads, outbox rows), at the fake and in
//! Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_admission::{Connection, Slots};
use herald_connectors::voice::ServerEvent;
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_fakes::vapi::{self, VapiFake, VapiFakeConfig};
use herald_jobs::Deps;
use herald_jobs::calls::{
    self, CallDispatch, MessageEffect, ReleaseSlot, Released, Voice, VoiceSettings,
};
use herald_jobs::sequences::{self, Generation, LeadGeneration, SequenceStep};
use herald_store::calls as call_store;
use herald_store::sequences::pools::{self, PoolPerson};
use herald_store::sequences::steps;
use herald_store::sequences::{self as store, LeadState, NewLead, NewSequence};
use herald_store::{PgPool, outbox, tenants};
use serde_json::{Value, json};
use uuid::Uuid;

async fn count(pool: &PgPool, sql: &str, tenant: TenantId) -> i64 {
    sqlx::query_scalar(sql)
        .bind(tenant.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn sequence(pool: &PgPool, tenant: TenantId, steps_json: Value, rules: Value) -> Uuid {
    let new = NewSequence {
        name: "outreach".into(),
        steps: steps::parse_steps(&steps_json).unwrap(),
        rules: steps::parse_rules(Some(&rules)).unwrap(),
        senders: BTreeMap::new(),
    };
    store::create(pool, tenant, &new).await.unwrap().id
}

/// The pending step jobs: (outbox id, payload).
async fn pending_steps(pool: &PgPool, tenant: TenantId) -> Vec<(Uuid, SequenceStep)> {
    let rows: Vec<(Uuid, Value)> = sqlx::query_as(
        "select id, payload from outbox where tenant_id = $1 and queue = 'sequence_step'
           and completed_at is null and dead_at is null order by id",
    )
    .bind(tenant.0)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, p)| (id, serde_json::from_value(p).unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// voice_agent_call

struct Calls {
    pool: PgPool,
    tenant: TenantId,
    deps: Deps,
    slots: Slots,
    fake: VapiFake,
    user: Uuid,
    agent: Uuid,
}

async fn calls_world(pool: PgPool) -> Calls {
    let tenant = tenants::create(&pool, "acme", "UTC").await.unwrap().0.id;
    // Calls talk far longer than any test: they end only when the test says so.
    let fake = vapi::spawn(VapiFakeConfig {
        talk: Duration::from_secs(600)..=Duration::from_secs(600),
        ..VapiFakeConfig::default()
    })
    .await
    .unwrap();
    call_store::put_voice_provider(
        &pool,
        tenant,
        &fake.base_url(),
        "vapi-key",
        "vapi-secret-for-tests",
        Some(10),
    )
    .await
    .unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = Connection::connect(&url).await.unwrap();
    let namespace = format!("test-{}", Uuid::new_v4().simple());
    let slots = Slots::new(conn, &namespace, CallDispatch::QUEUE).unwrap();
    let http = reqwest::Client::new();
    let voice = Voice::new(http.clone(), VoiceSettings::default(), slots.clone());
    let deps = Deps::new(pool.clone(), http, false).with_voice(voice);
    // One call at a time for this user: the slot limit is visible in the order calls go.
    let user = call_store::create_user(&pool, tenant, "Uma", Some(1))
        .await
        .unwrap()
        .id;
    let agent = call_store::create_agent(&pool, tenant, "Ava", "asst-1", "phone-1")
        .await
        .unwrap()
        .id;
    Calls {
        pool,
        tenant,
        deps,
        slots,
        fake,
        user,
        agent,
    }
}

impl Calls {
    async fn count(&self, sql: &str) -> i64 {
        count(&self.pool, sql, self.tenant).await
    }

    async fn run_step(
        &self,
        id: Uuid,
        job: &SequenceStep,
        now: DateTime<Utc>,
    ) -> Result<(), JobError> {
        sequences::run_step(
            &self.deps,
            self.tenant,
            &id.simple().to_string(),
            job,
            false,
            now,
        )
        .await
    }

    /// Runs every pending step job once (marking each done, as the engine would); returns the
    /// errors.
    async fn run_pending_steps(&self, now: DateTime<Utc>) -> Vec<JobError> {
        let mut errors = Vec::new();
        for (id, job) in pending_steps(&self.pool, self.tenant).await {
            if let Err(e) = self.run_step(id, &job, now).await {
                errors.push(e);
            }
            outbox::mark_completed(&self.pool, self.tenant, id)
                .await
                .unwrap();
        }
        errors
    }

    /// The provider's id of the one call in progress.
    async fn live_call(&self) -> (Uuid, String) {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "select id, provider_call_id from calls where tenant_id = $1
               and state in ('dialing', 'in_call')",
        )
        .bind(self.tenant.0)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.into_iter().next().unwrap()
    }

    /// The call hangs up at the fake, and the provider says so with `reason` (the webhook's
    /// path): the release job it writes, and whether it was a duplicate.
    async fn provider_ends(&self, provider_call_id: &str, reason: &str) -> (ReleaseSlot, bool) {
        self.fake.state().end_call(provider_call_id);
        let effect = calls::on_server_message(
            &self.pool,
            self.tenant,
            ServerEvent::Ended {
                call_id: provider_call_id.to_owned(),
                ended_reason: Some(reason.to_owned()),
                duration_ms: Some(42_000),
            },
        )
        .await
        .unwrap();
        let MessageEffect::ReleaseQueued { duplicate } = effect else {
            panic!("{effect:?}");
        };
        let payload: Value = sqlx::query_scalar(
            "select payload from outbox where tenant_id = $1 and queue = 'call_release_slot'
               and job_key = $2",
        )
        .bind(self.tenant.0)
        .bind(format!("release:{provider_call_id}"))
        .fetch_one(&self.pool)
        .await
        .unwrap();
        (serde_json::from_value(payload).unwrap(), duplicate)
    }

    async fn lead(&self, id: Uuid) -> store::Lead {
        store::lead(&self.pool, self.tenant, id).await.unwrap()
    }
}

fn caller(i: usize, phone: &str) -> NewLead {
    NewLead {
        external_id: Some(format!("c{i}")),
        variables: BTreeMap::from([
            ("first_name".to_owned(), format!("Cal{i}")),
            ("phone".to_owned(), phone.to_owned()),
        ]),
    }
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_call_step_goes_through_the_slots_and_moves_the_lead_on_when_the_call_ends(pool: PgPool) {
    let w = calls_world(pool).await;
    // Call, then branch on whether the call connected: step 2 for yes, 3 for no.
    let seq = sequence(
        &w.pool,
        w.tenant,
        json!([
            {"type": "voice_agent_call", "user_id": w.user, "agent_id": w.agent},
            {"type": "condition", "if": "connected", "yes": 2, "no": 3},
            {"type": "delay", "hours": 1},
            {"type": "delay", "hours": 2}
        ]),
        json!({}),
    )
    .await;
    let added = sequences::add_leads(
        &w.pool,
        w.tenant,
        seq,
        &[
            caller(0, "+1 555 000 0001"),
            caller(1, "+15550000002"),
            caller(2, "555-0003"),
        ],
    )
    .await
    .unwrap();
    let (a, b, bad) = (added.added[0], added.added[1], added.added[2]);
    sequences::start(&w.pool, w.tenant, seq).await.unwrap();
    let now = Utc::now();

    // Every step-0 job runs twice (a re-delivery): two calls queued, one per valid lead.
    let jobs = pending_steps(&w.pool, w.tenant).await;
    assert_eq!(jobs.len(), 3);
    let mut failures = Vec::new();
    for (id, job) in &jobs {
        for _ in 0..2 {
            if let Err(e) = w.run_step(*id, job, now).await {
                failures.push((job.lead_id, e.to_string()));
            }
        }
        outbox::mark_completed(&w.pool, w.tenant, *id)
            .await
            .unwrap();
    }
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, bad);
    let failed = w.lead(bad).await;
    assert_eq!(failed.state, LeadState::Failed);
    let reason = failed.error.unwrap_or_default();
    assert!(
        reason.contains("step 0 (voice_agent_call)") && reason.contains("E.164"),
        "{reason}"
    );
    assert_eq!(
        w.count("select count(*) from calls where tenant_id = $1 and state = 'queued'")
            .await,
        2
    );
    assert_eq!(
        w.count(
            "select count(*) from sequence_activities where tenant_id = $1
               and outcome = 'calling' and call_id is not null"
        )
        .await,
        2
    );
    // The calls belong to the step's own campaign, marked as the sequence's.
    let campaigns: Vec<(Uuid, Option<Uuid>, Option<i32>)> = sqlx::query_as(
        "select distinct c.id, c.sequence_id, c.sequence_step from calls k
         join call_campaigns c on c.tenant_id = k.tenant_id and c.id = k.campaign_id
         where k.tenant_id = $1",
    )
    .bind(w.tenant.0)
    .fetch_all(&w.pool)
    .await
    .unwrap();
    assert_eq!(campaigns.len(), 1);
    assert_eq!((campaigns[0].1, campaigns[0].2), (Some(seq), Some(0)));
    // A hand-made change to it is refused: it follows its sequence.
    let refused = call_store::cancel_campaign(&w.pool, w.tenant, campaigns[0].0).await;
    assert!(
        matches!(refused, Err(herald_store::Error::Conflict { .. })),
        "{refused:?}"
    );
    // Nobody moved on yet, and nothing but dispatch was written.
    assert!(pending_steps(&w.pool, w.tenant).await.is_empty());
    assert_eq!(
        (w.lead(a).await.current_step, w.lead(b).await.current_step),
        (0, 0)
    );
    assert!(
        w.count(
            "select count(*) from outbox where tenant_id = $1 and queue = 'call_dispatch'
               and completed_at is null"
        )
        .await
            >= 1
    );

    // Dispatch: the user may hold one call, so one call goes.
    let first = calls::run_dispatch(&w.deps, w.tenant, Utc::now())
        .await
        .unwrap();
    assert_eq!(first.placed.len(), 1, "{first:?}");
    assert_eq!(w.fake.state().stats().calls_created, 1);
    let again = calls::run_dispatch(&w.deps, w.tenant, Utc::now())
        .await
        .unwrap();
    assert!(
        again.placed.is_empty(),
        "the user's slot is taken: {again:?}"
    );
    let (first_call, provider_id) = w.live_call().await;
    let first_lead: Uuid = sqlx::query_scalar(
        "select lead_id from sequence_activities where tenant_id = $1 and call_id = $2",
    )
    .bind(w.tenant.0)
    .bind(first_call)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    let second_lead = if first_lead == a { b } else { a };
    let placed = &w.fake.state().calls()[0];
    assert_eq!(placed.metadata["call_id"], first_call.to_string());

    // The call ends; the provider says so twice: one release job, the lead moves on once.
    let (release, duplicate) = w.provider_ends(&provider_id, "customer-ended-call").await;
    assert!(!duplicate);
    let (_, duplicate) = w.provider_ends(&provider_id, "customer-ended-call").await;
    assert!(duplicate);
    let released = calls::run_release_slot(&w.deps, w.tenant, &release, false)
        .await
        .unwrap();
    assert_eq!(
        released,
        Released::Ended {
            call: first_call,
            slot_freed: true
        }
    );
    let again = calls::run_release_slot(&w.deps, w.tenant, &release, false)
        .await
        .unwrap();
    assert_eq!(again, Released::AlreadyEnded { call: first_call });
    // A second end of the same call by any path settles nothing more.
    let mut conn = w.pool.acquire().await.unwrap();
    assert!(
        !sequences::on_call_ended(
            &mut conn,
            w.tenant,
            first_call,
            call_store::Outcome::Failed,
            Utc::now()
        )
        .await
        .unwrap()
    );
    drop(conn);
    let moved = w.lead(first_lead).await;
    assert_eq!((moved.state, moved.current_step), (LeadState::Active, 1));
    assert_eq!(w.lead(second_lead).await.current_step, 0);
    let next = pending_steps(&w.pool, w.tenant).await;
    assert_eq!(
        next.len(),
        1,
        "one step-1 job for the lead whose call ended"
    );
    assert_eq!((next[0].1.lead_id, next[0].1.step), (first_lead, 1));
    let outcome: String = sqlx::query_scalar(
        "select outcome from sequence_activities where tenant_id = $1 and call_id = $2",
    )
    .bind(w.tenant.0)
    .bind(first_call)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(outcome, "completed");
    assert!(
        store::has_signal(&w.pool, w.tenant, first_lead, steps::Signal::Connected)
            .await
            .unwrap()
    );

    // The freed slot takes the second call; it ends busy.
    let second = calls::run_dispatch(&w.deps, w.tenant, Utc::now())
        .await
        .unwrap();
    assert_eq!(second.placed.len(), 1, "{second:?}");
    let (second_call, provider_id) = w.live_call().await;
    let (release, _) = w.provider_ends(&provider_id, "customer-busy").await;
    calls::run_release_slot(&w.deps, w.tenant, &release, false)
        .await
        .unwrap();
    let timeline = store::timeline(&w.pool, w.tenant, second_lead)
        .await
        .unwrap();
    assert_eq!(timeline.len(), 1);
    assert_eq!(
        (timeline[0].outcome.as_str(), timeline[0].call_id),
        ("busy", Some(second_call))
    );
    assert!(
        !store::has_signal(&w.pool, w.tenant, second_lead, steps::Signal::Connected)
            .await
            .unwrap()
    );

    // The conditions read the calls: connected goes to step 2, busy to step 3.
    assert!(w.run_pending_steps(Utc::now()).await.is_empty());
    assert_eq!(w.lead(first_lead).await.current_step, 2);
    assert_eq!(w.lead(second_lead).await.current_step, 3);

    // One call per lead reached the provider, never two at once for the user; no slot is left.
    let stats = w.fake.state().stats();
    assert_eq!(stats.calls_created, 2, "{stats:?}");
    assert_eq!(
        stats.max_active_by_group.values().max(),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(
        w.slots
            .tenant_in_use(&w.tenant.0.simple().to_string(), now_ms())
            .await
            .unwrap(),
        0
    );
    let seq_view = store::get(&w.pool, w.tenant, seq).await.unwrap();
    let stats = store::stats(&w.pool, w.tenant, &seq_view).await.unwrap();
    assert_eq!(
        stats.steps[0].calls,
        BTreeMap::from([("busy".to_owned(), 1), ("completed".to_owned(), 1)])
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_call_step_follows_its_sequence_and_rechecks_its_agent(pool: PgPool) {
    let w = calls_world(pool).await;
    let seq = sequence(
        &w.pool,
        w.tenant,
        json!([
            {"type": "voice_agent_call", "user_id": w.user, "agent_id": w.agent},
            {"type": "delay", "hours": 1}
        ]),
        json!({"time_zone": "Europe/London", "window": {"start": "09:00", "end": "17:00"}}),
    )
    .await;
    let added = sequences::add_leads(
        &w.pool,
        w.tenant,
        seq,
        &[caller(0, "+15550000001"), caller(1, "+15550000002")],
    )
    .await
    .unwrap();
    sequences::start(&w.pool, w.tenant, seq).await.unwrap();
    let jobs = pending_steps(&w.pool, w.tenant).await;
    // The first lead's call is queued; its campaign calls in the sequence's window.
    w.run_step(jobs[0].0, &jobs[0].1, Utc::now()).await.unwrap();
    outbox::mark_completed(&w.pool, w.tenant, jobs[0].0)
        .await
        .unwrap();
    let campaign: (Uuid, String, String, String) = sqlx::query_as(
        "select id, status, time_zone, first_call_time::text || '-' || last_call_time::text
         from call_campaigns where tenant_id = $1 and sequence_id = $2",
    )
    .bind(w.tenant.0)
    .bind(seq)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            campaign.1.as_str(),
            campaign.2.as_str(),
            campaign.3.as_str()
        ),
        ("active", "Europe/London", "09:00:00-17:00:00")
    );

    // Pausing the sequence pauses its campaign (queued calls wait); starting resumes it.
    sequences::pause(&w.pool, w.tenant, seq).await.unwrap();
    let status: String =
        sqlx::query_scalar("select status from call_campaigns where tenant_id = $1 and id = $2")
            .bind(w.tenant.0)
            .bind(campaign.0)
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(status, "paused");
    sequences::start(&w.pool, w.tenant, seq).await.unwrap();
    let status: String =
        sqlx::query_scalar("select status from call_campaigns where tenant_id = $1 and id = $2")
            .bind(w.tenant.0)
            .bind(campaign.0)
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(status, "active");

    // The agent is removed: the second lead's step fails, naming the step and the field.
    call_store::remove_agent(&w.pool, w.tenant, w.agent)
        .await
        .unwrap();
    let second = pending_steps(&w.pool, w.tenant)
        .await
        .into_iter()
        .find(|(_, job)| job.lead_id == added.added[1])
        .unwrap();
    let err = w
        .run_step(second.0, &second.1, Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::Permanent { .. }), "{err:?}");
    let failed = w.lead(added.added[1]).await;
    assert_eq!(failed.state, LeadState::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("step 0 (voice_agent_call): agent_id")),
        "{:?}",
        failed.error
    );
    assert_eq!(
        w.count("select count(*) from calls where tenant_id = $1")
            .await,
        1,
        "no call for the lead whose step failed"
    );

    // Stopping the sequence cancels the queued call and settles its step as cancelled.
    sequences::stop(&w.pool, w.tenant, seq).await.unwrap();
    assert_eq!(
        w.count("select count(*) from calls where tenant_id = $1 and state = 'cancelled'")
            .await,
        1
    );
    let outcome: String = sqlx::query_scalar(
        "select outcome from sequence_activities where tenant_id = $1 and lead_id = $2",
    )
    .bind(w.tenant.0)
    .bind(added.added[0])
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(outcome, "cancelled");
    assert_eq!(w.lead(added.added[0]).await.state, LeadState::Stopped);
    assert_eq!(w.fake.state().stats().calls_created, 0);
}

// ---------------------------------------------------------------------------------------------
// lead_generation

fn person(i: usize) -> PoolPerson {
    PoolPerson {
        external_person_id: format!("p{i:03}"),
        variables: BTreeMap::from([
            ("first_name".to_owned(), format!("Pat{i}")),
            ("email".to_owned(), format!("pat{i}@example.test")),
        ]),
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

async fn generate(pool: &PgPool, tenant: TenantId, seq: Uuid, now: DateTime<Utc>) -> Generation {
    sequences::run_lead_generation(pool, tenant, &LeadGeneration { sequence_id: seq }, now)
        .await
        .unwrap()
}

fn added(generation: &Generation) -> usize {
    match generation {
        Generation::Ran { added, .. } => added.len(),
        Generation::Idle => panic!("the generation did not run"),
    }
}

async fn lead_external_ids(pool: &PgPool, tenant: TenantId, seq: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "select external_id from sequence_leads where tenant_id = $1 and sequence_id = $2
         order by external_id",
    )
    .bind(tenant.0)
    .bind(seq)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn lead_generation_fills_up_to_the_daily_limit_once_per_local_day(pool: PgPool) {
    let tenant = tenants::create(&pool, "acme", "UTC").await.unwrap().0.id;
    let mut people: Vec<PoolPerson> = (0..25).map(person).collect();
    // Someone without the email the sequence's step needs is never drawn.
    people.push(PoolPerson {
        external_person_id: "no-email".into(),
        variables: BTreeMap::from([("first_name".to_owned(), "Nemo".to_owned())]),
    });
    let loaded = pools::load(&pool, tenant, "q4", &people).await.unwrap();
    assert_eq!((loaded.added, loaded.updated), (26, 0));
    let seq = sequence(
        &pool,
        tenant,
        json!([
            {"type": "lead_generation", "daily_limit": 10, "pool": "q4"},
            {"type": "email_send", "subject": "Hi {{first_name}}", "body": "Hello"}
        ]),
        json!({"time_zone": "America/New_York"}),
    )
    .await;
    // A draft draws nothing.
    assert_eq!(
        generate(&pool, tenant, seq, Utc::now()).await,
        Generation::Idle
    );
    sequences::start(&pool, tenant, seq).await.unwrap();
    assert_eq!(
        count(
            &pool,
            "select count(*) from outbox where tenant_id = $1 and queue = 'lead_generation'",
            tenant
        )
        .await,
        1,
        "start writes the day's generation job"
    );

    // Day 1 (Wednesday 3 March 2027 in New York; the days are ahead of the real clock, so
    // the start's own job, due now, is told apart): ten people, at step 1, each with its step job.
    let day1 = at("2027-03-03T15:00:00Z");
    let run = generate(&pool, tenant, seq, day1).await;
    let Generation::Ran {
        day,
        added: ref first,
        already_drawn,
        next_at,
    } = run
    else {
        panic!("{run:?}");
    };
    assert_eq!(
        (day.to_string().as_str(), first.len(), already_drawn),
        ("2027-03-03", 10, false)
    );
    assert_eq!(
        next_at,
        at("2027-03-04T05:00:00Z"),
        "the next New York midnight"
    );
    let leads = lead_external_ids(&pool, tenant, seq).await;
    assert_eq!(
        leads,
        (0..10).map(|i| format!("p{i:03}")).collect::<Vec<_>>()
    );
    let steps_written = pending_steps(&pool, tenant).await;
    assert_eq!(steps_written.len(), 10);
    assert!(steps_written.iter().all(|(_, job)| job.step == 1));
    assert_eq!(
        count(
            &pool,
            "select count(*) from sequence_leads where tenant_id = $1 and current_step = 1
               and state = 'active'",
            tenant
        )
        .await,
        10
    );
    // The next run is written for the next local midnight, once however often the day runs.
    let next_runs: Vec<(Option<DateTime<Utc>>, Option<String>)> = sqlx::query_as(
        "select run_at, job_key from outbox where tenant_id = $1 and queue = 'lead_generation'
           and run_at > $2",
    )
    .bind(tenant.0)
    .bind(day1)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        next_runs,
        vec![(
            Some(at("2027-03-04T05:00:00Z")),
            Some(format!("lead_generation:{seq}:2027-03-04"))
        )]
    );

    // The same local day again (a re-delivery, later that evening in New York): nothing.
    let again = generate(&pool, tenant, seq, at("2027-03-04T04:59:59Z")).await;
    assert_eq!(added(&again), 0);
    assert!(matches!(
        again,
        Generation::Ran {
            already_drawn: true,
            ..
        }
    ));
    assert_eq!(lead_external_ids(&pool, tenant, seq).await.len(), 10);
    assert_eq!(
        count(
            &pool,
            "select count(*) from outbox where tenant_id = $1 and queue = 'lead_generation'
               and completed_at is null",
            tenant
        )
        .await,
        2,
        "today's and tomorrow's jobs, no more"
    );

    // Day 2, two workers at once: one draws the next ten, the other nothing.
    let day2 = at("2027-03-04T05:00:00Z");
    let (x, y) = tokio::join!(
        generate(&pool, tenant, seq, day2),
        generate(&pool, tenant, seq, day2)
    );
    assert_eq!(added(&x) + added(&y), 10, "{x:?} {y:?}");
    let leads = lead_external_ids(&pool, tenant, seq).await;
    assert_eq!(
        leads,
        (0..20).map(|i| format!("p{i:03}")).collect::<Vec<_>>()
    );

    // Day 3: the five left with an email; day 4: nobody left.
    assert_eq!(
        added(&generate(&pool, tenant, seq, at("2027-03-05T12:00:00Z")).await),
        5
    );
    assert_eq!(
        added(&generate(&pool, tenant, seq, at("2027-03-06T12:00:00Z")).await),
        0
    );
    // New people (and a repeat of one already drawn) join the pool: day 5 takes only the new.
    let more = vec![person(3), person(30), person(31)];
    let loaded = pools::load(&pool, tenant, "q4", &more).await.unwrap();
    assert_eq!((loaded.added, loaded.updated), (2, 1));
    assert_eq!(
        added(&generate(&pool, tenant, seq, at("2027-03-07T12:00:00Z")).await),
        2
    );
    let leads = lead_external_ids(&pool, tenant, seq).await;
    assert_eq!(leads.len(), 27);
    let mut unique = leads.clone();
    unique.dedup();
    assert_eq!(unique.len(), leads.len(), "nobody twice");
    assert!(!leads.contains(&"no-email".to_owned()));
    let days: i64 = count(
        &pool,
        "select count(*) from lead_generation_runs where tenant_id = $1",
        tenant,
    )
    .await;
    assert_eq!(days, 5);
    let view = pools::view(&pool, tenant, "q4").await.unwrap();
    assert_eq!((view.people, view.in_sequences), (28, 27));
    assert_eq!(view.drawn_by_sequence.get(&seq), Some(&27));

    // Paused or stopped: a run ends without effect.
    sequences::pause(&pool, tenant, seq).await.unwrap();
    assert_eq!(
        generate(&pool, tenant, seq, at("2027-03-08T12:00:00Z")).await,
        Generation::Idle
    );
    sequences::stop(&pool, tenant, seq).await.unwrap();
    assert_eq!(
        generate(&pool, tenant, seq, at("2027-03-09T12:00:00Z")).await,
        Generation::Idle
    );
    assert_eq!(lead_external_ids(&pool, tenant, seq).await.len(), 27);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_lead_added_by_hand_passes_the_generation_step(pool: PgPool) {
    let tenant = tenants::create(&pool, "acme", "UTC").await.unwrap().0.id;
    let seq = sequence(
        &pool,
        tenant,
        json!([
            {"type": "lead_generation", "daily_limit": 1, "pool": "q4"},
            {"type": "delay", "hours": 3}
        ]),
        json!({}),
    )
    .await;
    let added = sequences::add_leads(
        &pool,
        tenant,
        seq,
        &[NewLead {
            external_id: Some("hand".into()),
            variables: BTreeMap::new(),
        }],
    )
    .await
    .unwrap();
    sequences::start(&pool, tenant, seq).await.unwrap();
    let deps = Deps::new(pool.clone(), reqwest::Client::new(), false);
    let jobs = pending_steps(&pool, tenant).await;
    assert_eq!(jobs.len(), 1);
    let now = Utc::now();
    sequences::run_step(&deps, tenant, "job-1", &jobs[0].1, false, now)
        .await
        .unwrap();
    let lead = store::lead(&pool, tenant, added.added[0]).await.unwrap();
    assert_eq!(lead.current_step, 1);
    // The pool is empty: the day's run adds nobody, and the hand-added lead is not re-added.
    assert_eq!(added_count(generate(&pool, tenant, seq, now).await), 0);
    assert_eq!(
        lead_external_ids(&pool, tenant, seq).await,
        vec!["hand".to_owned()]
    );
    // A person of the pool with the same external id is already this sequence's lead.
    pools::load(
        &pool,
        tenant,
        "q4",
        &[PoolPerson {
            external_person_id: "hand".into(),
            variables: BTreeMap::new(),
        }],
    )
    .await
    .unwrap();
    let tomorrow = now + chrono::Duration::days(1);
    assert_eq!(added_count(generate(&pool, tenant, seq, tomorrow).await), 0);
}

fn added_count(generation: Generation) -> usize {
    added(&generation)
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn deleting_the_contact_cancels_the_call_and_moves_the_lead_on(pool: PgPool) {
    let w = calls_world(pool).await;
    let seq = sequence(
        &w.pool,
        w.tenant,
        json!([
            {"type": "voice_agent_call", "user_id": w.user, "agent_id": w.agent},
            {"type": "delay", "hours": 1}
        ]),
        json!({}),
    )
    .await;
    let added = sequences::add_leads(&w.pool, w.tenant, seq, &[caller(0, "+15550000001")])
        .await
        .unwrap();
    sequences::start(&w.pool, w.tenant, seq).await.unwrap();
    assert!(w.run_pending_steps(Utc::now()).await.is_empty());
    let contact: Uuid = sqlx::query_scalar("select contact_id from calls where tenant_id = $1")
        .bind(w.tenant.0)
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(
        calls::delete_contact(&w.pool, w.tenant, contact)
            .await
            .unwrap(),
        1
    );
    let lead = w.lead(added.added[0]).await;
    assert_eq!((lead.state, lead.current_step), (LeadState::Active, 1));
    let timeline = store::timeline(&w.pool, w.tenant, lead.id).await.unwrap();
    assert_eq!(timeline[0].outcome, "cancelled");
    let next = pending_steps(&w.pool, w.tenant).await;
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].1.lead_id, next[0].1.step), (lead.id, 1));
    assert_eq!(w.fake.state().stats().calls_created, 0);
}
