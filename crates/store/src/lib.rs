//! herald's Postgres state: the migrations, tenants and their tokens, the transactional outbox,
//! stored idempotent responses, the probe job's effect log, and the daily VA assignment's
//! profiles, campaigns, assignments and sync ledger.
//!
//! Every query a tenant can reach filters by `tenant_id`. The only cross-tenant functions are
//! the outbox relay, reconciler and pruning operations, which say so in their documentation and
//! never hand rows back to a tenant.

pub mod calls;
pub mod daily;
mod error;
pub mod idempotency;
pub mod messages;
pub mod ops_tokens;
pub mod outbox;
#[cfg(test)]
mod plans;
pub mod probe;
pub mod profiles;
pub mod sends;
pub mod sequences;
pub mod tenants;
mod tokens;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

pub use error::Error;
pub use sqlx::PgPool;

/// The schema migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long a caller waits for a pooled connection before the pool reports an error, so an
/// exhausted pool surfaces as a failure instead of a hang.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many rows one pruning statement deletes, so pruning never holds long locks or builds
/// one huge transaction.
const PRUNE_BATCH: i64 = 5_000;

/// A pooled connection idle for longer than this is checked (one round trip) before it is
/// handed out; one idle for less was checked when it came back to the pool, so it is used as
/// it is. The pool's own check before every hand-out doubled the round trips of a statement.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Opens a connection pool to `url` with at most `max_connections` connections.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, Error> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Creates the database named in `url` if it does not exist yet, by connecting to the
/// `postgres` maintenance database on the same server. Safe to run from several processes at
/// once: losing the race to create it counts as success.
pub async fn ensure_database(url: &str) -> Result<(), Error> {
    let target: PgConnectOptions = url.parse()?;
    // Without an explicit database, Postgres uses the one named after the user.
    let name = target
        .get_database()
        .unwrap_or_else(|| target.get_username())
        .to_owned();
    if name.is_empty() {
        return Err(Error::Invalid {
            field: "database_url",
            reason: "names no database".to_owned(),
        });
    }
    if name == "postgres" {
        return Ok(());
    }

    let mut conn = target.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let create = format!("create database {}", quote_identifier(&name));
        match sqlx::raw_sql(&create).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            Err(err) if is_concurrent_create(&err) => {}
            Err(err) => return Err(err.into()),
        }
    }
    conn.close().await?;
    Ok(())
}

/// Applies every migration not yet applied.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Quotes a Postgres identifier, doubling embedded quotes.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Another process created the database between our check and our `CREATE DATABASE`:
/// `duplicate_database`, or a unique violation on `pg_database` when the two overlap exactly.
fn is_concurrent_create(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "42P04" || code == "23505")
}

/// Runs `delete_batch_sql` (which takes the cut-off instant as `$1` and the batch size as `$2`)
/// until a batch deletes fewer rows than the batch size; returns how many rows went in total.
async fn delete_in_batches(
    pool: &PgPool,
    delete_batch_sql: &'static str,
    older_than: DateTime<Utc>,
) -> Result<u64, Error> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query(delete_batch_sql)
            .bind(older_than)
            .bind(PRUNE_BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}
