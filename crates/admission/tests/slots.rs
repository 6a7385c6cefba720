//! Concurrency slots against a real Redis (`REDIS_URL`, default 127.0.0.1:6379), each test under
//! its own random namespace.

use std::time::Duration;

use herald_admission::{Connection, SlotAdmission, SlotRequest, Slots};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn slots() -> Slots {
    let conn = Connection::connect(&redis_url())
        .await
        .expect("redis reachable");
    let namespace = format!("test-{}", uuid::Uuid::new_v4().simple());
    Slots::new(conn, &namespace, "call_dispatch").expect("valid names")
}

const T0: u64 = 1_900_000_000_000;

fn ask<'a>(user: &'a str, slot: &'a str) -> SlotRequest<'a> {
    SlotRequest {
        tenant: "tenant-a",
        user,
        slot,
        user_limit: 2,
        tenant_limit: 3,
        lease: Duration::from_secs(60),
        fleet_limit: None,
        expected_turn: None,
    }
}

#[tokio::test]
async fn user_and_tenant_limits_hold_and_a_refusal_takes_nothing() {
    let slots = slots().await;
    let granted = |a: SlotAdmission| a.is_granted();
    assert!(granted(
        slots.acquire_at(&ask("u1", "c1"), T0).await.unwrap()
    ));
    assert!(granted(
        slots.acquire_at(&ask("u1", "c2"), T0).await.unwrap()
    ));
    // The user's third call waits for its first lease.
    assert_eq!(
        slots.acquire_at(&ask("u1", "c3"), T0).await.unwrap(),
        SlotAdmission::UserFull {
            until_ms: T0 + 60_000
        }
    );
    assert!(granted(
        slots.acquire_at(&ask("u2", "c4"), T0 + 5).await.unwrap()
    ));
    // The tenant is full (3); a user with room is refused for the tenant's sake.
    assert_eq!(
        slots.acquire_at(&ask("u3", "c5"), T0 + 6).await.unwrap(),
        SlotAdmission::TenantFull {
            until_ms: T0 + 60_000
        }
    );
    assert_eq!(slots.tenant_in_use("tenant-a", T0 + 6).await.unwrap(), 3);
    assert_eq!(slots.user_in_use("tenant-a", "u3", T0).await.unwrap(), 0);
    assert_eq!(
        slots.last_served("tenant-a").await.unwrap().as_deref(),
        Some("u2")
    );
    // Taking the same slot again takes nothing more.
    assert_eq!(
        slots.acquire_at(&ask("u2", "c4"), T0 + 7).await.unwrap(),
        SlotAdmission::AlreadyHeld {
            lease_until_ms: T0 + 5 + 60_000,
            turn: 3
        }
    );
    assert_eq!(slots.tenant_in_use("tenant-a", T0 + 7).await.unwrap(), 3);
}

#[tokio::test]
async fn a_slot_is_released_once_however_often_it_is_released() {
    let slots = slots().await;
    for (user, slot) in [("u1", "c1"), ("u1", "c2"), ("u2", "c3")] {
        assert!(
            slots
                .acquire_at(&ask(user, slot), T0)
                .await
                .unwrap()
                .is_granted()
        );
    }
    assert!(slots.release("tenant-a", "u1", "c1").await.unwrap());
    assert!(!slots.release("tenant-a", "u1", "c1").await.unwrap());
    assert!(!slots.release("tenant-a", "u1", "c1").await.unwrap());
    // One slot came back, not three.
    assert!(
        slots
            .acquire_at(&ask("u3", "c4"), T0 + 1)
            .await
            .unwrap()
            .is_granted()
    );
    assert!(matches!(
        slots.acquire_at(&ask("u3", "c5"), T0 + 1).await.unwrap(),
        SlotAdmission::TenantFull { .. }
    ));
}

#[tokio::test]
async fn a_lost_release_frees_the_slot_when_its_lease_runs_out() {
    let slots = slots().await;
    let mut short = ask("u1", "c1");
    short.lease = Duration::from_millis(500);
    assert!(slots.acquire_at(&short, T0).await.unwrap().is_granted());
    short.slot = "c2";
    assert!(slots.acquire_at(&short, T0).await.unwrap().is_granted());
    short.slot = "c3";
    assert_eq!(
        slots.acquire_at(&short, T0 + 499).await.unwrap(),
        SlotAdmission::UserFull { until_ms: T0 + 500 }
    );
    // No release ever came; at the lease's end both slots are free again.
    assert!(
        slots
            .acquire_at(&short, T0 + 500)
            .await
            .unwrap()
            .is_granted()
    );
    assert_eq!(
        slots.user_in_use("tenant-a", "u1", T0 + 500).await.unwrap(),
        1
    );
    // A late release of an expired slot frees nothing.
    assert!(!slots.release("tenant-a", "u1", "c1").await.unwrap());
    assert_eq!(
        slots.user_in_use("tenant-a", "u1", T0 + 500).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn many_concurrent_requests_never_exceed_the_limits() {
    let slots = slots().await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("u{}", i % 6);
            let slot = format!("c{i}");
            let request = SlotRequest {
                tenant: "tenant-a",
                user: &user,
                slot: &slot,
                user_limit: 2,
                tenant_limit: 10,
                lease: Duration::from_secs(60),
                fleet_limit: None,
                expected_turn: None,
            };
            slots.acquire(&request).await.unwrap().is_granted()
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += usize::from(t.await.unwrap());
    }
    assert_eq!(granted, 10);
    let now = herald_core::now_ms();
    assert_eq!(slots.tenant_in_use("tenant-a", now).await.unwrap(), 10);
    for u in 0..6 {
        assert!(
            slots
                .user_in_use("tenant-a", &format!("u{u}"), now)
                .await
                .unwrap()
                <= 2
        );
    }
}

#[tokio::test]
async fn a_retired_slot_is_not_taken_again_but_a_released_one_is() {
    let slots = slots().await;
    assert!(
        slots
            .acquire_at(&ask("u1", "c1"), T0)
            .await
            .unwrap()
            .is_granted()
    );
    // The call ended: a dispatcher that still saw it waiting must not take a slot for it.
    assert!(
        slots
            .retire("tenant-a", "u1", "c1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(
        slots.acquire(&ask("u1", "c1")).await.unwrap(),
        SlotAdmission::Retired
    );
    assert_eq!(slots.turn("tenant-a").await.unwrap().1, 1, "no turn taken");
    // A call that goes back to waiting is released, not retired: its slot may be taken again.
    assert!(slots.acquire(&ask("u1", "c2")).await.unwrap().is_granted());
    assert!(slots.release("tenant-a", "u1", "c2").await.unwrap());
    assert!(slots.acquire(&ask("u1", "c2")).await.unwrap().is_granted());
}
