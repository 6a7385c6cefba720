//! The effect log of the diagnostic `probe` job type: one row per (tenant, effect key) counting
//! how many times the handler ran, so fault tests can prove an effect happened exactly once.

use herald_core::TenantId;
use sqlx::PgPool;

use crate::Error;
use crate::error;

/// Records one run of the effect `effect_key` and returns how many runs it has had, this one
/// included.
pub async fn record(pool: &PgPool, tenant: TenantId, effect_key: &str) -> Result<i32, Error> {
    if effect_key.is_empty() || effect_key.len() > 512 {
        return Err(Error::invalid("effect_key", "must be 1 to 512 bytes"));
    }
    let runs = sqlx::query_scalar(
        "insert into probe_effects (tenant_id, effect_key) values ($1, $2)
         on conflict (tenant_id, effect_key)
         do update set runs = probe_effects.runs + 1, last_at = now()
         returning runs",
    )
    .bind(tenant.0)
    .bind(effect_key)
    .fetch_one(pool)
    .await
    .map_err(error::tenant_must_exist)?;
    Ok(runs)
}

/// How many distinct effects the tenant's probe jobs have recorded.
pub async fn count(pool: &PgPool, tenant: TenantId) -> Result<i64, Error> {
    let count = sqlx::query_scalar("select count(*) from probe_effects where tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(pool)
        .await?;
    Ok(count)
}

/// How many probe runs the tenant has had in total; more than [`count`] means some effect ran
/// twice.
pub async fn total_runs(pool: &PgPool, tenant: TenantId) -> Result<i64, Error> {
    let runs = sqlx::query_scalar(
        "select coalesce(sum(runs), 0)::bigint from probe_effects where tenant_id = $1",
    )
    .bind(tenant.0)
    .fetch_one(pool)
    .await?;
    Ok(runs)
}
