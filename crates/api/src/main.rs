//! `herald-api`: loads the settings, refuses an evicting Redis, migrates Postgres (unless told
//! not to), serves the router, and drains on SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use herald_api::{ApiConfig, AppState, DEFAULT_BODY_LIMIT, DEFAULT_IMPORT_BODY_LIMIT, router};
use herald_queue::{Client, QueueSettings, RedisTarget};

/// How long in-flight requests get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(20);

/// herald's HTTP API: enqueue jobs, inspect queues and dead jobs, pause and resume queues.
#[derive(Debug, Parser)]
#[command(name = "herald-api", version, about)]
struct Settings {
    /// Address to listen on.
    #[arg(long, env = "HERALD_API_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Postgres URL; the database is created if missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/herald",
        hide_env_values = true
    )]
    database_url: String,
    /// Redis URL (`redis+cluster://a,b,c` for a cluster).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Key namespace in Redis (shared with the workers).
    #[arg(long, env = "HERALD_NAMESPACE", default_value = "herald")]
    namespace: String,
    /// Postgres connections this process may hold (see docs/operations.md, "Connection budget").
    #[arg(long, env = "HERALD_API_PG_POOL_SIZE", default_value_t = 10)]
    pg_pool_size: u32,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "HERALD_API_BODY_LIMIT", default_value_t = DEFAULT_BODY_LIMIT)]
    body_limit: usize,
    /// Largest profile import (`POST /v1/profiles`) accepted, in bytes.
    #[arg(long, env = "HERALD_API_IMPORT_BODY_LIMIT", default_value_t = DEFAULT_IMPORT_BODY_LIMIT)]
    import_body_limit: usize,
    /// Refuse enqueues (503) above this fraction of Redis `maxmemory`.
    #[arg(long, env = "HERALD_MEMORY_HIGH_WATER", default_value_t = 0.85)]
    memory_high_water: f64,
    /// Apply pending migrations at start-up (`--migrate false` or HERALD_MIGRATE=false to skip).
    #[arg(long, env = "HERALD_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    migrate: bool,
    /// Skip migrations at start-up (same as `--migrate false`).
    #[arg(long)]
    no_migrate: bool,
    /// Log as JSON lines.
    #[arg(long, env = "HERALD_JSON_LOGS")]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    init_logging(settings.json_logs);

    herald_store::ensure_database(&settings.database_url)
        .await
        .context("creating the database")?;
    let pool = herald_store::connect(&settings.database_url, settings.pg_pool_size)
        .await
        .context("connecting to Postgres")?;
    if settings.migrate && !settings.no_migrate {
        herald_store::migrate(&pool)
            .await
            .context("migrating Postgres")?;
        tracing::info!("migrations applied");
    }

    let target = RedisTarget::parse(&settings.redis_url).context("REDIS_URL")?;
    let queues = Client::connect(
        target,
        QueueSettings {
            namespace: settings.namespace.clone(),
            memory_high_water: settings.memory_high_water,
            ..QueueSettings::default()
        },
    )
    .await
    .context("connecting to Redis")?;
    queues
        .check_memory_policy()
        .await
        .context("checking Redis's memory policy")?;

    let state = AppState::new(
        pool.clone(),
        queues,
        ApiConfig {
            body_limit: settings.body_limit,
            import_body_limit: settings.import_body_limit,
            ..ApiConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("listening on {}", settings.addr))?;
    tracing::info!(addr = %settings.addr, "herald-api listening");

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = drain_tx.send(());
    });
    let server = tokio::spawn(async move { server.await });
    // Wait for the server to end on its own, or for the drain deadline after a signal.
    let result = tokio::select! {
        result = server => result.context("server task")?.context("serving"),
        () = async {
            let _ = drain_rx.await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::warn!("drain deadline passed; closing open connections");
            Ok(())
        }
    };
    pool.close().await;
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
