//! The fleet-wide call cap shared fairly between tenants, as pure functions of an explicit state
//! and `now` (docs/decisions/0008-fleet-call-sharing.md).
//!
//! herald may run many tenants' call campaigns on one fleet with a total cap on concurrent calls
//! (`HERALD_CALL_FLEET_LIMIT`). A tenant *competes* for the cap while it has a call it could
//! place right now but for the fleet (its user and tenant limits have room); the cap is then
//! divided between the competing tenants:
//!
//! - slots held by tenants that do not compete stay theirs and are taken off the cap first;
//! - what is left, `available`, is split evenly: every competing tenant's share is
//!   `available / n`, and the `available % n` slots left over go one each to the competing
//!   tenants holding the most, ties in round-robin order after the tenant served last. The
//!   shares add up to `available` exactly, so a tenant alone may use the whole cap and no slot
//!   stays idle while someone below its share waits;
//! - a tenant is granted a slot only while the fleet has one free *and* it holds fewer than its
//!   share. Calls in progress are never cut, so a tenant above its share (it was alone until a
//!   moment ago) gets nothing more until its own calls bring it back under.
//!
//! When a slot is freed, [`next_to_serve`] names the competing tenant furthest below its share:
//! the one whose dispatcher is woken to take it.
//!
//! The Lua script that enforces the cap (`lua/acquire_slot.lua`) is a transcription of
//! [`decide`]; `crates/admission/tests/fleet.rs` runs both over random states and compares them.

use std::collections::{BTreeMap, BTreeSet};

use crate::slots::round_robin;

/// The fleet as one snapshot: the cap, every fleet slot with its owner and lease end, the
/// tenants that registered demand with the instant it lapses, and the tenant served last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetState {
    pub limit: u32,
    /// `(tenant, lease_until_ms)`, one per slot held.
    pub slots: Vec<(String, u64)>,
    /// `(tenant, until_ms)`: the tenant competes until then unless it asks again or withdraws.
    pub demand: Vec<(String, u64)>,
    /// The tenant granted a fleet slot last (the round-robin cursor for ties).
    pub last_served: Option<String>,
}

/// The answer for a tenant asking for a fleet slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetDecision {
    /// A slot is free and the tenant is under its share.
    Take { share: u32, held: u32 },
    /// Every slot of the cap is held.
    Full { share: u32, held: u32 },
    /// The tenant already holds its share while others compete.
    OverShare { share: u32, held: u32 },
}

/// The live view of a state at `now`: slots held per tenant, and who competes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Live<'a> {
    held: BTreeMap<&'a str, u32>,
    competing: BTreeSet<&'a str>,
    total: u32,
}

fn live<'a>(state: &'a FleetState, now_ms: u64, asking: Option<&'a str>) -> Live<'a> {
    let mut held: BTreeMap<&str, u32> = BTreeMap::new();
    let mut total = 0u32;
    for (tenant, until) in &state.slots {
        if *until > now_ms {
            *held.entry(tenant.as_str()).or_insert(0) += 1;
            total = total.saturating_add(1);
        }
    }
    let mut competing: BTreeSet<&str> = state
        .demand
        .iter()
        .filter(|(_, until)| *until > now_ms)
        .map(|(tenant, _)| tenant.as_str())
        .collect();
    if let Some(asking) = asking {
        competing.insert(asking);
    }
    Live {
        held,
        competing,
        total,
    }
}

/// Every competing tenant's share of the cap, by the rule in the module documentation.
fn shares_of<'a>(limit: u32, live: &Live<'a>, last_served: Option<&str>) -> BTreeMap<&'a str, u32> {
    let mut shares = BTreeMap::new();
    if live.competing.is_empty() {
        return shares;
    }
    let kept: u32 = live
        .held
        .iter()
        .filter(|(tenant, _)| !live.competing.contains(*tenant))
        .map(|(_, n)| *n)
        .sum();
    let available = limit.saturating_sub(kept);
    let n = u32::try_from(live.competing.len()).unwrap_or(u32::MAX);
    let base = available / n;
    let extra = available % n;
    let competing: Vec<&str> = live.competing.iter().copied().collect();
    let turn: BTreeMap<&str, usize> = round_robin(&competing, last_served.as_ref())
        .into_iter()
        .enumerate()
        .map(|(position, tenant)| (tenant, position))
        .collect();
    let mut order = competing;
    order.sort_by_key(|tenant| {
        let held = live.held.get(tenant).copied().unwrap_or(0);
        (
            std::cmp::Reverse(held),
            turn.get(tenant).copied().unwrap_or(0),
        )
    });
    for (rank, tenant) in order.into_iter().enumerate() {
        let bonus = u32::from(u32::try_from(rank).is_ok_and(|rank| rank < extra));
        shares.insert(tenant, base + bonus);
    }
    shares
}

/// Every competing tenant's share at `now` (tenants whose demand lapsed do not compete).
pub fn shares(state: &FleetState, now_ms: u64) -> BTreeMap<String, u32> {
    let live = live(state, now_ms, None);
    shares_of(state.limit, &live, state.last_served.as_deref())
        .into_iter()
        .map(|(tenant, share)| (tenant.to_owned(), share))
        .collect()
}

/// Whether `asking` may take a fleet slot at `now`. Asking makes it compete, so its own demand
/// counts even if the state does not list it yet.
pub fn decide(state: &FleetState, asking: &str, now_ms: u64) -> FleetDecision {
    let live = live(state, now_ms, Some(asking));
    let shares = shares_of(state.limit, &live, state.last_served.as_deref());
    let share = shares.get(asking).copied().unwrap_or(0);
    let held = live.held.get(asking).copied().unwrap_or(0);
    if live.total >= state.limit {
        FleetDecision::Full { share, held }
    } else if held >= share {
        FleetDecision::OverShare { share, held }
    } else {
        FleetDecision::Take { share, held }
    }
}

/// Who should get a slot free at `now`: the competing tenant furthest below its share (ties in
/// round-robin order after the tenant served last), or nobody when the fleet is full or every
/// competing tenant holds its share.
pub fn next_to_serve(state: &FleetState, now_ms: u64) -> Option<String> {
    let live = live(state, now_ms, None);
    if live.total >= state.limit {
        return None;
    }
    let last = state.last_served.as_deref();
    let shares = shares_of(state.limit, &live, last);
    let competing: Vec<&str> = live.competing.iter().copied().collect();
    round_robin(&competing, last.as_ref())
        .into_iter()
        .filter_map(|tenant| {
            let share = shares.get(tenant).copied().unwrap_or(0);
            let held = live.held.get(tenant).copied().unwrap_or(0);
            share
                .checked_sub(held)
                .filter(|deficit| *deficit > 0)
                .map(|deficit| (deficit, tenant))
        })
        // The first of the largest deficits: `max_by_key` keeps the last of equals, so reverse.
        .rev()
        .max_by_key(|(deficit, _)| *deficit)
        .map(|(_, tenant)| tenant.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn state(limit: u32, slots: &[(&str, u32)], demand: &[&str], last: Option<&str>) -> FleetState {
        FleetState {
            limit,
            slots: slots
                .iter()
                .flat_map(|(tenant, n)| (0..*n).map(|_| ((*tenant).to_owned(), NOW + 60_000)))
                .collect(),
            demand: demand
                .iter()
                .map(|tenant| ((*tenant).to_owned(), NOW + 60_000))
                .collect(),
            last_served: last.map(str::to_owned),
        }
    }

    fn shares_at(s: &FleetState) -> Vec<(String, u32)> {
        shares(s, NOW).into_iter().collect()
    }

    #[test]
    fn a_tenant_alone_may_use_the_whole_cap() {
        let alone = state(6, &[("a", 5)], &["a"], Some("a"));
        assert_eq!(
            decide(&alone, "a", NOW),
            FleetDecision::Take { share: 6, held: 5 }
        );
        let full = state(6, &[("a", 6)], &["a"], Some("a"));
        assert_eq!(
            decide(&full, "a", NOW),
            FleetDecision::Full { share: 6, held: 6 }
        );
    }

    #[test]
    fn competing_tenants_split_the_cap_and_the_remainder_goes_to_those_holding_most() {
        let s = state(10, &[("a", 4), ("b", 2)], &["a", "b", "c"], None);
        // 10 / 3 = 3 each, one left over: a holds the most.
        assert_eq!(
            shares_at(&s),
            [("a".into(), 4), ("b".into(), 3), ("c".into(), 3)]
        );
        assert_eq!(
            decide(&s, "a", NOW),
            FleetDecision::OverShare { share: 4, held: 4 }
        );
        assert_eq!(
            decide(&s, "c", NOW),
            FleetDecision::Take { share: 3, held: 0 }
        );
        // Shares always add up to the cap: nothing idles while someone is under its share.
        assert_eq!(shares(&s, NOW).values().sum::<u32>(), 10);
    }

    #[test]
    fn a_tenant_above_its_share_gets_nothing_more_until_it_is_back_under() {
        // a was alone and holds the whole cap; b starts to compete.
        let s = state(6, &[("a", 6)], &["a", "b"], Some("a"));
        assert_eq!(
            decide(&s, "b", NOW),
            FleetDecision::Full { share: 3, held: 0 }
        );
        // One of a's calls ends: the free slot is b's, not a's.
        let s = state(6, &[("a", 5)], &["a", "b"], Some("a"));
        assert_eq!(
            decide(&s, "a", NOW),
            FleetDecision::OverShare { share: 3, held: 5 }
        );
        assert_eq!(
            decide(&s, "b", NOW),
            FleetDecision::Take { share: 3, held: 0 }
        );
        assert_eq!(next_to_serve(&s, NOW).as_deref(), Some("b"));
    }

    #[test]
    fn slots_of_tenants_that_do_not_compete_are_taken_off_the_cap() {
        // c holds 4 but wants no more (its own limits bind, or its queue is empty).
        let s = state(10, &[("c", 4), ("a", 1)], &["a", "b"], None);
        assert_eq!(shares_at(&s), [("a".into(), 3), ("b".into(), 3)]);
        // Asking makes a tenant compete even before its demand is recorded.
        let s = state(10, &[("c", 4)], &[], None);
        assert_eq!(
            decide(&s, "d", NOW),
            FleetDecision::Take { share: 6, held: 0 }
        );
    }

    #[test]
    fn leases_and_demand_lapse_at_their_instant() {
        let mut s = state(2, &[("a", 2)], &["a", "b"], None);
        assert_eq!(
            decide(&s, "b", NOW),
            FleetDecision::Full { share: 1, held: 0 }
        );
        // At the lease's end the slots are free, whatever was released.
        let end = NOW + 60_000;
        assert_eq!(
            decide(&s, "b", end),
            FleetDecision::Take { share: 2, held: 0 }
        );
        // a's demand lapsed too: b alone competes and may use both.
        s.slots.clear();
        s.demand[0].1 = NOW;
        assert_eq!(
            decide(&s, "b", NOW),
            FleetDecision::Take { share: 2, held: 0 }
        );
    }

    #[test]
    fn a_remainder_smaller_than_the_tenants_rotates_instead_of_starving_one() {
        // Cap 2, three tenants: the share is 1 for two of them and 0 for the third.
        let mut last = Some("b".to_owned());
        let mut held: BTreeMap<&str, u32> = [("a", 1), ("b", 1), ("c", 0)].into_iter().collect();
        let mut served = Vec::new();
        for _ in 0..6 {
            // The oldest call ends: the tenant holding a slot with the smallest name frees it.
            let freeing = *held.iter().find(|(_, n)| **n > 0).map(|(t, _)| t).unwrap();
            *held.get_mut(freeing).unwrap() -= 1;
            let s = FleetState {
                limit: 2,
                slots: held
                    .iter()
                    .flat_map(|(t, n)| (0..*n).map(|_| ((*t).to_owned(), NOW + 1)))
                    .collect(),
                demand: ["a", "b", "c"]
                    .iter()
                    .map(|t| ((*t).to_owned(), NOW + 1))
                    .collect(),
                last_served: last.clone(),
            };
            let next = next_to_serve(&s, NOW).unwrap();
            assert!(matches!(decide(&s, &next, NOW), FleetDecision::Take { .. }));
            *held.get_mut(next.as_str()).unwrap() += 1;
            served.push(next.clone());
            last = Some(next);
        }
        for tenant in ["a", "b", "c"] {
            assert!(
                served.iter().any(|t| t == tenant),
                "{tenant} starved: {served:?}"
            );
        }
    }

    #[test]
    fn the_next_to_serve_is_the_one_furthest_below_its_share() {
        let s = state(9, &[("a", 3), ("b", 1)], &["a", "b", "c"], Some("a"));
        // Shares 3 each: c (3 below) before b (2 below).
        assert_eq!(next_to_serve(&s, NOW).as_deref(), Some("c"));
        let s = state(
            9,
            &[("a", 3), ("b", 1), ("c", 1)],
            &["a", "b", "c"],
            Some("b"),
        );
        // b and c both 2 below: c comes first after b.
        assert_eq!(next_to_serve(&s, NOW).as_deref(), Some("c"));
        let full = state(4, &[("a", 4)], &["a", "b"], None);
        assert_eq!(next_to_serve(&full, NOW), None);
        let nobody = state(4, &[("a", 1)], &[], None);
        assert_eq!(next_to_serve(&nobody, NOW), None);
    }
}
