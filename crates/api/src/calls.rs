//! Call campaigns over HTTP: users, agents (removing one pauses its active campaigns), contacts
//! (deleting one cancels its queued calls), the tenant's voice-provider account, campaigns
//! (create from contacts or a CSV body or multipart form, list, view, update, pause, resume,
//! cancel, delete, stats, CSV templates), the calls of a campaign and one call (each queued one
//! with why it is not running yet) and the provider's webhook.
//!
//! Tenant routes act on the tenant's own data (an ops token is 403, another tenant's campaign
//! 404). Creating or resuming a campaign writes its dispatch job in Postgres (the outbox); the
//! workers place the calls. The webhook is authenticated by the tenant's shared secret
//! (`X-Vapi-Secret`, compared in constant time): a bad or missing secret is 401 and changes
//! nothing.

use axum::Json;
use axum::body::Bytes;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use herald_admission::waiting::{self, FleetWait, Usage, WaitFacts, WaitReason};
use herald_admission::window::{Window, parse_time};
use herald_connectors::voice::{self, ServerEvent};
use herald_core::TenantId;
use herald_store::calls::{self, CampaignEdit, NewCampaign, NewContact};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use crate::auth::Caller;
use crate::extract::{JsonBody, Params, QueryParams, body_rejection, is_json_mime};
use crate::routes::split_action;
use crate::{ApiError, AppState};

/// The default voice API when a tenant names none: `VOICE_API_URL`, else Vapi's.
fn default_voice_api_url() -> String {
    std::env::var("VOICE_API_URL").unwrap_or_else(|_| voice::DEFAULT_API_URL.to_owned())
}

/// A JSON body as `T`, the error naming what serde names.
fn typed<T: DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body).map_err(|e| {
        let message = e.to_string();
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .unwrap_or("(body)")
            .to_owned();
        ApiError::invalid(field, message)
    })
}

fn media_type(headers: &HeaderMap) -> String {
    crate::daily::media_type(
        headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    )
}

fn csv_error(e: herald_store::Error) -> ApiError {
    match e {
        herald_store::Error::Invalid { reason, .. } => ApiError::MalformedCsv(reason),
        other => other.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Users, agents, provider

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRequest {
    name: String,
    #[serde(default)]
    concurrent_calls_limit: Option<u32>,
}

/// `POST /v1/users` `{"name", "concurrent_calls_limit"?}` (default 2) → 201.
pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let request: UserRequest = typed(body)?;
    let user = calls::create_user(
        state.pool(),
        tenant,
        &request.name,
        request.concurrent_calls_limit,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!(user))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentRequest {
    name: String,
    assistant_id: String,
    phone_number_id: String,
}

/// `POST /v1/agents` `{"name", "assistant_id", "phone_number_id"}` → 201.
pub async fn create_agent(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let request: AgentRequest = typed(body)?;
    let agent = calls::create_agent(
        state.pool(),
        tenant,
        &request.name,
        &request.assistant_id,
        &request.phone_number_id,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!(agent))).into_response())
}

/// A path id as a uuid; anything else names nothing of the tenant's: 404.
fn path_id(what: &str, id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("{what} {id:?}")))
}

/// `DELETE /v1/agents/{id}`: the agent can no longer be used; every active campaign using it is
/// paused with the reason (shown as the campaign's `pause_reason`), its calls in progress finish.
pub async fn remove_agent(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let removal = calls::remove_agent(state.pool(), tenant, path_id("agent", &id)?).await?;
    tracing::info!(%tenant, agent = %removal.id, paused = removal.paused_campaigns.len(), "agent removed");
    Ok(Json(json!({
        "id": removal.id, "removed": true, "paused_campaigns": removal.paused_campaigns
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderRequest {
    #[serde(default)]
    api_url: Option<String>,
    api_key: String,
    webhook_secret: String,
    #[serde(default)]
    system_limit: Option<u32>,
}

/// `PUT /v1/providers/voice` `{"api_url"?, "api_key", "webhook_secret", "system_limit"?}`: the
/// tenant's provider account (the API URL defaults to `VOICE_API_URL`). The answer never
/// repeats the key or the secret.
pub async fn put_voice_provider(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let request: ProviderRequest = typed(body)?;
    let api_url = request.api_url.unwrap_or_else(default_voice_api_url);
    let provider = calls::put_voice_provider(
        state.pool(),
        tenant,
        &api_url,
        &request.api_key,
        &request.webhook_secret,
        request.system_limit,
    )
    .await?;
    Ok(Json(json!({
        "api_url": provider.api_url,
        "system_limit": provider.system_limit,
        "webhook_url": format!("/v1/webhooks/voice/{tenant}"),
    })))
}

// ---------------------------------------------------------------------------------------------
// Contacts

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactsBody {
    contacts: Vec<Value>,
}

/// The contacts of a JSON list: each `{"phone", "name"?, …context}`; a bad item is reported
/// with its number (from 1).
fn json_contacts(items: Vec<Value>) -> Vec<calls::ContactRow> {
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let line = index as u64 + 1;
            let reject = |column: &str, reason: String| calls::RejectedContact {
                line,
                column: column.to_owned(),
                reason,
            };
            let contact = match item {
                Value::Object(mut map) => {
                    let phone = map.remove("phone");
                    let name = map.remove("name");
                    match (phone, name) {
                        (Some(Value::String(phone)), Some(Value::String(name))) => {
                            NewContact::new(&phone, Some(&name), map)
                                .map_err(|r| reject("phone", r))
                        }
                        (Some(Value::String(phone)), None | Some(Value::Null)) => {
                            NewContact::new(&phone, None, map).map_err(|r| reject("phone", r))
                        }
                        (Some(Value::String(_)), Some(_)) => {
                            Err(reject("name", "name must be a string".into()))
                        }
                        (None, _) => Err(reject("phone", "phone is missing".into())),
                        (Some(_), _) => Err(reject("phone", "phone must be a string".into())),
                    }
                }
                _ => Err(reject("(item)", "must be an object".into())),
            };
            calls::ContactRow { line, contact }
        })
        .collect()
}

/// The contacts of a JSON body `{"contacts": [...]}`.
fn json_body_contacts(bytes: &[u8]) -> Result<Vec<calls::ContactRow>, ApiError> {
    let body: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let body: ContactsBody = typed(body)?;
    Ok(json_contacts(body.contacts))
}

fn multipart_rejection(e: axum::extract::multipart::MultipartRejection) -> ApiError {
    ApiError::BadRequest {
        field: "(body)".into(),
        message: e.body_text(),
    }
}

/// `POST /v1/contacts`: `{"contacts": [...]}`, a CSV (`text/csv`), or a multipart form with the
/// CSV or JSON file in a part named `file` → 200 with the stored ids and the refused rows (line,
/// column, reason).
pub async fn import_contacts(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let mime = media_type(request.headers());
    let limit = state.config().import_body_limit;
    let rows = if mime == "multipart/form-data" {
        let form = Multipart::from_request(request, &state)
            .await
            .map_err(multipart_rejection)?;
        match crate::daily::multipart_file(form, limit).await? {
            (crate::daily::Format::Csv, bytes) => {
                calls::parse_contacts_csv(&bytes).map_err(csv_error)?
            }
            (crate::daily::Format::Json, bytes) => json_body_contacts(&bytes)?,
        }
    } else if crate::daily::is_csv_mime(&mime) || is_json_mime(&mime) {
        let bytes = Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_rejection(e, limit))?;
        if crate::daily::is_csv_mime(&mime) {
            calls::parse_contacts_csv(&bytes).map_err(csv_error)?
        } else {
            json_body_contacts(&bytes)?
        }
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "text/csv, application/json or multipart/form-data",
        ));
    };
    let mut conn = state.pool().acquire().await?;
    let report = calls::import_contacts(&mut conn, tenant, rows).await?;
    Ok((StatusCode::OK, Json(json!(report))).into_response())
}

/// `DELETE /v1/contacts/{id}`: the contact is deleted and its queued calls, in every campaign,
/// are cancelled (calls in progress finish); a sequence lead waiting on such a call moves on.
pub async fn delete_contact(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id("contact", &id)?;
    let cancelled = herald_jobs::calls::delete_contact(state.pool(), tenant, id).await?;
    Ok(Json(
        json!({"id": id, "deleted": true, "cancelled_calls": cancelled}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Campaigns

/// A campaign's settings as a JSON body or upload query; every field is a string (times
/// `HH:MM`, the zone IANA, the date `YYYY-MM-DD`) so both share one parser.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSettings {
    name: String,
    user_id: Uuid,
    agent_id: Uuid,
    #[serde(default)]
    next_action: Option<String>,
    first_call_time: String,
    last_call_time: String,
    time_zone: String,
    #[serde(default)]
    start_date: Option<NaiveDate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignRequest {
    name: String,
    user_id: Uuid,
    agent_id: Uuid,
    #[serde(default)]
    next_action: Option<String>,
    first_call_time: String,
    last_call_time: String,
    time_zone: String,
    #[serde(default)]
    start_date: Option<NaiveDate>,
    contact_ids: Vec<Uuid>,
}

impl CampaignRequest {
    fn split(self) -> (CampaignSettings, Vec<Uuid>) {
        (
            CampaignSettings {
                name: self.name,
                user_id: self.user_id,
                agent_id: self.agent_id,
                next_action: self.next_action,
                first_call_time: self.first_call_time,
                last_call_time: self.last_call_time,
                time_zone: self.time_zone,
                start_date: self.start_date,
            },
            self.contact_ids,
        )
    }
}

fn window_error(field: &str, e: herald_admission::WindowError) -> ApiError {
    ApiError::invalid(field, e.to_string())
}

fn call_time(field: &'static str, value: &str) -> Result<NaiveTime, ApiError> {
    parse_time(field, value).map_err(|e| window_error(field, e))
}

fn time_zone(value: &str) -> Result<herald_admission::window::Tz, ApiError> {
    herald_admission::window::parse_zone(value).map_err(|e| window_error("time_zone", e))
}

/// Validates the window once, here: times, zone, a non-empty window. The start date defaults
/// to today in the campaign's zone.
fn new_campaign(settings: CampaignSettings) -> Result<NewCampaign, ApiError> {
    let first = call_time("first_call_time", &settings.first_call_time)?;
    let last = call_time("last_call_time", &settings.last_call_time)?;
    let zone = time_zone(&settings.time_zone)?;
    let start_date = settings
        .start_date
        .unwrap_or_else(|| chrono::Utc::now().with_timezone(&zone).date_naive());
    Window::new(first, last, zone, start_date).map_err(|e| window_error("last_call_time", e))?;
    Ok(NewCampaign {
        name: settings.name,
        user_id: settings.user_id,
        agent_id: settings.agent_id,
        next_action: settings.next_action,
        first_call_time: first,
        last_call_time: last,
        time_zone: zone.name().to_owned(),
        start_date,
    })
}

/// `Some(None)` for an explicit `null`, so an update can clear a field; an absent field is
/// `None` through `#[serde(default)]`.
fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `PATCH /v1/call-campaigns/{id}`: the fields to change; absent ones keep their value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignPatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    agent_id: Option<Uuid>,
    #[serde(default, deserialize_with = "nullable")]
    next_action: Option<Option<String>>,
    #[serde(default)]
    first_call_time: Option<String>,
    #[serde(default)]
    last_call_time: Option<String>,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    start_date: Option<NaiveDate>,
}

/// The campaign's settings after `patch`, validated as on create: the merged window must be a
/// usable one in the merged zone. A non-empty window that `patch` made empty is blamed on the
/// time the request changed.
fn edit_campaign(
    current: &calls::Campaign,
    patch: CampaignPatch,
) -> Result<CampaignEdit, ApiError> {
    let first = match &patch.first_call_time {
        Some(value) => call_time("first_call_time", value)?,
        None => current.first_call_time,
    };
    let last = match &patch.last_call_time {
        Some(value) => call_time("last_call_time", value)?,
        None => current.last_call_time,
    };
    let zone = time_zone(patch.time_zone.as_deref().unwrap_or(&current.time_zone))?;
    let start_date = patch.start_date.unwrap_or(current.start_date);
    let blamed = if patch.last_call_time.is_none() && patch.first_call_time.is_some() {
        "first_call_time"
    } else {
        "last_call_time"
    };
    Window::new(first, last, zone, start_date).map_err(|e| window_error(blamed, e))?;
    Ok(CampaignEdit {
        name: patch.name.unwrap_or_else(|| current.name.clone()),
        agent_id: patch.agent_id.unwrap_or(current.agent_id),
        next_action: patch
            .next_action
            .unwrap_or_else(|| current.next_action.clone()),
        first_call_time: first,
        last_call_time: last,
        time_zone: zone.name().to_owned(),
        start_date,
    })
}

/// `PATCH /v1/call-campaigns/{id}` `{"name"?, "agent_id"?, "next_action"?, "first_call_time"?,
/// "last_call_time"?, "time_zone"?, "start_date"?}`: changes an active or paused campaign
/// (409 once cancelled or completed). An active campaign is dispatched again at once, so a
/// window that now opens earlier starts calling without waiting for the old wake-up.
pub async fn update_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = campaign_id(&id)?;
    let patch: CampaignPatch = typed(body)?;
    let mut tx = state.pool().begin().await?;
    let current = calls::campaign_for_update(&mut tx, tenant, id).await?;
    let edit = edit_campaign(&current, patch)?;
    let updated = calls::update_campaign(&mut tx, tenant, id, &edit).await?;
    if updated.status == calls::CampaignStatus::Active {
        herald_jobs::calls::enqueue_dispatch(&mut tx, tenant, None).await?;
    }
    tx.commit().await?;
    Ok(Json(json!({ "campaign": updated })))
}

/// `POST /v1/call-campaigns` from existing contacts → 201 with the campaign and `queued`.
pub async fn create_campaign(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let (settings, contact_ids) = typed::<CampaignRequest>(body)?.split();
    let campaign = new_campaign(settings)?;
    if contact_ids.is_empty() {
        return Err(ApiError::invalid(
            "contact_ids",
            "must name at least one contact",
        ));
    }
    let (created, queued) =
        herald_jobs::calls::start_campaign(state.pool(), tenant, &campaign, &contact_ids).await?;
    tracing::info!(%tenant, campaign = %created.id, queued, "call campaign created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"campaign": created, "queued": queued})),
    )
        .into_response())
}

/// A campaign upload's multipart form: its text fields (settings) and the file (the part named
/// `file`, else the first part with a file name).
async fn multipart_upload(
    mut form: Multipart,
    limit: usize,
) -> Result<(BTreeMap<String, String>, Bytes), ApiError> {
    let read_error = |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::BadRequest {
                field: "file".into(),
                message: e.body_text(),
            }
        }
    };
    let mut fields = BTreeMap::new();
    let mut file = None;
    while let Some(field) = form.next_field().await.map_err(read_error)? {
        let is_file = field.name() == Some("file") || field.file_name().is_some();
        if is_file {
            if file.is_some() {
                return Err(ApiError::BadRequest {
                    field: "file".into(),
                    message: "the form holds more than one file".into(),
                });
            }
            let mime = field.content_type().map(media_type_of);
            if let Some(mime) = mime.filter(|m| is_json_mime(m)) {
                return Err(ApiError::BadRequest {
                    field: "file".into(),
                    message: format!("the file must be CSV, not {mime}"),
                });
            }
            file = Some(field.bytes().await.map_err(read_error)?);
        } else if let Some(name) = field.name().map(str::to_owned) {
            let value = field.text().await.map_err(read_error)?;
            fields.insert(name, value);
        }
    }
    let file = file.ok_or_else(|| ApiError::BadRequest {
        field: "file".into(),
        message: "the form holds no file; send the CSV as a part named `file`".into(),
    })?;
    Ok((fields, file))
}

fn media_type_of(value: &str) -> String {
    crate::daily::media_type(value)
}

/// `POST /v1/call-campaigns:upload`: the settings in the query with a `text/csv` body, or a
/// multipart form with the settings as fields (or in the query) and the CSV in a part named
/// `file`. The contacts are stored (bad rows reported by line and column, never blocking good
/// ones) and the campaign calls the good ones. A file that is not CSV, or is too big, is 400
/// and nothing is written.
pub async fn upload_campaign(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(mut settings): QueryParams<BTreeMap<String, String>>,
    request: Request,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let mime = media_type(request.headers());
    let limit = state.config().import_body_limit;
    let bytes = if mime == "multipart/form-data" {
        let form = Multipart::from_request(request, &state)
            .await
            .map_err(multipart_rejection)?;
        let (fields, file) = multipart_upload(form, limit).await?;
        settings.extend(fields);
        file
    } else if crate::daily::is_csv_mime(&mime) {
        Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_rejection(e, limit))?
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "text/csv or multipart/form-data",
        ));
    };
    let campaign = new_campaign(typed(json!(settings))?)?;
    let rows = calls::parse_contacts_csv(&bytes).map_err(csv_error)?;
    let mut tx = state.pool().begin().await?;
    let report = calls::import_contacts(&mut tx, tenant, rows).await?;
    if report.contact_ids.is_empty() {
        return Err(ApiError::invalid(
            "file",
            format!(
                "no usable contact in the file ({} rows refused)",
                report.rejected
            ),
        ));
    }
    let (created, queued) =
        calls::create_campaign(&mut tx, tenant, &campaign, &report.contact_ids).await?;
    herald_jobs::calls::enqueue_dispatch(&mut tx, tenant, None).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "campaign": created, "queued": queued,
            "stored": report.stored, "rejected": report.rejected,
            "rejected_rows": report.rejected_rows
        })),
    )
        .into_response())
}

const BASIC_TEMPLATE: &str = "phone,name\n+14155550100,Ada Lovelace\n+442079460000,\n";
const ADVANCED_TEMPLATE: &str = "phone,name,company,email,notes\n\
    +14155550100,Ada Lovelace,Analytical Engines,ada@example.com,Prefers mornings\n\
    +442079460000,,Example Ltd,info@example.com,\n";

/// `GET /v1/call-campaigns/templates/{basic|advanced}.csv`.
pub async fn template(caller: Caller, Params(file): Params<String>) -> Result<Response, ApiError> {
    caller.tenant()?;
    let body = match file.as_str() {
        "basic.csv" => BASIC_TEMPLATE,
        "advanced.csv" => ADVANCED_TEMPLATE,
        other => return Err(ApiError::not_found(format!("template {other:?}"))),
    };
    Ok((
        StatusCode::OK,
        [
            (CONTENT_TYPE, "text/csv; charset=utf-8"),
            (axum::http::header::CONTENT_DISPOSITION, "attachment"),
        ],
        body,
    )
        .into_response())
}

fn campaign_id(id: &str) -> Result<Uuid, ApiError> {
    path_id("call campaign", id)
}

#[derive(Deserialize)]
pub struct Page {
    limit: Option<i64>,
}

/// `GET /v1/call-campaigns?limit=`: newest first.
pub async fn list_campaigns(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(page): QueryParams<Page>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest {
            field: "limit".into(),
            message: "must be 1 to 500".into(),
        });
    }
    let campaigns = calls::list_campaigns(state.pool(), tenant, limit).await?;
    Ok(Json(json!({ "campaigns": campaigns })))
}

/// `GET /v1/call-campaigns/{id}`: the campaign with its stats.
pub async fn get_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = campaign_id(&id)?;
    let campaign = calls::campaign(state.pool(), tenant, id).await?;
    let stats = calls::campaign_stats(state.pool(), tenant, id).await?;
    Ok(Json(json!({"campaign": campaign, "stats": stats})))
}

/// `GET /v1/call-campaigns/{id}/stats`.
pub async fn campaign_stats(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let stats = calls::campaign_stats(state.pool(), tenant, campaign_id(&id)?).await?;
    Ok(Json(json!(stats)))
}

/// `POST /v1/call-campaigns/{id}:pause|:resume|:cancel`.
pub async fn campaign_action(
    State(state): State<AppState>,
    caller: Caller,
    Params(segment): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let (id, action) = split_action(&segment).ok_or(ApiError::MethodNotAllowed)?;
    let id = campaign_id(id)?;
    let pool = state.pool();
    match action {
        "pause" => {
            let campaign = calls::pause_campaign(pool, tenant, id, "paused by request").await?;
            Ok(Json(json!({ "campaign": campaign })))
        }
        "resume" => {
            let campaign = herald_jobs::calls::resume_campaign(pool, tenant, id).await?;
            Ok(Json(json!({ "campaign": campaign })))
        }
        "cancel" => {
            let cancelled = calls::cancel_campaign(pool, tenant, id).await?;
            let campaign = calls::campaign(pool, tenant, id).await?;
            Ok(Json(
                json!({ "campaign": campaign, "cancelled_calls": cancelled }),
            ))
        }
        other => Err(ApiError::RouteNotFound(format!(
            "/v1/call-campaigns/{{id}}:{other}"
        ))),
    }
}

/// `DELETE /v1/call-campaigns/{id}`: 409 while calls are in progress.
pub async fn delete_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = campaign_id(&id)?;
    calls::delete_campaign(state.pool(), tenant, id).await?;
    Ok(Json(json!({"id": id, "deleted": true})))
}

// ---------------------------------------------------------------------------------------------
// Calls, and why a queued call waits

/// The most calls one page lists.
const MAX_CALLS_PAGE: i64 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallsQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    cursor: Option<String>,
}

/// A page cursor: the last call's `<priority>.<seq>`.
fn parse_cursor(cursor: &str) -> Result<(i16, i64), ApiError> {
    let bad = || ApiError::BadRequest {
        field: "cursor".into(),
        message: "not a cursor from a previous page's next_cursor".into(),
    };
    let (priority, seq) = cursor.split_once('.').ok_or_else(bad)?;
    Ok((
        priority.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
}

fn stored_window(campaign: &calls::Campaign) -> Result<Window, ApiError> {
    Window::parse(
        campaign.first_call_time,
        campaign.last_call_time,
        &campaign.time_zone,
        campaign.start_date,
    )
    .map_err(|e| ApiError::Internal(format!("call campaign {}: {e}", campaign.id)))
}

fn count(n: impl TryInto<u32>) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}

/// The `waiting` object of a queued call.
fn waiting_json(reason: &WaitReason) -> Value {
    let name = reason.name();
    match reason {
        WaitReason::CampaignPaused { pause_reason } => json!({
            "reason": name, "pause_reason": pause_reason,
            "detail": "the campaign is paused; resume it to dispatch its calls",
        }),
        WaitReason::StartDateInFuture { opens_at } => json!({
            "reason": name, "opens_at": opens_at,
            "detail": "the campaign's start date is ahead; its window first opens at opens_at",
        }),
        WaitReason::OutsideWindow { opens_at } => json!({
            "reason": name, "opens_at": opens_at,
            "detail": "the campaign's calling window is closed until opens_at",
        }),
        WaitReason::UserLimit(usage) => json!({
            "reason": name, "in_use": usage.in_use, "limit": usage.limit,
            "detail": format!("the user has {} of {} calls in progress", usage.in_use, usage.limit),
        }),
        WaitReason::SystemLimit(usage) => json!({
            "reason": name, "in_use": usage.in_use, "limit": usage.limit,
            "detail": format!(
                "the tenant's voice account has {} of {} calls in progress",
                usage.in_use, usage.limit
            ),
        }),
        WaitReason::FleetLimit(fleet) => json!({
            "reason": name, "limit": fleet.limit, "share": fleet.share, "held": fleet.held,
            "detail": format!(
                "the fleet-wide cap of {} calls is shared with other tenants; this tenant's share is {} and it holds {}",
                fleet.limit, fleet.share, fleet.held
            ),
        }),
        WaitReason::WaitingTurn { ahead } => json!({
            "reason": name, "ahead": ahead,
            "detail": if *ahead == 0 {
                "next for its user; slots go round-robin across users".to_owned()
            } else {
                format!("{ahead} calls of the same user go first (named contacts, then in order)")
            },
        }),
    }
}

/// The calls as JSON, each queued one with `waiting`: why it is not running yet, computed from
/// the state at `now` (a pure function, `herald_admission::waiting`).
async fn with_waiting(
    state: &AppState,
    tenant: TenantId,
    views: Vec<calls::CallView>,
    now: DateTime<Utc>,
) -> Result<Vec<Value>, ApiError> {
    let pool = state.pool();
    let mut reasons: std::collections::HashMap<Uuid, WaitReason> = std::collections::HashMap::new();
    let mut by_user: BTreeMap<Uuid, Vec<&calls::CallView>> = BTreeMap::new();
    for view in views.iter().filter(|v| v.state == "queued") {
        by_user.entry(view.user_id).or_default().push(view);
    }
    for (user, queued) in by_user {
        let context = calls::wait_context(pool, tenant, user).await?;
        let mut open = Vec::new();
        for runnable in calls::user_runnable_campaigns(pool, tenant, user).await? {
            let window = Window::parse(
                runnable.first_call_time,
                runnable.last_call_time,
                &runnable.time_zone,
                runnable.start_date,
            );
            if window.is_ok_and(|w| w.is_open(now)) {
                open.push(runnable.id);
            }
        }
        let ids: Vec<Uuid> = queued.iter().map(|v| v.id).collect();
        let ahead = calls::queued_ahead(pool, tenant, user, &open, &ids).await?;
        let mut campaigns: BTreeMap<Uuid, calls::Campaign> = BTreeMap::new();
        for view in queued {
            let campaign = match campaigns.entry(view.campaign_id) {
                Entry::Occupied(known) => known.into_mut(),
                Entry::Vacant(new) => {
                    new.insert(calls::campaign(pool, tenant, view.campaign_id).await?)
                }
            };
            let facts = WaitFacts {
                paused: (campaign.status != calls::CampaignStatus::Active)
                    .then(|| campaign.pause_reason.clone()),
                window: stored_window(campaign)?,
                user: Usage {
                    in_use: count(context.user_in_use),
                    limit: count(context.user_limit),
                },
                tenant: Usage {
                    in_use: count(context.tenant_in_use),
                    limit: count(context.system_limit),
                },
                fleet: context.fleet.map(|f| FleetWait {
                    limit: count(f.fleet_limit),
                    share: count(f.share),
                    held: count(f.held),
                }),
                ahead: ahead
                    .get(&view.id)
                    .copied()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
            };
            reasons.insert(view.id, waiting::why_waiting(&facts, now));
        }
    }
    Ok(views
        .into_iter()
        .map(|view| {
            let waiting = reasons.get(&view.id).map(waiting_json);
            let mut value = json!(view);
            value["waiting"] = waiting.unwrap_or(Value::Null);
            value
        })
        .collect())
}

/// `GET /v1/call-campaigns/{id}/calls?state=&limit=&cursor=`: the campaign's calls in dispatch
/// order (named contacts first, then in the order given), each queued one with `waiting`: why it
/// is not running yet. `next_cursor` continues the list.
pub async fn list_calls(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
    QueryParams(query): QueryParams<CallsQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = campaign_id(&id)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_CALLS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest {
            field: "limit".into(),
            message: format!("must be 1 to {MAX_CALLS_PAGE}"),
        });
    }
    if let Some(wanted) = query.state.as_deref()
        && !calls::CALL_STATES.contains(&wanted)
    {
        return Err(ApiError::BadRequest {
            field: "state".into(),
            message: format!("must be one of {}", calls::CALL_STATES.join(", ")),
        });
    }
    let after = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let views = calls::campaign_calls(
        state.pool(),
        tenant,
        id,
        query.state.as_deref(),
        after,
        limit,
    )
    .await?;
    let next_cursor = (views.len() as i64 == limit)
        .then(|| views.last().map(|v| format!("{}.{}", v.priority, v.seq)))
        .flatten();
    let calls = with_waiting(&state, tenant, views, Utc::now()).await?;
    Ok(Json(json!({"calls": calls, "next_cursor": next_cursor})))
}

/// `GET /v1/calls/{id}`: one call; queued, with `waiting`.
pub async fn get_call(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let view = calls::call(state.pool(), tenant, path_id("call", &id)?).await?;
    let mut calls = with_waiting(&state, tenant, vec![view], Utc::now()).await?;
    let call = calls.pop().unwrap_or(Value::Null);
    Ok(Json(json!({ "call": call })))
}

// ---------------------------------------------------------------------------------------------
// Webhook

/// Whether `given` is the tenant's secret, compared in constant time.
fn secret_matches(expected: &str, given: Option<&str>) -> bool {
    given.is_some_and(|given| bool::from(expected.as_bytes().ct_eq(given.as_bytes())))
}

/// `POST /v1/webhooks/voice/{tenant_id}`: a Vapi server message with the tenant's secret in
/// `X-Vapi-Secret`. Unknown tenant, no provider, or a bad or missing secret: 401, nothing
/// changes. A call-ended message writes a release job keyed by the provider's call id.
pub async fn voice_webhook(
    State(state): State<AppState>,
    Params(tenant): Params<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    const REFUSED: &str = "missing or wrong X-Vapi-Secret";
    let tenant: TenantId = tenant
        .parse()
        .map_err(|_| ApiError::Unauthorized(REFUSED))?;
    let provider = herald_jobs::calls::provider(state.pool(), tenant)
        .await?
        .ok_or(ApiError::Unauthorized(REFUSED))?;
    let given = headers.get("x-vapi-secret").and_then(|v| v.to_str().ok());
    if !secret_matches(&provider.webhook_secret, given) {
        tracing::warn!(%tenant, "voice webhook refused: bad secret");
        return Err(ApiError::Unauthorized(REFUSED));
    }
    let event = voice::parse_server_message(&body).map_err(|e| ApiError::BadRequest {
        field: "(body)".into(),
        message: e.to_string(),
    })?;
    let effect = herald_jobs::calls::on_server_message(state.pool(), tenant, event.clone()).await?;
    let (kind, duplicate) = match (&event, effect) {
        (
            ServerEvent::Ended { .. },
            herald_jobs::calls::MessageEffect::ReleaseQueued { duplicate },
        ) => ("ended", duplicate),
        (ServerEvent::InProgress { .. }, _) => ("in_progress", false),
        _ => ("ignored", false),
    };
    Ok(Json(json!({"received": kind, "duplicate": duplicate})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_cursors_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_cursor("0.42").unwrap(), (0, 42));
        assert_eq!(parse_cursor("1.7").unwrap(), (1, 7));
        for bad in ["", "1", "a.b", "1.2.3", "99999.1"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn waiting_reasons_name_themselves_and_their_figures() {
        let user = waiting_json(&WaitReason::UserLimit(Usage {
            in_use: 2,
            limit: 2,
        }));
        assert_eq!(user["reason"], "user_limit");
        assert_eq!(
            (user["in_use"].as_u64(), user["limit"].as_u64()),
            (Some(2), Some(2))
        );
        let fleet = waiting_json(&WaitReason::FleetLimit(FleetWait {
            limit: 6,
            share: 3,
            held: 3,
        }));
        assert_eq!(fleet["reason"], "fleet_limit");
        assert_eq!(fleet["share"], 3);
        let turn = waiting_json(&WaitReason::WaitingTurn { ahead: 4 });
        assert_eq!(
            (turn["reason"].as_str(), turn["ahead"].as_u64()),
            (Some("waiting_turn"), Some(4))
        );
    }

    #[test]
    fn secrets_must_match_exactly() {
        assert!(secret_matches("s3cret-value", Some("s3cret-value")));
        assert!(!secret_matches("s3cret-value", Some("s3cret-valuE")));
        assert!(!secret_matches("s3cret-value", Some("s3cret")));
        assert!(!secret_matches("s3cret-value", None));
    }

    #[test]
    fn json_contacts_report_the_item_and_column() {
        let rows = json_contacts(vec![
            json!({"phone": "+14155550100", "name": "Ann", "company": "Acme"}),
            json!({"name": "Bob"}),
            json!({"phone": "+1415555", "name": 5}),
            json!("x"),
        ]);
        assert_eq!(rows[0].contact.as_ref().unwrap().context["company"], "Acme");
        assert_eq!(rows[1].contact.as_ref().unwrap_err().column, "phone");
        assert_eq!(rows[2].contact.as_ref().unwrap_err().column, "name");
        assert_eq!(rows[3].contact.as_ref().unwrap_err().line, 4);
    }

    #[test]
    fn campaign_windows_are_validated_here() {
        let settings = |first: &str, last: &str, zone: &str| CampaignSettings {
            name: "c".into(),
            user_id: Uuid::nil(),
            agent_id: Uuid::nil(),
            next_action: None,
            first_call_time: first.into(),
            last_call_time: last.into(),
            time_zone: zone.into(),
            start_date: None,
        };
        assert!(new_campaign(settings("22:00", "06:00", "Europe/London")).is_ok());
        for (s, field) in [
            (settings("9am", "18:00", "UTC"), "first_call_time"),
            (settings("09:00", "09:00", "UTC"), "last_call_time"),
            (settings("09:00", "18:00", "Mars/Base"), "time_zone"),
        ] {
            match new_campaign(s) {
                Err(ApiError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{other:?}"),
            }
        }
    }
}
