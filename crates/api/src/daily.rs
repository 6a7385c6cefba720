//! The daily VA assignment over HTTP: the tenant's profile pool (import, stats), daily
//! campaigns (start, list, view, live progress as server-sent events, resume) and the rolling
//! 7-day cleanup on demand.
//!
//! Every route acts for a tenant token on the tenant's own data; an ops token is 403 and another
//! tenant's campaign is 404. Starting, resuming and cleaning up only write Postgres (the
//! campaign and its outbox rows, in one transaction, through `herald-jobs`): the workers do the
//! work, and these handlers never wait on it.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use futures::Stream;
use herald_core::TenantId;
use herald_store::daily::{self, CampaignId, CampaignView, Shape};
use herald_store::profiles::{self, InputRow};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::Caller;
use crate::extract::{OptionalJsonBody, Params, QueryParams, body_rejection, is_json_mime};
use crate::{ApiError, AppState};

/// Defaults of `POST /v1/campaigns/daily`: the seed's 14,400 profiles over 80 VA tables of 180.
pub const DEFAULT_TARGET: u32 = 14_400;
pub const DEFAULT_TABLES: u32 = 80;
pub const DEFAULT_PER_TABLE: u32 = 180;
/// The default and largest page of campaigns.
const CAMPAIGN_PAGE_DEFAULT: i64 = 50;
const CAMPAIGN_PAGE_MAX: i64 = 500;
/// The content types `POST /v1/profiles` takes, as the 415 message names them.
const IMPORT_MEDIA_TYPES: &str = "text/csv, application/json or multipart/form-data";

/// What an upload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Csv,
    Json,
}

/// The media type of a `Content-Type` value, lower-cased, without parameters.
pub(crate) fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

pub(crate) fn is_csv_mime(mime: &str) -> bool {
    matches!(mime, "text/csv" | "application/csv" | "text/x-csv")
}

/// Parses an upload into rows: a body that is not CSV at all is 400 `malformed_csv`, JSON that
/// does not parse is 400 `malformed_json`, JSON of the wrong shape 422 naming the field.
fn parse_upload(format: Format, bytes: &[u8]) -> Result<Vec<InputRow>, ApiError> {
    match format {
        Format::Csv => profiles::parse_csv(bytes).map_err(|e| match e {
            herald_store::Error::Invalid { reason, .. } => ApiError::MalformedCsv(reason),
            other => other.into(),
        }),
        Format::Json => {
            serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
                .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
            profiles::parse_json(bytes).map_err(ApiError::from)
        }
    }
}

/// The file of a multipart upload: the part named `file`, else the first part with a file name.
/// Its format comes from the part's content type, else its file name's extension (CSV unless it
/// says JSON).
pub(crate) async fn multipart_file(
    mut form: Multipart,
    limit: usize,
) -> Result<(Format, Bytes), ApiError> {
    let bad = |message: String| ApiError::BadRequest {
        field: "file".into(),
        message,
    };
    let read_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            bad(e.body_text())
        }
    };
    while let Some(field) = form.next_field().await.map_err(read_error)? {
        let is_file = field.name() == Some("file") || field.file_name().is_some();
        if !is_file {
            continue;
        }
        let by_type = field.content_type().map(media_type);
        let by_name = field
            .file_name()
            .map(|name| name.to_ascii_lowercase().ends_with(".json"));
        let format = match (by_type.as_deref(), by_name) {
            (Some(mime), _) if is_json_mime(mime) => Format::Json,
            (Some(mime), _) if is_csv_mime(mime) => Format::Csv,
            (_, Some(true)) => Format::Json,
            _ => Format::Csv,
        };
        let bytes = field.bytes().await.map_err(read_error)?;
        return Ok((format, bytes));
    }
    Err(bad(
        "the form holds no file; send the CSV or JSON as a part named `file`".into(),
    ))
}

/// `POST /v1/profiles`: a CSV body (header required), a JSON body `{"profiles": [...]}`, or a
/// multipart form with the file in a part named `file`. Good rows go in, duplicates and bad
/// rows are reported with their line numbers.
pub async fn import_profiles(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let limit = state.config().import_body_limit;
    let mime = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type)
        .unwrap_or_default();
    let (format, bytes) = if mime == "multipart/form-data" {
        let form = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::BadRequest {
                field: "(body)".into(),
                message: e.body_text(),
            })?;
        multipart_file(form, limit).await?
    } else {
        let format = if is_csv_mime(&mime) {
            Format::Csv
        } else if is_json_mime(&mime) {
            Format::Json
        } else {
            return Err(ApiError::UnsupportedMediaType(IMPORT_MEDIA_TYPES));
        };
        let bytes = Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_rejection(e, limit))?;
        (format, bytes)
    };
    let rows = parse_upload(format, &bytes)?;
    let report = profiles::import(state.pool(), tenant, rows).await?;
    state
        .metrics()
        .profiles_imported(report.inserted, report.duplicates, report.rejected);
    tracing::info!(
        %tenant,
        inserted = report.inserted,
        duplicates = report.duplicates,
        rejected = report.rejected,
        "profiles imported"
    );
    Ok((StatusCode::OK, Json(json!(report))).into_response())
}

/// `GET /v1/profiles/stats`: the pool's total, unused and used counts.
pub async fn profile_stats(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let stats = profiles::stats(state.pool(), tenant).await?;
    Ok(Json(json!(stats)))
}

/// The body of `POST /v1/campaigns/daily`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyRequest {
    pub date: Option<NaiveDate>,
    pub shape: Shape,
}

fn object(body: &Option<Value>, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let map = match body {
        None => return Ok(Map::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(ApiError::invalid("(body)", "must be a JSON object")),
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            unknown.clone(),
            format!("unknown field; expected {}", allowed.join(", ")),
        ));
    }
    Ok(map.clone())
}

fn date_field(map: &Map<String, Value>) -> Result<Option<NaiveDate>, ApiError> {
    match map.get("date") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(Some)
            .map_err(|_| ApiError::invalid("date", format!("{s:?} is not a date (YYYY-MM-DD)"))),
        Some(_) => Err(ApiError::invalid(
            "date",
            "must be a string, a date (YYYY-MM-DD)",
        )),
    }
}

fn count_field(map: &Map<String, Value>, name: &str, default: u32) -> Result<u32, ApiError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ApiError::invalid(name, "must be a whole number ≥ 1")),
    }
}

/// Validates `{"date"?, "target"?, "tables"?, "per_table"?}`; the error names the field.
pub fn parse_daily_request(body: &Option<Value>) -> Result<DailyRequest, ApiError> {
    let map = object(body, &["date", "target", "tables", "per_table"])?;
    let date = date_field(&map)?;
    let target = count_field(&map, "target", DEFAULT_TARGET)?;
    let tables = count_field(&map, "tables", DEFAULT_TABLES)?;
    let per_table = count_field(&map, "per_table", DEFAULT_PER_TABLE)?;
    let shape = Shape::new(target, tables, per_table)?;
    Ok(DailyRequest { date, shape })
}

/// A campaign view as JSON, with extra top-level fields.
fn view_json(view: &CampaignView, extra: &[(&str, Value)]) -> Value {
    let mut value = json!(view);
    if let Value::Object(map) = &mut value {
        for (name, v) in extra {
            map.insert((*name).to_owned(), v.clone());
        }
    }
    value
}

/// `POST /v1/campaigns/daily` → 202 with the campaign's view and `created` (false when the
/// tenant already has a campaign for that date: that one is returned, nothing new is started).
pub async fn start_daily(
    State(state): State<AppState>,
    caller: Caller,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let request = parse_daily_request(&body)?;
    let started =
        herald_jobs::daily::start_daily(state.pool(), tenant, request.date, request.shape).await?;
    if started.created {
        tracing::info!(%tenant, campaign = %started.campaign.id, date = %started.campaign.date, "daily campaign started");
    }
    let body = view_json(
        &started.campaign.view(),
        &[("created", json!(started.created))],
    );
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// A campaign id from the path; anything but a UUID is 404 (no such campaign), like job ids.
fn campaign_id(id: &str) -> Result<CampaignId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("campaign {id:?}")))
}

#[derive(Debug, Deserialize)]
pub struct CampaignPage {
    limit: Option<i64>,
}

/// `GET /v1/campaigns`: the tenant's campaigns, newest first.
pub async fn list_campaigns(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(page): QueryParams<CampaignPage>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let limit = page.limit.unwrap_or(CAMPAIGN_PAGE_DEFAULT);
    if !(1..=CAMPAIGN_PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest {
            field: "limit".into(),
            message: format!("must be 1 to {CAMPAIGN_PAGE_MAX}"),
        });
    }
    let campaigns: Vec<CampaignView> = daily::list(state.pool(), tenant, limit)
        .await?
        .iter()
        .map(daily::Campaign::view)
        .collect();
    Ok(Json(json!({ "campaigns": campaigns })))
}

/// `GET /v1/campaigns/{id}`: status, stage, progress, counts, error.
pub async fn get_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let view = daily::view(state.pool(), tenant, campaign_id(&id)?).await?;
    Ok(Json(json!(view)))
}

/// Where the event stream is.
enum EventsState {
    /// A view to send next.
    Send(Box<CampaignView>),
    /// Sent this view; poll until it changes.
    Poll(Box<CampaignView>),
    /// The campaign finished (or vanished); the stream ends.
    Done,
}

fn campaign_event(view: &CampaignView) -> Event {
    let event = Event::default()
        .event("campaign")
        .id(view.updated_at.timestamp_micros().to_string());
    match event.json_data(view) {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(error = %e, "encoding a campaign event");
            Event::default().event("error").data("internal error")
        }
    }
}

/// The campaign's views as events: the current one at once, then each change (polling Postgres
/// every `every`), ending after the first `complete` or `failed` view.
fn campaign_events_stream(
    state: AppState,
    tenant: TenantId,
    id: CampaignId,
    first: CampaignView,
    every: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(EventsState::Send(Box::new(first)), move |events| {
        let state = state.clone();
        async move {
            let sent = match events {
                EventsState::Done => return None,
                EventsState::Send(view) => view,
                EventsState::Poll(last) => loop {
                    tokio::time::sleep(every).await;
                    match daily::view(state.pool(), tenant, id).await {
                        Ok(view) if view != *last => break Box::new(view),
                        Ok(_) => {}
                        Err(herald_store::Error::NotFound { .. }) => {
                            let gone = Event::default()
                                .event("error")
                                .data(format!("campaign {id} no longer exists"));
                            return Some((Ok(gone), EventsState::Done));
                        }
                        Err(e) => {
                            // A transient database error: keep the stream and try again.
                            tracing::warn!(error = %e, campaign = %id, "polling a campaign for events");
                        }
                    }
                },
            };
            let event = campaign_event(&sent);
            let next = if sent.status == "running" {
                EventsState::Poll(sent)
            } else {
                EventsState::Done
            };
            Some((Ok(event), next))
        }
    })
}

/// `GET /v1/campaigns/{id}/events`: server-sent events (`event: campaign`, data: the view of
/// `GET /v1/campaigns/{id}`) at once and on every change, until the campaign is complete or
/// failed.
pub async fn campaign_events(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = campaign_id(&id)?;
    let first = daily::view(state.pool(), tenant, id).await?;
    let every = state.config().events_poll_interval;
    let stream = campaign_events_stream(state, tenant, id, first, every);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `POST /v1/campaigns/{id}/resume`: a failed campaign continues from the stage that failed;
/// any other state is 409.
pub async fn resume_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = campaign_id(&id)?;
    let campaign = herald_jobs::daily::resume(state.pool(), tenant, id).await?;
    tracing::info!(%tenant, campaign = %id, stage = %campaign.stage, "daily campaign resumed");
    Ok((StatusCode::ACCEPTED, Json(json!(campaign.view()))).into_response())
}

/// `POST /v1/cleanup` with an optional `{"date": "YYYY-MM-DD"}` (default: today in the tenant's
/// time zone) → 202 with the cleanup job's id.
pub async fn cleanup(
    State(state): State<AppState>,
    caller: Caller,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let map = object(&body, &["date"])?;
    let date = date_field(&map)?;
    let job_id = herald_jobs::daily::enqueue_cleanup(state.pool(), tenant, date).await?;
    let queue = <herald_jobs::daily::DailyCleanup as herald_core::JobPayload>::QUEUE;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": job_id, "queue": queue, "date": date})),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_requests_default_to_the_seed_and_name_the_bad_field() {
        let request = parse_daily_request(&None).unwrap();
        assert_eq!(request.date, None);
        assert_eq!(
            (
                request.shape.target(),
                request.shape.tables(),
                request.shape.per_table()
            ),
            (14_400, 80, 180)
        );
        let given = parse_daily_request(&Some(
            json!({"date": "2026-03-01", "target": 20, "tables": 2, "per_table": 10}),
        ))
        .unwrap();
        assert_eq!(given.date, NaiveDate::from_ymd_opt(2026, 3, 1));
        for (body, field) in [
            (json!({"date": "01/03/2026"}), "date"),
            (json!({"date": 20260301}), "date"),
            (json!({"target": -1}), "target"),
            (json!({"target": 1.5}), "target"),
            (json!({"tables": "80"}), "tables"),
            (json!({"tables": 0}), "tables"),
            (json!({"per_table": 0}), "per_table"),
            (
                json!({"target": 100, "tables": 1, "per_table": 10}),
                "target",
            ),
            (json!({"colour": "red"}), "colour"),
            (json!([1]), "(body)"),
        ] {
            match parse_daily_request(&Some(body.clone())) {
                Err(ApiError::Invalid { field: got, .. }) => assert_eq!(got, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn media_types_ignore_parameters_and_case() {
        assert_eq!(media_type("Text/CSV; charset=utf-8"), "text/csv");
        assert!(is_csv_mime(&media_type("application/csv")));
        assert!(!is_csv_mime(&media_type("text/plain")));
    }
}
