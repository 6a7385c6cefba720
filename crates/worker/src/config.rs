//! Command-line flags (each with an environment fallback) and the plan derived from them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use herald_core::QueueName;

/// What the flags asked for cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--queues: unknown queue {name:?}; known queues: {known}")]
    UnknownQueue { name: String, known: String },
    #[error("--queues: queue {name:?} has no handler in this herald-worker build")]
    NoHandler { name: String },
    #[error("--queues is empty; give a comma-separated list of queues, or `all`")]
    NoQueues,
    #[error("--queue-concurrency: {0}")]
    QueueConcurrency(String),
    #[error("--{flag} must be at least 1")]
    Zero { flag: &'static str },
}

/// Runs job handlers over herald's Redis queues; also relays the Postgres outbox to Redis,
/// reconciles what Redis lost, and prunes old rows.
///
/// Signals: SIGTERM or SIGINT stops fetching, releases fetched-but-unstarted jobs to other
/// workers at once, lets running jobs finish within --drain-secs, then exits 0.
#[derive(Debug, Clone, Parser)]
#[command(name = "herald-worker", version, about, long_about = None)]
pub struct Args {
    /// Queues to serve: a comma-separated list, or `all` for every job type herald knows.
    #[arg(
        long,
        env = "HERALD_QUEUES",
        default_value = "all",
        value_name = "LIST"
    )]
    pub queues: String,

    /// Jobs of one queue running at once in this process.
    #[arg(long, env = "HERALD_CONCURRENCY", default_value_t = 10)]
    pub concurrency: usize,

    /// Per-queue concurrency overrides, e.g. `noop=50,http=20`.
    #[arg(
        long,
        env = "HERALD_QUEUE_CONCURRENCY",
        default_value = "",
        value_name = "QUEUE=N,..."
    )]
    pub queue_concurrency: String,

    /// Lease (visibility timeout) in milliseconds: a job whose worker stops renewing it this
    /// long is re-delivered to another worker, and the delivery counts as an attempt.
    #[arg(long, env = "HERALD_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,

    /// Most jobs fetched per Redis round trip.
    #[arg(long, env = "HERALD_FETCH_BATCH", default_value_t = 200)]
    pub fetch_batch: usize,

    /// Jobs fetched per queue beyond --concurrency, waiting (leases renewed) for a free slot so
    /// handlers never wait on a round trip. Released unstarted at shutdown.
    #[arg(long, env = "HERALD_PREFETCH", default_value_t = 0)]
    pub prefetch: usize,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before the process exits
    /// anyway (their leases then expire and other workers re-run them).
    #[arg(long, env = "HERALD_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,

    /// Where to serve `/metrics` (Prometheus text) and `/healthz`. Port 0 picks a free port;
    /// the address is logged at start-up.
    #[arg(long, env = "HERALD_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,

    /// Log as JSON lines instead of human-readable text (level filter: RUST_LOG).
    #[arg(long, env = "HERALD_JSON_LOGS")]
    pub json_logs: bool,

    /// Postgres (state, outbox).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/herald",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Postgres connections this process may open.
    #[arg(long, env = "HERALD_PG_POOL_SIZE", default_value_t = 5)]
    pub pg_pool_size: u32,

    /// Redis: `redis://host:port`, or several comma-separated URLs / `redis+cluster://…` for a
    /// cluster.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Redis key namespace (first segment of every key).
    #[arg(long, env = "HERALD_NAMESPACE", default_value = "herald")]
    pub namespace: String,

    /// Do not run the outbox relay in this process.
    #[arg(long, env = "HERALD_NO_RELAY")]
    pub no_relay: bool,

    /// How often an idle relay looks for new outbox rows, in milliseconds.
    #[arg(long, env = "HERALD_RELAY_POLL_MS", default_value_t = 200)]
    pub relay_poll_ms: u64,

    /// Do not run the reconciler in this process.
    #[arg(long, env = "HERALD_NO_RECONCILER")]
    pub no_reconciler: bool,

    /// Reconciler period in milliseconds (one run per period across the fleet).
    #[arg(long, env = "HERALD_RECONCILE_EVERY_MS", default_value_t = 60_000)]
    pub reconcile_every_ms: u64,

    /// Maintenance period in seconds (pruning; one run per period across the fleet).
    #[arg(long, env = "HERALD_MAINTENANCE_EVERY_SECS", default_value_t = 600)]
    pub maintenance_every_secs: u64,

    /// Finished outbox rows are deleted after this many seconds. The Redis job-key retention
    /// is raised to match when this is longer than its 24 h default, so a row the reconciler
    /// re-publishes is always recognised as a duplicate.
    #[arg(long, env = "HERALD_OUTBOX_RETENTION_SECS", default_value_t = 86_400)]
    pub outbox_retention_secs: u64,

    /// Stored Idempotency-Key responses are deleted after this many seconds.
    #[arg(
        long,
        env = "HERALD_IDEMPOTENCY_RETENTION_SECS",
        default_value_t = 86_400
    )]
    pub idempotency_retention_secs: u64,

    /// Let the diagnostic `probe` job abort the process when asked (fault tests only).
    #[arg(long, env = "HERALD_ALLOW_PROBE_ABORT", hide = true)]
    pub allow_probe_abort: bool,
}

/// The job types this binary has a handler for.
pub const HANDLED: &[&str] = &[
    "call_dispatch",
    "call_release_slot",
    "daily_airtable_cleanup",
    "daily_cleanup",
    "daily_distribute",
    "daily_select",
    "daily_sync",
    "http",
    "lead_generation",
    "noop",
    "probe",
    "sequence_step",
    "whatsapp_send",
];

/// One queue to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlan {
    pub name: QueueName,
    pub concurrency: usize,
    /// The job type's execution timeout.
    pub timeout: Duration,
}

/// What the worker will do, derived from [`Args`] without any IO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub queues: Vec<QueuePlan>,
    pub lease: Duration,
    pub fetch_batch: usize,
    pub prefetch: usize,
    pub drain: Duration,
}

fn known_queues() -> String {
    herald_jobs::job_types()
        .iter()
        .map(|t| t.queue)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `noop=50,http=20`.
pub fn parse_overrides(s: &str) -> Result<BTreeMap<String, usize>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::QueueConcurrency(format!("{part:?} is not QUEUE=N")))?;
        let name = name.trim();
        if herald_jobs::job_type(name).is_none() {
            return Err(ConfigError::QueueConcurrency(format!(
                "unknown queue {name:?}; known queues: {}",
                known_queues()
            )));
        }
        let n: usize = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            ConfigError::QueueConcurrency(format!("{part:?}: N must be a whole number ≥ 1"))
        })?;
        out.insert(name.to_owned(), n);
    }
    Ok(out)
}

impl Plan {
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        if args.concurrency == 0 {
            return Err(ConfigError::Zero {
                flag: "concurrency",
            });
        }
        if args.fetch_batch == 0 {
            return Err(ConfigError::Zero {
                flag: "fetch-batch",
            });
        }
        if args.lease_ms == 0 {
            return Err(ConfigError::Zero { flag: "lease-ms" });
        }
        let overrides = parse_overrides(&args.queue_concurrency)?;
        let names: Vec<&str> = args
            .queues
            .split(',')
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .collect();
        let names: Vec<&str> = if names == ["all"] {
            herald_jobs::job_types().iter().map(|t| t.queue).collect()
        } else {
            names
        };
        if names.is_empty() {
            return Err(ConfigError::NoQueues);
        }
        let mut queues: Vec<QueuePlan> = Vec::new();
        for name in names {
            let Some(job_type) = herald_jobs::job_type(name) else {
                return Err(ConfigError::UnknownQueue {
                    name: name.to_owned(),
                    known: known_queues(),
                });
            };
            if !HANDLED.contains(&name) {
                return Err(ConfigError::NoHandler {
                    name: name.to_owned(),
                });
            }
            if queues.iter().any(|q| q.name.as_str() == name) {
                continue;
            }
            let qname: QueueName = name.parse().map_err(|_| ConfigError::UnknownQueue {
                name: name.to_owned(),
                known: known_queues(),
            })?;
            queues.push(QueuePlan {
                name: qname,
                concurrency: overrides.get(name).copied().unwrap_or(args.concurrency),
                timeout: job_type.timeout,
            });
        }
        for name in overrides.keys() {
            if !queues.iter().any(|q| q.name.as_str() == name) {
                tracing::warn!(queue = %name, "--queue-concurrency names a queue this worker does not serve");
            }
        }
        Ok(Plan {
            queues,
            lease: Duration::from_millis(args.lease_ms),
            fetch_batch: args.fetch_batch,
            prefetch: args.prefetch,
            drain: Duration::from_secs(args.drain_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["herald-worker"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("flags parse")
    }

    #[test]
    fn every_registered_job_type_has_a_handler() {
        for t in herald_jobs::job_types() {
            assert!(
                HANDLED.contains(&t.queue),
                "job type {} is registered but herald-worker has no handler for it (see runtime::serve_queue)",
                t.queue
            );
        }
    }

    #[test]
    fn all_means_every_job_type_with_overrides() {
        let plan = Plan::from_args(&args(&[
            "--queues",
            "all",
            "--concurrency",
            "7",
            "--queue-concurrency",
            "noop=50, probe=3",
        ]))
        .unwrap();
        assert_eq!(plan.queues.len(), herald_jobs::job_types().len());
        let c = |q: &str| {
            plan.queues
                .iter()
                .find(|p| p.name.as_str() == q)
                .unwrap()
                .concurrency
        };
        assert_eq!((c("noop"), c("probe"), c("http")), (50, 3, 7));
        assert!(
            plan.queues
                .iter()
                .all(|q| HANDLED.contains(&q.name.as_str()))
        );
    }

    #[test]
    fn unknown_queues_and_bad_overrides_are_refused_with_a_reason() {
        let e = Plan::from_args(&args(&["--queues", "noop,nope"])).unwrap_err();
        assert!(matches!(&e, ConfigError::UnknownQueue { name, .. } if name == "nope"));
        assert!(e.to_string().contains("known queues"));
        assert_eq!(
            Plan::from_args(&args(&["--queues", " , "])).unwrap_err(),
            ConfigError::NoQueues
        );
        for bad in ["noop", "noop=0", "noop=x", "nope=3"] {
            let e = Plan::from_args(&args(&["--queue-concurrency", bad])).unwrap_err();
            assert!(matches!(e, ConfigError::QueueConcurrency(_)), "{bad}");
        }
        assert!(Plan::from_args(&args(&["--concurrency", "0"])).is_err());
    }

    #[test]
    fn a_queue_listed_twice_is_served_once() {
        let plan = Plan::from_args(&args(&["--queues", "probe,probe"])).unwrap();
        assert_eq!(plan.queues.len(), 1);
        assert_eq!(plan.queues[0].timeout, Duration::from_secs(30));
    }
}
