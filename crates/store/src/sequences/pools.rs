//! Lead pools in Postgres: people a sequence's `lead_generation` step draws from, and the
//! record of each sequence's daily draw (one row per sequence and local day, written in the same
//! transaction as the leads it added, so a day is drawn at most once).
//!
//! Every function is scoped by tenant. A person is known by the tenant's external id, unique
//! within a pool; a drawn person becomes a lead whose `external_id` is that id, unique per
//! sequence, so nobody joins one sequence twice whichever day or run draws them.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use herald_core::TenantId;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::error;

/// The most people one request may load.
pub const MAX_PEOPLE_PER_REQUEST: usize = 10_000;
/// The longest external person id.
pub const MAX_EXTERNAL_ID_LEN: usize = 200;

/// One person to load: the tenant's id for them and their lead variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPerson {
    pub external_person_id: String,
    pub variables: BTreeMap<String, String>,
}

/// What loading people did: new people, and people already in the pool whose variables were
/// replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Loaded {
    pub added: u64,
    pub updated: u64,
}

/// Loads people into the tenant's pool `name` (created by its first person), in one
/// transaction. A person already in the pool keeps their place in the draw order and gets the
/// new variables.
pub async fn load(
    pool: &PgPool,
    tenant: TenantId,
    name: &str,
    people: &[PoolPerson],
) -> Result<Loaded, Error> {
    super::steps::check_pool_name(name).map_err(|reason| Error::invalid("pool", reason))?;
    if people.len() > MAX_PEOPLE_PER_REQUEST {
        return Err(Error::invalid(
            "people",
            format!("at most {MAX_PEOPLE_PER_REQUEST} people per request"),
        ));
    }
    let mut loaded = Loaded::default();
    let mut tx = pool.begin().await?;
    for person in people {
        let id = person.external_person_id.trim();
        if id.is_empty() || id.chars().count() > MAX_EXTERNAL_ID_LEN {
            return Err(Error::invalid(
                "external_id",
                format!("must be 1 to {MAX_EXTERNAL_ID_LEN} characters"),
            ));
        }
        let inserted: bool = sqlx::query_scalar(
            "insert into lead_pool_people (tenant_id, pool, external_person_id, variables)
             values ($1, $2, $3, $4)
             on conflict (tenant_id, pool, external_person_id)
                 do update set variables = excluded.variables, updated_at = now()
             returning (xmax = 0)",
        )
        .bind(tenant.0)
        .bind(name)
        .bind(id)
        .bind(serde_json::to_value(&person.variables).unwrap_or_default())
        .fetch_one(&mut *tx)
        .await
        .map_err(error::tenant_must_exist)?;
        if inserted {
            loaded.added += 1;
        } else {
            loaded.updated += 1;
        }
    }
    tx.commit().await?;
    Ok(loaded)
}

/// A pool's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolView {
    pub name: String,
    /// People in the pool.
    pub people: u64,
    /// Of those, people that are a lead of at least one of the tenant's sequences.
    pub in_sequences: u64,
    /// Sequences whose `lead_generation` step drew from this pool, and how many leads each
    /// drew in all.
    pub drawn_by_sequence: BTreeMap<Uuid, u64>,
}

/// The tenant's pool `name`: `NotFound` when it holds nobody.
pub async fn view(pool: &PgPool, tenant: TenantId, name: &str) -> Result<PoolView, Error> {
    let (people, in_sequences): (i64, i64) = sqlx::query_as(
        "select count(*),
                count(*) filter (where exists (
                    select 1 from sequence_leads l
                    where l.tenant_id = p.tenant_id and l.external_id = p.external_person_id))
         from lead_pool_people p where p.tenant_id = $1 and p.pool = $2",
    )
    .bind(tenant.0)
    .bind(name)
    .fetch_one(pool)
    .await?;
    if people == 0 {
        return Err(Error::not_found(format!("lead pool {name:?}")));
    }
    let drawn: Vec<(Uuid, i64)> = sqlx::query_as(
        "select sequence_id, sum(added)::bigint from lead_generation_runs
         where tenant_id = $1 and pool = $2 group by sequence_id",
    )
    .bind(tenant.0)
    .bind(name)
    .fetch_all(pool)
    .await?;
    Ok(PoolView {
        name: name.to_owned(),
        people: u64::try_from(people).unwrap_or(0),
        in_sequences: u64::try_from(in_sequences).unwrap_or(0),
        drawn_by_sequence: drawn
            .into_iter()
            .map(|(id, n)| (id, u64::try_from(n).unwrap_or(0)))
            .collect(),
    })
}

/// Claims the sequence's draw for the local day `day`, in the caller's transaction: `false`
/// when that day was already drawn (or another transaction is drawing it and commits; this
/// waits for it).
pub async fn claim_day(
    conn: &mut PgConnection,
    tenant: TenantId,
    sequence: Uuid,
    day: NaiveDate,
    pool: &str,
) -> Result<bool, Error> {
    Ok(sqlx::query(
        "insert into lead_generation_runs (tenant_id, sequence_id, local_day, pool)
         values ($1, $2, $3, $4) on conflict do nothing",
    )
    .bind(tenant.0)
    .bind(sequence)
    .bind(day)
    .bind(pool)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// What one draw asks for.
#[derive(Debug, Clone)]
pub struct Draw<'a> {
    pub sequence: Uuid,
    pub day: NaiveDate,
    pub pool: &'a str,
    pub limit: u32,
    /// Variables a person must have to be drawn (the addresses the steps need).
    pub needed: &'a [&'a str],
    /// The step drawn leads start at.
    pub first_step: u32,
    pub due: DateTime<Utc>,
}

/// Adds up to `draw.limit` people of the pool who are not yet leads of the sequence (by external
/// id), in load order, as active leads at `draw.first_step`, and records the count on the day's
/// row. Runs in the caller's transaction, after [`claim_day`]. Returns the new leads' ids.
pub async fn draw(
    conn: &mut PgConnection,
    tenant: TenantId,
    draw: &Draw<'_>,
) -> Result<Vec<Uuid>, Error> {
    let needed: Vec<String> = draw.needed.iter().map(|v| (*v).to_owned()).collect();
    let picked: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "select p.external_person_id, p.variables from lead_pool_people p
         where p.tenant_id = $1 and p.pool = $2 and p.variables ?& $3
           and not exists (select 1 from sequence_leads l
                           where l.tenant_id = $1 and l.sequence_id = $4
                             and l.external_id = p.external_person_id)
         order by p.seq limit $5",
    )
    .bind(tenant.0)
    .bind(draw.pool)
    .bind(&needed)
    .bind(draw.sequence)
    .bind(i64::from(draw.limit))
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<Uuid> = picked.iter().map(|_| Uuid::now_v7()).collect();
    let external: Vec<String> = picked.iter().map(|(id, _)| id.clone()).collect();
    let variables: Vec<serde_json::Value> = picked.into_iter().map(|(_, v)| v).collect();
    let added: Vec<Uuid> = sqlx::query_scalar(
        "insert into sequence_leads
             (tenant_id, id, sequence_id, external_id, variables, current_step, next_run_at)
         select $1, u.id, $2, u.external_id, u.variables, $3, $4
         from unnest($5::uuid[], $6::text[], $7::jsonb[]) with ordinality
             as u(id, external_id, variables, ord)
         order by u.ord
         on conflict (tenant_id, sequence_id, external_id) do nothing
         returning id",
    )
    .bind(tenant.0)
    .bind(draw.sequence)
    .bind(i64::from(draw.first_step) as i32)
    .bind(draw.due)
    .bind(&ids)
    .bind(&external)
    .bind(&variables)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query(
        "update lead_generation_runs set added = $4
         where tenant_id = $1 and sequence_id = $2 and local_day = $3",
    )
    .bind(tenant.0)
    .bind(draw.sequence)
    .bind(draw.day)
    .bind(i32::try_from(added.len()).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(added)
}
