//! Fault injection: planned 429s and 5xx answered instead of the real response, for tests.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Faults to inject into the requests to one base (or to every base without a plan of its own).
///
/// Bursts are spent first, 429s before 5xx: the next `rate_limit_burst` requests get a 429,
/// the `server_error_burst` after them get `server_error_status`. Once the bursts are spent,
/// each request gets a 429 with `rate_limit_probability`, else a 5xx with
/// `server_error_probability`. Injected faults do not start a lock-out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailPlan {
    /// The base this plan applies to; `None` applies it to every base without its own plan.
    pub base: Option<String>,
    pub rate_limit_burst: u32,
    pub server_error_burst: u32,
    /// 500 or 503 (any 5xx is accepted).
    pub server_error_status: u16,
    pub rate_limit_probability: f64,
    pub server_error_probability: f64,
}

impl Default for FailPlan {
    fn default() -> Self {
        Self {
            base: None,
            rate_limit_burst: 0,
            server_error_burst: 0,
            server_error_status: 503,
            rate_limit_probability: 0.0,
            server_error_probability: 0.0,
        }
    }
}

/// A fail plan that cannot be carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid fail plan: {0}")]
pub struct InvalidFailPlan(String);

impl FailPlan {
    /// A plan that answers the next `count` requests to `base` with 429.
    pub fn rate_limit_burst(base: impl Into<String>, count: u32) -> Self {
        Self {
            base: Some(base.into()),
            rate_limit_burst: count,
            ..Self::default()
        }
    }

    /// A plan that answers the next `count` requests to `base` with `status` (500 or 503).
    pub fn server_error_burst(base: impl Into<String>, count: u32, status: u16) -> Self {
        Self {
            base: Some(base.into()),
            server_error_burst: count,
            server_error_status: status,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), InvalidFailPlan> {
        if !(500..=599).contains(&self.server_error_status) {
            return Err(InvalidFailPlan(format!(
                "server_error_status {} is not a 5xx status",
                self.server_error_status
            )));
        }
        let probabilities = [self.rate_limit_probability, self.server_error_probability];
        if probabilities.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return Err(InvalidFailPlan(
                "probabilities must be between 0 and 1".to_owned(),
            ));
        }
        if probabilities.iter().sum::<f64>() > 1.0 {
            return Err(InvalidFailPlan(
                "the probabilities must not add up to more than 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn is_noop(&self) -> bool {
        self.rate_limit_burst == 0
            && self.server_error_burst == 0
            && self.rate_limit_probability == 0.0
            && self.server_error_probability == 0.0
    }

    /// Spends one request of the plan: the status to answer with, if any.
    fn next(&mut self) -> Option<StatusCode> {
        if self.rate_limit_burst > 0 {
            self.rate_limit_burst -= 1;
            return Some(StatusCode::TOO_MANY_REQUESTS);
        }
        let server_error = StatusCode::from_u16(self.server_error_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        if self.server_error_burst > 0 {
            self.server_error_burst -= 1;
            return Some(server_error);
        }
        if self.rate_limit_probability == 0.0 && self.server_error_probability == 0.0 {
            return None;
        }
        let roll: f64 = rand::thread_rng().r#gen();
        if roll < self.rate_limit_probability {
            Some(StatusCode::TOO_MANY_REQUESTS)
        } else if roll < self.rate_limit_probability + self.server_error_probability {
            Some(server_error)
        } else {
            None
        }
    }
}

/// The plans in force: one per base, plus one for every other base.
#[derive(Clone, Debug, Default)]
pub(crate) struct Faults {
    any_base: FailPlan,
    per_base: BTreeMap<String, FailPlan>,
}

impl Faults {
    pub(crate) fn set(&mut self, plan: FailPlan) {
        match plan.base.clone() {
            Some(base) => {
                self.per_base.insert(base, plan);
            }
            None => self.any_base = plan,
        }
    }

    pub(crate) fn plans(&self) -> Vec<FailPlan> {
        std::iter::once(&self.any_base)
            .filter(|plan| !plan.is_noop())
            .chain(self.per_base.values())
            .cloned()
            .collect()
    }

    pub(crate) fn next(&mut self, base: &str) -> Option<StatusCode> {
        match self.per_base.get_mut(base) {
            Some(plan) => plan.next(),
            None => self.any_base.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_spent_in_order_then_stop() {
        let mut faults = Faults::default();
        faults.set(FailPlan {
            base: Some("app1".into()),
            rate_limit_burst: 1,
            server_error_burst: 2,
            server_error_status: 500,
            ..FailPlan::default()
        });
        assert_eq!(faults.next("app2"), None);
        assert_eq!(faults.next("app1"), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(faults.next("app1"), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(faults.next("app1"), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(faults.next("app1"), None);
    }

    #[test]
    fn certain_probability_always_fires() {
        let mut faults = Faults::default();
        faults.set(FailPlan {
            server_error_probability: 1.0,
            ..FailPlan::default()
        });
        for _ in 0..20 {
            assert_eq!(faults.next("any"), Some(StatusCode::SERVICE_UNAVAILABLE));
        }
    }

    #[test]
    fn validation_refuses_non_5xx_and_bad_probabilities() {
        assert!(
            FailPlan::server_error_burst("a", 1, 404)
                .validate()
                .is_err()
        );
        let plan = FailPlan {
            rate_limit_probability: 0.7,
            server_error_probability: 0.7,
            ..FailPlan::default()
        };
        assert!(plan.validate().is_err());
        assert!(FailPlan::rate_limit_burst("a", 3).validate().is_ok());
    }
}
