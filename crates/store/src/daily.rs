//! The daily VA assignment's state: campaigns (one per tenant and date) and their stages,
//! assignments of profiles to VA tables and positions, the sync ledger (Airtable record id and
//! sync time per assignment, or Airtable's reason for refusing it), sync batches for the fan-in,
//! and the rolling 7-day cleanup.
//!
//! Functions that take a `&mut PgConnection` run inside the caller's transaction, so the job
//! handlers can write a state change and the outbox rows it creates together. Every query is
//! scoped by `tenant_id`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use herald_core::TenantId;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::error;

/// Airtable takes at most this many records per request: one sync batch.
pub const BATCH_SIZE: u32 = 10;
/// Table numbers are two digits in Airtable table names.
pub const MAX_TABLES: u32 = 99;
/// The longest error text kept on a campaign, batch or assignment.
const MAX_ERROR_LEN: usize = 2_000;

/// A daily campaign's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CampaignId(pub Uuid);

impl fmt::Display for CampaignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for CampaignId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| Error::invalid("campaign_id", format!("{s:?} is not a UUID")))
    }
}

/// Where a campaign is. `Failed` remembers the stage that failed (see [`Campaign::failed_stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Selecting,
    Distributing,
    Syncing,
    Complete,
    Failed,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Selecting => "selecting",
            Stage::Distributing => "distributing",
            Stage::Syncing => "syncing",
            Stage::Complete => "complete",
            Stage::Failed => "failed",
        }
    }
}

impl FromStr for Stage {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "selecting" => Stage::Selecting,
            "distributing" => Stage::Distributing,
            "syncing" => Stage::Syncing,
            "complete" => Stage::Complete,
            "failed" => Stage::Failed,
            other => {
                return Err(Error::Corrupt {
                    what: "campaign stage",
                    reason: other.to_owned(),
                });
            }
        })
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many profiles a campaign takes and how it lays them out; validated once, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    target: u32,
    tables: u32,
    per_table: u32,
}

impl Shape {
    /// `target` profiles over `tables` tables (1..=99) of `per_table` positions;
    /// `target` must fit: 1 ≤ target ≤ tables × per_table.
    pub fn new(target: u32, tables: u32, per_table: u32) -> Result<Self, Error> {
        if !(1..=MAX_TABLES).contains(&tables) {
            return Err(Error::invalid(
                "tables",
                format!("must be 1 to {MAX_TABLES}, got {tables}"),
            ));
        }
        if !(1..=100_000).contains(&per_table) {
            return Err(Error::invalid(
                "per_table",
                format!("must be 1 to 100000, got {per_table}"),
            ));
        }
        let capacity = u64::from(tables) * u64::from(per_table);
        if target == 0 || u64::from(target) > capacity {
            return Err(Error::invalid(
                "target",
                format!("must be 1 to tables × per_table = {capacity}, got {target}"),
            ));
        }
        Ok(Self {
            target,
            tables,
            per_table,
        })
    }

    pub fn target(&self) -> u32 {
        self.target
    }
    pub fn tables(&self) -> u32 {
        self.tables
    }
    pub fn per_table(&self) -> u32 {
        self.per_table
    }
}

/// A campaign's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub target: u32,
    pub selected: u32,
    pub shortfall: u32,
    pub distributed: u32,
    pub batches_total: u32,
    pub batches_done: u32,
    pub synced: u32,
    pub rejected: u32,
}

/// A daily campaign as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Campaign {
    pub id: CampaignId,
    pub tenant_id: TenantId,
    pub date: NaiveDate,
    pub shape: Shape,
    pub stage: Stage,
    /// The stage that failed, while `stage` is `Failed`.
    pub failed_stage: Option<Stage>,
    pub error: Option<String>,
    pub counts: Counts,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// What `GET /v1/campaigns/{id}` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CampaignView {
    pub campaign_id: CampaignId,
    pub date: NaiveDate,
    /// `running`, `complete` or `failed`.
    pub status: &'static str,
    pub stage: Stage,
    /// The stage that failed, when `status` is `failed`.
    pub failed_stage: Option<Stage>,
    /// 0 to 100.
    pub progress: u8,
    pub counts: Counts,
    pub tables: u32,
    pub per_table: u32,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Campaign {
    /// Progress: selecting 0, distributing 10, syncing 20 to 99 by batches finished, complete
    /// 100; a failed campaign shows the progress of the stage that failed.
    pub fn progress(&self) -> u8 {
        let stage = match self.stage {
            Stage::Failed => self.failed_stage.unwrap_or(Stage::Selecting),
            other => other,
        };
        match stage {
            Stage::Selecting | Stage::Failed => 0,
            Stage::Distributing => 10,
            Stage::Syncing => {
                let total = u64::from(self.counts.batches_total.max(1));
                let done = u64::from(self.counts.batches_done).min(total);
                (20 + 79 * done / total) as u8
            }
            Stage::Complete => 100,
        }
    }

    pub fn view(&self) -> CampaignView {
        let status = match self.stage {
            Stage::Complete => "complete",
            Stage::Failed => "failed",
            _ => "running",
        };
        CampaignView {
            campaign_id: self.id,
            date: self.date,
            status,
            stage: self.stage,
            failed_stage: self.failed_stage,
            progress: self.progress(),
            counts: self.counts,
            tables: self.shape.tables,
            per_table: self.shape.per_table,
            error: self.error.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            completed_at: self.completed_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct CampaignRecord {
    tenant_id: Uuid,
    id: Uuid,
    campaign_date: NaiveDate,
    target: i32,
    tables: i32,
    per_table: i32,
    stage: String,
    failed_stage: Option<String>,
    error: Option<String>,
    selected: i32,
    shortfall: i32,
    distributed: i32,
    batches_total: i32,
    batches_done: i32,
    synced: i32,
    rejected: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
}

const CAMPAIGN_COLUMNS: &str = "tenant_id, id, campaign_date, target, tables, per_table, stage, \
     failed_stage, error, selected, shortfall, distributed, batches_total, batches_done, synced, \
     rejected, created_at, updated_at, completed_at";

fn count(what: &'static str, n: i32) -> Result<u32, Error> {
    u32::try_from(n).map_err(|_| Error::Corrupt {
        what,
        reason: format!("negative count {n}"),
    })
}

impl TryFrom<CampaignRecord> for Campaign {
    type Error = Error;
    fn try_from(r: CampaignRecord) -> Result<Self, Error> {
        let shape = Shape::new(
            count("campaign target", r.target)?,
            count("campaign tables", r.tables)?,
            count("campaign per_table", r.per_table)?,
        )
        .map_err(|e| Error::Corrupt {
            what: "campaign shape",
            reason: e.to_string(),
        })?;
        Ok(Campaign {
            id: CampaignId(r.id),
            tenant_id: TenantId(r.tenant_id),
            date: r.campaign_date,
            stage: r.stage.parse()?,
            failed_stage: r.failed_stage.as_deref().map(str::parse).transpose()?,
            error: r.error,
            counts: Counts {
                target: shape.target,
                selected: count("campaign count", r.selected)?,
                shortfall: count("campaign count", r.shortfall)?,
                distributed: count("campaign count", r.distributed)?,
                batches_total: count("campaign count", r.batches_total)?,
                batches_done: count("campaign count", r.batches_done)?,
                synced: count("campaign count", r.synced)?,
                rejected: count("campaign count", r.rejected)?,
            },
            shape,
            created_at: r.created_at,
            updated_at: r.updated_at,
            completed_at: r.completed_at,
        })
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_ERROR_LEN {
        return s;
    }
    let mut end = MAX_ERROR_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Today's date in an IANA time zone (e.g. `Europe/Paris`).
pub fn today_in(time_zone: &str, now: DateTime<Utc>) -> Result<NaiveDate, Error> {
    let zone: chrono_tz::Tz = time_zone.parse().map_err(|_| {
        Error::invalid(
            "time_zone",
            format!("{time_zone:?} is not an IANA time zone"),
        )
    })?;
    Ok(now.with_timezone(&zone).date_naive())
}

/// Today's date for the tenant, in its time zone (UTC when the stored zone is unknown).
pub async fn tenant_today(pool: &PgPool, tenant: TenantId) -> Result<NaiveDate, Error> {
    let tenant = crate::tenants::get(pool, tenant).await?;
    let now = Utc::now();
    Ok(today_in(&tenant.time_zone, now).unwrap_or_else(|_| now.date_naive()))
}

// ---------------------------------------------------------------------------------------------
// Campaigns

/// Inserts the tenant's campaign for `date` unless one exists; returns it and whether it is new.
/// Run it in the transaction that writes the select job's outbox row, and write that row only
/// when the campaign is new.
pub async fn insert_campaign(
    conn: &mut PgConnection,
    tenant: TenantId,
    date: NaiveDate,
    shape: Shape,
) -> Result<(Campaign, bool), Error> {
    let inserted: Option<CampaignRecord> = sqlx::query_as(&format!(
        "insert into daily_campaigns (tenant_id, id, campaign_date, target, tables, per_table)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (tenant_id, campaign_date) do nothing
         returning {CAMPAIGN_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(date)
    .bind(shape.target as i32)
    .bind(shape.tables as i32)
    .bind(shape.per_table as i32)
    .fetch_optional(&mut *conn)
    .await
    .map_err(error::tenant_must_exist)?;
    if let Some(record) = inserted {
        return Ok((record.try_into()?, true));
    }
    let existing: CampaignRecord = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from daily_campaigns where tenant_id = $1 and campaign_date = $2"
    ))
    .bind(tenant.0)
    .bind(date)
    .fetch_one(&mut *conn)
    .await?;
    Ok((existing.try_into()?, false))
}

/// The tenant's campaign, or `Error::NotFound` (also for another tenant's campaign).
pub async fn get(pool: &PgPool, tenant: TenantId, id: CampaignId) -> Result<Campaign, Error> {
    let mut conn = pool.acquire().await?;
    fetch(&mut conn, tenant, id, false).await
}

/// The tenant's campaign as the progress endpoint reports it.
pub async fn view(pool: &PgPool, tenant: TenantId, id: CampaignId) -> Result<CampaignView, Error> {
    Ok(get(pool, tenant, id).await?.view())
}

/// The tenant's campaign for `date`, if any.
pub async fn get_by_date(
    pool: &PgPool,
    tenant: TenantId,
    date: NaiveDate,
) -> Result<Option<Campaign>, Error> {
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from daily_campaigns where tenant_id = $1 and campaign_date = $2"
    ))
    .bind(tenant.0)
    .bind(date)
    .fetch_optional(pool)
    .await?;
    record.map(Campaign::try_from).transpose()
}

/// The tenant's campaigns, newest first, at most `limit` (1 to 500).
pub async fn list(pool: &PgPool, tenant: TenantId, limit: i64) -> Result<Vec<Campaign>, Error> {
    let records: Vec<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from daily_campaigns where tenant_id = $1
         order by created_at desc, id desc limit $2"
    ))
    .bind(tenant.0)
    .bind(limit.clamp(1, 500))
    .fetch_all(pool)
    .await?;
    records.into_iter().map(Campaign::try_from).collect()
}

/// Reads the campaign, locking its row for the rest of the transaction when `lock` is set: the
/// stage changes of one campaign are serialised on this lock.
pub async fn fetch(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
    lock: bool,
) -> Result<Campaign, Error> {
    let suffix = if lock { " for update" } else { "" };
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from daily_campaigns where tenant_id = $1 and id = $2{suffix}"
    ))
    .bind(tenant.0)
    .bind(id.0)
    .fetch_optional(conn)
    .await?;
    record
        .map(Campaign::try_from)
        .transpose()?
        .ok_or_else(|| Error::not_found(format!("campaign {id}")))
}

/// Marks the campaign failed in `stage` with `error`, unless it is already complete or failed.
/// Returns whether it changed.
pub async fn fail(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
    stage: Stage,
    error: &str,
) -> Result<bool, Error> {
    let updated = sqlx::query(
        "update daily_campaigns
         set stage = 'failed', failed_stage = $3, error = $4, updated_at = now()
         where tenant_id = $1 and id = $2 and stage not in ('complete', 'failed')",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(stage.as_str())
    .bind(truncate(error))
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// What a resume has to re-run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// The stage the campaign is back in.
    pub stage: Stage,
    /// For a failed sync: the batches set back to pending, as (table, batch).
    pub batches: Vec<(u32, u32)>,
}

/// Puts a failed campaign back into the stage that failed, clearing the error, and (for the sync
/// stage) sets its failed batches back to pending. Finished work is left alone. A campaign that
/// is not failed is `Error::Conflict`. Write the re-run's outbox rows in the same transaction.
pub async fn resume(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
) -> Result<Resumed, Error> {
    let campaign = fetch(conn, tenant, id, true).await?;
    let Some(stage) = campaign
        .failed_stage
        .filter(|_| campaign.stage == Stage::Failed)
    else {
        return Err(Error::Conflict {
            what: format!(
                "campaign {id} is {} and cannot be resumed; only a failed campaign",
                campaign.stage
            ),
        });
    };
    sqlx::query(
        "update daily_campaigns set stage = $3, failed_stage = null, error = null,
                updated_at = now()
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(stage.as_str())
    .execute(&mut *conn)
    .await?;
    let mut batches = Vec::new();
    if stage == Stage::Syncing {
        let rows: Vec<(i32, i32)> = sqlx::query_as(
            "update sync_batches set status = 'pending', error = null, updated_at = now()
             where tenant_id = $1 and campaign_id = $2 and status = 'failed'
             returning table_no, batch_no",
        )
        .bind(tenant.0)
        .bind(id.0)
        .fetch_all(&mut *conn)
        .await?;
        batches = rows
            .into_iter()
            .map(|(t, b)| (t.max(0) as u32, b.max(0) as u32))
            .collect();
        batches.sort_unstable();
        // Batches that finished while the campaign was failed may have been the last ones.
        if batches.is_empty() && campaign.counts.batches_done >= campaign.counts.batches_total {
            sqlx::query(
                "update daily_campaigns set stage = 'complete', completed_at = now()
                 where tenant_id = $1 and id = $2",
            )
            .bind(tenant.0)
            .bind(id.0)
            .execute(&mut *conn)
            .await?;
            return Ok(Resumed {
                stage: Stage::Complete,
                batches,
            });
        }
    }
    Ok(Resumed { stage, batches })
}

// ---------------------------------------------------------------------------------------------
// Select

/// Takes up to the campaign's target of the tenant's unused profiles (skipping rows another
/// transaction holds), marks them used by this campaign and creates their assignments with
/// table 0. Returns how many it took. Run it in the transaction that moves the campaign on.
pub async fn take_unused_profiles(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: &Campaign,
) -> Result<u32, Error> {
    let taken = sqlx::query(
        "with picked as (
             select id from profiles
             where tenant_id = $1 and used_on is null
             order by id
             limit $2
             for update skip locked
         ), used as (
             update profiles p set used_on = $3, used_by = $4
             from picked
             where p.tenant_id = $1 and p.id = picked.id
             returning p.id
         )
         insert into assignments (tenant_id, campaign_id, profile_id, campaign_date)
         select $1, $4, id, $3 from used",
    )
    .bind(tenant.0)
    .bind(i64::from(campaign.shape.target))
    .bind(campaign.date)
    .bind(campaign.id.0)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(u32::try_from(taken).unwrap_or(u32::MAX))
}

/// How many assignments the campaign has (selected profiles).
pub async fn assignment_count(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
) -> Result<u32, Error> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from assignments where tenant_id = $1 and campaign_id = $2",
    )
    .bind(tenant.0)
    .bind(id.0)
    .fetch_one(conn)
    .await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// Records the selection and moves the campaign from `selecting` to `distributing`.
pub async fn finish_selecting(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
    selected: u32,
    shortfall: u32,
) -> Result<(), Error> {
    sqlx::query(
        "update daily_campaigns
         set stage = 'distributing', selected = $3, shortfall = $4, updated_at = now()
         where tenant_id = $1 and id = $2 and stage = 'selecting'",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(selected as i32)
    .bind(shortfall as i32)
    .execute(conn)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Distribute

/// The campaign's selected profiles not yet placed in a table, by profile id.
pub async fn unplaced_profiles(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
) -> Result<Vec<Uuid>, Error> {
    let ids = sqlx::query_scalar(
        "select profile_id from assignments
         where tenant_id = $1 and campaign_id = $2 and table_no = 0
         order by profile_id",
    )
    .bind(tenant.0)
    .bind(id.0)
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// One profile's place: table 1..=tables, position 1..=per_table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub profile_id: Uuid,
    pub table_no: u32,
    pub position: u32,
}

/// One sync batch: at most [`BATCH_SIZE`] consecutive positions of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BatchRef {
    pub table_no: u32,
    /// From 1: positions `(batch_no - 1) * 10 + 1 ..= batch_no * 10`.
    pub batch_no: u32,
}

impl BatchRef {
    pub fn of_position(table_no: u32, position: u32) -> Self {
        Self {
            table_no,
            batch_no: position.saturating_sub(1) / BATCH_SIZE + 1,
        }
    }

    fn positions(&self) -> (i32, i32) {
        let first = (self.batch_no.saturating_sub(1) * BATCH_SIZE + 1) as i32;
        (first, first + BATCH_SIZE as i32 - 1)
    }
}

/// Places the campaign's unplaced assignments, creates the sync batches they fall into and
/// moves the campaign from `distributing` to `syncing`. Only assignments still at table 0 move,
/// so a re-run changes nothing. Returns the batches created.
pub async fn place(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
    placements: &[Placement],
) -> Result<Vec<(BatchRef, u32)>, Error> {
    let profile_ids: Vec<Uuid> = placements.iter().map(|p| p.profile_id).collect();
    let tables: Vec<i32> = placements.iter().map(|p| p.table_no as i32).collect();
    let positions: Vec<i32> = placements.iter().map(|p| p.position as i32).collect();
    sqlx::query(
        "update assignments a set table_no = p.table_no, position = p.position
         from unnest($3::uuid[], $4::int[], $5::int[]) as p(profile_id, table_no, position)
         where a.tenant_id = $1 and a.campaign_id = $2 and a.profile_id = p.profile_id
           and a.table_no = 0",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(&profile_ids)
    .bind(&tables)
    .bind(&positions)
    .execute(&mut *conn)
    .await?;

    let mut batches: std::collections::BTreeMap<BatchRef, u32> = Default::default();
    for p in placements {
        *batches
            .entry(BatchRef::of_position(p.table_no, p.position))
            .or_default() += 1;
    }
    let batch_tables: Vec<i32> = batches.keys().map(|b| b.table_no as i32).collect();
    let batch_nos: Vec<i32> = batches.keys().map(|b| b.batch_no as i32).collect();
    let sizes: Vec<i32> = batches.values().map(|n| *n as i32).collect();
    sqlx::query(
        "insert into sync_batches (tenant_id, campaign_id, table_no, batch_no, records)
         select $1, $2, * from unnest($3::int[], $4::int[], $5::int[])
         on conflict do nothing",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(&batch_tables)
    .bind(&batch_nos)
    .bind(&sizes)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "update daily_campaigns
         set stage = 'syncing', distributed = $3, batches_total = $4, updated_at = now()
         where tenant_id = $1 and id = $2 and stage = 'distributing'",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(placements.len() as i32)
    .bind(batches.len() as i32)
    .execute(&mut *conn)
    .await?;
    Ok(batches.into_iter().collect())
}

/// The campaign's assignments with their places, by table then position.
pub async fn placements(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
) -> Result<Vec<Placement>, Error> {
    let rows: Vec<(Uuid, i32, i32)> = sqlx::query_as(
        "select profile_id, table_no, position from assignments
         where tenant_id = $1 and campaign_id = $2
         order by table_no, position, profile_id",
    )
    .bind(tenant.0)
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(profile_id, t, p)| Placement {
            profile_id,
            table_no: t.max(0) as u32,
            position: p.max(0) as u32,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Sync

/// A sync batch's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchStatus {
    Pending,
    Synced,
    Rejected,
    Failed,
}

impl FromStr for BatchStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "pending" => BatchStatus::Pending,
            "synced" => BatchStatus::Synced,
            "rejected" => BatchStatus::Rejected,
            "failed" => BatchStatus::Failed,
            other => {
                return Err(Error::Corrupt {
                    what: "sync batch status",
                    reason: other.to_owned(),
                });
            }
        })
    }
}

/// One record to push to Airtable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    pub profile_id: Uuid,
    pub username: String,
    pub full_name: Option<String>,
    pub position: u32,
    pub campaign_date: NaiveDate,
    /// `assigned` or `unfollow`.
    pub status: String,
}

/// A batch's status and its records, by position.
pub async fn batch(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
    batch: BatchRef,
) -> Result<(BatchStatus, Vec<SyncRecord>), Error> {
    let status: Option<String> = sqlx::query_scalar(
        "select status from sync_batches
         where tenant_id = $1 and campaign_id = $2 and table_no = $3 and batch_no = $4",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(batch.table_no as i32)
    .bind(batch.batch_no as i32)
    .fetch_optional(pool)
    .await?;
    let status: BatchStatus = status
        .ok_or_else(|| {
            Error::not_found(format!(
                "batch {} of table {} in campaign {id}",
                batch.batch_no, batch.table_no
            ))
        })?
        .parse()?;
    let (first, last) = batch.positions();
    let rows: Vec<(Uuid, String, Option<String>, i32, NaiveDate, String)> = sqlx::query_as(
        "select a.profile_id, p.username, p.full_name, a.position, a.campaign_date, a.status
         from assignments a
         join profiles p on p.tenant_id = a.tenant_id and p.id = a.profile_id
         where a.tenant_id = $1 and a.campaign_id = $2 and a.table_no = $3
           and a.position between $4 and $5
         order by a.position",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(batch.table_no as i32)
    .bind(first)
    .bind(last)
    .fetch_all(pool)
    .await?;
    Ok((
        status,
        rows.into_iter()
            .map(
                |(profile_id, username, full_name, position, campaign_date, status)| SyncRecord {
                    profile_id,
                    username,
                    full_name,
                    position: position.max(0) as u32,
                    campaign_date,
                    status,
                },
            )
            .collect(),
    ))
}

/// What recording a batch's outcome did to the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanIn {
    /// The batch was pending and now has its final state (false on a re-run).
    pub recorded: bool,
    /// This call finished the campaign's last batch and completed the campaign.
    pub completed_campaign: bool,
}

/// A batch's final state and what it adds to the campaign's counts.
struct BatchOutcome<'a> {
    status: BatchStatus,
    error: Option<&'a str>,
    synced: u32,
    rejected: u32,
}

async fn finish_batch(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: CampaignId,
    batch: BatchRef,
    outcome: BatchOutcome<'_>,
) -> Result<FanIn, Error> {
    let BatchOutcome {
        status,
        error,
        synced,
        rejected,
    } = outcome;
    // The campaign row lock serialises the fan-in: whichever batch finishes last sees every
    // other batch done, whatever the commit order.
    let campaign = fetch(conn, tenant, id, true).await?;
    let status_text = match status {
        BatchStatus::Synced => "synced",
        BatchStatus::Rejected => "rejected",
        BatchStatus::Failed => "failed",
        BatchStatus::Pending => "pending",
    };
    let recorded = sqlx::query(
        "update sync_batches set status = $5, error = $6, updated_at = now()
         where tenant_id = $1 and campaign_id = $2 and table_no = $3 and batch_no = $4
           and status in ('pending', 'failed')",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(batch.table_no as i32)
    .bind(batch.batch_no as i32)
    .bind(status_text)
    .bind(error.map(truncate))
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !recorded {
        return Ok(FanIn {
            recorded,
            completed_campaign: false,
        });
    }
    // A campaign another batch failed stays failed until it is resumed; it still counts
    // this batch, so the resume re-runs only the failed ones.
    let done = campaign.counts.batches_done + 1;
    let completes = campaign.stage == Stage::Syncing && done >= campaign.counts.batches_total;
    sqlx::query(
        "update daily_campaigns
         set batches_done = batches_done + 1, synced = synced + $3, rejected = rejected + $4,
             stage = case when $5 then 'complete' else stage end,
             completed_at = case when $5 then now() else completed_at end,
             updated_at = now()
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(synced as i32)
    .bind(rejected as i32)
    .bind(completes)
    .execute(&mut *conn)
    .await?;
    Ok(FanIn {
        recorded,
        completed_campaign: completes,
    })
}

/// Records a batch Airtable accepted: each assignment's Airtable record id and sync time, then
/// the fan-in (the campaign completes when this was its last batch). Idempotent: a batch
/// already recorded changes nothing.
pub async fn record_synced(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
    batch: BatchRef,
    records: &[(Uuid, String)],
) -> Result<FanIn, Error> {
    let mut tx = pool.begin().await?;
    let fan_in = finish_batch(
        &mut tx,
        tenant,
        id,
        batch,
        BatchOutcome {
            status: BatchStatus::Synced,
            error: None,
            synced: records.len() as u32,
            rejected: 0,
        },
    )
    .await?;
    if fan_in.recorded {
        let profile_ids: Vec<Uuid> = records.iter().map(|(p, _)| *p).collect();
        let record_ids: Vec<&str> = records.iter().map(|(_, r)| r.as_str()).collect();
        sqlx::query(
            "update assignments a
             set airtable_record_id = r.record_id, synced_at = now(), sync_error = null
             from unnest($3::uuid[], $4::text[]) as r(profile_id, record_id)
             where a.tenant_id = $1 and a.campaign_id = $2 and a.profile_id = r.profile_id",
        )
        .bind(tenant.0)
        .bind(id.0)
        .bind(&profile_ids)
        .bind(&record_ids)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(fan_in)
}

/// Records a batch Airtable refused (a 422): every record of it carries Airtable's error, the
/// batch counts as done for the fan-in.
pub async fn record_rejected(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
    batch: BatchRef,
    error: &str,
) -> Result<FanIn, Error> {
    let mut tx = pool.begin().await?;
    let (first, last) = batch.positions();
    let rejected: i64 = sqlx::query_scalar(
        "select count(*) from assignments
         where tenant_id = $1 and campaign_id = $2 and table_no = $3
           and position between $4 and $5",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(batch.table_no as i32)
    .bind(first)
    .bind(last)
    .fetch_one(&mut *tx)
    .await?;
    let fan_in = finish_batch(
        &mut tx,
        tenant,
        id,
        batch,
        BatchOutcome {
            status: BatchStatus::Rejected,
            error: Some(error),
            synced: 0,
            rejected: u32::try_from(rejected).unwrap_or(0),
        },
    )
    .await?;
    if fan_in.recorded {
        sqlx::query(
            "update assignments set sync_error = $6
             where tenant_id = $1 and campaign_id = $2 and table_no = $3
               and position between $4 and $5",
        )
        .bind(tenant.0)
        .bind(id.0)
        .bind(batch.table_no as i32)
        .bind(first)
        .bind(last)
        .bind(truncate(error))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(fan_in)
}

/// Records a batch that ran out of attempts (Airtable kept failing): the batch is `failed` and
/// the campaign fails in `syncing`, to be resumed once the cause is fixed.
pub async fn record_batch_failed(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
    batch: BatchRef,
    error: &str,
) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    fetch(&mut tx, tenant, id, true).await?;
    sqlx::query(
        "update sync_batches set status = 'failed', error = $5, updated_at = now()
         where tenant_id = $1 and campaign_id = $2 and table_no = $3 and batch_no = $4
           and status = 'pending'",
    )
    .bind(tenant.0)
    .bind(id.0)
    .bind(batch.table_no as i32)
    .bind(batch.batch_no as i32)
    .bind(truncate(error))
    .execute(&mut *tx)
    .await?;
    let message = format!(
        "batch {} of table {} failed: {error}",
        batch.batch_no, batch.table_no
    );
    fail(&mut tx, tenant, id, Stage::Syncing, &message).await?;
    tx.commit().await?;
    Ok(())
}

/// The campaign's batches with their status, by table and batch.
pub async fn batches(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
) -> Result<Vec<(BatchRef, BatchStatus, Option<String>)>, Error> {
    let rows: Vec<(i32, i32, String, Option<String>)> = sqlx::query_as(
        "select table_no, batch_no, status, error from sync_batches
         where tenant_id = $1 and campaign_id = $2 order by table_no, batch_no",
    )
    .bind(tenant.0)
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(t, b, status, error)| {
            Ok((
                BatchRef {
                    table_no: t.max(0) as u32,
                    batch_no: b.max(0) as u32,
                },
                status.parse()?,
                error,
            ))
        })
        .collect()
}

/// One assignment's sync ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub profile_id: Uuid,
    pub table_no: u32,
    pub position: u32,
    pub status: String,
    pub airtable_record_id: Option<String>,
    pub synced_at: Option<DateTime<Utc>>,
    pub sync_error: Option<String>,
}

/// The campaign's sync ledger, by table and position.
pub async fn ledger(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
) -> Result<Vec<LedgerEntry>, Error> {
    type Row = (
        Uuid,
        i32,
        i32,
        String,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "select profile_id, table_no, position, status, airtable_record_id, synced_at, sync_error
         from assignments where tenant_id = $1 and campaign_id = $2
         order by table_no, position",
    )
    .bind(tenant.0)
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(profile_id, t, p, status, airtable_record_id, synced_at, sync_error)| LedgerEntry {
                profile_id,
                table_no: t.max(0) as u32,
                position: p.max(0) as u32,
                status,
                airtable_record_id,
                synced_at,
                sync_error,
            },
        )
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Cleanup

/// An assignment whose Airtable record cleanup has to change or delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AirtableRef {
    pub table_no: u32,
    pub profile_id: Uuid,
    pub record_id: String,
}

/// What one cleanup run changed in Postgres.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Assignments marked `unfollow` (7 days old).
    pub unfollowed: u64,
    /// Assignments deleted (8 or more days old).
    pub deleted: u64,
    /// Synced records of newly unfollowed assignments, whose Airtable status must change.
    pub to_unfollow: Vec<AirtableRef>,
    /// Synced records of deleted assignments, to delete from Airtable.
    pub to_delete: Vec<AirtableRef>,
}

/// The rolling 7-day window for the tenant, as of `today`: assignments of campaigns dated 7
/// days ago are marked `unfollow`, those 8 or more days old are deleted (with their campaigns'
/// sync batches). Idempotent: a second run the same day changes nothing. Profiles stay used.
/// Write the Airtable follow-up jobs in the same transaction.
pub async fn cleanup(
    conn: &mut PgConnection,
    tenant: TenantId,
    today: NaiveDate,
) -> Result<Cleanup, Error> {
    let unfollow_on = today - chrono::Days::new(7);
    let delete_through = today - chrono::Days::new(8);
    let unfollowed: Vec<(i32, Uuid, Option<String>)> = sqlx::query_as(
        "update assignments set status = 'unfollow'
         where tenant_id = $1 and status = 'assigned'
           and campaign_date <= $2 and campaign_date > $3
         returning table_no, profile_id, airtable_record_id",
    )
    .bind(tenant.0)
    .bind(unfollow_on)
    .bind(delete_through)
    .fetch_all(&mut *conn)
    .await?;
    let deleted: Vec<(i32, Uuid, Option<String>)> = sqlx::query_as(
        "delete from assignments where tenant_id = $1 and campaign_date <= $2
         returning table_no, profile_id, airtable_record_id",
    )
    .bind(tenant.0)
    .bind(delete_through)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query(
        "delete from sync_batches b using daily_campaigns c
         where b.tenant_id = $1 and c.tenant_id = $1 and b.campaign_id = c.id
           and c.campaign_date <= $2",
    )
    .bind(tenant.0)
    .bind(delete_through)
    .execute(&mut *conn)
    .await?;
    let refs = |rows: &[(i32, Uuid, Option<String>)]| -> Vec<AirtableRef> {
        let mut refs: Vec<AirtableRef> = rows
            .iter()
            .filter_map(|(t, p, r)| {
                r.as_ref().map(|record_id| AirtableRef {
                    table_no: (*t).max(0) as u32,
                    profile_id: *p,
                    record_id: record_id.clone(),
                })
            })
            .collect();
        refs.sort_by(|a, b| (a.table_no, &a.record_id).cmp(&(b.table_no, &b.record_id)));
        refs
    };
    Ok(Cleanup {
        unfollowed: unfollowed.len() as u64,
        deleted: deleted.len() as u64,
        to_unfollow: refs(&unfollowed),
        to_delete: refs(&deleted),
    })
}

/// Cross-tenant, for the daily cleanup schedule: every tenant that has assignments, with its
/// time zone. Returns no tenant data beyond that.
pub async fn tenants_with_assignments(pool: &PgPool) -> Result<Vec<(TenantId, String)>, Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "select t.id, t.time_zone from tenants t
         where exists (select 1 from assignments a where a.tenant_id = t.id)
         order by t.id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, tz)| (TenantId(id), tz))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_validated() {
        assert!(Shape::new(14_400, 80, 180).is_ok());
        assert!(Shape::new(14_401, 80, 180).is_err());
        assert!(Shape::new(0, 80, 180).is_err());
        assert!(Shape::new(10, 0, 180).is_err());
        assert!(Shape::new(10, 100, 180).is_err());
        assert!(Shape::new(10, 1, 0).is_err());
    }

    #[test]
    fn batches_cover_ten_positions() {
        assert_eq!(BatchRef::of_position(3, 1).batch_no, 1);
        assert_eq!(BatchRef::of_position(3, 10).batch_no, 1);
        assert_eq!(BatchRef::of_position(3, 11).batch_no, 2);
        assert_eq!(BatchRef::of_position(3, 180).batch_no, 18);
        assert_eq!(
            BatchRef {
                table_no: 1,
                batch_no: 2
            }
            .positions(),
            (11, 20)
        );
    }

    #[test]
    fn today_follows_the_time_zone() {
        let now = DateTime::parse_from_rfc3339("2026-03-01T23:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            today_in("UTC", now).unwrap(),
            NaiveDate::from_ymd_opt(2026, 3, 1).unwrap()
        );
        assert_eq!(
            today_in("Asia/Kolkata", now).unwrap(),
            NaiveDate::from_ymd_opt(2026, 3, 2).unwrap()
        );
        assert!(today_in("Mars/Olympus", now).is_err());
    }
}
