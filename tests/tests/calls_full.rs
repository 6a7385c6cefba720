//! The full call-campaign run: 6 users × 2 campaigns × 150 calls (1,800 calls) with
//! random millisecond talk times, through the Vapi fake and two real `herald-worker` processes
//! (outbox relay, Redis queues, fleet-wide slots), with a user limit of 2 and a system limit of
//! 10 (six users could hold 12, so the system limit binds).
//!
//! Counted at the fake and in Postgres:
//! - limits: the fake never sees more than 10 calls at once, nor more than 2 of one user, and
//!   Postgres shows the system limit binding: 10 slots certainly held at once;
//! - exactly once: every call placed once, ended once, with one attempt, one release job, and
//!   one slot grant (the tenant's turns are exactly 1..=1800);
//! - order: priority then FIFO within a user, and round-robin across users, as checked by
//!   [`fifo_violations`], [`displacement_violations`] and [`round_robin_violations`] (each says
//!   what it proves and why it holds whatever the timing).

mod calls_common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use calls_common::{CallWorld, call_workers, call_world, logs, queue_campaign, tenant_scalar};
use chrono::{DateTime, Utc};
use herald_store::calls::{self as store, NewContact};
use herald_tests::{DEADLINE, TestDb, wait_until};
use serde_json::{Map, Value};
use uuid::Uuid;

const USERS: u64 = 6;
const CAMPAIGNS_PER_USER: u64 = 2;
const CALLS_PER_CAMPAIGN: u64 = 150;
const TOTAL: u64 = USERS * CAMPAIGNS_PER_USER * CALLS_PER_CAMPAIGN;
const USER_LIMIT: u32 = 2;
const SYSTEM_LIMIT: u32 = 10;

/// A call as Postgres recorded it, with when its release job finished.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    id: Uuid,
    user_id: Uuid,
    priority: i16,
    seq: i64,
    slot_turn: Option<i64>,
    state: String,
    outcome: Option<String>,
    attempts: i32,
    provider_call_id: Option<String>,
    /// When the slot was granted (Redis's clock, whole milliseconds, rounded down).
    dialed_at: Option<DateTime<Utc>>,
    /// When the release began (before the slot was freed).
    ended_at: Option<DateTime<Utc>>,
    /// Release jobs written for the call.
    releases: i64,
    /// When the release job finished: after the slot was freed.
    released: Option<DateTime<Utc>>,
}

impl Row {
    fn turn(&self) -> i64 {
        self.slot_turn.unwrap_or(0)
    }
}

/// Priority then FIFO within a user, exactly: ordered by (priority, seq), a user's calls were
/// granted their slots in increasing turns, and at non-decreasing instants.
///
/// Why it holds whatever the timing: dispatch offers each user's *next* call (lowest priority,
/// then lowest seq among its queued calls); a later call becomes the next only once the earlier
/// one is recorded dialing, which is after its grant. Two dispatchers offering the same next
/// call both name the same slot, so only one grant happens.
fn fifo_violations(rows: &[Row]) -> Vec<String> {
    let mut by_user: BTreeMap<Uuid, Vec<&Row>> = BTreeMap::new();
    for row in rows {
        by_user.entry(row.user_id).or_default().push(row);
    }
    let mut violations = Vec::new();
    for (user, mut calls) in by_user {
        calls.sort_by_key(|r| (r.priority, r.seq));
        for pair in calls.windows(2) {
            if pair[0].turn() >= pair[1].turn() || pair[0].dialed_at > pair[1].dialed_at {
                violations.push(format!(
                    "user {user}: call (priority {}, seq {}) granted at turn {} {:?}, after (priority {}, seq {}) at turn {} {:?}",
                    pair[0].priority,
                    pair[0].seq,
                    pair[0].turn(),
                    pair[0].dialed_at,
                    pair[1].priority,
                    pair[1].seq,
                    pair[1].turn(),
                    pair[1].dialed_at
                ));
            }
        }
    }
    violations
}

/// At the fake, a user's calls start in their grant order, give or take one: when a call starts,
/// at most `USER_LIMIT - 1` of the user's calls granted before it have not started yet.
///
/// Why it holds: at a call's grant the user holds at most `USER_LIMIT` slots, this call's among
/// them, so every earlier call but `USER_LIMIT - 1` has released its slot; a released call has
/// ended at the fake, so it started there before this call's grant, hence before this call.
fn displacement_violations(rows: &[Row], started_us: &HashMap<Uuid, u64>) -> Vec<String> {
    let mut by_user: BTreeMap<Uuid, Vec<(i64, u64)>> = BTreeMap::new();
    for row in rows {
        if let Some(start) = started_us.get(&row.id) {
            by_user
                .entry(row.user_id)
                .or_default()
                .push((row.turn(), *start));
        }
    }
    let mut violations = Vec::new();
    for (user, mut calls) in by_user {
        calls.sort_unstable();
        for (i, (turn, start)) in calls.iter().enumerate() {
            let late = calls[..i].iter().filter(|(_, s)| s > start).count();
            if late > (USER_LIMIT as usize - 1) {
                violations.push(format!(
                    "user {user}: the call granted at turn {turn} started at the fake before {late} calls granted earlier"
                ));
            }
        }
    }
    violations
}

/// Round-robin across users, exactly, in the order slots were granted (the tenant's turns):
/// when the slot of turn `k` goes to user U and turn `k-1` went to user P, every user strictly
/// between P and U in the users' cyclic order (by id, as dispatch sorts them; every user before
/// U when `k` is the first turn) was passed over, so it must have been full at that moment or
/// have had no call left to place. A user V is reported when neither can be true:
/// - V still had a call to place: one of its calls was granted after turn `k`;
/// - V could not have been full: fewer than `USER_LIMIT` of its calls granted before turn `k-1`
///   can still have held their slot at turn `k-1`'s grant (a call can hold it until its release
///   job finished, an upper bound on the release).
///
/// Why it holds whatever the timing: a dispatcher reads the cursor (the user served last) and the
/// tenant's turn together and asks for every slot with that turn; a grant to anyone else in
/// between makes the request stale and the dispatcher reads again. So the grant of turn `k` was
/// made by a dispatcher that read the cursor P after turn `k-1`, offered the users after P in
/// order, and was refused for each user before U because it was full (a user with no call is
/// not offered; a tenant at its limit ends the run without granting). Between two grants no one
/// takes a slot, so a user full when offered was full from turn `k-1` on.
fn round_robin_violations(rows: &[Row]) -> Vec<String> {
    let mut users: Vec<Uuid> = rows.iter().map(|r| r.user_id).collect();
    users.sort();
    users.dedup();
    let mut by_user: HashMap<Uuid, Vec<&Row>> = HashMap::new();
    for row in rows {
        by_user.entry(row.user_id).or_default().push(row);
    }
    let last_turn: HashMap<Uuid, i64> = by_user
        .iter()
        .map(|(user, calls)| (*user, calls.iter().map(|r| r.turn()).max().unwrap_or(0)))
        .collect();
    let mut granted: Vec<&Row> = rows.iter().collect();
    granted.sort_by_key(|r| r.turn());
    let position = |user: &Uuid| users.iter().position(|u| u == user).unwrap_or(0);
    let mut violations = Vec::new();
    for (index, row) in granted.iter().enumerate() {
        let previous = index.checked_sub(1).map(|i| granted[i]);
        let to = position(&row.user_id);
        let passed_over: Vec<Uuid> = match previous {
            None => users[..to].to_vec(),
            Some(previous) => {
                let from = position(&previous.user_id);
                (1..users.len())
                    .map(|step| (from + step) % users.len())
                    .take_while(|i| *i != to)
                    .map(|i| users[i])
                    .collect()
            }
        };
        for user in passed_over {
            let had_calls = last_turn.get(&user).copied().unwrap_or(0) > row.turn();
            let could_be_full = previous.is_some_and(|previous| {
                by_user[&user]
                    .iter()
                    .filter(|r| r.turn() < previous.turn())
                    .filter(|r| r.released.is_none_or(|at| Some(at) > previous.dialed_at))
                    .count()
                    >= USER_LIMIT as usize
            });
            if had_calls && !could_be_full {
                violations.push(format!(
                    "turn {} went to user {} after user {:?}, passing over user {user}, which had calls waiting and could not have been full",
                    row.turn(),
                    row.user_id,
                    previous.map(|p| p.user_id)
                ));
            }
        }
    }
    violations
}

/// The most calls whose slot was certainly held at once, from Postgres: a slot is held from its
/// grant (at most a millisecond after `dialed_at`) until after `ended_at`.
fn certainly_held_peak(rows: &[Row]) -> usize {
    let mut events: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for row in rows {
        if let (Some(dialed), Some(ended)) = (row.dialed_at, row.ended_at) {
            let from = dialed + chrono::Duration::milliseconds(1);
            if from < ended {
                events.push((from, 1));
                events.push((ended, -1));
            }
        }
    }
    events.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
}

/// The calls still live and the release jobs written for them, for a failure message.
async fn stuck_report(db: &TestDb, tenant: herald_core::TenantId) -> String {
    // Read through `Debug`, for the failure message.
    #[allow(dead_code)]
    #[derive(Debug, sqlx::FromRow)]
    struct Stuck {
        id: Uuid,
        state: String,
        provider_call_id: Option<String>,
        slot_turn: Option<i64>,
        dialed_at: Option<DateTime<Utc>>,
        release_created_at: Option<DateTime<Utc>>,
        release_completed_at: Option<DateTime<Utc>>,
        release_dead_at: Option<DateTime<Utc>>,
        release_error: Option<String>,
    }
    let stuck: Vec<Stuck> = sqlx::query_as(
        "select k.id, k.state, k.provider_call_id, k.slot_turn, k.dialed_at,
                o.created_at as release_created_at, o.completed_at as release_completed_at,
                o.dead_at as release_dead_at, o.last_error as release_error
         from calls k
         left join outbox o on o.tenant_id = k.tenant_id and o.queue = 'call_release_slot'
                           and o.job_key = 'release:' || k.provider_call_id
         where k.tenant_id = $1 and k.state in ('queued', 'dialing', 'in_call')
         limit 20",
    )
    .bind(tenant.0)
    .fetch_all(&db.pool)
    .await
    .unwrap_or_default();
    format!("{stuck:#?}")
}

/// The warning and error lines of the workers' logs.
fn warnings(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighteen_hundred_calls_keep_the_limits_and_the_order() {
    let CallWorld {
        redis,
        db,
        tenant,
        namespace: ns,
        fake,
        agent,
        ..
    } = call_world(
        Duration::from_millis(10)..=Duration::from_millis(60),
        SYSTEM_LIMIT,
    )
    .await;
    for u in 0..USERS {
        let user = store::create_user(&db.pool, tenant, &format!("user {u}"), Some(USER_LIMIT))
            .await
            .unwrap()
            .id;
        for c in 0..CAMPAIGNS_PER_USER {
            // One contact in three has a name: those go first, each group in the order given.
            let contacts: Vec<NewContact> = (0..CALLS_PER_CAMPAIGN)
                .map(|i| {
                    let number = u * 10_000 + c * 1_000 + i;
                    NewContact::new(
                        &format!("+1555{number:07}"),
                        (i % 3 == 1).then(|| format!("Contact {number}")).as_deref(),
                        Map::new(),
                    )
                    .unwrap()
                })
                .collect();
            queue_campaign(&db, tenant, user, agent, &format!("u{u} c{c}"), &contacts).await;
        }
    }

    let started = Instant::now();
    let workers = call_workers(&redis.url(), &db, &ns, 2, &[]);
    loop {
        let live = tenant_scalar(
            &db,
            tenant,
            "select count(*) from calls where tenant_id = $1
               and state in ('queued', 'dialing', 'in_call')",
        )
        .await;
        if live == 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{live} calls still live after {DEADLINE:?}: {}\n{:?}\n{}",
            stuck_report(&db, tenant).await,
            fake.state().stats(),
            warnings(&logs(&workers))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until("every release job to finish", DEADLINE, || async {
        tenant_scalar(
            &db,
            tenant,
            "select count(*) from outbox where tenant_id = $1 and queue = 'call_release_slot'
               and completed_at is not null",
        )
        .await
            == TOTAL as i64
    })
    .await;
    let elapsed = started.elapsed();

    // At the fake: every call placed once and ended once, within both limits.
    let stats = fake.state().stats();
    let placed = fake.state().calls();
    assert_eq!(stats.calls_created, TOTAL, "{stats:?}\n{}", logs(&workers));
    assert_eq!(stats.calls_ended, TOTAL, "{stats:?}");
    assert_eq!(stats.refused_at_limit, 0, "{stats:?}");
    assert!(stats.max_active <= SYSTEM_LIMIT as usize, "{stats:?}");
    assert_eq!(stats.max_active_by_group.len(), USERS as usize, "{stats:?}");
    assert!(
        stats
            .max_active_by_group
            .values()
            .all(|&n| n <= USER_LIMIT as usize),
        "{stats:?}"
    );
    let started_us: HashMap<Uuid, u64> = placed
        .iter()
        .filter_map(|call| {
            let id = call.metadata.get("call_id").and_then(Value::as_str)?;
            Some((Uuid::parse_str(id).ok()?, call.placed_at_us))
        })
        .collect();
    assert_eq!(
        started_us.len() as u64,
        TOTAL,
        "one call at the fake per herald call"
    );

    // In Postgres: one attempt, one grant, one release each.
    let rows: Vec<Row> = sqlx::query_as(
        "select k.id, k.user_id, k.priority, k.seq, k.slot_turn, k.state, k.outcome, k.attempts,
                k.provider_call_id, k.dialed_at, k.ended_at,
                (select count(*) from outbox o where o.tenant_id = k.tenant_id
                   and o.queue = 'call_release_slot'
                   and o.job_key = 'release:' || k.provider_call_id) as releases,
                (select max(o.completed_at) from outbox o where o.tenant_id = k.tenant_id
                   and o.queue = 'call_release_slot'
                   and o.job_key = 'release:' || k.provider_call_id) as released
         from calls k where k.tenant_id = $1",
    )
    .bind(tenant.0)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as u64, TOTAL);
    for row in &rows {
        assert!(
            row.attempts == 1
                && row.outcome.is_some()
                && row.provider_call_id.is_some()
                && row.ended_at.is_some()
                && row.releases == 1
                && row.released.is_some()
                && !matches!(
                    row.state.as_str(),
                    "queued" | "dialing" | "in_call" | "failed"
                ),
            "not ended exactly once: {row:?}"
        );
    }
    let mut turns: Vec<i64> = rows.iter().map(Row::turn).collect();
    turns.sort_unstable();
    let odd: Vec<(usize, i64)> = turns
        .iter()
        .enumerate()
        .filter(|(i, turn)| **turn != *i as i64 + 1)
        .map(|(i, turn)| (i, *turn))
        .take(20)
        .collect();
    assert!(
        odd.is_empty(),
        "every grant is one call's and every call had one grant; first mismatches (index, turn): {odd:?}"
    );
    // Slots all free again.
    let slots = herald_jobs::calls::Voice::connect(
        Default::default(),
        herald_jobs::calls::VoiceSettings::default(),
        &redis.url(),
        &ns,
    )
    .await
    .unwrap()
    .slots;
    assert_eq!(
        slots
            .tenant_in_use(&tenant.0.simple().to_string(), herald_core::now_ms())
            .await
            .unwrap(),
        0
    );

    // The order.
    let fifo = fifo_violations(&rows);
    assert!(fifo.is_empty(), "priority then FIFO: {fifo:#?}");
    let displaced = displacement_violations(&rows, &started_us);
    assert!(
        displaced.is_empty(),
        "start order at the fake: {displaced:#?}"
    );
    let unfair = round_robin_violations(&rows);
    assert!(unfair.is_empty(), "round-robin: {unfair:#?}");

    // The system limit is what bound: Postgres shows 10 slots held at once (never more), where
    // the users' limits alone would have allowed 12.
    let peak = certainly_held_peak(&rows);
    eprintln!(
        "calls_full: {TOTAL} calls in {:.1} s; at most {} at once at the fake, {} slots certainly held at once",
        elapsed.as_secs_f64(),
        stats.max_active,
        peak
    );
    assert_eq!(peak, SYSTEM_LIMIT as usize, "the system limit should bind");
    for worker in &workers {
        worker.sigterm();
    }
}

/// The round-robin check catches a user passed over, and accepts one that was full.
#[test]
fn the_round_robin_check_tells_a_pass_over_from_a_full_user() {
    let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(1_900_000_000_000 + ms);
    let users = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
    let row = |user: usize, turn: i64, granted: i64, released: i64| Row {
        id: Uuid::new_v4(),
        user_id: users[user],
        priority: 0,
        seq: turn,
        slot_turn: Some(turn),
        state: "completed".into(),
        outcome: Some("completed".into()),
        attempts: 1,
        provider_call_id: Some(format!("p{turn}")),
        dialed_at: at(granted),
        ended_at: at(released - 1),
        releases: 1,
        released: at(released),
    };
    // Turns 1, 2, 3 go to users 1, 2, 3; then user 1 again and user 2 again while user 3,
    // with its only call released long before, still has a call waiting.
    let passed_over = [
        row(0, 1, 0, 50),
        row(1, 2, 1, 50),
        row(2, 3, 2, 10),
        row(0, 4, 100, 150),
        row(1, 5, 101, 150),
        row(0, 6, 200, 250),
        row(2, 7, 300, 350),
    ];
    let found = round_robin_violations(&passed_over);
    assert!(
        found.iter().any(|v| v.contains(&users[2].to_string())),
        "{found:?}"
    );
    // Passing over user 3 is fine while it holds two calls (turns 3 and 6, released late).
    let full = [
        row(0, 1, 0, 50),
        row(1, 2, 1, 50),
        row(2, 3, 2, 400),
        row(0, 4, 100, 150),
        row(1, 5, 101, 150),
        row(2, 6, 102, 400),
        row(0, 7, 200, 250),
        row(1, 8, 201, 250),
        row(0, 9, 300, 350),
        row(2, 10, 500, 550),
    ];
    assert_eq!(round_robin_violations(&full), Vec::<String>::new());
}
