//! Test support: how many rows a statement reads and throws away to find the ones it wants, in
//! the plan the server caches for a prepared statement once it stops planning per call (a
//! generic plan, made for any parameters, on whatever statistics the tables have). A hot
//! statement that finds one row by its key should throw none away; one that walks a campaign
//! or the in-flight outbox for it costs time in proportion to their size, on every call.
//!
//! `HERALD_SHOW_PLANS=1 cargo test -p herald-store --lib plan_tests -- --nocapture` prints the
//! plans.

use serde_json::Value;
use sqlx::PgPool;

/// Runs `sql` as a prepared statement with `args` (SQL literals) under a generic plan, in a
/// transaction that is rolled back, and returns the rows its scans and joins discarded.
pub(crate) async fn rows_discarded(pool: &PgPool, sql: &str, args: &[String]) -> u64 {
    rows_discarded_as(pool, sql, &[], args).await
}

/// [`rows_discarded`] with the parameters' types named, for a statement that does not use
/// every parameter (the server cannot infer the type of one it never sees).
pub(crate) async fn rows_discarded_as(
    pool: &PgPool,
    sql: &str,
    types: &[&str],
    args: &[String],
) -> u64 {
    discarded(&generic_plan(pool, sql, types, args).await)
}

/// The rows `sql`'s generic plan (as [`rows_discarded`]) reads from `relation`, over all its
/// scans of it: a statement that looks one row up by its key reads one.
pub(crate) async fn rows_read_from(
    pool: &PgPool,
    sql: &str,
    args: &[String],
    relation: &str,
) -> u64 {
    read_from(&generic_plan(pool, sql, &[], args).await, relation)
}

/// `explain analyze` of `sql` run as a prepared statement under a generic plan, in a
/// transaction that is rolled back.
async fn generic_plan(pool: &PgPool, sql: &str, types: &[&str], args: &[String]) -> Value {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("set local plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .unwrap();
    let name = format!("walked_{}", uuid::Uuid::new_v4().simple());
    let types = if types.is_empty() {
        String::new()
    } else {
        format!("({})", types.join(", "))
    };
    sqlx::raw_sql(&format!("prepare {name} {types} as {sql}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let (plan,): (Value,) = sqlx::query_as(&format!(
        "explain (analyze, format json) execute {name}({})",
        args.join(", ")
    ))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::raw_sql(&format!("deallocate {name}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    if std::env::var_os("HERALD_SHOW_PLANS").is_some() {
        eprintln!("{plan:#}");
    }
    plan
}

/// The actual rows of the plan's scans of `relation` (not the rows it updates), each times its
/// node's loops.
fn read_from(plan: &Value, relation: &str) -> u64 {
    match plan {
        Value::Object(node) => {
            let scan = node
                .get("Node Type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.contains("Scan"));
            let own = if scan && node.get("Relation Name").and_then(Value::as_str) == Some(relation)
            {
                let rows = node.get("Actual Rows").and_then(Value::as_u64).unwrap_or(0);
                let loops = node
                    .get("Actual Loops")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                rows * loops
            } else {
                0
            };
            own + node.values().map(|v| read_from(v, relation)).sum::<u64>()
        }
        Value::Array(items) => items.iter().map(|v| read_from(v, relation)).sum(),
        _ => 0,
    }
}

/// The plan's "Rows Removed by …" counts, each times its node's loops.
fn discarded(plan: &Value) -> u64 {
    match plan {
        Value::Object(node) => {
            let loops = node
                .get("Actual Loops")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            node.iter()
                .map(|(key, value)| {
                    if key.starts_with("Rows Removed by") {
                        value.as_u64().unwrap_or(0) * loops
                    } else {
                        discarded(value)
                    }
                })
                .sum()
        }
        Value::Array(items) => items.iter().map(discarded).sum(),
        _ => 0,
    }
}

/// A SQL literal for a UUID.
pub(crate) fn uuid(id: uuid::Uuid) -> String {
    format!("'{id}'::uuid")
}
