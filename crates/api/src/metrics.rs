//! The API's Prometheus metrics: names and help text are constants here, the registry is built
//! once per [`crate::AppState`], and `/metrics` renders it in the text exposition format.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::AppState;

pub const REQUESTS: &str = "herald_api_requests";
pub const REQUESTS_HELP: &str = "HTTP requests answered, by route, method and status";
pub const ENQUEUED: &str = "herald_api_jobs_enqueued";
pub const ENQUEUED_HELP: &str = "Jobs accepted for enqueueing (new, not duplicates), by queue";
pub const DUPLICATES: &str = "herald_api_jobs_duplicate";
pub const DUPLICATES_HELP: &str = "Enqueues answered as duplicates of an existing job, by queue";
pub const PROFILES_IMPORTED: &str = "herald_api_profiles_imported";
pub const PROFILES_IMPORTED_HELP: &str =
    "Profile rows received by imports, by outcome (inserted, duplicate, rejected)";
pub const BACKPRESSURE: &str = "herald_api_backpressure_rejections";
pub const BACKPRESSURE_HELP: &str =
    "Enqueue requests refused with 503 because Redis memory was over the high-water mark";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The API's counters and the registry that renders them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    enqueued: Family<QueueLabels, Counter>,
    duplicates: Family<QueueLabels, Counter>,
    profiles: Family<OutcomeLabels, Counter>,
    backpressure: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let enqueued = Family::<QueueLabels, Counter>::default();
        let duplicates = Family::<QueueLabels, Counter>::default();
        let profiles = Family::<OutcomeLabels, Counter>::default();
        let backpressure = Counter::default();
        registry.register(REQUESTS, REQUESTS_HELP, requests.clone());
        registry.register(PROFILES_IMPORTED, PROFILES_IMPORTED_HELP, profiles.clone());
        registry.register(ENQUEUED, ENQUEUED_HELP, enqueued.clone());
        registry.register(DUPLICATES, DUPLICATES_HELP, duplicates.clone());
        registry.register(BACKPRESSURE, BACKPRESSURE_HELP, backpressure.clone());
        Self {
            registry: Arc::new(registry),
            requests,
            enqueued,
            duplicates,
            profiles,
            backpressure,
        }
    }

    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
    }

    pub fn enqueued(&self, queue: &str, new: u64, duplicates: u64) {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        if new > 0 {
            self.enqueued.get_or_create(&labels).inc_by(new);
        }
        if duplicates > 0 {
            self.duplicates.get_or_create(&labels).inc_by(duplicates);
        }
    }

    pub fn profiles_imported(&self, inserted: u64, duplicates: u64, rejected: u64) {
        for (outcome, n) in [
            ("inserted", inserted),
            ("duplicate", duplicates),
            ("rejected", rejected),
        ] {
            if n > 0 {
                self.profiles
                    .get_or_create(&OutcomeLabels { outcome })
                    .inc_by(n);
            }
        }
    }

    pub fn backpressure_rejected(&self) {
        self.backpressure.inc();
    }

    /// The registry in Prometheus's text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Counts every routed request by its route template (not the raw path, which would give one
/// series per job id).
pub async fn track_request(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "(unmatched)".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .metrics()
        .request(&route, &method, response.status().as_u16());
    response
}
