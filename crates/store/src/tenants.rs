//! Tenants: creation (with their API token and webhook secret), lookup, bearer-token
//! authentication, and the allow-list of hosts for the built-in `http` job type.

use chrono::{DateTime, Utc};
use herald_core::TenantId;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{self, Error};
use crate::tokens;

/// The prefix of every tenant API token.
pub const TOKEN_PREFIX: &str = "hrd_";

/// The longest bearer token worth hashing; anything longer cannot be one of ours.
const MAX_TOKEN_LEN: usize = 256;

/// A tenant as the rest of herald sees it: no token hash, no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub time_zone: String,
    pub created_at: DateTime<Utc>,
}

/// Who a bearer token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// A tenant's token: may act on that tenant's data only.
    Tenant(TenantId),
    /// An ops token: may run cross-tenant operations.
    Ops,
}

#[derive(sqlx::FromRow)]
struct TenantRecord {
    id: Uuid,
    name: String,
    time_zone: String,
    created_at: DateTime<Utc>,
}

impl From<TenantRecord> for Tenant {
    fn from(r: TenantRecord) -> Self {
        Tenant {
            id: TenantId(r.id),
            name: r.name,
            time_zone: r.time_zone,
            created_at: r.created_at,
        }
    }
}

/// Creates a tenant and returns it with its API token. The token is shown this once: only its
/// sha256 is stored. A name already taken is `Error::Conflict`.
pub async fn create(pool: &PgPool, name: &str, time_zone: &str) -> Result<(Tenant, String), Error> {
    validate_name(name)?;
    validate_time_zone(time_zone)?;
    let token = tokens::generate(TOKEN_PREFIX);
    let record: TenantRecord = sqlx::query_as(
        "insert into tenants (id, name, time_zone, token_hash, hmac_secret)
         values ($1, $2, $3, $4, $5)
         returning id, name, time_zone, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(time_zone)
    .bind(tokens::hash(&token))
    .bind(tokens::generate_secret())
    .fetch_one(pool)
    .await
    .map_err(|err| {
        if error::is_unique_violation(&err) {
            Error::Conflict {
                what: format!("tenant named {name:?}"),
            }
        } else {
            Error::Database(err)
        }
    })?;
    Ok((record.into(), token))
}

/// The tenant with this id, or `Error::NotFound`.
pub async fn get(pool: &PgPool, tenant: TenantId) -> Result<Tenant, Error> {
    let record: Option<TenantRecord> =
        sqlx::query_as("select id, name, time_zone, created_at from tenants where id = $1")
            .bind(tenant.0)
            .fetch_optional(pool)
            .await?;
    record
        .map(Tenant::from)
        .ok_or_else(|| Error::not_found(format!("tenant {tenant}")))
}

/// Every tenant, by name. An ops operation.
pub async fn list(pool: &PgPool) -> Result<Vec<Tenant>, Error> {
    let records: Vec<TenantRecord> =
        sqlx::query_as("select id, name, time_zone, created_at from tenants order by name")
            .fetch_all(pool)
            .await?;
    Ok(records.into_iter().map(Tenant::from).collect())
}

/// The secret the tenant's webhook signatures are checked against, or `Error::NotFound`.
pub async fn hmac_secret(pool: &PgPool, tenant: TenantId) -> Result<String, Error> {
    sqlx::query_scalar("select hmac_secret from tenants where id = $1")
        .bind(tenant.0)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| Error::not_found(format!("tenant {tenant}")))
}

/// Who `token` belongs to: a tenant, an ops user, or nobody (`None`).
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Principal>, Error> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Ok(None);
    }
    let hash = tokens::hash(token);
    let tenant: Option<Uuid> = sqlx::query_scalar("select id from tenants where token_hash = $1")
        .bind(&hash)
        .fetch_optional(pool)
        .await?;
    if let Some(id) = tenant {
        return Ok(Some(Principal::Tenant(TenantId(id))));
    }
    let ops: Option<Uuid> = sqlx::query_scalar("select id from ops_tokens where token_hash = $1")
        .bind(&hash)
        .fetch_optional(pool)
        .await?;
    Ok(ops.map(|_| Principal::Ops))
}

/// Adds `host` to the tenant's allow-list for `http` jobs. Hosts are compared lower-case;
/// adding one twice is not an error. An unknown tenant is `Error::NotFound`.
pub async fn allow_host(pool: &PgPool, tenant: TenantId, host: &str) -> Result<(), Error> {
    let host = normalize_host(host)?;
    sqlx::query(
        "insert into tenant_allowed_hosts (tenant_id, host) values ($1, $2)
         on conflict (tenant_id, host) do nothing",
    )
    .bind(tenant.0)
    .bind(&host)
    .execute(pool)
    .await
    .map_err(error::tenant_must_exist)?;
    Ok(())
}

/// Replaces the tenant's whole allow-list with `hosts` (normalised as [`allow_host`] does), in
/// one transaction: every host is checked before anything changes. Returns the new list, sorted.
pub async fn replace_allowed_hosts(
    pool: &PgPool,
    tenant: TenantId,
    hosts: &[String],
) -> Result<Vec<String>, Error> {
    let mut normalized = hosts
        .iter()
        .map(|h| normalize_host(h))
        .collect::<Result<Vec<_>, _>>()?;
    normalized.sort();
    normalized.dedup();
    let mut tx = pool.begin().await?;
    sqlx::query("delete from tenant_allowed_hosts where tenant_id = $1")
        .bind(tenant.0)
        .execute(&mut *tx)
        .await?;
    sqlx::query("insert into tenant_allowed_hosts (tenant_id, host) select $1, unnest($2::text[])")
        .bind(tenant.0)
        .bind(&normalized)
        .execute(&mut *tx)
        .await
        .map_err(error::tenant_must_exist)?;
    tx.commit().await?;
    Ok(normalized)
}

/// The tenant's allowed hosts, sorted.
pub async fn allowed_hosts(pool: &PgPool, tenant: TenantId) -> Result<Vec<String>, Error> {
    let hosts = sqlx::query_scalar(
        "select host from tenant_allowed_hosts where tenant_id = $1 order by host",
    )
    .bind(tenant.0)
    .fetch_all(pool)
    .await?;
    Ok(hosts)
}

/// Whether the tenant's `http` jobs may call `host`. A malformed host is simply not allowed.
pub async fn is_host_allowed(pool: &PgPool, tenant: TenantId, host: &str) -> Result<bool, Error> {
    let Ok(host) = normalize_host(host) else {
        return Ok(false);
    };
    let allowed = sqlx::query_scalar(
        "select exists (select 1 from tenant_allowed_hosts where tenant_id = $1 and host = $2)",
    )
    .bind(tenant.0)
    .bind(&host)
    .fetch_one(pool)
    .await?;
    Ok(allowed)
}

fn validate_name(name: &str) -> Result<(), Error> {
    let chars = name.chars().count();
    if !(1..=100).contains(&chars) {
        return Err(Error::invalid("name", "must be 1 to 100 characters"));
    }
    if name.trim().is_empty() {
        return Err(Error::invalid("name", "must not be blank"));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn validate_time_zone(time_zone: &str) -> Result<(), Error> {
    if time_zone.trim().is_empty() {
        return Err(Error::invalid("time_zone", "must not be empty"));
    }
    if time_zone.len() > 64
        || time_zone
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::invalid(
            "time_zone",
            "must be an IANA zone name such as Europe/Paris",
        ));
    }
    Ok(())
}

/// A host as stored: lower-case, without a trailing dot; a name or an address, optionally with
/// a port, never a URL.
fn normalize_host(host: &str) -> Result<String, Error> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.len() > 260 {
        return Err(Error::invalid("host", "must be 1 to 260 characters"));
    }
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'));
    if !ok {
        return Err(Error::invalid(
            "host",
            "must be a host name or address, not a URL",
        ));
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("Acme").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("   ").is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name(&"x".repeat(100)).is_ok());
        assert!(validate_name(&"x".repeat(101)).is_err());
    }

    #[test]
    fn hosts_are_normalized_and_urls_refused() {
        assert_eq!(
            normalize_host("API.Example.com.").ok().as_deref(),
            Some("api.example.com")
        );
        assert!(normalize_host("https://example.com/x").is_err());
        assert!(normalize_host("").is_err());
        assert!(normalize_host("user@example.com").is_err());
    }
}
