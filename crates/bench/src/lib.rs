//! Helpers shared by the bench binaries (`herald-bench`, `herald-bench-assign`).

/// Deletes every key of the bench's namespace (SCAN, never KEYS).
pub async fn cleanup(url: &str, namespace: &str) -> anyhow::Result<u64> {
    let client = redis_client(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{namespace}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis_cmd_scan(&mut conn, cursor, &pattern).await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(deleted);
        }
    }
}

fn redis_client(url: &str) -> anyhow::Result<redis::Client> {
    let first = url.split(',').next().unwrap_or(url);
    Ok(redis::Client::open(first)?)
}

async fn redis_cmd_scan(
    conn: &mut redis::aio::MultiplexedConnection,
    cursor: u64,
    pattern: &str,
) -> anyhow::Result<(u64, Vec<String>)> {
    Ok(redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000)
        .query_async(conn)
        .await?)
}
