//! The outbox relay and the reconciler. The relay publishes committed outbox rows to Redis with
//! the row id as job id and dedupe key, so a relay that crashes between publishing and marking
//! causes no duplicate work; many relays run at once (one per worker) thanks to `SKIP LOCKED`.
//! The reconciler re-publishes rows Postgres calls pending that Redis no longer knows (after
//! Redis lost its data).

use std::time::Duration;

use herald_core::JobId;
use herald_queue::{Client, NewJob};
use herald_store::outbox::{self, OutboxRow};

/// Rows moved per relay transaction.
pub const RELAY_BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] herald_store::Error),
    #[error(transparent)]
    Queue(#[from] herald_queue::Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn job_for(row: &OutboxRow) -> NewJob {
    let id = JobId::try_from(row.id.simple().to_string()).expect("a simple UUID is a valid job id");
    let max_attempts = row
        .max_attempts
        .or_else(|| crate::job_type(row.queue.as_str()).map(|t| t.max_attempts))
        .unwrap_or(5);
    let mut job = NewJob::raw(
        row.tenant_id,
        row.payload.to_string(),
        row.payload_version,
        max_attempts,
    )
    .id(id)
    .key(
        row.job_key
            .clone()
            .unwrap_or_else(|| format!("outbox:{}", row.id.simple())),
    )
    .priority(row.priority)
    .durable(true);
    if let Some(at) = row.run_at {
        job = job.run_at_ms(at.timestamp_millis().max(0) as u64);
    }
    job
}

/// Publishes one batch of unpublished rows. Returns how many rows it moved.
pub async fn relay_once(pool: &sqlx::PgPool, queues: &Client) -> Result<usize, Error> {
    let mut tx = pool.begin().await?;
    let rows = outbox::claim_unpublished(&mut tx, RELAY_BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut by_queue: std::collections::BTreeMap<String, Vec<&OutboxRow>> = Default::default();
    for row in &rows {
        by_queue.entry(row.queue.to_string()).or_default().push(row);
    }
    for group in by_queue.values() {
        let queue = queues.queue(&group[0].queue);
        queue
            .enqueue_batch(group.iter().map(|r| job_for(r)).collect())
            .await?;
    }
    let ids: Vec<_> = rows.iter().map(|r| r.id).collect();
    outbox::mark_published(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(rows.len())
}

/// Re-publishes every pending outbox row whose job Redis does not have. Returns how many.
pub async fn reconcile(pool: &sqlx::PgPool, queues: &Client) -> Result<usize, Error> {
    let mut after = None;
    let mut republished = 0;
    loop {
        let rows = outbox::published_unfinished(pool, after, RELAY_BATCH).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id);
        let mut by_queue: std::collections::BTreeMap<String, Vec<&OutboxRow>> = Default::default();
        for row in &rows {
            by_queue.entry(row.queue.to_string()).or_default().push(row);
        }
        for group in by_queue.values() {
            let queue = queues.queue(&group[0].queue);
            let jobs: Vec<NewJob> = group.iter().map(|r| job_for(r)).collect();
            let ids: Vec<JobId> = jobs.iter().filter_map(|j| j.id.clone()).collect();
            let missing = queue.missing(&ids).await?;
            if missing.is_empty() {
                continue;
            }
            let lost: Vec<NewJob> = jobs
                .into_iter()
                .filter(|j| j.id.as_ref().is_some_and(|id| missing.contains(id)))
                .collect();
            let out = queue.enqueue_batch(lost).await?;
            republished += out.iter().filter(|e| !e.duplicate).count();
        }
    }
    Ok(republished)
}

/// The Postgres channel a statement-level trigger on `outbox` notifies on every insert
/// (delivered when the inserting transaction commits).
pub const OUTBOX_CHANNEL: &str = "herald_outbox";

/// The relay loop run inside every worker: publish while there is work, then wait for the
/// outbox's notification (or `idle_poll`, whichever comes first), so a committed row reaches
/// Redis within milliseconds instead of a poll interval. The listener holds one connection of
/// its own, outside `pool`; without it (Postgres unreachable) the loop simply polls.
pub async fn run_relay(pool: sqlx::PgPool, queues: Client, idle_poll: Duration) {
    let mut failures = 0u32;
    let mut listener: Option<sqlx::postgres::PgListener> = None;
    loop {
        match relay_once(&pool, &queues).await {
            Ok(n) if n > 0 => {
                failures = 0;
                continue;
            }
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "outbox relay failed; retrying");
            }
        }
        let pause = idle_poll * (1 + failures.min(10));
        if listener.is_none() && failures == 0 {
            listener = listen(&pool).await;
        }
        match listener.as_mut() {
            Some(l) => match tokio::time::timeout(pause, l.try_recv()).await {
                // A notification, or the connection was lost and re-made: look again.
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "outbox listener failed; polling meanwhile");
                    listener = None;
                }
                Err(_) => {}
            },
            None => tokio::time::sleep(pause).await,
        }
    }
}

async fn listen(pool: &sqlx::PgPool) -> Option<sqlx::postgres::PgListener> {
    let options = pool.connect_options().as_ref().clone();
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    let mut listener = match sqlx::postgres::PgListener::connect_with(&own).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "outbox listener unavailable; polling");
            return None;
        }
    };
    match listener.listen(OUTBOX_CHANNEL).await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::debug!(error = %e, "LISTEN failed; polling");
            None
        }
    }
}
