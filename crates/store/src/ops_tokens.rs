//! Ops tokens: bearer tokens for cross-tenant operations. Authentication lives in
//! [`crate::tenants::authenticate`], which knows both kinds of token.

use sqlx::PgPool;
use uuid::Uuid;

use crate::Error;
use crate::tokens;

/// The prefix of every ops token.
pub const TOKEN_PREFIX: &str = "hrdops_";

/// Issues a new ops token and returns it. It is shown this once: only its sha256 is stored.
pub async fn create(pool: &PgPool) -> Result<String, Error> {
    let token = tokens::generate(TOKEN_PREFIX);
    sqlx::query("insert into ops_tokens (id, token_hash) values ($1, $2)")
        .bind(Uuid::now_v7())
        .bind(tokens::hash(&token))
        .execute(pool)
        .await?;
    Ok(token)
}
