//! Provider sends, whatever the channel: the record that makes a send step effectively-once.
//!
//! A send step writes a send as `attempting` (naming the job that attempts it) *before* it calls
//! the provider, and records the provider's answer after. A job re-delivered after dying between
//! the two finds its own `attempting` send and must not call again: it marks the send
//! `unknown`, and the provider's status webhooks (which carry the send id) settle it.
//!
//! Statuses only move forward: `attempting`/`unknown` → `sent` → `delivered` → `read`, and
//! `failed` from anything not yet delivered; a late or repeated event that would move a send
//! backwards changes nothing. Every function is scoped by tenant.

use std::fmt;
use std::str::FromStr;

use herald_core::TenantId;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::error;

/// The longest provider error kept on a send.
const MAX_ERROR_LEN: usize = 1_000;

/// Where a send stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendStatus {
    /// Recorded before the provider call; the call's outcome is not known yet.
    Attempting,
    /// The call may or may not have reached the provider (the worker died, the connection
    /// dropped mid-request); a status webhook settles it.
    Unknown,
    Sent,
    Delivered,
    Read,
    Failed,
}

impl SendStatus {
    pub const ALL: [SendStatus; 6] = [
        SendStatus::Attempting,
        SendStatus::Unknown,
        SendStatus::Sent,
        SendStatus::Delivered,
        SendStatus::Read,
        SendStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SendStatus::Attempting => "attempting",
            SendStatus::Unknown => "unknown",
            SendStatus::Sent => "sent",
            SendStatus::Delivered => "delivered",
            SendStatus::Read => "read",
            SendStatus::Failed => "failed",
        }
    }

    /// The statuses a send may be in for `self` to replace it: the forward-only rule.
    pub fn may_follow(self) -> &'static [SendStatus] {
        use SendStatus::*;
        match self {
            Attempting => &[],
            Unknown => &[Attempting],
            Sent => &[Attempting, Unknown],
            Delivered => &[Attempting, Unknown, Sent],
            Read => &[Attempting, Unknown, Sent, Delivered],
            Failed => &[Attempting, Unknown, Sent],
        }
    }

    fn names(statuses: &[SendStatus]) -> Vec<&'static str> {
        statuses.iter().map(|s| s.as_str()).collect()
    }
}

impl fmt::Display for SendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SendStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        SendStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| Error::invalid("status", format!("unknown send status {s:?}")))
    }
}

/// A send as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub id: Uuid,
    pub channel: String,
    pub job_id: String,
    pub status: SendStatus,
    pub provider_message_id: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct SendRecord {
    pub(crate) id: Uuid,
    pub(crate) channel: String,
    pub(crate) job_id: String,
    pub(crate) status: String,
    pub(crate) provider_message_id: Option<String>,
    pub(crate) error_code: Option<String>,
    pub(crate) error: Option<String>,
}

impl TryFrom<SendRecord> for Send {
    type Error = Error;
    fn try_from(r: SendRecord) -> Result<Self, Error> {
        let status = r.status.parse().map_err(|_| Error::Corrupt {
            what: "send",
            reason: format!("{}: status {:?}", r.id, r.status),
        })?;
        Ok(Send {
            id: r.id,
            channel: r.channel,
            job_id: r.job_id,
            status,
            provider_message_id: r.provider_message_id,
            error_code: r.error_code,
            error: r.error,
        })
    }
}

/// Records a new send as `attempting` by `job_id`, inside the caller's transaction; returns
/// its id (the send id the provider call carries).
pub async fn begin(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &str,
    job_id: &str,
) -> Result<Uuid, Error> {
    let id = Uuid::now_v7();
    sqlx::query("insert into sends (tenant_id, id, channel, job_id) values ($1, $2, $3, $4)")
        .bind(tenant.0)
        .bind(id)
        .bind(channel)
        .bind(job_id)
        .execute(conn)
        .await
        .map_err(error::tenant_must_exist)?;
    Ok(id)
}

/// The tenant's send `id`, if any.
pub async fn get(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Option<Send>, Error> {
    let record: Option<SendRecord> = sqlx::query_as(
        "select id, channel, job_id, status, provider_message_id, error_code, error
         from sends where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    record.map(Send::try_from).transpose()
}

/// Deletes an `attempting` send the provider certainly did not act on (it refused the request
/// or was never reached), inside the caller's transaction, so the work can be attempted again.
/// Returns whether it was still attempting (and is now gone).
pub async fn abandon(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<bool, Error> {
    let deleted =
        sqlx::query("delete from sends where tenant_id = $1 and id = $2 and status = 'attempting'")
            .bind(tenant.0)
            .bind(id)
            .execute(conn)
            .await?
            .rows_affected();
    Ok(deleted == 1)
}

/// What a status change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    /// The send moved forward.
    Moved,
    /// The send exists but is already at or past that status (a duplicate or a late event).
    Ignored,
    /// No send of this tenant matches.
    NotFound,
}

/// A status change for one send, from the provider's answer or a webhook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusChange {
    /// The send id, when the event carries it.
    pub send_id: Option<Uuid>,
    /// The provider's message id: recorded on the send if it has none, and used to find the
    /// send when the event carries no send id.
    pub provider_message_id: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
}

/// [`apply`]'s statement around the part that finds the send (locked): $1 tenant, $2 channel,
/// $3 send id, $4 provider message id, $5 the statuses that may move, $6 the new status,
/// $7 error code, $8 error. The update names the send's id as a value (`= (select id …)`), not
/// as a join to the part that found it: joined, a plan made for any parameters walks the
/// tenant's sends for the one it wants.
macro_rules! apply_statement {
    ($find:literal) => {
        concat!(
            "with target as (",
            $find,
            " for update), moved as (
                 update sends s set
                     status = case when s.status = any($5) then $6 else s.status end,
                     provider_message_id = coalesce(s.provider_message_id, $4),
                     error_code = case when s.status = any($5) and $6 = 'failed'
                                       then $7 else s.error_code end,
                     error = case when s.status = any($5) and $6 = 'failed'
                                  then $8 else s.error end,
                     updated_at = now()
                 where s.tenant_id = $1 and s.id = (select id from target)
                 returning (select status from target) = any($5) as moved
             )
             select moved from moved"
        )
    };
}

const APPLY_BY_SEND_ID: &str = apply_statement!(
    "select id, status from sends where tenant_id = $1 and id = $3 and channel = $2"
);

const APPLY_BY_PROVIDER_ID: &str = apply_statement!(
    "select id, status from sends
     where tenant_id = $1 and channel = $2 and provider_message_id = $4"
);

/// Moves the tenant's send to `status` if the forward-only rule allows it; found by send id,
/// else by the provider's message id on `channel`. The provider's message id is recorded even
/// when the status does not move (an `unknown` send learns its id from a late `sent`).
pub async fn apply<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    channel: &str,
    status: SendStatus,
    change: &StatusChange,
) -> Result<Applied, Error> {
    if change.send_id.is_none() && change.provider_message_id.is_none() {
        return Ok(Applied::NotFound);
    }
    let from = SendStatus::names(status.may_follow());
    let error_text = change
        .error
        .as_deref()
        .map(|e| e.chars().take(MAX_ERROR_LEN).collect::<String>());
    // One statement: find the send, record the provider id if missing, move the status when
    // allowed, and say which happened. The send is found by its id when the change carries it,
    // else by the provider's message id: two statements, because one that says "by id, or by
    // message id when there is no id" cannot use either index in a plan made for any
    // parameters, and walks the tenant's sends for the one it wants (1 ms per status at 4,000
    // sends, growing with them).
    let statement = if change.send_id.is_some() {
        APPLY_BY_SEND_ID
    } else {
        APPLY_BY_PROVIDER_ID
    };
    let outcome: Option<(bool,)> = sqlx::query_as(statement)
        .bind(tenant.0)
        .bind(channel)
        .bind(change.send_id)
        .bind(change.provider_message_id.as_deref())
        .bind(&from)
        .bind(status.as_str())
        .bind(change.error_code.as_deref())
        .bind(error_text.as_deref())
        .fetch_optional(conn)
        .await
        .map_err(|e| {
            if error::is_unique_violation(&e) {
                Error::Conflict {
                    what: "a send with this provider message id".into(),
                }
            } else {
                Error::Database(e)
            }
        })?;
    Ok(match outcome {
        None => Applied::NotFound,
        Some((true,)) => Applied::Moved,
        Some((false,)) => Applied::Ignored,
    })
}

/// Marks the tenant's `attempting` send `unknown`: its job died (or lost the connection) after
/// the provider may have acted. Returns whether it changed.
pub async fn mark_unknown(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<bool, Error> {
    let applied = apply(
        pool,
        tenant,
        &channel_of(pool, tenant, id).await?.unwrap_or_default(),
        SendStatus::Unknown,
        &StatusChange {
            send_id: Some(id),
            ..StatusChange::default()
        },
    )
    .await?;
    Ok(applied == Applied::Moved)
}

async fn channel_of(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Option<String>, Error> {
    Ok(
        sqlx::query_scalar("select channel from sends where tenant_id = $1 and id = $2")
            .bind(tenant.0)
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_only_move_forward() {
        use SendStatus::*;
        assert!(Read.may_follow().contains(&Delivered));
        assert!(!Delivered.may_follow().contains(&Read));
        assert!(!Sent.may_follow().contains(&Delivered));
        assert!(!Failed.may_follow().contains(&Delivered));
        assert!(!Sent.may_follow().contains(&Failed));
        assert!(!Read.may_follow().contains(&Failed));
        assert!(Sent.may_follow().contains(&Unknown));
        for status in SendStatus::ALL {
            assert_eq!(status.as_str().parse::<SendStatus>().unwrap(), status);
            assert!(!status.may_follow().contains(&status));
        }
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::plans::{rows_discarded, rows_discarded_as, uuid};

    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_status_finds_its_send_by_its_key(pool: PgPool) {
        let tenant = crate::tenants::create(&pool, "acme", "UTC")
            .await
            .unwrap()
            .0
            .id;
        let mut tx = pool.begin().await.unwrap();
        let mut last = Uuid::nil();
        for n in 0..400 {
            last = begin(&mut tx, tenant, "whatsapp", &format!("job-{n}"))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let args = [
            uuid(tenant.0),
            "'whatsapp'".to_owned(),
            uuid(last),
            "null".to_owned(),
            "'{attempting}'".to_owned(),
            "'sent'".to_owned(),
            "null".to_owned(),
            "null".to_owned(),
        ];
        assert_eq!(rows_discarded(&pool, APPLY_BY_SEND_ID, &args).await, 0);
        let mut by_provider_id = args.clone();
        by_provider_id[2] = "null".to_owned();
        by_provider_id[3] = "'wamid.1'".to_owned();
        let types = [
            "uuid", "text", "uuid", "text", "text[]", "text", "text", "text",
        ];
        assert_eq!(
            rows_discarded_as(&pool, APPLY_BY_PROVIDER_ID, &types, &by_provider_id).await,
            0
        );

        // What the statement said before: by id, or by the provider's id when there is none.
        let before = "select id from sends where tenant_id = $1 and channel = $2
                      and (id = $3 or ($3 is null and provider_message_id = $4))";
        let discarded = rows_discarded(&pool, before, &args[..4]).await;
        assert!(
            discarded > 0,
            "the old statement discarded {discarded} rows"
        );
    }
}
