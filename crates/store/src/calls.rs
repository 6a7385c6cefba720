//! Call campaigns' Postgres state: users (with their concurrent-call limit), agents, contacts,
//! the tenant's voice-provider account, campaigns with their calling window, and calls.
//!
//! Every function takes the tenant and touches only its rows. Call state only moves forward
//! through conditional updates (`queued → dialing → in_call → ended`), so a job that runs twice,
//! or two webhooks for one call, change a call at most once. Slots are not kept here: they live
//! in Redis (`herald-admission`), and this module never touches Redis.

use std::collections::HashSet;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use herald_core::TenantId;
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::error;

/// A user's concurrent-call limit unless set.
pub const DEFAULT_CONCURRENT_CALLS: u32 = 2;
/// A tenant's system limit (its provider account's concurrency) unless set.
pub const DEFAULT_SYSTEM_LIMIT: u32 = 10;
/// The most contacts one request (JSON list or CSV) may carry.
pub const MAX_CONTACTS_PER_IMPORT: usize = 100_000;
/// The longest name or text field kept.
pub const MAX_TEXT_LEN: usize = 200;

// ---------------------------------------------------------------------------------------------
// Validation: pure, shared by the API and the CSV import

/// `phone` in E.164 (`+` then 7 to 15 digits, not starting with 0). Spaces, dashes, dots and
/// parentheses are dropped first, so `+44 20 7946-0000` is accepted as `+442079460000`.
pub fn normalize_phone(phone: &str) -> Result<String, String> {
    let cleaned: String = phone
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let Some(digits) = cleaned.strip_prefix('+') else {
        return Err(format!(
            "phone {phone:?} is not E.164: it must start with + and the country code"
        ));
    };
    let ok = (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if ok {
        Ok(cleaned)
    } else {
        Err(format!(
            "phone {phone:?} is not E.164: + then 7 to 15 digits, the first not 0"
        ))
    }
}

fn bounded_text(field: &'static str, value: &str) -> Result<String, Error> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_TEXT_LEN {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {MAX_TEXT_LEN} characters"),
        ));
    }
    Ok(value.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Users and agents

/// A person inside a tenant who owns call campaigns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub concurrent_calls_limit: i32,
    pub created_at: DateTime<Utc>,
}

pub async fn create_user(
    pool: &PgPool,
    tenant: TenantId,
    name: &str,
    concurrent_calls_limit: Option<u32>,
) -> Result<User, Error> {
    let name = bounded_text("name", name)?;
    let limit = concurrent_calls_limit.unwrap_or(DEFAULT_CONCURRENT_CALLS);
    let limit = i32::try_from(limit)
        .ok()
        .filter(|l| (1..=1000).contains(l))
        .ok_or_else(|| Error::invalid("concurrent_calls_limit", "must be 1 to 1000"))?;
    sqlx::query_as(
        "insert into call_users (tenant_id, id, name, concurrent_calls_limit)
         values ($1, $2, $3, $4)
         returning id, name, concurrent_calls_limit, created_at",
    )
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(limit)
    .fetch_one(pool)
    .await
    .map_err(error::tenant_must_exist)
}

/// A voice assistant at the provider, with the number it calls from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Agent {
    pub id: Uuid,
    pub name: String,
    pub assistant_id: String,
    pub phone_number_id: String,
    pub created_at: DateTime<Utc>,
}

pub async fn create_agent(
    pool: &PgPool,
    tenant: TenantId,
    name: &str,
    assistant_id: &str,
    phone_number_id: &str,
) -> Result<Agent, Error> {
    let name = bounded_text("name", name)?;
    let assistant_id = bounded_text("assistant_id", assistant_id)?;
    let phone_number_id = bounded_text("phone_number_id", phone_number_id)?;
    sqlx::query_as(
        "insert into call_agents (tenant_id, id, name, assistant_id, phone_number_id)
         values ($1, $2, $3, $4, $5)
         returning id, name, assistant_id, phone_number_id, created_at",
    )
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(assistant_id)
    .bind(phone_number_id)
    .fetch_one(pool)
    .await
    .map_err(error::tenant_must_exist)
}

// ---------------------------------------------------------------------------------------------
// Contacts

/// A contact ready to store: phone normalised, name trimmed (absent when blank), the other
/// fields as context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewContact {
    pub phone: String,
    pub name: Option<String>,
    pub context: Map<String, Value>,
}

impl NewContact {
    /// Validates one contact; the error is the reason, for a row-level report.
    pub fn new(
        phone: &str,
        name: Option<&str>,
        context: Map<String, Value>,
    ) -> Result<Self, String> {
        let phone = normalize_phone(phone)?;
        let name = name.map(str::trim).filter(|n| !n.is_empty());
        if let Some(name) = name
            && name.chars().count() > MAX_TEXT_LEN
        {
            return Err(format!("name is longer than {MAX_TEXT_LEN} characters"));
        }
        Ok(Self {
            phone,
            name: name.map(str::to_owned),
            context,
        })
    }
}

/// Stores contacts (one statement), merging with an existing contact of the same phone: a new
/// name replaces the old, context fields are merged. Returns the contacts' ids in input order.
pub async fn upsert_contacts(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[NewContact],
) -> Result<Vec<Uuid>, Error> {
    if contacts.is_empty() {
        return Ok(Vec::new());
    }
    if contacts.len() > MAX_CONTACTS_PER_IMPORT {
        return Err(Error::invalid(
            "contacts",
            format!("at most {MAX_CONTACTS_PER_IMPORT} per request"),
        ));
    }
    // Within one request the last row of a phone wins, as a later line would on its own.
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    let mut phones = Vec::new();
    let mut names = Vec::new();
    let mut contexts = Vec::new();
    for contact in contacts.iter().rev() {
        if seen.insert(contact.phone.as_str()) {
            ids.push(Uuid::now_v7());
            phones.push(contact.phone.clone());
            names.push(contact.name.clone());
            contexts.push(Value::Object(contact.context.clone()));
        }
    }
    let stored: Vec<(Uuid, String)> = sqlx::query_as(
        "insert into contacts (tenant_id, id, phone, name, context)
         select $1, u.id, u.phone, u.name, u.context
         from unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[]) as u(id, phone, name, context)
         on conflict (tenant_id, phone) do update
             set name = coalesce(excluded.name, contacts.name),
                 context = contacts.context || excluded.context
         returning id, phone",
    )
    .bind(tenant.0)
    .bind(&ids)
    .bind(&phones)
    .bind(&names)
    .bind(&contexts)
    .fetch_all(&mut *conn)
    .await
    .map_err(error::tenant_must_exist)?;
    let by_phone: std::collections::HashMap<String, Uuid> =
        stored.into_iter().map(|(id, phone)| (phone, id)).collect();
    contacts
        .iter()
        .map(|c| {
            by_phone
                .get(&c.phone)
                .copied()
                .ok_or_else(|| Error::Corrupt {
                    what: "contact",
                    reason: format!("upsert of {} returned no row", c.phone),
                })
        })
        .collect()
}

/// One contact row of an upload: its line (the header is line 1; a JSON list's item number from
/// 1) and the contact, or the column at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    pub line: u64,
    pub contact: Result<NewContact, RejectedContact>,
}

/// A row that was not stored, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedContact {
    pub line: u64,
    pub column: String,
    pub reason: String,
}

/// The most bytes a contacts CSV may hold.
pub const MAX_CONTACTS_CSV_BYTES: usize = 8 * 1024 * 1024;

fn not_csv(reason: impl Into<String>) -> Error {
    Error::invalid("file", reason)
}

/// Parses a contacts CSV: a header naming `phone` (required) and `name` (optional), any case,
/// any order; every other column is kept as the contact's context. A bad row is an `Err` row; a
/// file that is not CSV at all (empty, binary, no `phone` column, too big) is
/// `Error::Invalid` for field `file`.
pub fn parse_contacts_csv(bytes: &[u8]) -> Result<Vec<ContactRow>, Error> {
    if bytes.len() > MAX_CONTACTS_CSV_BYTES {
        return Err(not_csv(format!(
            "the file is larger than {MAX_CONTACTS_CSV_BYTES} bytes"
        )));
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(not_csv("the file is empty"));
    }
    if bytes.contains(&0) {
        return Err(not_csv("the file holds binary data, not CSV text"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| not_csv("the file is not UTF-8 text"))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| not_csv(format!("the header row cannot be read: {e}")))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    let position = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let Some(phone_column) = position("phone") else {
        return Err(not_csv(
            "the header row must name a phone column (and optionally name, then any context columns)",
        ));
    };
    let name_column = position("name");
    let mut rows = Vec::new();
    for record in reader.records() {
        if rows.len() >= MAX_CONTACTS_PER_IMPORT {
            return Err(not_csv(format!(
                "the file holds more than {MAX_CONTACTS_PER_IMPORT} rows"
            )));
        }
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                rows.push(ContactRow {
                    line,
                    contact: Err(RejectedContact {
                        line,
                        column: "(row)".into(),
                        reason: format!("unreadable row: {e}"),
                    }),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if record.len() != headers.len() {
            rows.push(ContactRow {
                line,
                contact: Err(RejectedContact {
                    line,
                    column: "(row)".into(),
                    reason: format!(
                        "expected {} fields as in the header, found {}",
                        headers.len(),
                        record.len()
                    ),
                }),
            });
            continue;
        }
        let mut context = Map::new();
        for (index, value) in record.iter().enumerate() {
            if index != phone_column && Some(index) != name_column && !value.trim().is_empty() {
                context.insert(
                    headers[index].clone(),
                    Value::String(value.trim().to_owned()),
                );
            }
        }
        let phone = record.get(phone_column).unwrap_or_default();
        let contact = if phone.trim().is_empty() {
            Err(RejectedContact {
                line,
                column: "phone".into(),
                reason: "phone is missing".into(),
            })
        } else {
            NewContact::new(phone, name_column.and_then(|c| record.get(c)), context).map_err(
                |reason| RejectedContact {
                    line,
                    column: if reason.starts_with("phone") {
                        "phone"
                    } else {
                        "name"
                    }
                    .into(),
                    reason,
                },
            )
        };
        rows.push(ContactRow { line, contact });
    }
    Ok(rows)
}

/// What a contacts upload did: the stored contacts' ids in file order, and the refused rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContactsReport {
    pub stored: u64,
    pub rejected: u64,
    pub contact_ids: Vec<Uuid>,
    pub rejected_rows: Vec<RejectedContact>,
}

/// Stores the good rows (merging with existing contacts of the same phone) and reports the
/// rest; bad rows never block good ones.
pub async fn import_contacts(
    conn: &mut PgConnection,
    tenant: TenantId,
    rows: Vec<ContactRow>,
) -> Result<ContactsReport, Error> {
    let mut good = Vec::new();
    let mut report = ContactsReport::default();
    for row in rows {
        match row.contact {
            Ok(contact) => good.push(contact),
            Err(rejected) => report.rejected_rows.push(rejected),
        }
    }
    report.contact_ids = upsert_contacts(conn, tenant, &good).await?;
    report.stored = report.contact_ids.len() as u64;
    report.rejected = report.rejected_rows.len() as u64;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The voice-provider account

/// The tenant's voice-provider account.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VoiceProvider {
    pub api_url: String,
    pub api_key: String,
    pub webhook_secret: String,
    pub system_limit: i32,
}

/// Creates or replaces the tenant's voice-provider account; `system_limit` defaults to 10.
pub async fn put_voice_provider(
    pool: &PgPool,
    tenant: TenantId,
    api_url: &str,
    api_key: &str,
    webhook_secret: &str,
    system_limit: Option<u32>,
) -> Result<VoiceProvider, Error> {
    let api_url = api_url.trim();
    if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
        return Err(Error::invalid("api_url", "must be an http(s) URL"));
    }
    if api_key.trim().is_empty() {
        return Err(Error::invalid("api_key", "must not be empty"));
    }
    if webhook_secret.len() < 8 {
        return Err(Error::invalid(
            "webhook_secret",
            "must be at least 8 characters",
        ));
    }
    let limit = i32::try_from(system_limit.unwrap_or(DEFAULT_SYSTEM_LIMIT))
        .ok()
        .filter(|l| (1..=10_000).contains(l))
        .ok_or_else(|| Error::invalid("system_limit", "must be 1 to 10000"))?;
    sqlx::query_as(
        "insert into voice_providers (tenant_id, api_url, api_key, webhook_secret, system_limit)
         values ($1, $2, $3, $4, $5)
         on conflict (tenant_id) do update
             set api_url = excluded.api_url, api_key = excluded.api_key,
                 webhook_secret = excluded.webhook_secret,
                 system_limit = excluded.system_limit, updated_at = now()
         returning api_url, api_key, webhook_secret, system_limit",
    )
    .bind(tenant.0)
    .bind(api_url.trim_end_matches('/'))
    .bind(api_key.trim())
    .bind(webhook_secret)
    .bind(limit)
    .fetch_one(pool)
    .await
    .map_err(error::tenant_must_exist)
}

/// The tenant's voice-provider account, if configured.
pub async fn voice_provider(
    pool: &PgPool,
    tenant: TenantId,
) -> Result<Option<VoiceProvider>, Error> {
    Ok(sqlx::query_as(
        "select api_url, api_key, webhook_secret, system_limit
         from voice_providers where tenant_id = $1",
    )
    .bind(tenant.0)
    .fetch_optional(pool)
    .await?)
}

// ---------------------------------------------------------------------------------------------
// Campaigns

/// A campaign's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignStatus {
    Active,
    Paused,
    Cancelled,
    Completed,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Active => "active",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Cancelled => "cancelled",
            CampaignStatus::Completed => "completed",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "active" => CampaignStatus::Active,
            "paused" => CampaignStatus::Paused,
            "cancelled" => CampaignStatus::Cancelled,
            "completed" => CampaignStatus::Completed,
            other => {
                return Err(Error::Corrupt {
                    what: "call campaign",
                    reason: format!("status {other:?}"),
                });
            }
        })
    }
}

/// A campaign to create. The window and time zone are validated by the caller (the API parses
/// them with `herald-admission`'s window type); the schema refuses an empty window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    pub name: String,
    pub user_id: Uuid,
    pub agent_id: Uuid,
    pub next_action: Option<String>,
    pub first_call_time: NaiveTime,
    pub last_call_time: NaiveTime,
    pub time_zone: String,
    pub start_date: NaiveDate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Campaign {
    pub id: Uuid,
    pub name: String,
    pub user_id: Uuid,
    pub agent_id: Uuid,
    pub next_action: Option<String>,
    pub first_call_time: NaiveTime,
    pub last_call_time: NaiveTime,
    pub time_zone: String,
    pub start_date: NaiveDate,
    pub status: CampaignStatus,
    pub pause_reason: Option<String>,
    /// The sequence whose `voice_agent_call` step this campaign serves (`None`: made by hand).
    /// Such a campaign follows its sequence: it cannot be changed by hand.
    pub sequence_id: Option<Uuid>,
    /// The index of that step.
    pub sequence_step: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct CampaignRecord {
    id: Uuid,
    name: String,
    user_id: Uuid,
    agent_id: Uuid,
    next_action: Option<String>,
    first_call_time: NaiveTime,
    last_call_time: NaiveTime,
    time_zone: String,
    start_date: NaiveDate,
    status: String,
    pause_reason: Option<String>,
    sequence_id: Option<Uuid>,
    sequence_step: Option<i32>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const CAMPAIGN_COLUMNS: &str = "id, name, user_id, agent_id, next_action, first_call_time, \
    last_call_time, time_zone, start_date, status, pause_reason, sequence_id, sequence_step, \
    created_at, updated_at";

impl TryFrom<CampaignRecord> for Campaign {
    type Error = Error;
    fn try_from(r: CampaignRecord) -> Result<Self, Error> {
        Ok(Campaign {
            status: CampaignStatus::parse(&r.status)?,
            id: r.id,
            name: r.name,
            user_id: r.user_id,
            agent_id: r.agent_id,
            next_action: r.next_action,
            first_call_time: r.first_call_time,
            last_call_time: r.last_call_time,
            time_zone: r.time_zone,
            start_date: r.start_date,
            pause_reason: r.pause_reason,
            sequence_id: r.sequence_id,
            sequence_step: r.sequence_step,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// Refuses a change by hand to a campaign that serves a sequence's call step (`Conflict`): it
/// follows its sequence. A campaign that does not exist passes (the change then finds nothing).
async fn refuse_sequence_owned<'c, E>(conn: E, tenant: TenantId, id: Uuid) -> Result<(), Error>
where
    E: sqlx::PgExecutor<'c>,
{
    let owner: Option<(Option<Uuid>, Option<i32>)> = sqlx::query_as(
        "select sequence_id, sequence_step from call_campaigns where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    match owner {
        Some((Some(sequence), step)) => Err(Error::Conflict {
            what: format!(
                "call campaign {id} serves step {} of sequence {sequence}: pause, start or stop \
                 the sequence instead; it",
                step.unwrap_or_default()
            ),
        }),
        _ => Ok(()),
    }
}

/// The call campaign of a sequence's `voice_agent_call` step, created on first use with
/// `campaign`'s settings (the sequence's window and zone) and no calls. Concurrent callers get
/// the same campaign. A user or agent that is not the tenant's (or a removed agent) is
/// `NotFound`.
pub async fn sequence_campaign(
    conn: &mut PgConnection,
    tenant: TenantId,
    sequence: Uuid,
    step: u32,
    campaign: &NewCampaign,
) -> Result<Uuid, Error> {
    let step = i32::try_from(step).map_err(|_| Error::invalid("step", "out of range"))?;
    // Serialises the first use, so leads running the step at once share one campaign.
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("sequence-call-campaign:{tenant}:{sequence}:{step}"))
        .execute(&mut *conn)
        .await?;
    let existing: Option<Uuid> = sqlx::query_scalar(
        "select id from call_campaigns
         where tenant_id = $1 and sequence_id = $2 and sequence_step = $3",
    )
    .bind(tenant.0)
    .bind(sequence)
    .bind(step)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = existing {
        return Ok(id);
    }
    let (created, _) = create_campaign(conn, tenant, campaign, &[]).await?;
    sqlx::query(
        "update call_campaigns set sequence_id = $3, sequence_step = $4
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(created.id)
    .bind(sequence)
    .bind(step)
    .execute(&mut *conn)
    .await?;
    Ok(created.id)
}

/// Queues one call to `contact` in `campaign` (FIFO after the calls already queued; a named
/// contact first, as on create). `None` when the campaign already has a call for that contact.
pub async fn queue_call(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: Uuid,
    contact: Uuid,
) -> Result<Option<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "insert into calls (tenant_id, id, campaign_id, user_id, contact_id, phone, name, context,
                            priority)
         select $1, $4, c.id, c.user_id, k.id, k.phone, k.name, k.context,
                case when k.name is null then 1 else 0 end
         from call_campaigns c
         join contacts k on k.tenant_id = c.tenant_id and k.id = $3
         where c.tenant_id = $1 and c.id = $2
         on conflict (tenant_id, campaign_id, contact_id) do nothing
         returning id",
    )
    .bind(tenant.0)
    .bind(campaign)
    .bind(contact)
    .bind(Uuid::now_v7())
    .fetch_optional(conn)
    .await?)
}

/// Moves every campaign serving a step of `sequence` that is in `from` to `to` (its sequence
/// was paused, started or stopped); stopping also cancels their queued calls. Returns how many
/// campaigns changed and the calls cancelled.
pub async fn follow_sequence(
    conn: &mut PgConnection,
    tenant: TenantId,
    sequence: Uuid,
    from: &[CampaignStatus],
    to: CampaignStatus,
    reason: Option<&str>,
) -> Result<(u64, Vec<Uuid>), Error> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let changed = sqlx::query(
        "update call_campaigns set status = $4, pause_reason = $5, updated_at = now()
         where tenant_id = $1 and sequence_id = $2 and status = any($3)",
    )
    .bind(tenant.0)
    .bind(sequence)
    .bind(&from)
    .bind(to.as_str())
    .bind(reason)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let mut cancelled = Vec::new();
    if to == CampaignStatus::Cancelled {
        cancelled = sqlx::query_scalar(
            "update calls k set state = 'cancelled', outcome = 'cancelled', ended_at = now(),
                                updated_at = now()
             from call_campaigns c
             where k.tenant_id = $1 and c.tenant_id = $1 and c.id = k.campaign_id
               and c.sequence_id = $2 and k.state = 'queued'
             returning k.id",
        )
        .bind(tenant.0)
        .bind(sequence)
        .fetch_all(&mut *conn)
        .await?;
    }
    Ok((changed, cancelled))
}

/// Creates the campaign and one queued call per contact (in the order given, which is the FIFO
/// order within a priority; named contacts get priority 0). A contact id that is not the
/// tenant's, a user or agent of another tenant, is `NotFound`. Returns the campaign and how many
/// calls were queued (a contact listed twice is called once).
pub async fn create_campaign(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: &NewCampaign,
    contact_ids: &[Uuid],
) -> Result<(Campaign, u64), Error> {
    let name = bounded_text("name", &campaign.name)?;
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from call_users where tenant_id = $1 and id = $2)",
    )
    .bind(tenant.0)
    .bind(campaign.user_id)
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Err(Error::not_found(format!("user {}", campaign.user_id)));
    }
    usable_agent(conn, tenant, campaign.agent_id).await?;
    let record: CampaignRecord = sqlx::query_as(&format!(
        "insert into call_campaigns (tenant_id, id, name, user_id, agent_id, next_action,
             first_call_time, last_call_time, time_zone, start_date)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         returning {CAMPAIGN_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(campaign.user_id)
    .bind(campaign.agent_id)
    .bind(campaign.next_action.as_deref())
    .bind(campaign.first_call_time)
    .bind(campaign.last_call_time)
    .bind(&campaign.time_zone)
    .bind(campaign.start_date)
    .fetch_one(&mut *conn)
    .await
    .map_err(error::tenant_must_exist)?;
    let created = Campaign::try_from(record)?;
    let mut unique = Vec::with_capacity(contact_ids.len());
    let mut seen = HashSet::new();
    for id in contact_ids {
        if seen.insert(*id) {
            unique.push(*id);
        }
    }
    let found: i64 =
        sqlx::query_scalar("select count(*) from contacts where tenant_id = $1 and id = any($2)")
            .bind(tenant.0)
            .bind(&unique)
            .fetch_one(&mut *conn)
            .await?;
    if found != unique.len() as i64 {
        return Err(Error::not_found(format!(
            "{} of the contacts",
            unique.len() as i64 - found
        )));
    }
    let call_ids: Vec<Uuid> = unique.iter().map(|_| Uuid::now_v7()).collect();
    let ordinals: Vec<i64> = (0..unique.len() as i64).collect();
    let queued = sqlx::query(
        "insert into calls (tenant_id, id, campaign_id, user_id, contact_id, phone, name, context,
                            priority)
         select $1, u.call_id, $2, $3, c.id, c.phone, c.name, c.context,
                case when c.name is null then 1 else 0 end
         from unnest($4::uuid[], $5::uuid[], $6::bigint[]) as u(call_id, contact_id, ord)
         join contacts c on c.tenant_id = $1 and c.id = u.contact_id
         order by u.ord",
    )
    .bind(tenant.0)
    .bind(created.id)
    .bind(created.user_id)
    .bind(&call_ids)
    .bind(&unique)
    .bind(&ordinals)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok((created, queued))
}

/// The tenant's campaign `id`.
pub async fn campaign(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Campaign, Error> {
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from call_campaigns where tenant_id = $1 and id = $2"
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    record
        .ok_or_else(|| Error::not_found(format!("call campaign {id}")))?
        .try_into()
}

/// The tenant's campaigns, newest first.
pub async fn list_campaigns(
    pool: &PgPool,
    tenant: TenantId,
    limit: i64,
) -> Result<Vec<Campaign>, Error> {
    let records: Vec<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from call_campaigns where tenant_id = $1
         order by created_at desc limit $2"
    ))
    .bind(tenant.0)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    records.into_iter().map(Campaign::try_from).collect()
}

/// Pauses an active campaign (`reason` is shown with it): no new calls are dispatched, calls in
/// progress finish. Returns `Conflict` when the campaign is not active.
pub async fn pause_campaign(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    reason: &str,
) -> Result<Campaign, Error> {
    refuse_sequence_owned(pool, tenant, id).await?;
    transition(pool, tenant, id, "active", "paused", Some(reason)).await
}

/// Resumes a paused campaign. Returns `Conflict` when the campaign is not paused, or when its
/// agent was removed (give it another agent first).
pub async fn resume_campaign(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Campaign, Error> {
    refuse_sequence_owned(pool, tenant, id).await?;
    let agent_removed: Option<bool> = sqlx::query_scalar(
        "select a.removed_at is not null from call_campaigns c
         join call_agents a on a.tenant_id = c.tenant_id and a.id = c.agent_id
         where c.tenant_id = $1 and c.id = $2",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match agent_removed {
        None => return Err(Error::not_found(format!("call campaign {id}"))),
        Some(true) => {
            return Err(Error::Conflict {
                what: format!(
                    "call campaign {id} calls through a removed agent (set another agent_id first); it"
                ),
            });
        }
        Some(false) => {}
    }
    transition(pool, tenant, id, "paused", "active", None).await
}

async fn transition(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    from: &str,
    to: &str,
    reason: Option<&str>,
) -> Result<Campaign, Error> {
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "update call_campaigns set status = $4, pause_reason = $5, updated_at = now()
         where tenant_id = $1 and id = $2 and status = $3
         returning {CAMPAIGN_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(id)
    .bind(from)
    .bind(to)
    .bind(reason)
    .fetch_optional(pool)
    .await?;
    match record {
        Some(record) => record.try_into(),
        None => {
            let current = campaign(pool, tenant, id).await?;
            Err(Error::Conflict {
                what: format!(
                    "call campaign {id} is {}, not {from}; it",
                    current.status.as_str()
                ),
            })
        }
    }
}

/// Cancels a campaign that is active or paused: its queued calls are cancelled (calls in
/// progress finish). Returns how many queued calls were cancelled.
pub async fn cancel_campaign(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<u64, Error> {
    refuse_sequence_owned(pool, tenant, id).await?;
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "update call_campaigns set status = 'cancelled', updated_at = now()
         where tenant_id = $1 and id = $2 and status in ('active', 'paused')",
    )
    .bind(tenant.0)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        let current = campaign(pool, tenant, id).await?;
        return Err(Error::Conflict {
            what: format!(
                "call campaign {id} is {}; it cannot be cancelled, and it",
                current.status.as_str()
            ),
        });
    }
    let cancelled = sqlx::query(
        "update calls set state = 'cancelled', outcome = 'cancelled', updated_at = now()
         where tenant_id = $1 and campaign_id = $2 and state = 'queued'",
    )
    .bind(tenant.0)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(cancelled)
}

/// Deletes a campaign that has no call holding a slot (dialing or in a call); its calls go with
/// it. `Conflict` while calls are live: cancel it first and let them finish.
pub async fn delete_campaign(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<(), Error> {
    refuse_sequence_owned(pool, tenant, id).await?;
    let mut tx = pool.begin().await?;
    campaign(pool, tenant, id).await?;
    let live: i64 = sqlx::query_scalar(
        "select count(*) from calls where tenant_id = $1 and campaign_id = $2
           and state in ('dialing', 'in_call')",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if live > 0 {
        return Err(Error::Conflict {
            what: format!("call campaign {id} has {live} calls in progress; it"),
        });
    }
    sqlx::query("delete from call_campaigns where tenant_id = $1 and id = $2")
        .bind(tenant.0)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The settings of a campaign an update may change, all given: the caller merges the request
/// with the current campaign and validates the window (as on create) before calling
/// [`update_campaign`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignEdit {
    pub name: String,
    pub agent_id: Uuid,
    pub next_action: Option<String>,
    pub first_call_time: NaiveTime,
    pub last_call_time: NaiveTime,
    pub time_zone: String,
    pub start_date: NaiveDate,
}

/// The tenant's campaign `id`, locked until the caller's transaction ends, so an update reads
/// and writes one version of it.
pub async fn campaign_for_update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Campaign, Error> {
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from call_campaigns where tenant_id = $1 and id = $2
         for update"
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    record
        .ok_or_else(|| Error::not_found(format!("call campaign {id}")))?
        .try_into()
}

/// Fails with `NotFound` unless `agent` is the tenant's and not removed.
async fn usable_agent(conn: &mut PgConnection, tenant: TenantId, agent: Uuid) -> Result<(), Error> {
    let usable: bool = sqlx::query_scalar(
        "select exists (select 1 from call_agents
                        where tenant_id = $1 and id = $2 and removed_at is null)",
    )
    .bind(tenant.0)
    .bind(agent)
    .fetch_one(&mut *conn)
    .await?;
    if usable {
        Ok(())
    } else {
        Err(Error::not_found(format!("agent {agent}")))
    }
}

/// Changes an active or paused campaign's settings (its queued calls follow the new window at
/// the next dispatch). `Conflict` for a cancelled or completed campaign; `NotFound` for an agent
/// that is not the tenant's or was removed.
pub async fn update_campaign(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    edit: &CampaignEdit,
) -> Result<Campaign, Error> {
    let name = bounded_text("name", &edit.name)?;
    refuse_sequence_owned(&mut *conn, tenant, id).await?;
    // A campaign keeps a removed agent until given another (it stays paused): only a new agent
    // must be usable.
    let current_agent: Option<Uuid> =
        sqlx::query_scalar("select agent_id from call_campaigns where tenant_id = $1 and id = $2")
            .bind(tenant.0)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    if current_agent != Some(edit.agent_id) {
        usable_agent(conn, tenant, edit.agent_id).await?;
    }
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "update call_campaigns
         set name = $3, agent_id = $4, next_action = $5, first_call_time = $6,
             last_call_time = $7, time_zone = $8, start_date = $9, updated_at = now()
         where tenant_id = $1 and id = $2 and status in ('active', 'paused')
         returning {CAMPAIGN_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(id)
    .bind(name)
    .bind(edit.agent_id)
    .bind(edit.next_action.as_deref())
    .bind(edit.first_call_time)
    .bind(edit.last_call_time)
    .bind(&edit.time_zone)
    .bind(edit.start_date)
    .fetch_optional(&mut *conn)
    .await?;
    match record {
        Some(record) => record.try_into(),
        None => {
            let current = campaign_for_update(conn, tenant, id).await?;
            Err(Error::Conflict {
                what: format!(
                    "call campaign {id} is {}; it cannot be changed, and it",
                    current.status.as_str()
                ),
            })
        }
    }
}

/// Deletes the tenant's contact and cancels its queued calls in every campaign (calls in
/// progress finish; ended calls keep their record), in the caller's transaction. Returns the
/// calls cancelled (a sequence's call step settles with them); `NotFound` when the contact is not
/// the tenant's.
pub async fn delete_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Vec<Uuid>, Error> {
    let deleted = sqlx::query("delete from contacts where tenant_id = $1 and id = $2")
        .bind(tenant.0)
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(Error::not_found(format!("contact {id}")));
    }
    Ok(sqlx::query_scalar(
        "update calls set state = 'cancelled', outcome = 'cancelled',
                          error = 'the contact was deleted', ended_at = now(), updated_at = now()
         where tenant_id = $1 and contact_id = $2 and state = 'queued'
         returning id",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?)
}

/// What removing an agent did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRemoval {
    pub id: Uuid,
    /// The active campaigns that used it, now paused with the reason.
    pub paused_campaigns: Vec<Uuid>,
}

/// Removes the tenant's agent: it is kept for the campaigns and calls that name it but can no
/// longer be used, and every active campaign using it is paused with the reason (its calls in
/// progress finish). `NotFound` when the agent is not the tenant's or already removed.
pub async fn remove_agent(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<AgentRemoval, Error> {
    let mut tx = pool.begin().await?;
    let name: Option<String> = sqlx::query_scalar(
        "update call_agents set removed_at = now()
         where tenant_id = $1 and id = $2 and removed_at is null
         returning name",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(name) = name else {
        return Err(Error::not_found(format!("agent {id}")));
    };
    let paused_campaigns: Vec<Uuid> = sqlx::query_scalar(
        "update call_campaigns set status = 'paused', pause_reason = $3, updated_at = now()
         where tenant_id = $1 and agent_id = $2 and status = 'active'
         returning id",
    )
    .bind(tenant.0)
    .bind(id)
    .bind(format!("agent {name:?} ({id}) was removed"))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(AgentRemoval {
        id,
        paused_campaigns,
    })
}

/// A campaign's calls by state, and the average duration of the ones that ended with one.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CampaignStats {
    pub queued: i64,
    pub dialing: i64,
    pub in_call: i64,
    pub completed: i64,
    pub failed: i64,
    pub busy: i64,
    pub no_answer: i64,
    pub cancelled: i64,
    pub total: i64,
    pub average_duration_ms: Option<f64>,
}

pub async fn campaign_stats(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<CampaignStats, Error> {
    campaign(pool, tenant, id).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select state, count(*) from calls where tenant_id = $1 and campaign_id = $2
         group by state",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_all(pool)
    .await?;
    let mut stats = CampaignStats::default();
    for (state, n) in rows {
        stats.total += n;
        match state.as_str() {
            "queued" => stats.queued = n,
            "dialing" => stats.dialing = n,
            "in_call" => stats.in_call = n,
            "completed" => stats.completed = n,
            "failed" => stats.failed = n,
            "busy" => stats.busy = n,
            "no-answer" => stats.no_answer = n,
            "cancelled" => stats.cancelled = n,
            _ => {}
        }
    }
    stats.average_duration_ms = sqlx::query_scalar(
        "select avg(duration_ms)::float8 from calls
         where tenant_id = $1 and campaign_id = $2 and duration_ms is not null",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_one(pool)
    .await?;
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Dispatch

/// An active campaign with queued calls, as the dispatcher needs it to evaluate its window.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RunnableCampaign {
    pub id: Uuid,
    pub user_id: Uuid,
    pub first_call_time: NaiveTime,
    pub last_call_time: NaiveTime,
    pub time_zone: String,
    pub start_date: NaiveDate,
}

/// The tenant's active campaigns that still have queued calls.
pub async fn runnable_campaigns(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<Vec<RunnableCampaign>, Error> {
    Ok(sqlx::query_as(
        "select c.id, c.user_id, c.first_call_time, c.last_call_time, c.time_zone, c.start_date
         from call_campaigns c
         where c.tenant_id = $1 and c.status = 'active'
           and exists (select 1 from calls k where k.tenant_id = $1 and k.campaign_id = c.id
                         and k.state = 'queued')
         order by c.id",
    )
    .bind(tenant.0)
    .fetch_all(conn)
    .await?)
}

/// A call ready to dial, with what the provider needs.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NextCall {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub user_id: Uuid,
    pub concurrent_calls_limit: i32,
    pub phone: String,
    pub name: Option<String>,
    pub context: Value,
    pub assistant_id: String,
    pub phone_number_id: String,
    pub next_action: Option<String>,
}

/// The next queued call of each user among `campaigns` (campaigns whose window is open): named
/// contacts first, then FIFO. One row per user, users in id order.
pub async fn next_call_per_user(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaigns: &[Uuid],
) -> Result<Vec<NextCall>, Error> {
    if campaigns.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(
        "select distinct on (k.user_id)
                k.id, k.campaign_id, k.user_id, u.concurrent_calls_limit, k.phone, k.name,
                k.context, a.assistant_id, a.phone_number_id, c.next_action
         from calls k
         join call_campaigns c on c.tenant_id = k.tenant_id and c.id = k.campaign_id
         join call_agents a on a.tenant_id = c.tenant_id and a.id = c.agent_id
         join call_users u on u.tenant_id = k.tenant_id and u.id = k.user_id
         where k.tenant_id = $1 and k.state = 'queued' and k.campaign_id = any($2)
           and c.status = 'active' and a.removed_at is null
         order by k.user_id, k.priority, k.seq",
    )
    .bind(tenant.0)
    .bind(campaigns)
    .fetch_all(conn)
    .await?)
}

/// Records that the call is being dialled, before the provider is asked: `queued → dialing`,
/// one more attempt. `dialed_at` is when the call's slot was granted (its lease starts then, by
/// the slots' clock), so the lease sweep here and the slot in Redis end together; `slot_turn` is
/// the tenant's turn the slot was granted at. `false` when the call was no longer queued (another
/// dispatcher took it, or it was cancelled): then it must not be dialled.
pub async fn mark_dialing(
    pool: &PgPool,
    tenant: TenantId,
    call: Uuid,
    slot_granted_at: DateTime<Utc>,
    slot_turn: Option<i64>,
) -> Result<bool, Error> {
    let updated = sqlx::query(
        "update calls set state = 'dialing', attempts = attempts + 1, dialed_at = $3,
                          slot_turn = $4, updated_at = now()
         where tenant_id = $1 and id = $2 and state = 'queued'
           and exists (select 1 from call_campaigns c where c.tenant_id = $1
                         and c.id = calls.campaign_id and c.status = 'active')",
    )
    .bind(tenant.0)
    .bind(call)
    .bind(slot_granted_at)
    .bind(slot_turn)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Whether a call in `state` holds a slot (dialing or in a call).
pub fn is_live_state(state: &str) -> bool {
    matches!(state, "dialing" | "in_call")
}

/// Whether the call holds a slot (dialing or in a call).
pub async fn is_live(pool: &PgPool, tenant: TenantId, call: Uuid) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from calls where tenant_id = $1 and id = $2
                          and state in ('dialing', 'in_call'))",
    )
    .bind(tenant.0)
    .bind(call)
    .fetch_one(pool)
    .await?)
}

/// Records the provider's id for a call being dialled. A webhook may have ended the call first
/// (it arrives before this write): the id is still recorded, the state is left alone.
pub async fn set_provider_call_id(
    pool: &PgPool,
    tenant: TenantId,
    call: Uuid,
    provider_call_id: &str,
) -> Result<(), Error> {
    sqlx::query(
        "update calls set provider_call_id = $3, updated_at = now()
         where tenant_id = $1 and id = $2 and provider_call_id is null",
    )
    .bind(tenant.0)
    .bind(call)
    .bind(provider_call_id)
    .execute(pool)
    .await
    .map_err(|e| {
        if error::is_unique_violation(&e) {
            Error::Conflict {
                what: format!("provider call id {provider_call_id}"),
            }
        } else {
            Error::Database(e)
        }
    })?;
    Ok(())
}

/// Puts a call the provider refused for now (its account at the concurrency limit) back in the
/// queue, where it keeps its place.
pub async fn requeue(pool: &PgPool, tenant: TenantId, call: Uuid) -> Result<bool, Error> {
    let updated = sqlx::query(
        "update calls set state = 'queued', dialed_at = null, updated_at = now()
         where tenant_id = $1 and id = $2 and state = 'dialing' and provider_call_id is null",
    )
    .bind(tenant.0)
    .bind(call)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Fails a call that could not be placed (the provider refused it for good).
pub async fn fail_dialing(
    conn: &mut PgConnection,
    tenant: TenantId,
    call: Uuid,
    error: &str,
) -> Result<bool, Error> {
    let updated = sqlx::query(
        "update calls set state = 'failed', outcome = 'failed', error = $3, ended_at = now(),
                          updated_at = now()
         where tenant_id = $1 and id = $2 and state = 'dialing'",
    )
    .bind(tenant.0)
    .bind(call)
    .bind(error)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    #[serde(rename = "completed")]
    Completed,
    #[serde(rename = "busy")]
    Busy,
    #[serde(rename = "no-answer")]
    NoAnswer,
    #[serde(rename = "failed")]
    Failed,
    #[serde(rename = "cancelled")]
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Busy => "busy",
            Outcome::NoAnswer => "no-answer",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A call that a release ended.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Ended {
    pub id: Uuid,
    pub user_id: Uuid,
}

/// Ends the call the provider knows as `provider_call_id` with its outcome, if it is still
/// dialing or in a call. `None` when nothing changed: no such call for the tenant, or it had
/// already ended (a duplicate or late webhook) — so a call is ended, and its slot released, at
/// most once.
pub async fn end_by_provider_id(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider_call_id: &str,
    outcome: Outcome,
    ended_reason: Option<&str>,
    duration_ms: Option<i64>,
) -> Result<Option<Ended>, Error> {
    Ok(sqlx::query_as(
        "update calls set state = $3, outcome = $3, ended_reason = $4, duration_ms = $5,
                          ended_at = now(), updated_at = now()
         where tenant_id = $1 and provider_call_id = $2 and state in ('dialing', 'in_call')
         returning id, user_id",
    )
    .bind(tenant.0)
    .bind(provider_call_id)
    .bind(outcome.as_str())
    .bind(ended_reason)
    .bind(duration_ms)
    .fetch_optional(conn)
    .await?)
}

/// A call as release sees it: found by the provider's id.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CallRef {
    pub id: Uuid,
    pub user_id: Uuid,
    pub state: String,
}

/// The tenant's call the provider knows as `provider_call_id`, if recorded yet.
pub async fn call_by_provider_id(
    pool: &PgPool,
    tenant: TenantId,
    provider_call_id: &str,
) -> Result<Option<CallRef>, Error> {
    Ok(sqlx::query_as(
        "select id, user_id, state from calls where tenant_id = $1 and provider_call_id = $2",
    )
    .bind(tenant.0)
    .bind(provider_call_id)
    .fetch_optional(pool)
    .await?)
}

/// Records a duration learned after the call ended (an end-of-call report arriving after the
/// status update), when none is recorded yet.
pub async fn fill_duration(
    pool: &PgPool,
    tenant: TenantId,
    provider_call_id: &str,
    duration_ms: i64,
) -> Result<(), Error> {
    sqlx::query(
        "update calls set duration_ms = $3, updated_at = now()
         where tenant_id = $1 and provider_call_id = $2 and duration_ms is null
           and state not in ('queued', 'dialing', 'in_call')",
    )
    .bind(tenant.0)
    .bind(provider_call_id)
    .bind(duration_ms)
    .execute(pool)
    .await?;
    Ok(())
}

/// The provider says the call is ringing or connected: `dialing → in_call`.
pub async fn mark_in_call(
    pool: &PgPool,
    tenant: TenantId,
    provider_call_id: &str,
) -> Result<bool, Error> {
    let updated = sqlx::query(
        "update calls set state = 'in_call', updated_at = now()
         where tenant_id = $1 and provider_call_id = $2 and state = 'dialing'",
    )
    .bind(tenant.0)
    .bind(provider_call_id)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Ends calls still dialing or in a call whose slot lease ran out (`dialed_at` before
/// `older_than`): their webhook never came, or dispatch died between recording the attempt and
/// learning the provider's id. They are `failed` with the reason; none is dialled again, since
/// the provider may have placed it. Returns the calls ended.
pub async fn expire_live_calls(
    conn: &mut PgConnection,
    tenant: TenantId,
    older_than: DateTime<Utc>,
) -> Result<Vec<Ended>, Error> {
    Ok(sqlx::query_as(
        "update calls set state = 'failed', outcome = 'failed',
                          error = 'no call-ended signal before the slot lease expired',
                          ended_at = now(), updated_at = now()
         where tenant_id = $1 and state in ('dialing', 'in_call') and dialed_at < $2
         returning id, user_id",
    )
    .bind(tenant.0)
    .bind(older_than)
    .fetch_all(conn)
    .await?)
}

/// When the tenant's oldest live call (dialing or in a call) was dialled, if any: its lease runs
/// out from then.
pub async fn oldest_live_dialed_at(
    pool: &PgPool,
    tenant: TenantId,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(sqlx::query_scalar(
        "select min(dialed_at) from calls
         where tenant_id = $1 and state in ('dialing', 'in_call')",
    )
    .bind(tenant.0)
    .fetch_one(pool)
    .await?)
}

/// Marks active campaigns whose calls have all ended `completed`; returns how many. A campaign
/// serving a sequence's call step is never complete: its sequence may queue more calls.
pub async fn complete_finished_campaigns(pool: &PgPool, tenant: TenantId) -> Result<u64, Error> {
    Ok(sqlx::query(
        "update call_campaigns c set status = 'completed', updated_at = now()
         where c.tenant_id = $1 and c.status = 'active' and c.sequence_id is null
           and not exists (select 1 from calls k where k.tenant_id = $1 and k.campaign_id = c.id
                             and k.state in ('queued', 'dialing', 'in_call'))",
    )
    .bind(tenant.0)
    .execute(pool)
    .await?
    .rows_affected())
}

// ---------------------------------------------------------------------------------------------
// Call views and why a call waits

/// A call as the views show it. `seq` is the order calls were queued in (FIFO within a
/// priority; 0 = a named contact, first); `slot_turn` the order they were admitted in.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct CallView {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub user_id: Uuid,
    pub contact_id: Uuid,
    pub phone: String,
    pub name: Option<String>,
    pub priority: i16,
    pub seq: i64,
    pub state: String,
    pub outcome: Option<String>,
    pub ended_reason: Option<String>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
    pub attempts: i32,
    pub provider_call_id: Option<String>,
    pub slot_turn: Option<i64>,
    pub dialed_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const CALL_VIEW_COLUMNS: &str = "id, campaign_id, user_id, contact_id, phone, name, priority, \
    seq, state, outcome, ended_reason, error, duration_ms, attempts, provider_call_id, slot_turn, \
    dialed_at, ended_at, created_at";

/// The call states a view may filter on.
pub const CALL_STATES: &[&str] = &[
    "queued",
    "dialing",
    "in_call",
    "completed",
    "failed",
    "cancelled",
    "busy",
    "no-answer",
];

/// A campaign's calls in dispatch order (priority, then FIFO), `limit` at most, after the call
/// at `after` (`(priority, seq)` of the last call of the previous page), optionally in one
/// state. `NotFound` when the campaign is not the tenant's.
pub async fn campaign_calls(
    pool: &PgPool,
    tenant: TenantId,
    campaign_id: Uuid,
    state: Option<&str>,
    after: Option<(i16, i64)>,
    limit: i64,
) -> Result<Vec<CallView>, Error> {
    campaign(pool, tenant, campaign_id).await?;
    if let Some(state) = state
        && !CALL_STATES.contains(&state)
    {
        return Err(Error::invalid(
            "state",
            format!("{state:?} is not one of {}", CALL_STATES.join(", ")),
        ));
    }
    let (after_priority, after_seq) = after.unwrap_or((i16::MIN, i64::MIN));
    Ok(sqlx::query_as(&format!(
        "select {CALL_VIEW_COLUMNS} from calls
         where tenant_id = $1 and campaign_id = $2 and ($3::text is null or state = $3)
           and (priority, seq) > ($4, $5)
         order by priority, seq
         limit $6"
    ))
    .bind(tenant.0)
    .bind(campaign_id)
    .bind(state)
    .bind(after_priority)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The tenant's call `id`.
pub async fn call(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<CallView, Error> {
    sqlx::query_as(&format!(
        "select {CALL_VIEW_COLUMNS} from calls where tenant_id = $1 and id = $2"
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Error::not_found(format!("call {id}")))
}

/// The tenant's last refusal by the fleet-wide call cap, as dispatch recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct FleetWaitRecord {
    pub fleet_limit: i32,
    pub share: i32,
    pub held: i32,
}

/// Records (`Some`) or clears (`None`) the tenant's refusal by the fleet cap at the end of a
/// dispatch run.
pub async fn record_fleet_wait(
    conn: &mut PgConnection,
    tenant: TenantId,
    wait: Option<FleetWaitRecord>,
) -> Result<(), Error> {
    match wait {
        Some(wait) => {
            sqlx::query(
                "insert into call_fleet_waits (tenant_id, fleet_limit, share, held)
                 values ($1, $2, $3, $4)
                 on conflict (tenant_id) do update
                     set fleet_limit = excluded.fleet_limit, share = excluded.share,
                         held = excluded.held, recorded_at = now()",
            )
            .bind(tenant.0)
            .bind(wait.fleet_limit)
            .bind(wait.share)
            .bind(wait.held)
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("delete from call_fleet_waits where tenant_id = $1")
                .bind(tenant.0)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// What decides whether a user's queued calls can start, read in one statement: the user's calls
/// in progress and limit, the tenant's calls in progress and system limit (10 until a provider is
/// set), and the tenant's last fleet refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitContext {
    pub user_in_use: i64,
    pub user_limit: i32,
    pub tenant_in_use: i64,
    pub system_limit: i32,
    pub fleet: Option<FleetWaitRecord>,
}

pub async fn wait_context(
    pool: &PgPool,
    tenant: TenantId,
    user: Uuid,
) -> Result<WaitContext, Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        user_in_use: i64,
        user_limit: Option<i32>,
        tenant_in_use: i64,
        system_limit: Option<i32>,
        fleet_limit: Option<i32>,
        share: Option<i32>,
        held: Option<i32>,
    }
    let row: Row = sqlx::query_as(
        "select
             (select count(*) from calls where tenant_id = $1 and user_id = $2
                and state in ('dialing', 'in_call')) as user_in_use,
             (select concurrent_calls_limit from call_users
                where tenant_id = $1 and id = $2) as user_limit,
             (select count(*) from calls where tenant_id = $1
                and state in ('dialing', 'in_call')) as tenant_in_use,
             (select system_limit from voice_providers where tenant_id = $1) as system_limit,
             w.fleet_limit, w.share, w.held
         from (select 1) as one
         left join call_fleet_waits w on w.tenant_id = $1",
    )
    .bind(tenant.0)
    .bind(user)
    .fetch_one(pool)
    .await?;
    Ok(WaitContext {
        user_in_use: row.user_in_use,
        user_limit: row.user_limit.unwrap_or(DEFAULT_CONCURRENT_CALLS as i32),
        tenant_in_use: row.tenant_in_use,
        system_limit: row.system_limit.unwrap_or(DEFAULT_SYSTEM_LIMIT as i32),
        fleet: match (row.fleet_limit, row.share, row.held) {
            (Some(fleet_limit), Some(share), Some(held)) => Some(FleetWaitRecord {
                fleet_limit,
                share,
                held,
            }),
            _ => None,
        },
    })
}

/// The user's active campaigns that still have queued calls.
pub async fn user_runnable_campaigns(
    pool: &PgPool,
    tenant: TenantId,
    user: Uuid,
) -> Result<Vec<RunnableCampaign>, Error> {
    Ok(sqlx::query_as(
        "select c.id, c.user_id, c.first_call_time, c.last_call_time, c.time_zone, c.start_date
         from call_campaigns c
         where c.tenant_id = $1 and c.user_id = $2 and c.status = 'active'
           and exists (select 1 from calls k where k.tenant_id = $1 and k.campaign_id = c.id
                         and k.state = 'queued')
         order by c.id",
    )
    .bind(tenant.0)
    .bind(user)
    .fetch_all(pool)
    .await?)
}

/// For each of `calls` (queued calls of `user`), how many of the user's queued calls in
/// `open_campaigns` go before it in dispatch order (priority, then FIFO). Calls outside those
/// campaigns, or no longer queued, are left out.
pub async fn queued_ahead(
    pool: &PgPool,
    tenant: TenantId,
    user: Uuid,
    open_campaigns: &[Uuid],
    calls: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, i64>, Error> {
    if open_campaigns.is_empty() || calls.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "select id, ahead from (
             select id, row_number() over (order by priority, seq) - 1 as ahead
             from calls
             where tenant_id = $1 and user_id = $2 and state = 'queued'
               and campaign_id = any($3)
         ) as queue
         where id = any($4)",
    )
    .bind(tenant.0)
    .bind(user)
    .bind(open_campaigns)
    .bind(calls)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_must_be_e164() {
        assert_eq!(
            normalize_phone("+44 20 7946-0000").unwrap(),
            "+442079460000"
        );
        assert_eq!(
            normalize_phone("+1 (415) 555.0100").unwrap(),
            "+14155550100"
        );
        assert!(normalize_phone("020 7946 0000").is_err());
        assert!(normalize_phone("+0441234567").is_err());
        assert!(normalize_phone("+12345").is_err());
        assert!(normalize_phone("+1234567890123456").is_err());
        assert!(normalize_phone("+44abc1234567").is_err());
    }

    #[test]
    fn contact_csv_rows_are_reported_by_line_and_column() {
        let csv =
            "Name,PHONE,company\nAnn,+14155550100,Acme\nBob,555,\n,,\n,+442079460000,\nX,+1,2,3\n";
        let rows = parse_contacts_csv(csv.as_bytes()).unwrap();
        assert_eq!(rows.len(), 4);
        let ann = rows[0].contact.as_ref().unwrap();
        assert_eq!(ann.name.as_deref(), Some("Ann"));
        assert_eq!(ann.context["company"], "Acme");
        let bad = rows[1].contact.as_ref().unwrap_err();
        assert_eq!((bad.line, bad.column.as_str()), (3, "phone"));
        assert_eq!(rows[2].contact.as_ref().unwrap().name, None);
        assert_eq!(rows[2].line, 5);
        assert_eq!(rows[3].contact.as_ref().unwrap_err().column, "(row)");
        assert!(parse_contacts_csv(b"name,email\nA,a@b\n").is_err());
        assert!(parse_contacts_csv(b"\x00\x01\x02").is_err());
        assert!(parse_contacts_csv(b"   ").is_err());
    }

    #[test]
    fn contacts_keep_a_name_only_when_not_blank() {
        let c = NewContact::new("+14155550100", Some("  "), Map::new()).unwrap();
        assert_eq!(c.name, None);
        let c = NewContact::new("+14155550100", Some(" Ann "), Map::new()).unwrap();
        assert_eq!(c.name.as_deref(), Some("Ann"));
        assert!(NewContact::new("555", None, Map::new()).is_err());
    }
}
