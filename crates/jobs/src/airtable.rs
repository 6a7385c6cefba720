//! Airtable as the job handlers use it: where it is (`AIRTABLE_API_URL`, `AIRTABLE_TOKEN`,
//! `AIRTABLE_BASE_ID`), the client, and the fleet-wide rate limits every request is admitted by
//! (per base and per token), including the hold after a 429.

use std::time::Duration;

use herald_admission::{Admission, Connection, Limit, LimitKey, RateLimiter};
use herald_connectors::airtable::{AirtableClient, AirtableConfig, DEFAULT_API_URL};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest, Sha256};

/// Airtable's documented limit per base.
pub const DEFAULT_BASE_RPS: f64 = 5.0;
/// Airtable's documented limit per token.
pub const DEFAULT_TOKEN_RPS: f64 = 50.0;
/// How much slower than the provider's limit herald paces requests, as a fraction. Airtable
/// counts requests in a sliding one-second window, so a margin `m` is `m` × 1 s of slack (30 ms
/// at 0.03) per window: a third of it forgives deferred jobs their lateness, two thirds (20 ms)
/// let the delay between a request's admission and its arrival at Airtable vary without six
/// requests ever falling in one window. See docs/decisions/0010-limiter-lateness.md.
pub const DEFAULT_RATE_MARGIN: f64 = 0.03;

/// Where and how fast to talk to Airtable.
#[derive(Clone, Debug)]
pub struct AirtableSettings {
    /// `AIRTABLE_API_URL`, without `/v0`.
    pub api_url: String,
    /// `AIRTABLE_TOKEN`.
    pub token: SecretString,
    /// `AIRTABLE_BASE_ID`.
    pub base_id: String,
    /// Requests per second per base (`HERALD_AIRTABLE_BASE_RPS`).
    pub base_rps: f64,
    /// Requests per second per token (`HERALD_AIRTABLE_TOKEN_RPS`).
    pub token_rps: f64,
    /// Pacing margin under the limits (`HERALD_AIRTABLE_RATE_MARGIN`), e.g. 0.03 = 3 % slower.
    pub rate_margin: f64,
    /// How long a 429 holds the base back when Airtable sends no `Retry-After`
    /// (`HERALD_AIRTABLE_LOCKOUT_MS`); Airtable's lock-out is 30 s.
    pub lockout: Duration,
    /// Per request.
    pub timeout: Duration,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("Airtable rate limiter: {0}")]
    Admission(#[from] herald_admission::Error),
    #[error("Airtable rate limiter cannot reach Redis: {0}")]
    Redis(#[from] herald_admission::RedisError),
}

impl AirtableSettings {
    /// Airtable's public API with its documented limits.
    pub fn new(token: SecretString, base_id: impl Into<String>) -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            token,
            base_id: base_id.into(),
            base_rps: DEFAULT_BASE_RPS,
            token_rps: DEFAULT_TOKEN_RPS,
            rate_margin: DEFAULT_RATE_MARGIN,
            lockout: herald_connectors::airtable::RATE_LIMIT_LOCKOUT,
            timeout: herald_connectors::airtable::DEFAULT_TIMEOUT,
        }
    }

    /// Reads the settings from variables looked up by `var` (e.g. `|k| std::env::var(k).ok()`).
    /// `None` when `AIRTABLE_TOKEN` or `AIRTABLE_BASE_ID` is unset: Airtable jobs then fail
    /// with a reason instead of the binary refusing to start.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, SettingsError> {
        let (Some(token), Some(base_id)) = (var("AIRTABLE_TOKEN"), var("AIRTABLE_BASE_ID")) else {
            return Ok(None);
        };
        let mut settings = Self::new(SecretString::from(token), base_id);
        if let Some(url) = var("AIRTABLE_API_URL") {
            settings.api_url = url;
        }
        let number = |name: &'static str| -> Result<Option<f64>, SettingsError> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite() && *n >= 0.0)
                        .ok_or_else(|| SettingsError::Invalid {
                            name,
                            reason: format!("{v:?} is not a non-negative number"),
                        })
                })
                .transpose()
        };
        if let Some(rps) = number("HERALD_AIRTABLE_BASE_RPS")? {
            settings.base_rps = rps;
        }
        if let Some(rps) = number("HERALD_AIRTABLE_TOKEN_RPS")? {
            settings.token_rps = rps;
        }
        if let Some(margin) = number("HERALD_AIRTABLE_RATE_MARGIN")? {
            settings.rate_margin = margin;
        }
        if let Some(ms) = number("HERALD_AIRTABLE_LOCKOUT_MS")? {
            settings.lockout = Duration::from_millis(ms as u64);
        }
        settings.validate()?;
        Ok(Some(settings))
    }

    /// [`from_vars`](Self::from_vars) over the process environment, for binaries.
    pub fn from_env() -> Result<Option<Self>, SettingsError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |name, reason: &str| SettingsError::Invalid {
            name,
            reason: reason.to_owned(),
        };
        if self.base_id.trim().is_empty() {
            return Err(invalid("AIRTABLE_BASE_ID", "must not be empty"));
        }
        if self.token.expose_secret().trim().is_empty() {
            return Err(invalid("AIRTABLE_TOKEN", "must not be empty"));
        }
        if !self.base_rps.is_finite() || self.base_rps <= 0.0 {
            return Err(invalid("HERALD_AIRTABLE_BASE_RPS", "must be above 0"));
        }
        if !self.token_rps.is_finite() || self.token_rps <= 0.0 {
            return Err(invalid("HERALD_AIRTABLE_TOKEN_RPS", "must be above 0"));
        }
        if !(0.0..1.0).contains(&self.rate_margin) {
            return Err(invalid(
                "HERALD_AIRTABLE_RATE_MARGIN",
                "must be 0 to below 1",
            ));
        }
        Ok(())
    }

    /// `rps` paced `rate_margin` under it, forgiving deferred jobs a third of the margin's slack
    /// in lateness (10 ms at 0.03): a job that comes back a few milliseconds after its instant
    /// does not push every later request back, and `rps + 1` consecutive requests still span
    /// `(1 + margin) s − lateness`, leaving two thirds of the slack (20 ms at 0.03) for the way
    /// to Airtable. See docs/decisions/0010-limiter-lateness.md.
    fn paced(&self, rps: f64) -> Result<Limit, SettingsError> {
        let limit = Limit::per_second(rps / (1.0 + self.rate_margin))?;
        let lateness = Duration::from_secs_f64(self.rate_margin / 3.0).min(limit.interval() / 2);
        Ok(limit.with_lateness(lateness)?)
    }
}

/// Airtable for the handlers: the client and its admission keys. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Airtable {
    pub client: AirtableClient,
    limiter: RateLimiter,
    base_key: LimitKey,
    token_key: LimitKey,
    lockout: Duration,
}

impl Airtable {
    /// The client and limits for `settings`, admitting through `limiter` (whose hash tag should
    /// be [`crate::daily::DailySync::QUEUE`], see [`Airtable::connect`]).
    pub fn new(
        http: reqwest::Client,
        settings: &AirtableSettings,
        limiter: RateLimiter,
    ) -> Result<Self, SettingsError> {
        settings.validate()?;
        let config = AirtableConfig {
            api_url: settings.api_url.clone(),
            token: settings.token.clone(),
            base_id: settings.base_id.clone(),
            timeout: settings.timeout,
        };
        // The token's key is a digest: the token itself never reaches Redis.
        let token_digest = hex::encode(&Sha256::digest(settings.token.expose_secret())[..12]);
        let base_key = limiter.key(
            &format!("airtable:base:{}", settings.base_id),
            settings.paced(settings.base_rps)?,
        )?;
        let token_key = limiter.key(
            &format!("airtable:token:{token_digest}"),
            settings.paced(settings.token_rps)?,
        )?;
        Ok(Self {
            client: AirtableClient::new(http, config),
            limiter,
            base_key,
            token_key,
            lockout: settings.lockout,
        })
    }

    /// Connects the limiter to Redis (`REDIS_URL`) under the queues' `namespace`.
    pub async fn connect(
        http: reqwest::Client,
        settings: &AirtableSettings,
        redis_url: &str,
        namespace: &str,
    ) -> Result<Self, SettingsError> {
        let conn = Connection::connect(redis_url).await?;
        let limiter = RateLimiter::new(
            conn,
            namespace,
            <crate::daily::DailySync as herald_core::JobPayload>::QUEUE,
        )?;
        Self::new(http, settings, limiter)
    }

    /// Asks for one request's slot against the base's and the token's limits; a refusal takes
    /// nothing.
    pub async fn admit(&self) -> Result<Admission, herald_admission::Error> {
        self.limiter
            .admit(&[self.base_key.clone(), self.token_key.clone()])
            .await
    }

    /// Holds the base back after a 429: for `retry_after`, else Airtable's lock-out. Returns
    /// the instant (Unix ms) the hold ends.
    pub async fn hold_base(
        &self,
        retry_after: Option<Duration>,
    ) -> Result<u64, herald_admission::Error> {
        let wait = retry_after.unwrap_or(self.lockout);
        let until = herald_core::now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.limiter.hold(&self.base_key, until).await?;
        Ok(until)
    }

    pub fn base_id(&self) -> &str {
        self.client.base_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn settings_come_from_variables_with_airtables_defaults() {
        let vars: HashMap<&str, &str> = [
            ("AIRTABLE_TOKEN", "pat1"),
            ("AIRTABLE_BASE_ID", "app1"),
            ("HERALD_AIRTABLE_BASE_RPS", "50"),
        ]
        .into();
        let get = |k: &str| vars.get(k).map(|v| (*v).to_owned());
        let settings = AirtableSettings::from_vars(get).unwrap().unwrap();
        assert_eq!(settings.api_url, "https://api.airtable.com");
        assert_eq!(settings.base_rps, 50.0);
        assert_eq!(settings.token_rps, DEFAULT_TOKEN_RPS);
        assert_eq!(settings.lockout, Duration::from_secs(30));

        assert!(AirtableSettings::from_vars(|_| None).unwrap().is_none());
        let bad = |k: &str| match k {
            "HERALD_AIRTABLE_BASE_RPS" => Some("fast".to_owned()),
            _ => get(k),
        };
        assert!(AirtableSettings::from_vars(bad).is_err());
    }
}
