//! Stored idempotent responses and the probe job's effect log.

use chrono::Utc;
use herald_store::idempotency::{self, StoreOutcome, StoredResponse};
use herald_store::{Error, PgPool, probe, tenants};
use serde_json::json;

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn the_first_stored_response_wins(pool: PgPool) -> anyhow::Result<()> {
    let (a, _) = tenants::create(&pool, "A", "UTC").await?;
    let (b, _) = tenants::create(&pool, "B", "UTC").await?;
    assert_eq!(idempotency::lookup(&pool, a.id, "k1").await?, None);

    let first = json!({ "job_id": "one" });
    let outcome = idempotency::store(&pool, a.id, "k1", "hash-1", 201, &first).await?;
    assert_eq!(outcome, StoreOutcome::Stored);

    let second = json!({ "job_id": "two" });
    let outcome = idempotency::store(&pool, a.id, "k1", "hash-1", 201, &second).await?;
    let stored = StoredResponse {
        request_hash: "hash-1".to_owned(),
        status_code: 201,
        response: first,
    };
    assert_eq!(outcome, StoreOutcome::AlreadyStored(stored.clone()));
    assert_eq!(idempotency::lookup(&pool, a.id, "k1").await?, Some(stored));

    // Keys are per tenant.
    assert_eq!(idempotency::lookup(&pool, b.id, "k1").await?, None);
    assert_eq!(
        idempotency::store(&pool, b.id, "k1", "hash-b", 200, &second).await?,
        StoreOutcome::Stored
    );

    assert!(matches!(
        idempotency::store(&pool, a.id, "k2", "hash", 42, &second).await,
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        idempotency::store(&pool, a.id, "", "hash", 200, &second).await,
        Err(Error::Invalid { .. })
    ));
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn prune_deletes_old_responses(pool: PgPool) -> anyhow::Result<()> {
    let (a, _) = tenants::create(&pool, "A", "UTC").await?;
    idempotency::store(&pool, a.id, "old", "h", 200, &json!({})).await?;
    sqlx::query("update idempotency_keys set created_at = now() - interval '2 days'")
        .execute(&pool)
        .await?;
    idempotency::store(&pool, a.id, "new", "h", 200, &json!({})).await?;

    let cutoff = Utc::now() - chrono::Duration::days(1);
    assert_eq!(idempotency::prune(&pool, cutoff).await?, 1);
    assert_eq!(idempotency::lookup(&pool, a.id, "old").await?, None);
    assert!(idempotency::lookup(&pool, a.id, "new").await?.is_some());
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn probe_effects_count_runs_per_tenant(pool: PgPool) -> anyhow::Result<()> {
    let (a, _) = tenants::create(&pool, "A", "UTC").await?;
    let (b, _) = tenants::create(&pool, "B", "UTC").await?;
    assert_eq!(probe::record(&pool, a.id, "e1").await?, 1);
    assert_eq!(probe::record(&pool, a.id, "e1").await?, 2);
    assert_eq!(probe::record(&pool, a.id, "e2").await?, 1);
    assert_eq!(probe::record(&pool, b.id, "e1").await?, 1);

    assert_eq!(probe::count(&pool, a.id).await?, 2);
    assert_eq!(probe::total_runs(&pool, a.id).await?, 3);
    assert_eq!(probe::count(&pool, b.id).await?, 1);
    assert_eq!(probe::total_runs(&pool, b.id).await?, 1);
    Ok(())
}
