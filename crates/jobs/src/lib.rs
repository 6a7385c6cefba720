//! herald's job types and the machinery that feeds them: each job type is a versioned payload
//! plus one `async fn` handler; the registry tells the API and the worker which queues exist and
//! how to validate their payloads; the relay and reconciler move work from Postgres to Redis.
//!
//! Handlers reach Redis only through `herald-queue`, and Postgres only through `herald-store`.

pub mod airtable;
pub mod builtin;
pub mod calls;
pub mod channels;
pub mod daily;
pub mod durable;
pub mod http;
pub mod registry;
pub mod relay;
pub mod sequence_events;
pub mod sequences;
pub mod whatsapp;

pub use registry::{JobType, job_type, job_types};

/// What every handler receives besides its payload.
#[derive(Clone)]
pub struct Deps {
    pub pool: sqlx::PgPool,
    pub http: reqwest::Client,
    /// Whether diagnostic job behaviour that harms the process (the probe's `abort`) is allowed.
    pub allow_probe_abort: bool,
    /// Airtable and its fleet-wide rate limits, for the daily assignment's sync and cleanup jobs.
    /// `None` when Airtable is not configured: those jobs then retry with a reason.
    pub airtable: Option<std::sync::Arc<airtable::Airtable>>,
    /// Voice calls' fleet-wide slots and provider client, for the call campaign jobs. `None`
    /// when not configured: those jobs then retry with a reason.
    pub voice: Option<std::sync::Arc<calls::Voice>>,
    /// WhatsApp's client and fleet-wide send rate limiter, for the message campaigns' send
    /// steps. `None` when not configured: those jobs then retry with a reason.
    pub whatsapp: Option<std::sync::Arc<whatsapp::WhatsApp>>,
    /// The channel connectors (email, LinkedIn, Instagram) for sequences' action steps. `None`
    /// or a channel missing: those steps retry with a reason. WhatsApp steps use `whatsapp`.
    pub sequences: Option<std::sync::Arc<sequences::Connectors>>,
}

impl Deps {
    /// Deps without Airtable; add it with [`Deps::with_airtable`].
    pub fn new(pool: sqlx::PgPool, http: reqwest::Client, allow_probe_abort: bool) -> Self {
        Self {
            pool,
            http,
            allow_probe_abort,
            airtable: None,
            voice: None,
            whatsapp: None,
            sequences: None,
        }
    }

    pub fn with_voice(mut self, voice: calls::Voice) -> Self {
        self.voice = Some(std::sync::Arc::new(voice));
        self
    }

    pub fn with_whatsapp(mut self, whatsapp: whatsapp::WhatsApp) -> Self {
        self.whatsapp = Some(std::sync::Arc::new(whatsapp));
        self
    }

    pub fn with_sequence_connectors(mut self, connectors: sequences::Connectors) -> Self {
        self.sequences = Some(std::sync::Arc::new(connectors));
        self
    }

    pub fn with_airtable(mut self, airtable: airtable::Airtable) -> Self {
        self.airtable = Some(std::sync::Arc::new(airtable));
        self
    }
}
