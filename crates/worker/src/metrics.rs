//! `/metrics` (Prometheus text format) and `/healthz`.
//!
//! Counters come from each queue backend's [`Stats`] (this process's work); the queue gauges are
//! read from Redis at scrape time, so every worker reports the same fleet-wide value — take the
//! `max by (queue)` when aggregating, as `deploy/keda-scaledobject.yaml` does.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use herald_queue::{Counts, Queue, Stats};
use tokio::net::TcpListener;

/// One served queue, as the metrics page sees it.
#[derive(Clone)]
pub struct QueueMetrics {
    pub queue: Queue,
    pub stats: Arc<Stats>,
    pub concurrency: usize,
}

/// What the metrics page reports.
#[derive(Clone)]
pub struct MetricsState {
    pub worker_id: String,
    pub queues: Vec<QueueMetrics>,
}

/// Redis-derived state of one queue at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueGauges {
    pub counts: Counts,
    pub paused: bool,
}

impl QueueGauges {
    /// Jobs more workers could start right now: ready and not paused. Delayed, retrying and
    /// deferred (admission-blocked) jobs wait in the delayed set and are not counted.
    pub fn runnable(&self) -> u64 {
        if self.paused { 0 } else { self.counts.ready }
    }
}

type Counter = fn(&Stats) -> u64;

/// The per-queue counters: name, help, reading.
const COUNTERS: &[(&str, &str, Counter)] = &[
    (
        "herald_jobs_fetched_total",
        "Jobs this process fetched (leased) from the queue.",
        |s| s.fetched.load(Ordering::Relaxed),
    ),
    (
        "herald_jobs_completed_total",
        "Jobs this process completed and Redis acknowledged.",
        |s| s.completed.load(Ordering::Relaxed),
    ),
    (
        "herald_jobs_retried_total",
        "Failed attempts scheduled for a retry.",
        |s| s.retried.load(Ordering::Relaxed),
    ),
    (
        "herald_jobs_deferred_total",
        "Runs deferred without spending an attempt (throttle, closed window).",
        |s| s.deferred.load(Ordering::Relaxed),
    ),
    (
        "herald_jobs_dead_total",
        "Jobs this process moved to the dead set.",
        |s| s.dead.load(Ordering::Relaxed),
    ),
    (
        "herald_leases_lost_total",
        "Acknowledgements refused because the lease had been taken over.",
        |s| s.leases_lost.load(Ordering::Relaxed),
    ),
    (
        "herald_redis_errors_total",
        "Redis calls of the queue driver that failed (and were retried).",
        |s| s.redis_errors.load(Ordering::Relaxed),
    ),
    (
        "herald_redis_round_trips_total",
        "Fetch/acknowledge round trips to Redis.",
        |s| s.round_trips.load(Ordering::Relaxed),
    ),
];

type Gauge = fn(&QueueGauges) -> u64;

const GAUGES: &[(&str, &str, Gauge)] = &[
    (
        "herald_queue_runnable_jobs",
        "Jobs ready to run now and not blocked (not delayed, deferred or paused); the autoscaling signal.",
        QueueGauges::runnable,
    ),
    ("herald_queue_ready_jobs", "Jobs in the ready set.", |g| {
        g.counts.ready
    }),
    (
        "herald_queue_delayed_jobs",
        "Jobs waiting for their run time (scheduled, retry backoff, deferred).",
        |g| g.counts.delayed,
    ),
    (
        "herald_queue_running_jobs",
        "Jobs leased by some worker.",
        |g| g.counts.running,
    ),
    ("herald_queue_dead_jobs", "Jobs in the dead set.", |g| {
        g.counts.dead
    }),
    (
        "herald_queue_completed_jobs",
        "Completed jobs still retained for inspection.",
        |g| g.counts.completed,
    ),
    ("herald_queue_paused", "1 when the queue is paused.", |g| {
        u64::from(g.paused)
    }),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the page. `gauges[i]` belongs to `state.queues[i]`; `None` when Redis did not
/// answer (the queue's gauges are then left out and `herald_redis_up` is 0).
pub fn render(state: &MetricsState, gauges: &[Option<QueueGauges>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP herald_worker_info This worker process (value is always 1).\n# TYPE herald_worker_info gauge\nherald_worker_info{{worker_id=\"{}\"}} 1",
        escape(&state.worker_id)
    );
    let _ = writeln!(
        out,
        "# HELP herald_worker_concurrency Jobs of the queue this process runs at once.\n# TYPE herald_worker_concurrency gauge"
    );
    for q in &state.queues {
        let _ = writeln!(
            out,
            "herald_worker_concurrency{{queue=\"{}\"}} {}",
            escape(q.queue.name().as_str()),
            q.concurrency
        );
    }
    for (name, help, read) in COUNTERS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for q in &state.queues {
            let _ = writeln!(
                out,
                "{name}{{queue=\"{}\"}} {}",
                escape(q.queue.name().as_str()),
                read(&q.stats)
            );
        }
    }
    for (name, help, read) in GAUGES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (q, g) in state.queues.iter().zip(gauges) {
            if let Some(g) = g {
                let _ = writeln!(
                    out,
                    "{name}{{queue=\"{}\"}} {}",
                    escape(q.queue.name().as_str()),
                    read(g)
                );
            }
        }
    }
    let up = gauges.iter().all(Option::is_some);
    let _ = writeln!(
        out,
        "# HELP herald_redis_up 1 when Redis answered this scrape.\n# TYPE herald_redis_up gauge\nherald_redis_up {}",
        u8::from(up)
    );
    out
}

async fn read_gauges(queue: &Queue) -> Option<QueueGauges> {
    let counts = queue.counts(None).await;
    let paused = queue.is_paused().await;
    match (counts, paused) {
        (Ok(counts), Ok(paused)) => Some(QueueGauges { counts, paused }),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(queue = %queue.name(), error = %e, "metrics: redis did not answer");
            None
        }
    }
}

async fn metrics(State(state): State<Arc<MetricsState>>) -> impl IntoResponse {
    let mut gauges = Vec::with_capacity(state.queues.len());
    for q in &state.queues {
        gauges.push(read_gauges(&q.queue).await);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&state, &gauges),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Binds `addr` and returns the bound address and the server future.
pub async fn serve(
    addr: SocketAddr,
    state: MetricsState,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Arc::new(state));
    Ok((bound, async move { axum::serve(listener, app).await }))
}
