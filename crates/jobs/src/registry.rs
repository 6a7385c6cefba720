//! The job types herald knows, with what the API needs to validate a payload before enqueueing
//! it and what the worker needs to serve the queue.

use std::time::Duration;

use herald_core::JobPayload;
use serde_json::Value;

use crate::builtin::{Noop, Probe};
use crate::calls::{CallDispatch, ReleaseSlot};
use crate::daily::{AirtableCleanup, DailyCleanup, DailyDistribute, DailySelect, DailySync};
use crate::http::HttpJob;
use crate::sequences::{LeadGeneration, SequenceStep};
use crate::whatsapp::WhatsAppSend;

/// One job type: its queue, payload version, default attempt budget and timeout.
#[derive(Debug, Clone, Copy)]
pub struct JobType {
    pub queue: &'static str,
    pub version: u32,
    pub max_attempts: u32,
    pub timeout: Duration,
    pub description: &'static str,
    /// Whether other services may enqueue it through the generic API.
    pub public: bool,
    /// Checks a payload's shape; the error names the field and the problem.
    pub validate: fn(&Value) -> Result<(), String>,
}

fn validate_as<P: JobPayload>(v: &Value) -> Result<(), String> {
    serde_json::from_value::<P>(v.clone())
        .map(|_| ())
        .map_err(|e| format!("payload does not match job type {}: {e}", P::QUEUE))
}

const fn describe<P: JobPayload>(
    description: &'static str,
    public: bool,
    validate: fn(&Value) -> Result<(), String>,
) -> JobType {
    JobType {
        queue: P::QUEUE,
        version: P::VERSION,
        max_attempts: P::MAX_ATTEMPTS,
        timeout: P::TIMEOUT,
        description,
        public,
        validate,
    }
}

static TYPES: &[JobType] = &[
    describe::<CallDispatch>(
        "Call campaigns: admit and place the tenant's next calls (slots per user and per tenant, round-robin, calling windows).",
        false,
        validate_as::<CallDispatch>,
    ),
    describe::<ReleaseSlot>(
        "Call campaigns: a call ended at the provider; record its outcome, free its slot once, dispatch the next call.",
        false,
        validate_as::<ReleaseSlot>,
    ),
    describe::<AirtableCleanup>(
        "Daily assignment cleanup in Airtable: mark up to 10 records unfollow, or delete them; paced by the Airtable rate limiter.",
        false,
        AirtableCleanup::validate_value,
    ),
    describe::<DailyCleanup>(
        "Daily assignment rolling window for one tenant: 7-day-old assignments become unfollow, 8+ days are deleted.",
        false,
        validate_as::<DailyCleanup>,
    ),
    describe::<DailyDistribute>(
        "Daily assignment: shuffle the selection into VA tables and positions, fan out the sync batches.",
        false,
        validate_as::<DailyDistribute>,
    ),
    describe::<DailySelect>(
        "Daily assignment: take up to the target of unused profiles and mark them used.",
        false,
        validate_as::<DailySelect>,
    ),
    describe::<DailySync>(
        "Daily assignment: upsert one batch of at most 10 records to its Airtable table, paced by the fleet-wide limiter.",
        false,
        validate_as::<DailySync>,
    ),
    describe::<HttpJob>(
        "Deliver an HTTP request to an allow-listed host, signed with the tenant's HMAC secret; retries 429/5xx/timeouts.",
        true,
        HttpJob::validate_value,
    ),
    describe::<Noop>(
        "Does nothing; for benchmarks and smoke tests.",
        true,
        validate_as::<Noop>,
    ),
    describe::<Probe>(
        "Diagnostic: records an effect row in Postgres (counting runs), optionally sleeping first.",
        true,
        validate_as::<Probe>,
    ),
    describe::<LeadGeneration>(
        "Multichannel sequences: draw the day's leads of a sequence from its lead pool (up to the daily limit, nobody twice), at most once per local day; writes itself for the next local midnight.",
        false,
        validate_as::<LeadGeneration>,
    ),
    describe::<SequenceStep>(
        "Multichannel sequences: run one step of one lead (action, delay or condition), recorded once per lead and step; actions obey the sequence's window and caps.",
        false,
        validate_as::<SequenceStep>,
    ),
    describe::<WhatsAppSend>(
        "WhatsApp campaign send step: one template message to one recipient, admitted by the fleet-wide rate limit of the tenant's sender number; recorded as attempting before the call.",
        false,
        validate_as::<WhatsAppSend>,
    ),
];

/// Every job type, in a stable order.
pub fn job_types() -> &'static [JobType] {
    TYPES
}

/// The job type served by `queue`, if any.
pub fn job_type(queue: &str) -> Option<&'static JobType> {
    TYPES.iter().find(|t| t.queue == queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_unique_and_valid_names() {
        let mut names: Vec<&str> = job_types().iter().map(|t| t.queue).collect();
        for n in &names {
            assert!(n.parse::<herald_core::QueueName>().is_ok(), "{n}");
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), job_types().len());
    }

    #[test]
    fn payloads_are_validated_with_a_reason() {
        let probe = job_type("probe").unwrap();
        assert!((probe.validate)(&serde_json::json!({"effect_key": "a"})).is_ok());
        let err = (probe.validate)(&serde_json::json!({"effect_key": 5})).unwrap_err();
        assert!(
            err.contains("effect_key") || err.contains("invalid type"),
            "{err}"
        );
        assert!(job_type("nope").is_none());
    }
}
