//! The fleet-wide call cap against a real Redis (`REDIS_URL`, default 127.0.0.1:6379), each test
//! under its own random namespace: fair shares between tenants, work conservation, leases, and
//! the Lua script agreeing with the pure rule (`herald_admission::fleet::decide`).

use std::time::Duration;

use herald_admission::fleet::{self, FleetDecision};
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
const FLEET: u32 = 6;

fn ask<'a>(tenant: &'a str, slot: &'a str) -> SlotRequest<'a> {
    SlotRequest {
        tenant,
        user: "u",
        slot,
        user_limit: 100,
        tenant_limit: 100,
        lease: Duration::from_secs(60),
        fleet_limit: Some(FLEET),
        expected_turn: None,
    }
}

async fn take(slots: &Slots, tenant: &str, slot: &str, now: u64) -> SlotAdmission {
    slots.acquire_at(&ask(tenant, slot), now).await.unwrap()
}

#[tokio::test]
async fn a_tenant_alone_uses_the_whole_cap_and_a_newcomer_gets_the_freed_slots() {
    let slots = slots().await;
    for i in 0..FLEET {
        assert!(take(&slots, "a", &format!("a{i}"), T0).await.is_granted());
    }
    assert_eq!(
        take(&slots, "a", "a6", T0).await,
        SlotAdmission::FleetFull {
            until_ms: T0 + 60_000,
            share: 6,
            held: 6
        }
    );
    // b starts to compete: the fleet is full, so it waits, with a share of 3.
    assert_eq!(
        take(&slots, "b", "b0", T0 + 1).await,
        SlotAdmission::FleetFull {
            until_ms: T0 + 60_000,
            share: 3,
            held: 0
        }
    );
    // One of a's calls ends: a is over its share, the slot is b's.
    assert!(slots.release("a", "u", "a0").await.unwrap());
    assert!(matches!(
        take(&slots, "a", "a7", T0 + 2).await,
        SlotAdmission::FleetShare {
            share: 3,
            held: 5,
            ..
        }
    ));
    let (state, _) = slots.fleet_state(FLEET).await.unwrap();
    assert_eq!(fleet::next_to_serve(&state, T0 + 2).as_deref(), Some("b"));
    assert!(take(&slots, "b", "b0", T0 + 3).await.is_granted());
    // a's calls keep ending; each freed slot goes to b until both hold 3.
    for (i, slot) in ["a1", "a2"].iter().enumerate() {
        assert!(slots.release("a", "u", slot).await.unwrap());
        assert!(matches!(
            take(&slots, "a", "a8", T0 + 4).await,
            SlotAdmission::FleetShare { .. }
        ));
        assert!(
            take(&slots, "b", &format!("b{}", i + 1), T0 + 4)
                .await
                .is_granted()
        );
    }
    assert!(matches!(
        take(&slots, "b", "b9", T0 + 5).await,
        SlotAdmission::FleetFull {
            share: 3,
            held: 3,
            ..
        }
    ));
    // At their shares, a freed slot of a's is a's again.
    assert!(slots.release("a", "u", "a3").await.unwrap());
    assert!(matches!(
        take(&slots, "b", "b9", T0 + 6).await,
        SlotAdmission::FleetShare {
            share: 3,
            held: 3,
            ..
        }
    ));
    assert!(take(&slots, "a", "a9", T0 + 6).await.is_granted());
}

#[tokio::test]
async fn a_tenant_that_cannot_use_more_stops_competing() {
    let slots = slots().await;
    // b's own account allows one call: once it holds it, it no longer shrinks a's share.
    let mut small = ask("b", "b0");
    small.tenant_limit = 1;
    assert!(slots.acquire_at(&small, T0).await.unwrap().is_granted());
    small.slot = "b1";
    assert!(matches!(
        slots.acquire_at(&small, T0).await.unwrap(),
        SlotAdmission::TenantFull { .. }
    ));
    for i in 0..5 {
        assert!(take(&slots, "a", &format!("a{i}"), T0).await.is_granted());
    }
    assert!(matches!(
        take(&slots, "a", "a5", T0).await,
        SlotAdmission::FleetFull {
            share: 5,
            held: 5,
            ..
        }
    ));
    // A withdrawal works the same: c asked, then had nothing more to place.
    assert!(slots.release("a", "u", "a0").await.unwrap());
    assert!(matches!(
        take(&slots, "c", "c0", T0 + 1).await,
        SlotAdmission::Acquired { .. }
    ));
    assert!(slots.release("a", "u", "a1").await.unwrap());
    // a holds 3 of a share of 3 (c competes and holds 1 of 2).
    assert!(matches!(
        take(&slots, "a", "a6", T0 + 2).await,
        SlotAdmission::FleetShare {
            share: 3,
            held: 3,
            ..
        }
    ));
    slots.withdraw_from_fleet("c").await.unwrap();
    assert!(take(&slots, "a", "a6", T0 + 3).await.is_granted());
}

#[tokio::test]
async fn fleet_slots_come_back_at_their_lease_end_and_on_release_once() {
    let slots = slots().await;
    let mut short = ask("a", "a0");
    short.lease = Duration::from_millis(500);
    short.fleet_limit = Some(1);
    assert!(slots.acquire_at(&short, T0).await.unwrap().is_granted());
    let mut other = ask("b", "b0");
    other.fleet_limit = Some(1);
    assert!(matches!(
        slots.acquire_at(&other, T0 + 499).await.unwrap(),
        SlotAdmission::FleetFull {
            until_ms,
            ..
        } if until_ms == T0 + 500
    ));
    // No release came: the lease ends and the fleet slot with it.
    assert!(
        slots
            .acquire_at(&other, T0 + 500)
            .await
            .unwrap()
            .is_granted()
    );
    // A late release of the expired slot frees nothing of b's.
    slots.release("a", "u", "a0").await.unwrap();
    short.slot = "a1";
    assert!(matches!(
        slots.acquire_at(&short, T0 + 501).await.unwrap(),
        SlotAdmission::FleetFull { .. }
    ));
    assert!(slots.release("b", "u", "b0").await.unwrap());
    assert!(!slots.release("b", "u", "b0").await.unwrap());
    assert!(
        slots
            .acquire_at(&short, T0 + 502)
            .await
            .unwrap()
            .is_granted()
    );
}

/// A small deterministic generator (xorshift), so a failure replays.
struct Dice(u64);

impl Dice {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test]
async fn the_script_decides_as_the_pure_rule_on_random_states() {
    let slots = slots().await;
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    let tenants = ["t0", "t1", "t2", "t3"];
    let mut held: Vec<(String, String)> = Vec::new();
    let mut now = T0;
    let mut compared = 0;
    for step in 0..600u32 {
        let limit = 1 + (dice.next(8) as u32);
        match dice.next(10) {
            0..=5 => {
                let tenant = tenants[dice.next(4) as usize];
                let slot = format!("s{step}");
                let (state, _) = slots.fleet_state(limit).await.unwrap();
                let expected = fleet::decide(&state, tenant, now);
                let mut request = ask(tenant, &slot);
                request.fleet_limit = Some(limit);
                request.lease = Duration::from_millis(500 + dice.next(3_000));
                let got = slots.acquire_at(&request, now).await.unwrap();
                match (expected, got) {
                    (FleetDecision::Take { .. }, SlotAdmission::Acquired { .. }) => {
                        held.push((tenant.to_owned(), slot));
                    }
                    (
                        FleetDecision::Full { share, held: mine },
                        SlotAdmission::FleetFull {
                            share: s, held: h, ..
                        },
                    )
                    | (
                        FleetDecision::OverShare { share, held: mine },
                        SlotAdmission::FleetShare {
                            share: s, held: h, ..
                        },
                    ) => assert_eq!((share, mine), (s, h), "step {step}: {state:?}"),
                    (expected, got) => {
                        panic!("step {step}: rule says {expected:?}, script {got:?}; {state:?}")
                    }
                }
                compared += 1;
            }
            6 | 7 if !held.is_empty() => {
                let (tenant, slot) = held.swap_remove(dice.next(held.len() as u64) as usize);
                slots.release(&tenant, "u", &slot).await.unwrap();
            }
            8 => {
                let tenant = tenants[dice.next(4) as usize];
                slots.withdraw_from_fleet(tenant).await.unwrap();
            }
            _ => now += dice.next(1_000),
        }
    }
    assert!(compared > 300);
}

#[tokio::test]
async fn a_request_read_before_another_grant_is_stale_and_takes_nothing() {
    let slots = slots().await;
    let mut request = ask("a", "c1");
    request.fleet_limit = None;
    assert_eq!(slots.turn("a").await.unwrap(), (None, 0));
    request.expected_turn = Some(0);
    assert_eq!(
        slots.acquire_at(&request, T0).await.unwrap(),
        SlotAdmission::Acquired {
            lease_until_ms: T0 + 60_000,
            turn: 1
        }
    );
    // Another dispatcher read turn 0 too; it was served after that read.
    request.slot = "c2";
    assert_eq!(
        slots.acquire_at(&request, T0).await.unwrap(),
        SlotAdmission::Stale
    );
    assert_eq!(slots.tenant_in_use("a", T0).await.unwrap(), 1);
    assert_eq!(slots.turn("a").await.unwrap(), (Some("u".into()), 1));
    request.expected_turn = Some(1);
    assert!(matches!(
        slots.acquire_at(&request, T0).await.unwrap(),
        SlotAdmission::Acquired { turn: 2, .. }
    ));
    // A re-run of the first grant learns its turn.
    request.slot = "c1";
    request.expected_turn = None;
    assert!(matches!(
        slots.acquire_at(&request, T0).await.unwrap(),
        SlotAdmission::AlreadyHeld { turn: 1, .. }
    ));
}
