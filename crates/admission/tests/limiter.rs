//! The rate limiter against a real Redis (`REDIS_URL`, default 127.0.0.1:6379). Each test uses its
//! own random namespace, so tests run in parallel and never flush anything.

use std::sync::Arc;
use std::time::Duration;

use herald_admission::{Admission, Connection, Limit, RateLimiter};
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
