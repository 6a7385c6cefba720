//! Admission control shared by the whole worker fleet: request-rate limits and lock-outs kept in
//! Redis, so every worker process draws from the same budget.
//!
//! A job asks [`RateLimiter::admit`] before it calls a rate-limited provider. The answer is
//! [`Admission::Admitted`] (the request's slot is taken) or [`Admission::WaitUntil`]: the job is
//! then deferred to that instant by the engine. Nothing here sleeps, and nothing here knows a
//! queue's internals or a job type.
//!
//! Each limit is a GCRA (generic cell rate algorithm) state: one Redis key holding the limit's
//! theoretical arrival time in microseconds. Several limits are checked in one script, so a
//! request is admitted against all of them or none: a request the token's limit refuses does
//! not use the base's slot. Keys live under one hash tag (the queue whose jobs are admitted), so
//! the script touches one cluster slot.
//!
//! A caller that comes back when told (a deferred job) should use
//! [`RateLimiter::admit_reserving`]: a refusal then reserves the request's slot under a name the
//! caller gives again when it comes back, so the slot is its own and its lateness never pushes
//! the slots after it back (docs/decisions/0007-limiter-reservations.md). Under a cap
//! ([`RateLimiter::admit_reserving_capped`]) the admission instants themselves are bounded too,
//! however late reservations are taken (docs/decisions/0012-whatsapp-send-throughput.md).

mod connection;
pub mod fleet;
pub mod slots;
pub mod waiting;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

pub use connection::Connection;
pub use fleet::{FleetDecision, FleetState};
pub use redis::RedisError;
pub use slots::{SlotAdmission, SlotRequest, Slots, round_robin};
pub use window::{Window, WindowError};

/// The version segment of admission keys, the same layout version as the queues'.
pub const LAYOUT_VERSION: &str = "v1";

/// Why admission could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis refused or could not be reached; the caller should retry the job later.
    #[error("Redis error during admission: {0}")]
    Redis(#[from] RedisError),
    /// A limit that cannot be enforced (zero or negative rate, zero burst).
    #[error("invalid rate limit: {0}")]
    InvalidLimit(String),
    /// A key name that would break the key layout.
    #[error("invalid limit key name {0:?}: use 1 to 200 characters without braces or spaces")]
    InvalidKeyName(String),
    /// An admit call with no limit, or more than [`MAX_KEYS_PER_ADMIT`].
    #[error("an admission names 1 to {MAX_KEYS_PER_ADMIT} limits, got {0}")]
    KeyCount(usize),
    /// Redis answered something the scripts never return.
    #[error("unexpected answer from the admission script: {0}")]
    Protocol(String),
}

/// The most limits one admission may check at once.
pub const MAX_KEYS_PER_ADMIT: usize = 8;

/// A rate: one request per `interval` on average, with up to `burst` requests at once.
///
/// `burst = 1` spaces requests evenly, which is what a provider counting a sliding window
/// needs: `Limit::per_second(5.0)` admits one request every 200 ms, never six in one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    interval_us: u64,
    burst: u32,
    /// Lateness forgiven, on top of the burst's tolerance ([`Limit::with_lateness`]).
    lateness_us: u64,
}

impl Limit {
    /// `rate` requests per second, evenly spaced (burst 1).
    pub fn per_second(rate: f64) -> Result<Self, Error> {
        if !rate.is_finite() || rate <= 0.0 {
            return Err(Error::InvalidLimit(format!(
                "rate must be a positive number of requests per second, got {rate}"
            )));
        }
        let interval_us = (1_000_000.0 / rate).round();
        if interval_us < 1.0 {
            return Err(Error::InvalidLimit(format!(
                "rate {rate}/s is above one request per microsecond"
            )));
        }
        Ok(Self {
            interval_us: interval_us as u64,
            burst: 1,
            lateness_us: 0,
        })
    }

    /// One request every `interval`, evenly spaced.
    pub fn every(interval: Duration) -> Result<Self, Error> {
        let interval_us = micros(interval);
        if interval_us == 0 {
            return Err(Error::InvalidLimit("interval must not be zero".into()));
        }
        Ok(Self {
            interval_us,
            burst: 1,
            lateness_us: 0,
        })
    }

    /// A limit that admits at most `n` requests in any window of length `window` (half-open, as
    /// providers count a second), at one request per `interval` on average, `interval` being at
    /// least `window / n`: the slack `n × interval − window` becomes the tolerance (a burst of
    /// whole intervals, the rest forgiven lateness). GCRA admits `k` requests no closer than
    /// `(k − 1) × interval − tolerance`, so `n + 1` would span at least `window`: never in one
    /// window. The longer `interval`, the more a burst is tolerated and the slower the pace.
    pub fn at_most(n: u32, window: Duration, interval: Duration) -> Result<Self, Error> {
        let window_us = micros(window);
        let interval_us = micros(interval);
        let span_us = u64::from(n).saturating_mul(interval_us);
        if n == 0 || interval_us == 0 || span_us < window_us {
            return Err(Error::InvalidLimit(format!(
                "{n} requests every {interval:?} cannot fit {n} in {window:?}"
            )));
        }
        let tolerance_us = span_us - window_us;
        let burst = u32::try_from(tolerance_us / interval_us)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        Ok(Self {
            interval_us,
            burst,
            lateness_us: tolerance_us % interval_us,
        })
    }

    /// Allows up to `burst` requests back to back after an idle spell.
    pub fn with_burst(self, burst: u32) -> Result<Self, Error> {
        if burst == 0 {
            return Err(Error::InvalidLimit("burst must be at least 1".into()));
        }
        Ok(Self { burst, ..self })
    }

    /// Forgives a request up to `lateness` after its slot: the slots after it stay where they
    /// were instead of moving back by its lateness, so a stream of deferred requests that each
    /// come back a few milliseconds late keeps its pace. The price is that a request may be
    /// admitted up to `lateness` before its slot, so `n` consecutive requests span at least
    /// `(n − 1) × interval − lateness` (with burst 1). Keep it under the pacing margin's slack:
    /// with a 5 req/s limit paced 2 % under it, six requests span at least 1.02 s − `lateness`.
    pub fn with_lateness(self, lateness: Duration) -> Result<Self, Error> {
        let lateness_us = micros(lateness);
        if lateness_us >= self.interval_us {
            return Err(Error::InvalidLimit(format!(
                "lateness {lateness:?} must be shorter than the interval {:?}",
                self.interval()
            )));
        }
        Ok(Self {
            lateness_us,
            ..self
        })
    }

    /// The lateness forgiven ([`Limit::with_lateness`]).
    pub fn lateness(&self) -> Duration {
        Duration::from_micros(self.lateness_us)
    }

    /// The average spacing between admitted requests.
    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us)
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn tolerance_us(&self) -> u64 {
        self.interval_us
            .saturating_mul(u64::from(self.burst.saturating_sub(1)))
            .saturating_add(self.lateness_us)
    }
}

/// One limited thing (an Airtable base, a token) with its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitKey {
    redis_key: String,
    hold_key: String,
    /// The last hold [`RateLimiter::back_off`] set (`rlback:`).
    back_off_key: String,
    /// Used only when the key is a cap: the instant the last request the cap refused was told
    /// to come back at, so that refused requests queue in order.
    queue_key: String,
    limit: Limit,
}

impl LimitKey {
    /// The Redis key holding this limit's state.
    pub fn redis_key(&self) -> &str {
        &self.redis_key
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }
}

/// The answer to an admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead: the request's slot in every limit is taken.
    Admitted,
    /// Not yet: every limit admits again at this instant (Unix milliseconds). After
    /// [`RateLimiter::admit`] nothing was taken; after [`RateLimiter::admit_reserving`] the
    /// slot at that instant is reserved for the caller.
    WaitUntil(u64),
}

/// How [`RateLimiter::back_off`] holds a limit back after the provider refused a request for
/// going too fast: `base` at first, twice the last hold's length for each refusal that comes
/// less than `quiet` after the last hold ended, never more than `longest`
/// (docs/decisions/0015-throttle-back-off.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackOff {
    base: Duration,
    longest: Duration,
    quiet: Duration,
}

impl BackOff {
    /// The base wait is at least a millisecond, and the longest no shorter than the base.
    pub const fn new(base: Duration, longest: Duration, quiet: Duration) -> Self {
        let base = if base.as_micros() < 1_000 {
            Duration::from_millis(1)
        } else {
            base
        };
        let longest = if longest.as_micros() < base.as_micros() {
            base
        } else {
            longest
        };
        Self {
            base,
            longest,
            quiet,
        }
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn longest(&self) -> Duration {
        self.longest
    }

    pub fn quiet(&self) -> Duration {
        self.quiet
    }
}

/// What [`RateLimiter::back_off`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackedOff {
    /// The instant (Unix milliseconds) the hold in force ends, or now if there is none: come
    /// back then.
    pub until_ms: u64,
    /// The length of the hold this refusal set; `None` when the request had been admitted
    /// before the last hold began, which already answers its refusal.
    pub held_for: Option<Duration>,
}

/// Fleet-wide rate limits in Redis. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RateLimiter {
    conn: Connection,
    /// `<namespace>:v1:{<hash_tag>}:`
    prefix: String,
    scripts: Arc<Scripts>,
}

struct Scripts {
    admit: redis::Script,
    reserve: redis::Script,
    hold: redis::Script,
    back_off: redis::Script,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A limiter script with the helpers it shares with the others (`lua/limits.lua`) prepended.
fn with_helpers(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}\n{body}", include_str!("../lua/limits.lua")))
}

/// A duration in whole microseconds, as the scripts take it.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
}

impl RateLimiter {
    /// A limiter whose keys are `<namespace>:v1:{<hash_tag>}:rl:<name>` (holds under `rlhold:`,
    /// the last back-off under `rlback:`, reservations under `rlres:`). Use the queue's
    /// namespace and, as `hash_tag`, the name of the queue whose jobs are admitted, so limiter
    /// and queue share a cluster slot.
    pub fn new(conn: Connection, namespace: &str, hash_tag: &str) -> Result<Self, Error> {
        if !valid_name(namespace) {
            return Err(Error::InvalidKeyName(namespace.to_owned()));
        }
        if !valid_name(hash_tag) {
            return Err(Error::InvalidKeyName(hash_tag.to_owned()));
        }
        Ok(Self {
            conn,
            prefix: format!("{namespace}:{LAYOUT_VERSION}:{{{hash_tag}}}:"),
            scripts: Arc::new(Scripts {
                admit: with_helpers(include_str!("../lua/admit.lua")),
                reserve: with_helpers(include_str!("../lua/reserve.lua")),
                hold: with_helpers(include_str!("../lua/hold.lua")),
                back_off: with_helpers(include_str!("../lua/back_off.lua")),
            }),
        })
    }

    /// The limit `limit` on the thing called `name` (e.g. `base:appXYZ`).
    pub fn key(&self, name: &str, limit: Limit) -> Result<LimitKey, Error> {
        if !valid_name(name) {
            return Err(Error::InvalidKeyName(name.to_owned()));
        }
        Ok(LimitKey {
            redis_key: format!("{}rl:{name}", self.prefix),
            hold_key: format!("{}rlhold:{name}", self.prefix),
            back_off_key: format!("{}rlback:{name}", self.prefix),
            queue_key: format!("{}rlq:{name}", self.prefix),
            limit,
        })
    }

    /// Admits one request against every key at once, by Redis's clock (one clock for the whole
    /// fleet, whatever the workers' clocks say).
    pub async fn admit(&self, keys: &[LimitKey]) -> Result<Admission, Error> {
        self.run_admit(keys, None).await
    }

    /// [`admit`](Self::admit) at an explicit instant (Unix milliseconds), for simulations and
    /// tests; the instants given to one key must not go backwards by more than its interval.
    pub async fn admit_at(&self, keys: &[LimitKey], now_ms: u64) -> Result<Admission, Error> {
        self.run_admit(keys, Some(now_ms)).await
    }

    /// Admits one request against every key at once, or reserves its slot: the answer
    /// [`Admission::WaitUntil`] means the slot at that instant now belongs to `reservation_id`
    /// (every limit already counts it). When the caller comes back with the same
    /// `reservation_id` at or after that instant, and at most `grace` after it, it is admitted
    /// on its reservation without paying again, so a caller that wakes a few milliseconds late
    /// does not push every later slot back. Coming back earlier gets the same instant again.
    ///
    /// A reservation is used once. It is forfeited, and the caller reserves again behind
    /// everyone already waiting, when a [`hold`](Self::hold) covers its slot or the caller comes
    /// back more than `grace` late (admitting it then could put two requests closer than the
    /// provider tolerates). A forfeited or abandoned slot stays unused; an abandoned
    /// reservation expires about a second after its grace.
    ///
    /// `reservation_id` names the request (a job, a batch); 1 to 200 characters without braces
    /// or spaces. It is scoped to this limiter and should always be used with the same keys.
    /// Two callers sharing one id never share a slot (a reservation admits once), they only
    /// lose the head start.
    pub async fn admit_reserving(
        &self,
        keys: &[LimitKey],
        reservation_id: &str,
        grace: Duration,
    ) -> Result<Admission, Error> {
        self.run_reserve(keys, None, reservation_id, grace, None)
            .await
    }

    /// [`admit_reserving`](Self::admit_reserving) under a cap: `cap`'s limit is counted on the
    /// instants requests are actually admitted (by Redis's clock), and every admission, on a
    /// reservation or on a free slot, must pass it too. A reservation the cap does not allow at
    /// the moment its caller comes back keeps its place and moves to the instant the cap names
    /// (answered as [`Admission::WaitUntil`], with its grace counted from there). A new request
    /// the cap refuses reserves in line: one cap interval behind the last one it refused, so a
    /// crowd comes back spread out instead of all at the cap's next instant.
    ///
    /// The keys' limits pace the slots; the cap bounds what reservations taken late can do to
    /// the admission instants: with a cap of interval `T` and tolerance `τ`, any window shorter
    /// than `W` holds fewer than `1 + (W + τ) / T` admissions, however late the callers come
    /// back within their grace. So the grace can be long (a loaded worker fleet wakes late
    /// without forfeiting slots) and the bound still holds by construction.
    ///
    /// `cap` is a key of this limiter ([`key`](Self::key)) used only as a cap: never pass it
    /// among `keys`, and always with the same keys.
    pub async fn admit_reserving_capped(
        &self,
        keys: &[LimitKey],
        cap: &LimitKey,
        reservation_id: &str,
        grace: Duration,
    ) -> Result<Admission, Error> {
        self.run_reserve(keys, Some(cap), reservation_id, grace, None)
            .await
    }

    /// [`admit_reserving_capped`](Self::admit_reserving_capped) at an explicit instant (Unix
    /// milliseconds), as [`admit_at`](Self::admit_at).
    pub async fn admit_reserving_capped_at(
        &self,
        keys: &[LimitKey],
        cap: &LimitKey,
        reservation_id: &str,
        grace: Duration,
        now_ms: u64,
    ) -> Result<Admission, Error> {
        self.run_reserve(keys, Some(cap), reservation_id, grace, Some(now_ms))
            .await
    }

    /// [`admit_reserving`](Self::admit_reserving) at an explicit instant (Unix milliseconds),
    /// as [`admit_at`](Self::admit_at).
    pub async fn admit_reserving_at(
        &self,
        keys: &[LimitKey],
        reservation_id: &str,
        grace: Duration,
        now_ms: u64,
    ) -> Result<Admission, Error> {
        self.run_reserve(keys, None, reservation_id, grace, Some(now_ms))
            .await
    }

    /// The slot (Unix milliseconds) reserved under `reservation_id`, if a reservation is
    /// still kept.
    pub async fn reserved_slot(&self, reservation_id: &str) -> Result<Option<u64>, Error> {
        let key = self.reservation_key(reservation_id)?;
        let mut conn = self.conn.clone();
        let slot: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        slot.map(|at| parse_instant_ms(&at)).transpose()
    }

    fn reservation_key(&self, reservation_id: &str) -> Result<String, Error> {
        if !valid_name(reservation_id) {
            return Err(Error::InvalidKeyName(reservation_id.to_owned()));
        }
        Ok(format!("{}rlres:{reservation_id}", self.prefix))
    }

    async fn run_reserve(
        &self,
        keys: &[LimitKey],
        cap: Option<&LimitKey>,
        reservation_id: &str,
        grace: Duration,
        now_ms: Option<u64>,
    ) -> Result<Admission, Error> {
        if keys.is_empty() || keys.len() > MAX_KEYS_PER_ADMIT {
            return Err(Error::KeyCount(keys.len()));
        }
        if let Some(cap) = cap
            && keys.iter().any(|key| key.redis_key == cap.redis_key)
        {
            return Err(Error::InvalidLimit(format!(
                "{} is both a limit and the cap of one admission",
                cap.redis_key
            )));
        }
        let reservation_key = self.reservation_key(reservation_id)?;
        let mut invocation = self.scripts.reserve.prepare_invoke();
        for key in keys {
            invocation.key(&key.redis_key);
        }
        for key in keys {
            invocation.key(&key.hold_key);
        }
        invocation.key(&reservation_key);
        invocation.arg(now_arg(now_ms)).arg(micros(grace));
        match cap {
            Some(cap) => {
                invocation.key(&cap.redis_key).key(&cap.queue_key);
                invocation
                    .arg(cap.limit.interval_us)
                    .arg(cap.limit.tolerance_us());
            }
            None => {
                invocation.arg(0).arg(0);
            }
        }
        for key in keys {
            invocation
                .arg(key.limit.interval_us)
                .arg(key.limit.tolerance_us());
        }
        let mut conn = self.conn.clone();
        let answer: (i64, String) = invocation.invoke_async(&mut conn).await?;
        admission(answer)
    }

    async fn run_admit(&self, keys: &[LimitKey], now_ms: Option<u64>) -> Result<Admission, Error> {
        if keys.is_empty() || keys.len() > MAX_KEYS_PER_ADMIT {
            return Err(Error::KeyCount(keys.len()));
        }
        let mut invocation = self.scripts.admit.prepare_invoke();
        for key in keys {
            invocation.key(&key.redis_key);
        }
        invocation.arg(now_arg(now_ms));
        for key in keys {
            invocation
                .arg(key.limit.interval_us)
                .arg(key.limit.tolerance_us());
        }
        let mut conn = self.conn.clone();
        let answer: (i64, String) = invocation.invoke_async(&mut conn).await?;
        admission(answer)
    }

    /// Holds `key` back until `until_ms` (Unix milliseconds): every admission naming it waits
    /// at least that long, and a reservation whose slot falls inside the hold is forfeited.
    /// Used when the provider answered 429 and locked the base out. A hold never shortens a
    /// longer one already in force.
    pub async fn hold(&self, key: &LimitKey, until_ms: u64) -> Result<(), Error> {
        self.run_hold(key, until_ms, None).await
    }

    /// [`hold`](Self::hold) at an explicit instant, as [`admit_at`](Self::admit_at).
    pub async fn hold_at(&self, key: &LimitKey, until_ms: u64, now_ms: u64) -> Result<(), Error> {
        self.run_hold(key, until_ms, Some(now_ms)).await
    }

    /// Holds `key` back after the provider refused a request for going too fast, for a wait
    /// that grows while the refusals keep coming ([`BackOff`]), and says when to come back.
    /// `admitted_ago` is how long ago the refused request was admitted: a request admitted
    /// before the last back-off began was refused for what that hold already answers, and
    /// changes nothing. Holds as [`hold`](Self::hold) does; never shortens a longer hold.
    pub async fn back_off(
        &self,
        key: &LimitKey,
        back_off: &BackOff,
        admitted_ago: Duration,
    ) -> Result<BackedOff, Error> {
        self.run_back_off(key, back_off, admitted_ago, None).await
    }

    /// [`back_off`](Self::back_off) at an explicit instant, as [`admit_at`](Self::admit_at).
    pub async fn back_off_at(
        &self,
        key: &LimitKey,
        back_off: &BackOff,
        admitted_ago: Duration,
        now_ms: u64,
    ) -> Result<BackedOff, Error> {
        self.run_back_off(key, back_off, admitted_ago, Some(now_ms))
            .await
    }

    async fn run_back_off(
        &self,
        key: &LimitKey,
        back_off: &BackOff,
        admitted_ago: Duration,
        now_ms: Option<u64>,
    ) -> Result<BackedOff, Error> {
        let mut conn = self.conn.clone();
        let (until, held_for): (String, String) = self
            .scripts
            .back_off
            .key(&key.redis_key)
            .key(&key.hold_key)
            .key(&key.back_off_key)
            .arg(micros(admitted_ago))
            .arg(micros(back_off.base))
            .arg(micros(back_off.longest))
            .arg(micros(back_off.quiet))
            .arg(key.limit.tolerance_us())
            .arg(now_arg(now_ms))
            .invoke_async(&mut conn)
            .await?;
        let held_for: u64 = held_for
            .parse()
            .map_err(|_| Error::Protocol(format!("hold length {held_for:?}")))?;
        Ok(BackedOff {
            until_ms: parse_instant_ms(&until)?,
            held_for: (held_for > 0).then(|| Duration::from_micros(held_for)),
        })
    }

    async fn run_hold(
        &self,
        key: &LimitKey,
        until_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: String = self
            .scripts
            .hold
            .key(&key.redis_key)
            .key(&key.hold_key)
            .arg(until_ms.saturating_mul(1000))
            .arg(key.limit.tolerance_us())
            .arg(now_arg(now_ms))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// The scripts' answer `{1, now}` or `{0, instant}`, instants in microseconds.
fn admission((admitted, at): (i64, String)) -> Result<Admission, Error> {
    if admitted == 1 {
        Ok(Admission::Admitted)
    } else {
        Ok(Admission::WaitUntil(parse_instant_ms(&at)?))
    }
}

/// An instant in microseconds, as the scripts write it, in Unix milliseconds rounded up (so a
/// caller coming back at that millisecond is never early).
fn parse_instant_ms(at: &str) -> Result<u64, Error> {
    let at_us: u64 = at
        .parse()
        .map_err(|_| Error::Protocol(format!("instant {at:?}")))?;
    Ok(at_us.div_ceil(1000))
}

fn now_arg(now_ms: Option<u64>) -> String {
    now_ms
        .map(|ms| ms.saturating_mul(1000).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated() {
        assert_eq!(
            Limit::per_second(5.0).unwrap().interval(),
            Duration::from_millis(200)
        );
        assert!(Limit::per_second(0.0).is_err());
        assert!(Limit::per_second(f64::NAN).is_err());
        assert!(Limit::per_second(-1.0).is_err());
        assert!(Limit::every(Duration::ZERO).is_err());
        assert!(Limit::per_second(5.0).unwrap().with_burst(0).is_err());
        let bursty = Limit::per_second(10.0).unwrap().with_burst(3).unwrap();
        assert_eq!(bursty.tolerance_us(), 200_000);
        let forgiving = Limit::per_second(5.0)
            .unwrap()
            .with_lateness(Duration::from_millis(10))
            .unwrap();
        assert_eq!(forgiving.tolerance_us(), 10_000);
        assert_eq!(forgiving.lateness(), Duration::from_millis(10));
        assert!(
            Limit::per_second(5.0)
                .unwrap()
                .with_lateness(Duration::from_millis(200))
                .is_err()
        );
    }

    #[test]
    fn at_most_n_in_a_window_turns_the_slack_into_tolerance() {
        let second = Duration::from_secs(1);
        let slow = Limit::at_most(50, second, Duration::from_micros(20_200)).unwrap();
        assert_eq!(
            (slow.burst(), slow.lateness()),
            (1, Duration::from_millis(10))
        );
        let fast = Limit::at_most(1_000, second, Duration::from_micros(1_010)).unwrap();
        assert_eq!(fast.burst(), 10);
        assert_eq!(fast.tolerance_us(), 10_000);
        assert!(Limit::at_most(50, second, Duration::from_micros(19_999)).is_err());
        assert!(Limit::at_most(0, second, second).is_err());
        // The bound, for every n and a range of intervals: the first request and n more
        // admitted as close as GCRA allows span at least the window.
        for n in 1..=1_000u32 {
            for slack_us in [0u64, 1, 7, 10_000, 250_000] {
                let interval_us = (1_000_000 + slack_us).div_ceil(u64::from(n));
                let limit = Limit::at_most(n, second, Duration::from_micros(interval_us)).unwrap();
                assert!(limit.lateness_us < limit.interval_us, "n {n}");
                let closest_n_plus_one = u64::from(n) * limit.interval_us - limit.tolerance_us();
                assert!(
                    closest_n_plus_one >= 1_000_000,
                    "n {n}, slack {slack_us} µs"
                );
            }
        }
    }

    #[test]
    fn key_names_cannot_break_the_hash_tag() {
        assert!(valid_name("base:app123"));
        assert!(!valid_name("a{b}"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(""));
    }
}
