//! Stored responses to requests that carried an `Idempotency-Key`: a retried request gets the
//! first response back instead of doing the work twice.

use chrono::{DateTime, Utc};
use herald_core::TenantId;
use sqlx::PgPool;

use crate::Error;
use crate::error;

/// The longest idempotency key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// The response recorded for a key, with the hash of the request that produced it (a reused
/// key with a different request is the caller's error, not a replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub request_hash: String,
    pub status_code: u16,
    pub response: serde_json::Value,
}

/// What [`store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The response was stored.
    Stored,
    /// A response for this key was already there (two identical requests raced); it is
    /// returned, and was left untouched.
    AlreadyStored(StoredResponse),
}

#[derive(sqlx::FromRow)]
struct StoredRecord {
    request_hash: String,
    status_code: i16,
    response: serde_json::Value,
}

impl TryFrom<StoredRecord> for StoredResponse {
    type Error = Error;
    fn try_from(r: StoredRecord) -> Result<Self, Error> {
        let status_code = u16::try_from(r.status_code).map_err(|_| Error::Corrupt {
            what: "idempotency key",
            reason: format!("status code {}", r.status_code),
        })?;
        Ok(StoredResponse {
            request_hash: r.request_hash,
            status_code,
            response: r.response,
        })
    }
}

/// The response stored for the tenant's `key`, if any.
pub async fn lookup(
    pool: &PgPool,
    tenant: TenantId,
    key: &str,
) -> Result<Option<StoredResponse>, Error> {
    let record: Option<StoredRecord> = sqlx::query_as(
        "select request_hash, status_code, response from idempotency_keys
         where tenant_id = $1 and key = $2",
    )
    .bind(tenant.0)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    record.map(StoredResponse::try_from).transpose()
}

/// Holds the tenant's `key` until the transaction `conn` belongs to ends, so two requests with
/// the same key run one after the other: the second then finds the first one's response.
pub async fn lock(conn: &mut sqlx::PgConnection, tenant: TenantId, key: &str) -> Result<(), Error> {
    validate_key(key)?;
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("idempotency:{tenant}:{key}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// Stores the response to the tenant's request under `key`, unless one is already stored.
pub async fn store(
    pool: &PgPool,
    tenant: TenantId,
    key: &str,
    request_hash: &str,
    status_code: u16,
    response: &serde_json::Value,
) -> Result<StoreOutcome, Error> {
    validate_key(key)?;
    if request_hash.is_empty() {
        return Err(Error::invalid("request_hash", "must not be empty"));
    }
    let status = i16::try_from(status_code)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| {
            Error::invalid(
                "status_code",
                format!("{status_code} is not an HTTP status"),
            )
        })?;

    // The existing row can be pruned between the failed insert and the lookup; then the next
    // insert succeeds. Two rounds are enough unless pruning runs with a cut-off in the future.
    for _ in 0..2 {
        let inserted = sqlx::query(
            "insert into idempotency_keys (tenant_id, key, request_hash, status_code, response)
             values ($1, $2, $3, $4, $5)
             on conflict (tenant_id, key) do nothing",
        )
        .bind(tenant.0)
        .bind(key)
        .bind(request_hash)
        .bind(status)
        .bind(response)
        .execute(pool)
        .await
        .map_err(error::tenant_must_exist)?
        .rows_affected();
        if inserted == 1 {
            return Ok(StoreOutcome::Stored);
        }
        if let Some(existing) = lookup(pool, tenant, key).await? {
            return Ok(StoreOutcome::AlreadyStored(existing));
        }
    }
    Err(Error::Conflict {
        what: format!("idempotency key {key:?}"),
    })
}

/// Deletes stored responses created before `older_than`, in bounded batches; returns how many
/// went. A maintenance operation across all tenants: it returns nothing to any tenant.
pub async fn prune(pool: &PgPool, older_than: DateTime<Utc>) -> Result<u64, Error> {
    crate::delete_in_batches(
        pool,
        "delete from idempotency_keys where (tenant_id, key) in (
             select tenant_id, key from idempotency_keys where created_at < $1 limit $2
         )",
        older_than,
    )
    .await
}

fn validate_key(key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_KEY_LEN} bytes"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid(
            "idempotency_key",
            "must not contain control characters",
        ));
    }
    Ok(())
}
