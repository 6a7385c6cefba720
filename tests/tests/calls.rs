//! A call campaign through real `herald-worker` processes: two workers (outbox relay, Redis
//! queues, fleet-wide slots) on a private Redis and a fresh database, the Vapi fake serving over
//! HTTP in this process, and herald-api's router in this process taking the fake's call-ended
//! webhooks. Counts the calls at the fake and in Postgres: every call placed once and ended
//! once, the user and tenant limits held across both processes, one release per call.

mod calls_common;

use std::time::Duration;

use calls_common::{CallWorld, call_workers, call_world, logs, queue_campaign, scalar};
use herald_store::calls::{self as store, NewContact};
use herald_tests::{DEADLINE, wait_until};
use serde_json::Map;

const USERS: u64 = 3;
const PER_USER: u64 = 20;
const USER_LIMIT: u32 = 2;
const SYSTEM_LIMIT: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_runs_through_two_worker_processes_within_the_limits() {
    // The fake's own limit is far above herald's: herald's own limits are what is observed.
    let CallWorld {
        redis,
        db,
        tenant,
        namespace: ns,
        fake,
        agent,
        ..
    } = call_world(
        Duration::from_millis(30)..=Duration::from_millis(120),
        SYSTEM_LIMIT,
    )
    .await;
    for u in 0..USERS {
        let user = store::create_user(&db.pool, tenant, &format!("user {u}"), Some(USER_LIMIT))
            .await
            .unwrap()
            .id;
        let contacts: Vec<NewContact> = (0..PER_USER)
            .map(|i| {
                NewContact::new(
                    &format!("+1555{:07}", u * 1_000 + i),
                    (i % 2 == 0).then_some("Named"),
                    Map::new(),
                )
                .unwrap()
            })
            .collect();
        queue_campaign(
            &db,
            tenant,
            user,
            agent,
            &format!("campaign {u}"),
            &contacts,
        )
        .await;
    }

    let workers = call_workers(&redis.url(), &db, &ns, 2, &[]);

    wait_until("every call to end", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from calls where state in ('queued', 'dialing', 'in_call')",
        )
        .await
            == 0
    })
    .await;
    wait_until("every campaign to complete", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from call_campaigns where status <> 'completed'",
        )
        .await
            == 0
    })
    .await;

    let total = USERS * PER_USER;
    let stats = fake.state().stats();
    // At the fake: every call placed once, the limits held across both processes.
    assert_eq!(stats.calls_created, total, "{stats:?}\n{}", logs(&workers));
    assert_eq!(stats.calls_ended, total);
    assert_eq!(stats.refused_at_limit, 0);
    assert!(
        stats.max_active <= SYSTEM_LIMIT as usize,
        "{stats:?}\n{}",
        logs(&workers)
    );
    assert!(
        stats
            .max_active_by_group
            .values()
            .all(|&n| n <= USER_LIMIT as usize),
        "{stats:?}"
    );
    let numbers: std::collections::HashSet<String> =
        fake.state().calls().into_iter().map(|c| c.number).collect();
    assert_eq!(numbers.len() as u64, total);
    // In Postgres: every call ended once with one attempt and the provider's id.
    assert_eq!(
        scalar(
            &db,
            "select count(distinct provider_call_id) from calls
             where attempts = 1 and ended_at is not null and outcome is not null"
        )
        .await,
        total as i64
    );
    assert_eq!(
        scalar(&db, "select count(*) from calls where state = 'failed'").await,
        0
    );
    // One release job per call, each finished.
    wait_until("every release job to finish", DEADLINE, || async {
        scalar(
            &db,
            "select count(*) from outbox where queue = 'call_release_slot'
               and completed_at is not null",
        )
        .await
            == total as i64
    })
    .await;
    assert_eq!(
        scalar(
            &db,
            "select count(*) from outbox where queue = 'call_release_slot'"
        )
        .await,
        total as i64
    );
    for worker in &workers {
        worker.sigterm();
    }
}
