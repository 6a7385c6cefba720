//! Concurrency slots shared by the whole worker fleet: "at most 2 calls at once for this user and
//! 10 for this tenant's provider account", counted in Redis so every worker sees the same count.
//!
//! A slot is taken by one Lua script against the user's and the tenant's limit together (both or
//! neither) and carries a lease: it frees itself when the lease runs out, so a call-ended signal
//! that never arrives cannot leak it. Releasing is keyed by the slot's id and frees it at most
//! once, whatever the number of releases.
//!
//! Keys: `<ns>:v1:{<hash_tag>}:slots:t:<tenant>` (the tenant's slots),
//! `…:slots:u:<tenant>:<user>` (the user's) and `…:slots:rr:<tenant>` (the user served last, for
//! round-robin), all under the dispatching queue's hash tag. Nothing here waits for a slot: a
//! refusal says when the first lease runs out, and the caller defers.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands as _;

use crate::{Connection, Error, LAYOUT_VERSION, valid_name};

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
}

/// The answer to a slot request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAdmission {
    /// Taken; it frees itself at `lease_until_ms` unless released first.
    Acquired { lease_until_ms: u64 },
    /// This slot id already holds a slot (a re-run); nothing more was taken.
    AlreadyHeld { lease_until_ms: u64 },
    /// The user is at its limit; its first lease runs out at `until_ms`.
    UserFull { until_ms: u64 },
    /// The tenant is at its limit; its first lease runs out at `until_ms`.
    TenantFull { until_ms: u64 },
}

impl SlotAdmission {
    pub fn is_granted(&self) -> bool {
        matches!(
            self,
            SlotAdmission::Acquired { .. } | SlotAdmission::AlreadyHeld { .. }
        )
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
        if request.user_limit == 0 || request.tenant_limit == 0 {
            return Err(Error::InvalidLimit("slot limits must be at least 1".into()));
        }
        let lease_ms = u64::try_from(request.lease.as_millis()).unwrap_or(u64::MAX);
        if lease_ms == 0 {
            return Err(Error::InvalidLimit("a slot lease must not be zero".into()));
        }
        checked(request.slot)?;
        let mut conn = self.conn.clone();
        let (status, at): (i64, i64) = self
            .scripts
            .acquire
            .key(self.tenant_key(request.tenant)?)
            .key(self.user_key(request.tenant, request.user)?)
            .key(self.cursor_key(request.tenant)?)
            .arg(now_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .arg(lease_ms)
            .arg(request.user_limit)
            .arg(request.tenant_limit)
            .arg(request.slot)
            .arg(request.user)
            .invoke_async(&mut conn)
            .await?;
        let at = u64::try_from(at).map_err(|_| Error::Protocol(format!("instant {at}")))?;
        match status {
            1 => Ok(SlotAdmission::Acquired { lease_until_ms: at }),
            2 => Ok(SlotAdmission::AlreadyHeld { lease_until_ms: at }),
            0 => Ok(SlotAdmission::UserFull { until_ms: at }),
            -1 => Ok(SlotAdmission::TenantFull { until_ms: at }),
            other => Err(Error::Protocol(format!("slot status {other}"))),
        }
    }

    /// Frees `slot`. `true` when this call freed it; `false` when it was not held (released
    /// before, or its lease ran out), so a second release changes nothing.
    pub async fn release(&self, tenant: &str, user: &str, slot: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let freed: i64 = self
            .scripts
            .release
            .key(self.tenant_key(tenant)?)
            .key(self.user_key(tenant, user)?)
            .arg(checked(slot)?)
            .invoke_async(&mut conn)
            .await?;
        Ok(freed == 1)
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
        let mut conn = self.conn.clone();
        Ok(conn.get(self.cursor_key(tenant)?).await?)
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
