//! Why a queued call is not running yet, as a pure function of what is known about it at an
//! explicit `now` (docs/decisions/0008-fleet-call-sharing.md, "Why a call waits").
//!
//! The reasons are checked in the order dispatch would meet them: the campaign is paused, its
//! start date is ahead, its window is closed, the user is at its limit, the tenant at its system
//! limit, the fleet cap keeps the tenant at its share, and otherwise the call waits its turn
//! behind `ahead` calls of the same user (0: it is the user's next call, and dispatch reaches it
//! in round-robin order). Nothing here reads a clock or a store.

use chrono::{DateTime, Utc};

use crate::Window;

/// Slots in use against a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub in_use: u32,
    pub limit: u32,
}

impl Usage {
    pub fn is_full(&self) -> bool {
        self.in_use >= self.limit
    }
}

/// The tenant's last refusal by the fleet cap, as its dispatcher recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetWait {
    pub limit: u32,
    pub share: u32,
    pub held: u32,
}

/// What is known about one queued call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFacts {
    /// `Some` when the campaign is paused, with the reason it was paused (if one was given).
    pub paused: Option<Option<String>>,
    pub window: Window,
    /// The user's calls in progress and concurrent-call limit.
    pub user: Usage,
    /// The tenant's calls in progress and system limit.
    pub tenant: Usage,
    /// Set while the tenant's last dispatch was refused by the fleet cap.
    pub fleet: Option<FleetWait>,
    /// Queued calls of the same user, in campaigns open now, that go first.
    pub ahead: u64,
}

/// Why a queued call waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    CampaignPaused { pause_reason: Option<String> },
    StartDateInFuture { opens_at: DateTime<Utc> },
    OutsideWindow { opens_at: DateTime<Utc> },
    UserLimit(Usage),
    SystemLimit(Usage),
    FleetLimit(FleetWait),
    WaitingTurn { ahead: u64 },
}

impl WaitReason {
    /// The reason's name as the API shows it.
    pub fn name(&self) -> &'static str {
        match self {
            WaitReason::CampaignPaused { .. } => "campaign_paused",
            WaitReason::StartDateInFuture { .. } => "start_date_in_future",
            WaitReason::OutsideWindow { .. } => "outside_window",
            WaitReason::UserLimit(_) => "user_limit",
            WaitReason::SystemLimit(_) => "system_limit",
            WaitReason::FleetLimit(_) => "fleet_limit",
            WaitReason::WaitingTurn { .. } => "waiting_turn",
        }
    }
}

/// The first reason that keeps the call from starting at `now`.
pub fn why_waiting(facts: &WaitFacts, now: DateTime<Utc>) -> WaitReason {
    if let Some(reason) = &facts.paused {
        return WaitReason::CampaignPaused {
            pause_reason: reason.clone(),
        };
    }
    let first = facts.window.first_open();
    if now < first {
        return WaitReason::StartDateInFuture { opens_at: first };
    }
    let opens_at = facts.window.next_open(now);
    if opens_at > now {
        return WaitReason::OutsideWindow { opens_at };
    }
    if facts.user.is_full() {
        return WaitReason::UserLimit(facts.user);
    }
    if facts.tenant.is_full() {
        return WaitReason::SystemLimit(facts.tenant);
    }
    if let Some(fleet) = facts.fleet {
        return WaitReason::FleetLimit(fleet);
    }
    WaitReason::WaitingTurn { ahead: facts.ahead }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::parse_time;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn facts(first: &str, last: &str, zone: &str, start: &str) -> WaitFacts {
        WaitFacts {
            paused: None,
            window: Window::parse(
                parse_time("first", first).unwrap(),
                parse_time("last", last).unwrap(),
                zone,
                start.parse().unwrap(),
            )
            .unwrap(),
            user: Usage {
                in_use: 1,
                limit: 2,
            },
            tenant: Usage {
                in_use: 5,
                limit: 10,
            },
            fleet: None,
            ahead: 3,
        }
    }

    #[test]
    fn reasons_come_in_the_order_dispatch_meets_them() {
        let now = utc("2026-03-10T12:00:00Z");
        let mut f = facts("09:00", "18:00", "Europe/London", "2026-03-01");
        assert_eq!(why_waiting(&f, now), WaitReason::WaitingTurn { ahead: 3 });
        f.fleet = Some(FleetWait {
            limit: 6,
            share: 3,
            held: 3,
        });
        assert_eq!(why_waiting(&f, now).name(), "fleet_limit");
        f.tenant.in_use = 10;
        assert_eq!(
            why_waiting(&f, now),
            WaitReason::SystemLimit(Usage {
                in_use: 10,
                limit: 10
            })
        );
        f.user.in_use = 2;
        assert_eq!(why_waiting(&f, now).name(), "user_limit");
        // A closed window comes before any limit.
        let evening = utc("2026-03-10T19:00:00Z");
        assert_eq!(
            why_waiting(&f, evening),
            WaitReason::OutsideWindow {
                opens_at: utc("2026-03-11T09:00:00Z")
            }
        );
        f.paused = Some(Some("paused by request".into()));
        assert_eq!(
            why_waiting(&f, now),
            WaitReason::CampaignPaused {
                pause_reason: Some("paused by request".into())
            }
        );
    }

    #[test]
    fn a_future_start_date_is_told_apart_from_a_closed_window() {
        let f = facts("22:00", "06:00", "America/New_York", "2026-01-10");
        // Before the start date's opening (22:00 local on the 10th = 03:00Z on the 11th).
        assert_eq!(
            why_waiting(&f, utc("2026-01-10T12:00:00Z")),
            WaitReason::StartDateInFuture {
                opens_at: utc("2026-01-11T03:00:00Z")
            }
        );
        // The early hours of the start date belong to the day before: still the start date.
        assert_eq!(
            why_waiting(&f, utc("2026-01-10T08:00:00Z")).name(),
            "start_date_in_future"
        );
        // After the first opening, a closed window is just closed.
        assert_eq!(
            why_waiting(&f, utc("2026-01-12T15:00:00Z")),
            WaitReason::OutsideWindow {
                opens_at: utc("2026-01-13T03:00:00Z")
            }
        );
        // Open at midnight local.
        assert_eq!(
            why_waiting(&f, utc("2026-01-12T05:00:00Z")).name(),
            "waiting_turn"
        );
    }

    #[test]
    fn a_window_across_a_dst_change_opens_at_the_right_instant() {
        // Europe/London springs forward on 2026-03-29: 09:00 is 08:00Z from that day.
        let f = facts("09:00", "18:00", "Europe/London", "2026-03-01");
        assert_eq!(
            why_waiting(&f, utc("2026-03-28T18:30:00Z")),
            WaitReason::OutsideWindow {
                opens_at: utc("2026-03-29T08:00:00Z")
            }
        );
    }
}
