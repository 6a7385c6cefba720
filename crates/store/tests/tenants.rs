//! Tenants, tokens and the host allow-list against a real, freshly migrated database.

use herald_core::TenantId;
use herald_store::tenants::{self, Principal};
use herald_store::{Error, PgPool, ops_tokens};

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_created_tenant_authenticates_with_its_token(pool: PgPool) -> anyhow::Result<()> {
    let (tenant, token) = tenants::create(&pool, "Acme", "Europe/Paris").await?;
    assert!(token.starts_with("hrd_"));
    assert_eq!(token.len(), 4 + 40);
    assert_eq!(tenant.name, "Acme");
    assert_eq!(tenant.time_zone, "Europe/Paris");

    assert_eq!(
        tenants::authenticate(&pool, &token).await?,
        Some(Principal::Tenant(tenant.id))
    );
    assert_eq!(tenants::authenticate(&pool, "hrd_wrong").await?, None);
    assert_eq!(tenants::authenticate(&pool, "").await?, None);
    assert_eq!(tenants::get(&pool, tenant.id).await?, tenant);

    // Only the hash is stored.
    let stored: String = sqlx::query_scalar("select token_hash from tenants where id = $1")
        .bind(tenant.id.0)
        .fetch_one(&pool)
        .await?;
    assert_ne!(stored, token);
    assert_eq!(stored.len(), 64);
    assert_eq!(tenants::hmac_secret(&pool, tenant.id).await?.len(), 64);
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_duplicate_tenant_name_is_a_conflict(pool: PgPool) -> anyhow::Result<()> {
    tenants::create(&pool, "Acme", "UTC").await?;
    let second = tenants::create(&pool, "Acme", "UTC").await;
    assert!(matches!(second, Err(Error::Conflict { .. })), "{second:?}");
    assert_eq!(tenants::list(&pool).await?.len(), 1);
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn invalid_tenant_input_is_refused(pool: PgPool) -> anyhow::Result<()> {
    for (name, zone) in [
        ("", "UTC"),
        ("a\u{7}b", "UTC"),
        (&*"x".repeat(101), "UTC"),
        ("ok", ""),
    ] {
        let result = tenants::create(&pool, name, zone).await;
        assert!(
            matches!(result, Err(Error::Invalid { .. })),
            "{name:?} {zone:?}: {result:?}"
        );
    }
    assert!(tenants::list(&pool).await?.is_empty());
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_unknown_tenant_is_not_found(pool: PgPool) -> anyhow::Result<()> {
    let missing = TenantId::new();
    assert!(matches!(
        tenants::get(&pool, missing).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        tenants::allow_host(&pool, missing, "example.com").await,
        Err(Error::NotFound { .. })
    ));
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_ops_token_authenticates_as_ops(pool: PgPool) -> anyhow::Result<()> {
    let token = ops_tokens::create(&pool).await?;
    assert!(token.starts_with("hrdops_"));
    assert_eq!(
        tenants::authenticate(&pool, &token).await?,
        Some(Principal::Ops)
    );
    let (_, tenant_token) = tenants::create(&pool, "Acme", "UTC").await?;
    assert_ne!(
        tenants::authenticate(&pool, &tenant_token).await?,
        Some(Principal::Ops)
    );
    Ok(())
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn allowed_hosts_belong_to_one_tenant(pool: PgPool) -> anyhow::Result<()> {
    let (a, _) = tenants::create(&pool, "A", "UTC").await?;
    let (b, _) = tenants::create(&pool, "B", "UTC").await?;
    tenants::allow_host(&pool, a.id, "API.Example.com").await?;
    tenants::allow_host(&pool, a.id, "api.example.com").await?;

    assert_eq!(
        tenants::allowed_hosts(&pool, a.id).await?,
        ["api.example.com"]
    );
    assert!(tenants::is_host_allowed(&pool, a.id, "api.example.com").await?);
    assert!(tenants::is_host_allowed(&pool, a.id, "API.EXAMPLE.COM").await?);
    assert!(!tenants::is_host_allowed(&pool, a.id, "evil.example.com").await?);
    assert!(!tenants::is_host_allowed(&pool, b.id, "api.example.com").await?);
    assert!(tenants::allowed_hosts(&pool, b.id).await?.is_empty());
    assert!(matches!(
        tenants::allow_host(&pool, a.id, "https://x.example.com/").await,
        Err(Error::Invalid { .. })
    ));
    Ok(())
}
