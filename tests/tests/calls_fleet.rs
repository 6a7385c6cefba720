//! The fleet-wide call cap shared between tenants (`HERALD_CALL_FLEET_LIMIT`), through two real
//! `herald-worker` processes: two tenants, each with its own voice account (a Vapi fake) far
//! above the cap, and a fleet cap of 6.
//!
//! 1. Tenant B alone: it uses the whole cap (6 calls at once at its fake).
//! 2. Tenant A starts too. Once B is back within its share (3), neither tenant has more than 3
//!    calls at once at its fake for as long as both have calls waiting, A gets its whole share,
//!    and B's queued calls say they wait for the fleet (`fleet_limit` in the call view).
//! 3. Both campaigns are cancelled: every call started ended once, one release each, and no
//!    slot is left in the fleet.
//!
//! At no moment do the two fakes together see more than 6 calls.

mod calls_common;

use std::collections::BTreeMap;
use std::time::Duration;

use calls_common::{
    call_workers, get_json, logs, queue_campaign, spawn_api, tenant_scalar, voice_account,
};
use herald_core::TenantId;
use herald_fakes::vapi::{PlacedCall, VapiFake, VapiFakeConfig, unix_micros};
use herald_store::calls::{self as store, NewContact};
use herald_tests::{DEADLINE, RedisServer, TestDb, namespace, wait_until};
use serde_json::Map;
use uuid::Uuid;

const FLEET: u32 = 6;
const SHARE: usize = 3;
const CALLS: u64 = 400;

struct Tenant {
    id: TenantId,
    token: String,
    fake: VapiFake,
    user: Uuid,
    agent: Uuid,
}

async fn tenant(db: &TestDb, name: &str, api: std::net::SocketAddr) -> Tenant {
    let (tenant, token) = herald_store::tenants::create(&db.pool, name, "UTC")
        .await
        .unwrap();
    let fake = voice_account(
        db,
        tenant.id,
        api,
        VapiFakeConfig {
            talk: Duration::from_millis(100)..=Duration::from_millis(200),
            concurrency_limit: 100,
            ..VapiFakeConfig::default()
        },
        // Each account alone would allow more than the fleet.
        10,
    )
    .await;
    let user = store::create_user(&db.pool, tenant.id, "caller", Some(10))
        .await
        .unwrap()
        .id;
    let agent = store::create_agent(&db.pool, tenant.id, "Ava", "asst-e2e", "phone-e2e")
        .await
        .unwrap()
        .id;
    Tenant {
        id: tenant.id,
        token,
        fake,
        user,
        agent,
    }
}

fn contacts(first: u64) -> Vec<NewContact> {
    (0..CALLS)
        .map(|i| NewContact::new(&format!("+1555{:07}", first + i), None, Map::new()).unwrap())
        .collect()
}

/// Calls active at once over a timeline of `(placed, ended)` instants: at `at`, and the most at
/// any start inside `[from, to)` (an end and a start at the same instant: the end first).
fn active(calls: &[PlacedCall], at: u64) -> usize {
    calls
        .iter()
        .filter(|c| c.placed_at_us <= at && c.ended_at_us.is_none_or(|end| end > at))
        .count()
}

fn peak_within(calls: &[PlacedCall], from: u64, to: u64) -> usize {
    let starts = calls
        .iter()
        .map(|c| c.placed_at_us)
        .filter(|at| (from..to).contains(at));
    starts
        .map(|at| active(calls, at))
        .chain([active(calls, from)])
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_share_the_fleet_cap_and_one_alone_uses_all_of_it() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let ns = namespace();
    let api = spawn_api(&db, &redis.url(), &ns).await;
    let a = tenant(&db, "fleet-a", api).await;
    let b = tenant(&db, "fleet-b", api).await;
    let slots = herald_jobs::calls::Voice::connect(
        Default::default(),
        herald_jobs::calls::VoiceSettings::default(),
        &redis.url(),
        &ns,
    )
    .await
    .unwrap()
    .slots;
    let held = |tenant: TenantId| {
        let slots = slots.clone();
        async move {
            slots
                .tenant_in_use(&tenant.0.simple().to_string(), herald_core::now_ms())
                .await
                .unwrap() as usize
        }
    };
    let fleet = FLEET.to_string();
    let workers = call_workers(
        &redis.url(),
        &db,
        &ns,
        2,
        &[("HERALD_CALL_FLEET_LIMIT", &fleet)],
    );

    // 1. B alone uses the whole cap.
    let b_campaign = queue_campaign(&db, b.id, b.user, b.agent, "b", &contacts(0)).await;
    wait_until(
        "tenant B alone to hold the whole fleet cap",
        DEADLINE,
        || async { b.fake.state().stats().max_active == FLEET as usize },
    )
    .await;

    // 2. A competes. Once B is back within its share, both stay within theirs.
    let a_campaign = queue_campaign(&db, a.id, a.user, a.agent, "a", &contacts(10_000)).await;
    wait_until("tenant A's first call", DEADLINE, || async {
        a.fake.state().stats().calls_created > 0
    })
    .await;
    // A has asked for a slot, so it competes from here on: B can only shrink to its share.
    wait_until("tenant B back within its share", DEADLINE, || async {
        held(b.id).await <= SHARE
    })
    .await;
    let from = unix_micros();
    wait_until("tenant A to hold its whole share", DEADLINE, || async {
        held(a.id).await == SHARE
    })
    .await;
    wait_until(
        "tenant B's queued calls to wait for the fleet",
        DEADLINE,
        || async {
            let (status, page) = get_json(
                api,
                &format!("/v1/call-campaigns/{b_campaign}/calls?state=queued&limit=1"),
                &b.token,
            )
            .await;
            assert_eq!(status, 200, "{page}");
            page["calls"][0]["waiting"]["reason"] == "fleet_limit"
        },
    )
    .await;
    wait_until("tenant A to place 20 more calls", DEADLINE, || async {
        a.fake
            .state()
            .calls()
            .iter()
            .filter(|c| c.placed_at_us >= from)
            .count()
            >= 20
    })
    .await;
    let to = unix_micros();
    for tenant in [&a, &b] {
        assert!(
            tenant_scalar(
                &db,
                tenant.id,
                "select count(*) from calls where tenant_id = $1 and state = 'queued'",
            )
            .await
                > 0,
            "both tenants still have calls waiting at the end of the window"
        );
    }

    // 3. Stop, and let the calls in progress finish.
    store::cancel_campaign(&db.pool, a.id, a_campaign)
        .await
        .unwrap();
    store::cancel_campaign(&db.pool, b.id, b_campaign)
        .await
        .unwrap();
    for tenant in [&a, &b] {
        wait_until("every call in progress to end", DEADLINE, || async {
            tenant_scalar(
                &db,
                tenant.id,
                "select count(*) from calls where tenant_id = $1
                   and state in ('dialing', 'in_call')",
            )
            .await
                == 0
        })
        .await;
    }

    let a_calls = a.fake.state().calls();
    let b_calls = b.fake.state().calls();
    let peaks: BTreeMap<&str, usize> = [
        ("a", peak_within(&a_calls, from, to)),
        ("b", peak_within(&b_calls, from, to)),
    ]
    .into_iter()
    .collect();
    assert!(
        peaks.values().all(|&n| n <= SHARE),
        "a tenant went over its share while both had calls waiting: {peaks:?}\n{}",
        logs(&workers)
    );
    // The two accounts together never held more than the cap.
    let mut both = a_calls.clone();
    both.extend(b_calls.iter().cloned());
    let fleet_peak = both
        .iter()
        .map(|c| active(&both, c.placed_at_us))
        .max()
        .unwrap_or(0);
    assert!(fleet_peak <= FLEET as usize, "fleet peak {fleet_peak}");
    assert_eq!(b.fake.state().stats().max_active, FLEET as usize);

    // Every call started ended once, with one attempt and one release.
    for tenant in [&a, &b] {
        let stats = tenant.fake.state().stats();
        assert_eq!(stats.calls_created, stats.calls_ended, "{stats:?}");
        assert_eq!(stats.refused_at_limit, 0);
        let dialled = tenant_scalar(
            &db,
            tenant.id,
            "select count(*) from calls where tenant_id = $1 and attempts = 1
               and ended_at is not null and provider_call_id is not null",
        )
        .await;
        assert_eq!(dialled as u64, stats.calls_created);
        wait_until("every release job to finish", DEADLINE, || async {
            tenant_scalar(
                &db,
                tenant.id,
                "select count(*) from outbox where tenant_id = $1
                   and queue = 'call_release_slot' and completed_at is not null",
            )
            .await
                == dialled
        })
        .await;
        assert_eq!(
            tenant_scalar(
                &db,
                tenant.id,
                "select count(*) from outbox where tenant_id = $1
                   and queue = 'call_release_slot'",
            )
            .await,
            dialled
        );
        assert_eq!(held(tenant.id).await, 0);
    }
    let (state, _) = slots.fleet_state(FLEET).await.unwrap();
    assert!(state.slots.is_empty(), "{state:?}");
    for worker in &workers {
        worker.sigterm();
    }
}
