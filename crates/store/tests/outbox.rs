//! The transactional outbox: insertion, relay claims under concurrency, tenant isolation of the
//! tenant-scoped functions, the reconciler's walk and pruning.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use herald_core::{Priority, TenantId};
use herald_store::outbox::{self, NewOutboxJob};
use herald_store::{PgPool, tenants};
use serde_json::json;
use uuid::Uuid;

fn job(n: u32) -> NewOutboxJob {
    NewOutboxJob {
        queue: "probe".parse().expect("valid queue name"),
        payload: json!({ "n": n }),
        payload_version: 1,
        priority: Priority::Normal,
        max_attempts: Some(3),
        run_at: None,
        job_key: Some(format!("key-{n}")),
    }
}

async fn tenant(pool: &PgPool, name: &str) -> anyhow::Result<TenantId> {
    Ok(tenants::create(pool, name, "UTC").await?.0.id)
}

async fn insert_jobs(pool: &PgPool, tenant: TenantId, n: u32) -> anyhow::Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(outbox::insert(&mut tx, tenant, &job(i)).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_inserted_job_exists_only_if_its_transaction_commits(
    pool: PgPool,
) -> anyhow::Result<()> {
    let t = tenant(&pool, "A").await?;
    let mut tx = pool.begin().await?;
    outbox::insert(&mut tx, t, &job(1)).await?;
    tx.rollback().await?;
    let mut tx = pool.begin().await?;
    assert!(outbox::claim_unpublished(&mut tx, 10).await?.is_empty());
    tx.rollback().await?;

    let mut high = job(2);
    high.priority = Priority::High;
    high.run_at = Some(Utc::now());
    let mut tx = pool.begin().await?;
    let id = outbox::insert(&mut tx, t, &high).await?;
    tx.commit().await?;

    let mut tx = pool.begin().await?;
    let rows = outbox::claim_unpublished(&mut tx, 10).await?;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.id, id);
    assert_eq!(row.tenant_id, t);
    assert_eq!(row.queue.as_str(), "probe");
    assert_eq!(row.payload, json!({ "n": 2 }));
    assert_eq!(row.priority, Priority::High);
    assert_eq!(row.max_attempts, Some(3));
    assert_eq!(row.job_key.as_deref(), Some("key-2"));
    assert!(row.run_at.is_some());
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_insert_for_an_unknown_tenant_is_not_found(pool: PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let result = outbox::insert(&mut conn, TenantId::new(), &job(1)).await;
    assert!(
        matches!(result, Err(herald_store::Error::NotFound { .. })),
        "{result:?}"
    );
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn concurrent_relays_claim_disjoint_rows(pool: PgPool) -> anyhow::Result<()> {
    let t = tenant(&pool, "A").await?;
    let ids: HashSet<Uuid> = insert_jobs(&pool, t, 5).await?.into_iter().collect();

    let mut first = pool.begin().await?;
    let mut second = pool.begin().await?;
    let a = outbox::claim_unpublished(&mut first, 3).await?;
    // Without SKIP LOCKED this would wait on the first transaction's locks forever.
    let b = tokio::time::timeout(
        Duration::from_secs(10),
        outbox::claim_unpublished(&mut second, 5),
    )
    .await??;

    let a_ids: HashSet<Uuid> = a.iter().map(|r| r.id).collect();
    let b_ids: HashSet<Uuid> = b.iter().map(|r| r.id).collect();
    assert_eq!(a_ids.len(), 3);
    assert_eq!(b_ids.len(), 2);
    assert!(a_ids.is_disjoint(&b_ids));
    assert_eq!(&a_ids | &b_ids, ids);
    // Oldest first.
    let created: Vec<_> = a.iter().map(|r| r.created_at).collect();
    assert!(created.windows(2).all(|w| w[0] <= w[1]));

    let a_list: Vec<Uuid> = a_ids.iter().copied().collect();
    assert_eq!(outbox::mark_published(&mut first, &a_list).await?, 3);
    first.commit().await?;
    // The second relay died: its rows go back to the pool, the first relay's do not.
    second.rollback().await?;

    let mut again = pool.begin().await?;
    let left: HashSet<Uuid> = outbox::claim_unpublished(&mut again, 10)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, b_ids);
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn another_tenant_cannot_finish_a_tenants_job(pool: PgPool) -> anyhow::Result<()> {
    let a = tenant(&pool, "A").await?;
    let b = tenant(&pool, "B").await?;
    let ids = insert_jobs(&pool, a, 1).await?;
    let mut tx = pool.begin().await?;
    outbox::mark_published(&mut tx, &ids).await?;
    tx.commit().await?;

    assert!(!outbox::mark_completed(&pool, b, ids[0]).await?);
    assert!(!outbox::mark_dead(&pool, b, ids[0], "not yours").await?);
    let unfinished = outbox::published_unfinished(&pool, None, 10).await?;
    assert_eq!(
        unfinished.len(),
        1,
        "tenant B's calls changed tenant A's row"
    );
    assert_eq!(unfinished[0].tenant_id, a);

    assert!(outbox::mark_completed(&pool, a, ids[0]).await?);
    assert!(!outbox::mark_completed(&pool, a, ids[0]).await?);
    assert!(!outbox::mark_dead(&pool, a, ids[0], "too late").await?);
    assert!(
        outbox::published_unfinished(&pool, None, 10)
            .await?
            .is_empty()
    );
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn the_reconciler_pages_through_published_unfinished_rows(
    pool: PgPool,
) -> anyhow::Result<()> {
    let t = tenant(&pool, "A").await?;
    let ids = insert_jobs(&pool, t, 7).await?;
    let mut tx = pool.begin().await?;
    outbox::mark_published(&mut tx, &ids[..6]).await?;
    tx.commit().await?;
    outbox::mark_completed(&pool, t, ids[0]).await?;
    outbox::mark_dead(&pool, t, ids[1], "boom").await?;

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = outbox::published_unfinished(&pool, after, 2).await?;
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.id);
        seen.extend(page.into_iter().map(|r| r.id));
    }
    let mut expected = ids[2..6].to_vec();
    expected.sort();
    assert_eq!(seen, expected);
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn prune_deletes_only_rows_finished_before_the_cutoff(pool: PgPool) -> anyhow::Result<()> {
    let t = tenant(&pool, "A").await?;
    let ids = insert_jobs(&pool, t, 3).await?;
    outbox::mark_completed(&pool, t, ids[0]).await?;
    outbox::mark_dead(&pool, t, ids[1], "boom").await?;

    let before = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(outbox::prune(&pool, before).await?, 0);
    let after = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(outbox::prune(&pool, after).await?, 2);
    assert_eq!(outbox::prune(&pool, after).await?, 0);

    let remaining: Vec<Uuid> = sqlx::query_scalar("select id from outbox")
        .fetch_all(&pool)
        .await?;
    assert_eq!(remaining, [ids[2]]);
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn prune_runs_as_many_batches_as_needed(pool: PgPool) -> anyhow::Result<()> {
    let t = tenant(&pool, "A").await?;
    // More than one batch (5,000) of finished rows, written in one statement for speed.
    sqlx::query(
        "insert into outbox (id, tenant_id, queue, payload, payload_version, completed_at)
         select gen_random_uuid(), $1, 'probe', '{}'::jsonb, 1, now() - interval '1 day'
         from generate_series(1, 12345)",
    )
    .bind(t.0)
    .execute(&pool)
    .await?;
    insert_jobs(&pool, t, 1).await?;
    assert_eq!(outbox::prune(&pool, Utc::now()).await?, 12_345);
    let left: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 1);
    Ok(())
}
