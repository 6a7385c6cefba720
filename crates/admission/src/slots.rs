//! Concurrency slots shared by the whole worker fleet: "at most 2 calls at once for this user and
//! 10 for this tenant's provider account", counted in Redis so every worker sees the same count.
//!
//! A slot is taken by one Lua script against the user's and the tenant's limit together (both or
//! neither) and carries a lease: it frees itself when the lease runs out, so a call-ended signal
//! that never arrives cannot leak it. Releasing is keyed by the slot's id and frees it at most
//! once, whatever the number of releases.
//!
//! With a fleet cap (`fleet_limit`), the same script also takes the slot against the tenant's fair
//! share of the fleet ([`crate::fleet`]); a freed fleet slot is offered by waking the tenant
//! [`crate::fleet::next_to_serve`] names.
//!
//! Every grant advances the tenant's *turn* (a counter). A dispatcher reads the cursor and the
//! turn together ([`Slots::turn`]) and asks with the turn it read: if another dispatcher was
//! granted a slot in between, the request is refused as stale and the dispatcher reads again, so
//! the grants of a tenant follow the round-robin order exactly however many dispatchers run.
//!
//! Keys: `<ns>:v1:{<hash_tag>}:slots:t:<tenant>` (the tenant's slots),
//! `…:slots:u:<tenant>:<user>` (the user's), `…:slots:rr:<tenant>` (the user served last, for
//! round-robin), `…:slots:n:<tenant>` (the turn), `…:slots:seq:<tenant>` (the turn each held
//! slot was granted at) and `…:slots:done:<tenant>` (slots whose call is over, refused for a
//! while: see [`Slots::retire`]); for the fleet, `…:slots:fleet` (every tenant's slots, members `<tenant> <slot>`),
//! `…:slots:fleet:demand` (the competing tenants) and `…:slots:fleet:rr` (the tenant served
//! last). All live under the dispatching queue's hash tag. Nothing here waits for a slot: a
//! refusal says when the first lease runs out, and the caller defers.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands as _;

use crate::fleet::FleetState;
use crate::{Connection, Error, LAYOUT_VERSION, valid_name};

/// `fleet_state.lua`'s answer: Redis's clock, the fleet's slots and demand with their scores,
/// and the tenant served last.
type FleetSnapshot = (u64, Vec<(String, f64)>, Vec<(String, f64)>, Option<String>);

/// What a slot request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRequest<'a> {
    pub tenant: &'a str,
    pub user: &'a str,
    /// The slot's own id (one per call); taking it twice takes one slot.
    pub slot: &'a str,
    pub user_limit: u32,
    pub tenant_limit: u32,
    /// How long the slot is held unless released first: the longest plausible call.
    pub lease: Duration,
    /// The fleet-wide cap on slots across tenants, shared fairly; `None` for no cap.
    pub fleet_limit: Option<u32>,
    /// The tenant's turn the caller read with the cursor ([`Slots::turn`]); the request is
    /// refused as [`SlotAdmission::Stale`] when it moved on. `None` does not check.
    pub expected_turn: Option<u64>,
}

/// The answer to a slot request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAdmission {
    /// Taken at the tenant's turn `turn` (1 for its first grant); it frees itself at
    /// `lease_until_ms` unless released first.
    Acquired { lease_until_ms: u64, turn: u64 },
    /// This slot id already holds a slot (a re-run), granted at `turn`; nothing more was taken.
    AlreadyHeld { lease_until_ms: u64, turn: u64 },
    /// Another request was granted a slot since the caller read the tenant's turn: read the
    /// cursor again. Nothing was taken.
    Stale,
    /// The slot id was retired ([`Slots::retire`]): its call is over, and the caller read it as
    /// waiting from a view older than that. Nothing was taken.
    Retired,
    /// The user is at its limit; its first lease runs out at `until_ms`.
    UserFull { until_ms: u64 },
    /// The tenant is at its limit; its first lease runs out at `until_ms`.
    TenantFull { until_ms: u64 },
    /// Every slot of the fleet cap is held; the fleet's first lease runs out at `until_ms`.
    /// `share` and `held` are the tenant's fair share of the fleet and what it holds.
    FleetFull {
        until_ms: u64,
        share: u32,
        held: u32,
    },
    /// The tenant holds its fair share of the fleet while other tenants compete.
    FleetShare {
        until_ms: u64,
        share: u32,
        held: u32,
    },
}

impl SlotAdmission {
    pub fn is_granted(&self) -> bool {
        matches!(
            self,
            SlotAdmission::Acquired { .. } | SlotAdmission::AlreadyHeld { .. }
        )
    }

    /// Whether the fleet cap refused it (the user and the tenant had room).
    pub fn is_fleet_refusal(&self) -> bool {
        matches!(
            self,
            SlotAdmission::FleetFull { .. } | SlotAdmission::FleetShare { .. }
        )
    }

    /// When a slot the request was granted started its lease (Unix milliseconds): the grant's
    /// instant by Redis's clock.
    pub fn granted_at_ms(&self, lease: Duration) -> Option<u64> {
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        match self {
            SlotAdmission::Acquired { lease_until_ms, .. }
            | SlotAdmission::AlreadyHeld { lease_until_ms, .. } => {
                Some(lease_until_ms.saturating_sub(lease_ms))
            }
            _ => None,
        }
    }

    /// The tenant's turn a granted slot was taken at (0 when unknown).
    pub fn turn(&self) -> Option<u64> {
        match self {
            SlotAdmission::Acquired { turn, .. } | SlotAdmission::AlreadyHeld { turn, .. } => {
                Some(*turn)
            }
            _ => None,
        }
    }
}

/// Fleet-wide concurrency slots in Redis. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Slots {
    conn: Connection,
    prefix: String,
    scripts: Arc<Scripts>,
}

struct Scripts {
    acquire: redis::Script,
    release: redis::Script,
    fleet_state: redis::Script,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn checked(name: &str) -> Result<&str, Error> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(Error::InvalidKeyName(name.to_owned()))
    }
}

impl Slots {
    /// Slots whose keys are `<namespace>:v1:{<hash_tag>}:slots:…`; use the namespace of the
    /// queues and, as `hash_tag`, the queue whose jobs take the slots.
    pub fn new(conn: Connection, namespace: &str, hash_tag: &str) -> Result<Self, Error> {
        checked(namespace)?;
        checked(hash_tag)?;
        Ok(Self {
            conn,
            prefix: format!("{namespace}:{LAYOUT_VERSION}:{{{hash_tag}}}:slots:"),
            scripts: Arc::new(Scripts {
                acquire: redis::Script::new(include_str!("../lua/acquire_slot.lua")),
                release: redis::Script::new(include_str!("../lua/release_slot.lua")),
                fleet_state: redis::Script::new(include_str!("../lua/fleet_state.lua")),
            }),
        })
    }

    fn tenant_key(&self, tenant: &str) -> Result<String, Error> {
        Ok(format!("{}t:{}", self.prefix, checked(tenant)?))
    }

    fn user_key(&self, tenant: &str, user: &str) -> Result<String, Error> {
        Ok(format!(
            "{}u:{}:{}",
            self.prefix,
            checked(tenant)?,
            checked(user)?
        ))
    }

    fn cursor_key(&self, tenant: &str) -> Result<String, Error> {
        Ok(format!("{}rr:{}", self.prefix, checked(tenant)?))
    }

    fn turn_key(&self, tenant: &str) -> Result<String, Error> {
        Ok(format!("{}n:{}", self.prefix, checked(tenant)?))
    }

    fn turns_key(&self, tenant: &str) -> Result<String, Error> {
        Ok(format!("{}seq:{}", self.prefix, checked(tenant)?))
    }

    fn retired_key(&self, tenant: &str) -> Result<String, Error> {
        Ok(format!("{}done:{}", self.prefix, checked(tenant)?))
    }

    fn fleet_key(&self) -> String {
        format!("{}fleet", self.prefix)
    }

    fn fleet_demand_key(&self) -> String {
        format!("{}fleet:demand", self.prefix)
    }

    fn fleet_cursor_key(&self) -> String {
        format!("{}fleet:rr", self.prefix)
    }

    /// Takes a slot against both limits at once, by Redis's clock.
    pub async fn acquire(&self, request: &SlotRequest<'_>) -> Result<SlotAdmission, Error> {
        self.run_acquire(request, None).await
    }

    /// [`acquire`](Self::acquire) at an explicit instant (Unix milliseconds), for tests.
    pub async fn acquire_at(
        &self,
        request: &SlotRequest<'_>,
        now_ms: u64,
    ) -> Result<SlotAdmission, Error> {
        self.run_acquire(request, Some(now_ms)).await
    }

    async fn run_acquire(
        &self,
        request: &SlotRequest<'_>,
        now_ms: Option<u64>,
    ) -> Result<SlotAdmission, Error> {
        if request.user_limit == 0 || request.tenant_limit == 0 || request.fleet_limit == Some(0) {
            return Err(Error::InvalidLimit("slot limits must be at least 1".into()));
        }
        let lease_ms = u64::try_from(request.lease.as_millis()).unwrap_or(u64::MAX);
        if lease_ms == 0 {
            return Err(Error::InvalidLimit("a slot lease must not be zero".into()));
        }
        checked(request.slot)?;
        let mut conn = self.conn.clone();
        let answer: Vec<i64> = self
            .scripts
            .acquire
            .key(self.tenant_key(request.tenant)?)
            .key(self.user_key(request.tenant, request.user)?)
            .key(self.cursor_key(request.tenant)?)
            .key(self.fleet_key())
            .key(self.fleet_demand_key())
            .key(self.fleet_cursor_key())
            .key(self.turn_key(request.tenant)?)
            .key(self.turns_key(request.tenant)?)
            .key(self.retired_key(request.tenant)?)
            .arg(now_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .arg(lease_ms)
            .arg(request.user_limit)
            .arg(request.tenant_limit)
            .arg(request.slot)
            .arg(request.user)
            .arg(request.tenant)
            .arg(request.fleet_limit.unwrap_or(0))
            .arg(
                request
                    .expected_turn
                    .map(|turn| turn.to_string())
                    .unwrap_or_default(),
            )
            .invoke_async(&mut conn)
            .await?;
        let [status, at, share, held, turn] = answer[..] else {
            return Err(Error::Protocol(format!("slot answer {answer:?}")));
        };
        let at = u64::try_from(at).map_err(|_| Error::Protocol(format!("instant {at}")))?;
        let count = |n: i64| u32::try_from(n).map_err(|_| Error::Protocol(format!("count {n}")));
        let turn = u64::try_from(turn).map_err(|_| Error::Protocol(format!("turn {turn}")))?;
        match status {
            1 => Ok(SlotAdmission::Acquired {
                lease_until_ms: at,
                turn,
            }),
            2 => Ok(SlotAdmission::AlreadyHeld {
                lease_until_ms: at,
                turn,
            }),
            3 => Ok(SlotAdmission::Stale),
            4 => Ok(SlotAdmission::Retired),
            0 => Ok(SlotAdmission::UserFull { until_ms: at }),
            -1 => Ok(SlotAdmission::TenantFull { until_ms: at }),
            -2 => Ok(SlotAdmission::FleetFull {
                until_ms: at,
                share: count(share)?,
                held: count(held)?,
            }),
            -3 => Ok(SlotAdmission::FleetShare {
                until_ms: at,
                share: count(share)?,
                held: count(held)?,
            }),
            other => Err(Error::Protocol(format!("slot status {other}"))),
        }
    }

    /// Frees `slot`. `true` when this call freed it; `false` when it was not held (released
    /// before, or its lease ran out), so a second release changes nothing. The slot id may be
    /// taken again at once: use it for a call that goes back to waiting.
    pub async fn release(&self, tenant: &str, user: &str, slot: &str) -> Result<bool, Error> {
        self.run_release(tenant, user, slot, Duration::ZERO).await
    }

    /// Frees the slot of a call that is over and refuses its id for `for_at_least`, so a
    /// dispatcher acting on a view of the call from before it ended cannot take a slot for it
    /// (and a turn with it) again. Use a span longer than any dispatch run.
    pub async fn retire(
        &self,
        tenant: &str,
        user: &str,
        slot: &str,
        for_at_least: Duration,
    ) -> Result<bool, Error> {
        self.run_release(
            tenant,
            user,
            slot,
            for_at_least.max(Duration::from_millis(1)),
        )
        .await
    }

    async fn run_release(
        &self,
        tenant: &str,
        user: &str,
        slot: &str,
        retire_for: Duration,
    ) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let freed: i64 = self
            .scripts
            .release
            .key(self.tenant_key(tenant)?)
            .key(self.user_key(tenant, user)?)
            .key(self.fleet_key())
            .key(self.turns_key(tenant)?)
            .key(self.retired_key(tenant)?)
            .arg(checked(slot)?)
            .arg(tenant)
            .arg(u64::try_from(retire_for.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await?;
        Ok(freed == 1)
    }

    /// The tenant stops competing for the fleet (it has no call it could place now but for the
    /// fleet cap), so its share goes to the others until it asks again.
    pub async fn withdraw_from_fleet(&self, tenant: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.zrem(self.fleet_demand_key(), checked(tenant)?).await?;
        Ok(())
    }

    /// The fleet as one snapshot under the cap `limit`, and Redis's clock at that instant
    /// (Unix milliseconds), for [`crate::fleet::next_to_serve`].
    pub async fn fleet_state(&self, limit: u32) -> Result<(FleetState, u64), Error> {
        let mut conn = self.conn.clone();
        let (now, slots, demand, last): FleetSnapshot = self
            .scripts
            .fleet_state
            .key(self.fleet_key())
            .key(self.fleet_demand_key())
            .key(self.fleet_cursor_key())
            .invoke_async(&mut conn)
            .await?;
        let instant = |score: f64| {
            if score.is_finite() && score >= 0.0 {
                Ok(score as u64)
            } else {
                Err(Error::Protocol(format!("score {score}")))
            }
        };
        let mut state = FleetState {
            limit,
            last_served: last,
            ..FleetState::default()
        };
        for (member, score) in slots {
            let Some((tenant, _slot)) = member.split_once(' ') else {
                return Err(Error::Protocol(format!("fleet slot {member:?}")));
            };
            state.slots.push((tenant.to_owned(), instant(score)?));
        }
        for (tenant, score) in demand {
            state.demand.push((tenant, instant(score)?));
        }
        Ok((state, now))
    }

    /// Slots the tenant holds whose lease runs past `now_ms`.
    pub async fn tenant_in_use(&self, tenant: &str, now_ms: u64) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let n: u64 = conn
            .zcount(self.tenant_key(tenant)?, format!("({now_ms}"), "+inf")
            .await?;
        Ok(n)
    }

    /// Slots the user holds whose lease runs past `now_ms`.
    pub async fn user_in_use(&self, tenant: &str, user: &str, now_ms: u64) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let n: u64 = conn
            .zcount(self.user_key(tenant, user)?, format!("({now_ms}"), "+inf")
            .await?;
        Ok(n)
    }

    /// The user that took the tenant's last slot, for [`round_robin`].
    pub async fn last_served(&self, tenant: &str) -> Result<Option<String>, Error> {
        Ok(self.turn(tenant).await?.0)
    }

    /// The user that took the tenant's last slot and the tenant's turn, read together: ask with
    /// [`SlotRequest::expected_turn`] set to the turn, and a grant to anyone else in between makes
    /// the request stale.
    pub async fn turn(&self, tenant: &str) -> Result<(Option<String>, u64), Error> {
        let mut conn = self.conn.clone();
        let (last, turn): (Option<String>, Option<u64>) = redis::cmd("MGET")
            .arg(self.cursor_key(tenant)?)
            .arg(self.turn_key(tenant)?)
            .query_async(&mut conn)
            .await?;
        Ok((last, turn.unwrap_or(0)))
    }
}

/// The order to offer the next slot to `candidates` (users with a runnable call, any order):
/// round-robin, starting with the first user after `last_served` in a fixed (sorted) order, so
/// every user with work gets a turn before any gets a second one.
pub fn round_robin<T: Ord + Clone>(candidates: &[T], last_served: Option<&T>) -> Vec<T> {
    let mut sorted = candidates.to_vec();
    sorted.sort();
    sorted.dedup();
    let start = match last_served {
        Some(last) => sorted.partition_point(|c| c <= last),
        None => 0,
    };
    let mut order = sorted.split_off(start);
    order.extend(sorted);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_starts_after_the_user_served_last() {
        let users = ["c", "a", "b"];
        assert_eq!(round_robin(&users, None), ["a", "b", "c"]);
        assert_eq!(round_robin(&users, Some(&"a")), ["b", "c", "a"]);
        assert_eq!(round_robin(&users, Some(&"c")), ["a", "b", "c"]);
        // The user served last may have no work now: the next one after it in order starts.
        assert_eq!(round_robin(&["a", "c", "d"], Some(&"b")), ["c", "d", "a"]);
        assert!(round_robin::<&str>(&[], Some(&"a")).is_empty());
    }

    #[test]
    fn serving_each_user_in_turn_gives_everyone_a_turn_before_a_second_one() {
        let users = [1, 2, 3, 4];
        let mut last = None;
        let mut served = Vec::new();
        for _ in 0..8 {
            let next = round_robin(&users, last.as_ref())[0];
            served.push(next);
            last = Some(next);
        }
        assert_eq!(served, [1, 2, 3, 4, 1, 2, 3, 4]);
    }
}
