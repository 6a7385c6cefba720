//! The rate limiter against a real Redis (`REDIS_URL`, default 127.0.0.1:6379). Each test uses its
//! own random namespace, so tests run in parallel and never flush anything.

use std::sync::Arc;
use std::time::Duration;

use herald_admission::{Admission, BackOff, BackedOff, Connection, Limit, RateLimiter};
use herald_core::now_ms;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn limiter() -> RateLimiter {
    let conn = Connection::connect(&redis_url())
        .await
        .expect("redis reachable");
    let namespace = format!("test-{}", uuid::Uuid::new_v4().simple());
    RateLimiter::new(conn, &namespace, "daily_sync").expect("valid names")
}

/// Offers requests at the given instants; returns the instants that were admitted.
async fn offer(limiter: &RateLimiter, keys: &[herald_admission::LimitKey], at: &[u64]) -> Vec<u64> {
    let mut admitted = Vec::new();
    for &t in at {
        if limiter.admit_at(keys, t).await.unwrap() == Admission::Admitted {
            admitted.push(t);
        }
    }
    admitted
}

fn max_in_any_window(times: &[u64], window_ms: u64) -> usize {
    times
        .iter()
        .map(|&start| {
            times
                .iter()
                .filter(|&&t| t >= start && t < start + window_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn admitted_requests_never_exceed_the_rate_in_any_window() {
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let start = 1_900_000_000_000u64;
    // A request every 7 ms for 10 s: far more than the limit.
    let offered: Vec<u64> = (0..1430).map(|i| start + i * 7).collect();
    let admitted = offer(&limiter, std::slice::from_ref(&base), &offered).await;
    assert!(max_in_any_window(&admitted, 1000) <= 5);
    // Evenly spaced: no two closer than the interval.
    assert!(admitted.windows(2).all(|w| w[1] - w[0] >= 200));
    // And the budget is used, not wasted: about 5 per second over 10 s.
    assert!(admitted.len() >= 49, "{}", admitted.len());
}

#[tokio::test]
async fn a_refusal_names_when_to_come_back() {
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let t = 1_900_000_000_000u64;
    assert_eq!(
        limiter
            .admit_at(std::slice::from_ref(&base), t)
            .await
            .unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter
            .admit_at(std::slice::from_ref(&base), t + 50)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 200)
    );
    assert_eq!(
        limiter
            .admit_at(std::slice::from_ref(&base), t + 200)
            .await
            .unwrap(),
        Admission::Admitted
    );
}

#[tokio::test]
async fn bursts_are_allowed_up_to_the_burst_then_spaced() {
    let limiter = limiter().await;
    let key = limiter
        .key(
            "token:pat1",
            Limit::per_second(10.0).unwrap().with_burst(3).unwrap(),
        )
        .unwrap();
    let t = 1_900_000_000_000u64;
    let admitted = offer(&limiter, std::slice::from_ref(&key), &[t, t, t, t, t + 100]).await;
    assert_eq!(admitted, vec![t, t, t, t + 100]);
}

#[tokio::test]
async fn both_keys_must_admit_and_a_refusal_takes_no_slot() {
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let token = limiter
        .key("token:pat1", Limit::per_second(2.0).unwrap())
        .unwrap();
    let other_base = limiter
        .key("base:app2", Limit::per_second(5.0).unwrap())
        .unwrap();
    let t = 1_900_000_000_000u64;
    let both = [base.clone(), token.clone()];
    assert_eq!(
        limiter.admit_at(&both, t).await.unwrap(),
        Admission::Admitted
    );
    // The token (500 ms spacing) refuses at +250 ms although the base (200 ms) would admit …
    assert_eq!(
        limiter
            .admit_at(&[other_base.clone(), token.clone()], t + 250)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 500)
    );
    // … and that refusal did not use the other base's slot.
    assert_eq!(
        limiter
            .admit_at(std::slice::from_ref(&other_base), t + 250)
            .await
            .unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter
            .admit_at(std::slice::from_ref(&other_base), t + 300)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 450)
    );
}

#[tokio::test]
async fn a_hold_blocks_the_key_until_its_time_and_never_shortens() {
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let token = limiter
        .key("token:pat1", Limit::per_second(50.0).unwrap())
        .unwrap();
    let t = 1_900_000_000_000u64;
    limiter.hold_at(&base, t + 30_000, t).await.unwrap();
    // A shorter hold later does not shorten it.
    limiter.hold_at(&base, t + 1_000, t + 10).await.unwrap();
    let both = [base.clone(), token.clone()];
    for probe in [t + 1, t + 5_000, t + 29_999] {
        assert_eq!(
            limiter.admit_at(&both, probe).await.unwrap(),
            Admission::WaitUntil(t + 30_000),
            "at +{} ms",
            probe - t
        );
    }
    assert_eq!(
        limiter.admit_at(&both, t + 30_000).await.unwrap(),
        Admission::Admitted
    );
    // Then the ordinary spacing again.
    assert_eq!(
        limiter.admit_at(&both, t + 30_100).await.unwrap(),
        Admission::WaitUntil(t + 30_200)
    );
}

const MS: Duration = Duration::from_millis(1);

/// The back-off tests' instant zero.
const T: u64 = 1_900_000_000_000;

/// A limiter, a number limited at 1,000/s on it, and a back-off of 25 ms up to 400 ms with a
/// quiet second.
async fn backing_off() -> (RateLimiter, herald_admission::LimitKey, BackOff) {
    let limiter = limiter().await;
    let number = limiter
        .key("number:1", Limit::per_second(1000.0).unwrap())
        .unwrap();
    let back_off = BackOff::new(25 * MS, 400 * MS, Duration::from_secs(1));
    (limiter, number, back_off)
}

/// The number admits nothing before `until_ms`, and admits at it.
async fn held_until(limiter: &RateLimiter, number: &herald_admission::LimitKey, until_ms: u64) {
    let one = std::slice::from_ref(number);
    assert_eq!(
        limiter.admit_at(one, until_ms - 1).await.unwrap(),
        Admission::WaitUntil(until_ms)
    );
    assert_eq!(
        limiter.admit_at(one, until_ms).await.unwrap(),
        Admission::Admitted
    );
}

#[tokio::test]
async fn a_back_off_holds_the_key_for_its_base_wait_then_admits() {
    let (limiter, number, back_off) = backing_off().await;
    let one = std::slice::from_ref(&number);
    assert_eq!(limiter.admit_at(one, T).await.unwrap(), Admission::Admitted);
    let held = limiter
        .back_off_at(&number, &back_off, 3 * MS, T + 3)
        .await
        .unwrap();
    assert_eq!(
        held,
        BackedOff {
            until_ms: T + 28,
            held_for: Some(25 * MS)
        }
    );
    held_until(&limiter, &number, T + 28).await;
}

#[tokio::test]
async fn refusals_of_requests_admitted_before_the_hold_change_nothing() {
    let (limiter, number, back_off) = backing_off().await;
    // Five requests in flight, admitted at T .. T+4, all refused at T+10 .. T+14.
    let first = limiter
        .back_off_at(&number, &back_off, 10 * MS, T + 10)
        .await
        .unwrap();
    assert_eq!(first.held_for, Some(25 * MS));
    for i in 1..5u64 {
        let later = limiter
            .back_off_at(&number, &back_off, 10 * MS, T + 10 + i)
            .await
            .unwrap();
        assert_eq!(
            later,
            BackedOff {
                until_ms: T + 35,
                held_for: None
            },
            "refusal {i}"
        );
    }
    held_until(&limiter, &number, T + 35).await;
    // One admitted before the hold and refused after it ended: nothing to hold, come back now.
    assert_eq!(
        limiter
            .back_off_at(&number, &back_off, 40 * MS, T + 45)
            .await
            .unwrap(),
        BackedOff {
            until_ms: T + 45,
            held_for: None
        }
    );
}

#[tokio::test]
async fn a_back_off_doubles_while_refusals_keep_coming_up_to_the_longest() {
    let (limiter, number, back_off) = backing_off().await;
    let mut now = T;
    let mut lengths = Vec::new();
    for _ in 0..7 {
        // Admitted as the last hold ended, refused 2 ms later.
        let held = limiter
            .back_off_at(&number, &back_off, 2 * MS, now + 2)
            .await
            .unwrap();
        let length = held.held_for.expect("a fresh refusal holds");
        assert_eq!(held.until_ms, now + 2 + length.as_millis() as u64);
        lengths.push(length.as_millis() as u64);
        held_until(&limiter, &number, held.until_ms).await;
        now = held.until_ms;
    }
    assert_eq!(lengths, [25, 50, 100, 200, 400, 400, 400]);
}

#[tokio::test]
async fn a_quiet_spell_brings_the_back_off_down_to_its_base() {
    let (limiter, number, back_off) = backing_off().await;
    let first = limiter
        .back_off_at(&number, &back_off, MS, T)
        .await
        .unwrap();
    let second = limiter
        .back_off_at(&number, &back_off, MS, first.until_ms + 999)
        .await
        .unwrap();
    assert_eq!(second.held_for, Some(50 * MS), "within the quiet spell");
    let third = limiter
        .back_off_at(&number, &back_off, MS, second.until_ms + 1_000)
        .await
        .unwrap();
    assert_eq!(
        third.held_for,
        Some(25 * MS),
        "a quiet second after the hold"
    );
}

#[tokio::test]
async fn a_back_off_never_shortens_a_longer_hold() {
    let (limiter, number, back_off) = backing_off().await;
    // Meta said Retry-After: 1.
    limiter.hold_at(&number, T + 1_000, T).await.unwrap();
    let held = limiter
        .back_off_at(&number, &back_off, MS, T + 5)
        .await
        .unwrap();
    assert_eq!(
        held,
        BackedOff {
            until_ms: T + 1_000,
            held_for: Some(25 * MS)
        }
    );
    held_until(&limiter, &number, T + 1_000).await;
}

#[test]
fn a_back_off_waits_a_millisecond_at_least_and_never_less_than_its_base() {
    let s = Duration::from_secs(1);
    let zero = BackOff::new(Duration::ZERO, s, s);
    assert_eq!((zero.base(), zero.longest()), (MS, s));
    let inverted = BackOff::new(2 * s, s, s);
    assert_eq!((inverted.base(), inverted.longest()), (2 * s, 2 * s));
    let ok = BackOff::new(25 * MS, s, s);
    assert_eq!((ok.base(), ok.longest(), ok.quiet()), (25 * MS, s, s));
}

#[tokio::test]
async fn concurrent_callers_on_redis_time_share_one_budget() {
    let limiter = Arc::new(limiter().await);
    let base = limiter
        .key("base:app1", Limit::per_second(20.0).unwrap())
        .unwrap();
    let deadline = now_ms() + 1_000;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let limiter = Arc::clone(&limiter);
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u32;
            while now_ms() < deadline {
                match limiter.admit(std::slice::from_ref(&base)).await.unwrap() {
                    Admission::Admitted => admitted += 1,
                    Admission::WaitUntil(at) => {
                        // A deferred job comes back at the named instant, not before.
                        let wait = at.saturating_sub(now_ms()).max(1);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                }
            }
            admitted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    // 20/s evenly spaced over a 1 s run: at most 20 (plus the first at t=0), at least some.
    assert!(total <= 21, "{total} admitted");
    assert!(total >= 1);
}

const GRACE: Duration = Duration::from_millis(10);

/// Jobs that all want the base at `t`, each deferred to its reserved slot and coming back
/// `late_by(i)` ms after it. Returns the instants each was admitted at, in order.
async fn reserving_jobs(
    limiter: &RateLimiter,
    key: &herald_admission::LimitKey,
    t: u64,
    jobs: usize,
    late_by: impl Fn(usize) -> u64,
) -> Vec<u64> {
    let keys = std::slice::from_ref(key);
    let mut slots = Vec::new();
    for i in 0..jobs {
        let id = format!("job{i}");
        match limiter
            .admit_reserving_at(keys, &id, GRACE, t)
            .await
            .unwrap()
        {
            Admission::Admitted => slots.push((t, None)),
            Admission::WaitUntil(slot) => slots.push((slot, Some(id))),
        }
    }
    let mut admitted = Vec::new();
    for (i, (slot, id)) in slots.into_iter().enumerate() {
        let Some(id) = id else {
            admitted.push(slot);
            continue;
        };
        let back = slot + late_by(i);
        // Coming back early is answered with the same slot, not a later one.
        assert_eq!(
            limiter
                .admit_reserving_at(keys, &id, GRACE, slot - 1)
                .await
                .unwrap(),
            Admission::WaitUntil(slot)
        );
        assert_eq!(
            limiter
                .admit_reserving_at(keys, &id, GRACE, back)
                .await
                .unwrap(),
            Admission::Admitted,
            "job {i} back {} ms after its slot",
            back - slot
        );
        admitted.push(back);
    }
    admitted
}

#[tokio::test]
async fn reservations_keep_slots_evenly_spaced_when_callers_come_back_late() {
    let limiter = limiter().await;
    // 5 req/s paced 2 % under it: a slot every 204 ms.
    let base = limiter
        .key("base:app1", Limit::per_second(5.0 / 1.02).unwrap())
        .unwrap();
    let t = 1_900_000_000_000u64;
    // Every job comes back late, by 0 to 10 ms (the grace).
    let admitted = reserving_jobs(&limiter, &base, t, 30, |i| (i as u64 * 7) % 11).await;
    // The slots did not drift: job i's slot is t + i × 204 ms, whatever the lateness before it.
    for (i, &at) in admitted.iter().enumerate() {
        let slot = t + i as u64 * 204;
        assert!(at >= slot && at <= slot + 10, "job {i} at +{} ms", at - t);
    }
    // And the next caller gets the slot right after the last one.
    assert_eq!(
        limiter
            .admit_reserving_at(std::slice::from_ref(&base), "late-comer", GRACE, t + 100)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 30 * 204)
    );
    // Lateness within the grace never puts more than 5 requests in one second.
    assert_eq!(max_in_any_window(&admitted, 1000), 5);
}

#[tokio::test]
async fn without_reservations_lateness_pushes_every_later_slot_back() {
    // The drift reservations remove: plain admission, each job 8 ms late.
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let keys = std::slice::from_ref(&base);
    let t = 1_900_000_000_000u64;
    let mut now = t;
    for _ in 0..10 {
        loop {
            match limiter.admit_at(keys, now).await.unwrap() {
                Admission::Admitted => break,
                Admission::WaitUntil(at) => now = at + 8,
            }
        }
    }
    assert_eq!(now, t + 9 * 208);
}

/// Plain admission with a lateness allowance: callers that come back `late_by(round)` ms after
/// the instant they were told keep the pace as long as they are at most the allowance late.
async fn late_callers(
    limiter: &RateLimiter,
    key: &herald_admission::LimitKey,
    rounds: usize,
    late_by: impl Fn(usize) -> u64,
) -> Vec<u64> {
    let keys = std::slice::from_ref(key);
    let t = 1_900_000_000_000u64;
    let mut now = t;
    let mut admitted = Vec::new();
    for round in 0..rounds {
        loop {
            match limiter.admit_at(keys, now).await.unwrap() {
                Admission::Admitted => break,
                Admission::WaitUntil(at) => now = at + late_by(round),
            }
        }
        admitted.push(now);
    }
    admitted
}

#[tokio::test]
async fn a_lateness_allowance_keeps_the_pace_of_late_callers() {
    let limiter = limiter().await;
    // 5 req/s paced 2 % under it (a slot every 204 ms), 10 ms of lateness forgiven.
    let limit = Limit::per_second(5.0 / 1.02)
        .unwrap()
        .with_lateness(Duration::from_millis(10))
        .unwrap();
    let base = limiter.key("base:app1", limit).unwrap();
    // Every caller 8 ms late: without the allowance each slot moves 8 ms (the test above).
    let admitted = late_callers(&limiter, &base, 30, |_| 8).await;
    let t = admitted[0];
    for (i, &at) in admitted.iter().enumerate() {
        let slot = t + i as u64 * 204;
        assert!(
            at + 10 >= slot && at <= slot + 10,
            "request {i} at +{} ms",
            at - t
        );
    }
    assert_eq!(max_in_any_window(&admitted, 1000), 5);
}

#[tokio::test]
async fn lateness_beyond_the_allowance_moves_the_pace_by_the_excess_only() {
    let limiter = limiter().await;
    let limit = Limit::per_second(5.0)
        .unwrap()
        .with_lateness(Duration::from_millis(10))
        .unwrap();
    let base = limiter.key("base:app1", limit).unwrap();
    // 25 ms late each time: 15 ms more than forgiven, so each slot moves 15 ms.
    let admitted = late_callers(&limiter, &base, 10, |_| 25).await;
    let t = admitted[0];
    // The first refusal names t + 190 (the slot at t + 200 minus the 10 ms allowance).
    assert_eq!(admitted[1], t + 190 + 25);
    for w in admitted.windows(2).skip(1) {
        assert_eq!(w[1] - w[0], 215, "{admitted:?}");
    }
}

#[tokio::test]
async fn with_a_lateness_allowance_any_six_requests_span_five_intervals_less_the_allowance() {
    // Callers late by anything from 0 to 40 ms, in an irregular pattern: whatever the pattern,
    // six consecutive admissions span at least 5 × 204 − 10 ms, so a provider counting a sliding
    // one-second window never sees six.
    let limiter = limiter().await;
    let limit = Limit::per_second(5.0 / 1.02)
        .unwrap()
        .with_lateness(Duration::from_millis(10))
        .unwrap();
    let base = limiter.key("base:app1", limit).unwrap();
    let admitted = late_callers(&limiter, &base, 200, |round| (round as u64 * 37 + 11) % 41).await;
    for w in admitted.windows(6) {
        assert!(w[5] - w[0] >= 5 * 204 - 10, "{w:?}");
    }
    assert_eq!(max_in_any_window(&admitted, 1000), 5);
}

#[tokio::test]
async fn a_hold_is_strict_under_a_lateness_allowance() {
    let limiter = limiter().await;
    let limit = Limit::per_second(5.0)
        .unwrap()
        .with_lateness(Duration::from_millis(10))
        .unwrap();
    let base = limiter.key("base:app1", limit).unwrap();
    let keys = std::slice::from_ref(&base);
    let t = 1_900_000_000_000u64;
    limiter.hold_at(&base, t + 30_000, t).await.unwrap();
    assert_eq!(
        limiter.admit_at(keys, t + 29_995).await.unwrap(),
        Admission::WaitUntil(t + 30_000)
    );
    assert_eq!(
        limiter.admit_at(keys, t + 30_000).await.unwrap(),
        Admission::Admitted
    );
}

#[tokio::test]
async fn a_hold_beats_a_reservation() {
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let keys = std::slice::from_ref(&base);
    let t = 1_900_000_000_000u64;
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "a", GRACE, t)
            .await
            .unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "b", GRACE, t)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 200)
    );
    assert_eq!(limiter.reserved_slot("b").await.unwrap(), Some(t + 200));
    // A 429 before b's slot: the base is held back for 30 s.
    limiter.hold_at(&base, t + 30_000, t + 100).await.unwrap();
    // b comes back at its slot, inside the hold: its reservation is forfeited and it waits for
    // the end of the hold like everyone else.
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "b", GRACE, t + 200)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 30_000)
    );
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "c", GRACE, t + 300)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 30_200)
    );
    // Reservations after the hold are honoured.
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "b", GRACE, t + 30_002)
            .await
            .unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "c", GRACE, t + 30_200)
            .await
            .unwrap(),
        Admission::Admitted
    );
    // A plain admission still sees the hold and the reservations.
    assert_eq!(
        limiter.admit_at(keys, t + 30_250).await.unwrap(),
        Admission::WaitUntil(t + 30_400)
    );
}

#[tokio::test]
async fn a_stale_reservation_expires() {
    let limiter = limiter().await;
    let base = limiter
        .key("base:app1", Limit::per_second(5.0).unwrap())
        .unwrap();
    let keys = std::slice::from_ref(&base);
    let t = 1_900_000_000_000u64;
    limiter
        .admit_reserving_at(keys, "a", GRACE, t)
        .await
        .unwrap();
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "b", GRACE, t)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 200)
    );
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "c", GRACE, t)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 400)
    );
    // b comes back 11 ms late, past its grace: sending now could crowd c's slot, so b's slot is
    // given up and b goes to the back.
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "b", GRACE, t + 211)
            .await
            .unwrap(),
        Admission::WaitUntil(t + 600)
    );
    assert_eq!(limiter.reserved_slot("b").await.unwrap(), Some(t + 600));
    // c's slot is untouched.
    assert_eq!(
        limiter
            .admit_reserving_at(keys, "c", GRACE, t + 400)
            .await
            .unwrap(),
        Admission::Admitted
    );
    assert_eq!(limiter.reserved_slot("c").await.unwrap(), None, "used once");

    // On Redis's clock, a reservation nobody comes back for is deleted about a second after
    // its grace.
    let fast = limiter
        .key(
            "base:app2",
            Limit::every(Duration::from_millis(50)).unwrap(),
        )
        .unwrap();
    let fast = std::slice::from_ref(&fast);
    assert_eq!(
        limiter.admit_reserving(fast, "d", GRACE).await.unwrap(),
        Admission::Admitted
    );
    let Admission::WaitUntil(slot) = limiter.admit_reserving(fast, "e", GRACE).await.unwrap()
    else {
        panic!("the second request within 50 ms is deferred");
    };
    assert_eq!(limiter.reserved_slot("e").await.unwrap(), Some(slot));
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(limiter.reserved_slot("e").await.unwrap(), None);
}

#[tokio::test]
async fn concurrent_reserving_callers_on_redis_time_keep_the_spacing() {
    let limiter = Arc::new(limiter().await);
    let base = limiter
        .key(
            "base:app1",
            Limit::every(Duration::from_millis(50)).unwrap(),
        )
        .unwrap();
    let start = now_ms();
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let limiter = Arc::clone(&limiter);
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = Vec::new();
            for job in 0..5 {
                let id = format!("w{worker}-j{job}");
                loop {
                    match limiter
                        .admit_reserving(std::slice::from_ref(&base), &id, GRACE)
                        .await
                        .unwrap()
                    {
                        Admission::Admitted => {
                            admitted.push(now_ms());
                            break;
                        }
                        Admission::WaitUntil(at) => {
                            let wait = at.saturating_sub(now_ms());
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                        }
                    }
                }
            }
            admitted
        }));
    }
    let mut admitted = Vec::new();
    for task in tasks {
        admitted.extend(task.await.unwrap());
    }
    admitted.sort_unstable();
    assert_eq!(admitted.len(), 20);
    // Every job was admitted, and 20 requests 50 ms apart end near 19 × 50 ms: forfeits
    // (a caller waking more than 10 ms late) are rare, so the end does not drift by much.
    let span = admitted[19] - start;
    assert!(span < 19 * 50 + 400, "span {span} ms");
    // Never two closer than the interval less the grace (and a little for taking the time).
    assert!(
        admitted.windows(2).all(|w| w[1] - w[0] + 20 >= 50),
        "{admitted:?}"
    );
}

/// Callers that all want the number at `t`, each deferred to its reserved instant and coming
/// back for its `visit`-th time (1 for the first return) `late_by(job, visit)` ms after the
/// instant it was given; events are played in time order on explicit instants. Returns the
/// instants each was admitted at, sorted, and how many times the callers asked in all.
async fn late_reservations(
    limiter: &RateLimiter,
    key: &herald_admission::LimitKey,
    cap: Option<&herald_admission::LimitKey>,
    t: u64,
    jobs: usize,
    late_by: impl Fn(usize, u32) -> u64,
) -> (Vec<u64>, usize) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let keys = std::slice::from_ref(key);
    let grace = Duration::from_millis(250);
    let mut due: BinaryHeap<Reverse<(u64, usize, u32)>> =
        (0..jobs).map(|job| Reverse((t, job, 0))).collect();
    let mut admitted = Vec::new();
    let mut asked = 0;
    while let Some(Reverse((at, job, visit))) = due.pop() {
        asked += 1;
        assert!(visit < 50, "job {job} keeps being deferred");
        let id = format!("job{job}");
        let answer = match cap {
            Some(cap) => limiter
                .admit_reserving_capped_at(keys, cap, &id, grace, at)
                .await
                .unwrap(),
            None => limiter
                .admit_reserving_at(keys, &id, grace, at)
                .await
                .unwrap(),
        };
        match answer {
            Admission::Admitted => admitted.push(at),
            Admission::WaitUntil(until) => {
                due.push(Reverse((until + late_by(job, visit + 1), job, visit + 1)));
            }
        }
    }
    admitted.sort_unstable();
    (admitted, asked)
}

/// A quarter-second stall (jobs 20 to 31 come back 240 ms late, as a descheduled worker's
/// would) on top of irregular lateness of up to 60 ms for everyone else, within the grace.
fn stalled_worker(job: usize, visit: u32) -> u64 {
    if visit == 0 {
        0
    } else if (20..32).contains(&job) && visit == 1 {
        240
    } else {
        (job as u64 * 37 + u64::from(visit) * 11) % 61
    }
}

#[tokio::test]
async fn under_a_cap_late_reservations_never_bunch_the_admissions() {
    let limiter = limiter().await;
    // A number configured at 50 msg/s: slots paced 2 % under it (one every 20.4 ms), the cap
    // at most 50 admissions in any second (one every 20.2 ms, 10 ms of tolerance).
    let number = limiter
        .key("whatsapp:number", Limit::per_second(50.0 / 1.02).unwrap())
        .unwrap();
    let cap = limiter
        .key(
            "whatsapp:number:admitted",
            Limit::at_most(50, Duration::from_secs(1), Duration::from_micros(20_200)).unwrap(),
        )
        .unwrap();
    let t = 1_900_000_000_000u64;
    let (admitted, _) =
        late_reservations(&limiter, &number, Some(&cap), t, 200, stalled_worker).await;
    assert_eq!(admitted.len(), 200, "every job admitted once");
    assert!(max_in_any_window(&admitted, 1000) <= 50);
    // 200 slots 20.4 ms apart end near 199 × 20.4 ms; the stall moves the end by about its
    // length, as the cap spreads the stalled steps over the slots that follow.
    let end = admitted[199] - t;
    assert!(end <= 199 * 204 / 10 + 500, "ends at +{end} ms");

    // The same callers without the cap: the late ones are honoured on top of the slots taken
    // on time meanwhile, and one second holds more than 50.
    let limiter = self::limiter().await;
    let number = limiter
        .key("whatsapp:number", Limit::per_second(50.0 / 1.02).unwrap())
        .unwrap();
    let (uncapped, _) = late_reservations(&limiter, &number, None, t, 200, stalled_worker).await;
    assert_eq!(uncapped.len(), 200);
    assert!(
        max_in_any_window(&uncapped, 1000) > 50,
        "{} in the busiest second",
        max_in_any_window(&uncapped, 1000)
    );
}

/// A fifth of a second's stall of 150 steps (two workers' worth, back 200 ms late), on top of
/// up to 8 ms of lateness for everyone else.
fn stalled_fast_steps(job: usize, visit: u32) -> u64 {
    if visit == 1 && (1_000..1_150).contains(&job) {
        200
    } else {
        (job as u64 * 7 + u64::from(visit)) % 9
    }
}

/// A number at 1,000 msg/s as the send step paces it: slots 2 % under, `burst` at once.
fn fast_number(limiter: &RateLimiter, name: &str, burst: u32) -> herald_admission::LimitKey {
    let pace = Limit::per_second(1_000.0 / 1.02)
        .unwrap()
        .with_burst(burst)
        .unwrap();
    limiter.key(name, pace).unwrap()
}

/// The cap on a number at 1,000 msg/s: at most 1,000 in any second, 10 ms of burst.
fn fast_cap(limiter: &RateLimiter, name: &str) -> herald_admission::LimitKey {
    let cap = Limit::at_most(1_000, Duration::from_secs(1), Duration::from_micros(1_010)).unwrap();
    limiter.key(name, cap).unwrap()
}

#[tokio::test]
async fn a_cap_bounds_a_fast_number_with_bursts() {
    // 1,000 msg/s: slots 2 % under it with 10 ms of burst, the cap at most 1,000 in a second.
    let number = |limiter: &RateLimiter| fast_number(limiter, "whatsapp:fast", 10);
    let limiter = limiter().await;
    let cap = fast_cap(&limiter, "whatsapp:fast:admitted");
    let t = 1_900_000_000_000u64;
    let (admitted, _) = late_reservations(
        &limiter,
        &number(&limiter),
        Some(&cap),
        t,
        2_500,
        stalled_fast_steps,
    )
    .await;
    assert_eq!(admitted.len(), 2_500);
    assert!(max_in_any_window(&admitted, 1000) <= 1_000);
    // 2,500 slots 1.02 ms apart end near 2.55 s. The stall costs time: the cap spreads the
    // stalled steps over the slots that follow, and runs only 1 % faster than they come, so the
    // end moves by about the stall (never more than half a second here). That is the price of
    // never putting the stall's 150 on top of a full second.
    let end = admitted[2_499] - t;
    assert!(end <= 2_499 * 102 / 100 + 500, "ends at +{end} ms");

    let limiter = self::limiter().await;
    let (uncapped, _) = late_reservations(
        &limiter,
        &number(&limiter),
        None,
        t,
        2_500,
        stalled_fast_steps,
    )
    .await;
    assert_eq!(uncapped.len(), 2_500);
    assert!(
        max_in_any_window(&uncapped, 1000) > 1_000,
        "{} in the busiest second",
        max_in_any_window(&uncapped, 1000)
    );
}

/// A little jitter on every return (0 to 2 ms), as a worker fleet's wake-ups have.
fn jittery(job: usize, visit: u32) -> u64 {
    if visit == 0 {
        0
    } else {
        (job as u64 * 7 + u64::from(visit)) % 3
    }
}

#[tokio::test]
async fn a_crowd_the_cap_refuses_comes_back_in_line() {
    let limiter = limiter().await;
    // 1,000 msg/s as the send step sets it up: slots 2 % under with 250 ms of tolerance (so a
    // crowd passes the slots), the cap at most 1,000 in a second with 10 ms of burst.
    let number = fast_number(&limiter, "whatsapp:crowd", 246);
    let cap = fast_cap(&limiter, "whatsapp:crowd:admitted");
    let t = 1_900_000_000_000u64;
    // 110 steps arrive at once (a worker catching up after a stall): the cap admits its burst
    // and refuses the rest.
    let (admitted, asked) = late_reservations(&limiter, &number, Some(&cap), t, 110, jittery).await;
    assert_eq!(admitted.len(), 110);
    assert!(max_in_any_window(&admitted, 1000) <= 1_000);
    // The refused are sent back in line, one cap interval apart, and nearly all are admitted
    // when they come back. Sent back all to the cap's next instant, they would come back
    // together and all but one be refused again, round after round.
    assert!(asked <= 110 + 100 + 20, "{asked} asks for 110 steps");
}

#[tokio::test]
async fn a_cap_is_never_one_of_the_limits() {
    let limiter = limiter().await;
    let key = limiter
        .key("whatsapp:number", Limit::per_second(50.0).unwrap())
        .unwrap();
    let err = limiter
        .admit_reserving_capped(
            std::slice::from_ref(&key),
            &key,
            "job",
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("both a limit and the cap"),
        "{err}"
    );
}
