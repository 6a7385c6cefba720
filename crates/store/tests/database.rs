//! Creating the database on a fresh server and migrating it.

use herald_store::{connect, ensure_database, migrate};

fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".to_owned())
}

/// `server_url` with its database replaced by `name`.
fn url_for(name: &str) -> String {
    let url = server_url();
    let base = url.split('?').next().unwrap_or(&url);
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    format!("{server}/{name}")
}

#[tokio::test]
async fn ensure_database_creates_a_missing_database_once() -> anyhow::Result<()> {
    let name = format!("herald_ensure_{}", uuid::Uuid::new_v4().simple());
    let url = url_for(&name);

    ensure_database(&url).await?;
    ensure_database(&url).await?; // Already there: still fine.
    let pool = connect(&url, 2).await?;
    migrate(&pool).await?;
    migrate(&pool).await?; // Idempotent.
    let tables: i64 = sqlx::query_scalar(
        "select count(*) from information_schema.tables
         where table_schema = 'public' and table_name in ('tenants', 'outbox')",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(tables, 2);
    pool.close().await;

    let admin = connect(&url_for("postgres"), 1).await?;
    sqlx::raw_sql(&format!("drop database \"{name}\""))
        .execute(&admin)
        .await?;
    Ok(())
}

/// The pool hands a recently used connection out unchecked (no round trip), and checks one
/// that sat idle: a connection the server dropped while idle is replaced, not handed out.
#[tokio::test]
async fn a_connection_dropped_while_idle_is_replaced() -> anyhow::Result<()> {
    let pool = connect(&server_url(), 1).await?;
    let admin = connect(&server_url(), 1).await?;
    let first: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    let terminated: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&admin)
        .await?;
    assert!(terminated);
    // Idle past the check (1 s).
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    let second: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    assert_ne!(first, second, "a new connection replaced the dropped one");
    Ok(())
}
