//! WhatsApp template campaigns over HTTP: templates and their sample CSV, the tenant's WhatsApp
//! account settings, campaigns (create with recipients as JSON or CSV, send, pause, resume,
//! stop, retry failed, live stats, failed-recipients CSV) and Meta's webhooks (verification
//! handshake and signed status events).
//!
//! Tenant routes act on the tenant's own data (an ops token is 403, another tenant's campaign
//! 404). Webhooks are public but every POST must carry Meta's `X-Hub-Signature-256` over the
//! raw body with the tenant's app secret: without a valid one nothing changes (401). The
//! handlers only record work (through `herald-jobs`); the workers send.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_connectors::whatsapp::{SIGNATURE_HEADER, verify_signature};
use herald_core::TenantId;
use herald_store::messages::{self, Campaign, Template, WhatsAppSettings};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::Caller;
use crate::extract::{JsonBody, Params, QueryParams, body_rejection, is_json_mime};
use crate::{ApiError, AppState};

/// Default send rate and concurrency when `POST …/send` names none.
pub const DEFAULT_RATE_PER_SEC: u32 = 50;
pub const DEFAULT_CONCURRENCY: u32 = 10;

fn object(body: &Value, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError::invalid("(body)", "must be a JSON object"));
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            unknown.clone(),
            format!("unknown field; expected {}", allowed.join(", ")),
        ));
    }
    Ok(map.clone())
}

fn text(map: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    match map.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(ApiError::invalid(name, "is required")),
        Some(_) => Err(ApiError::invalid(name, "must be a string")),
    }
}

fn number(map: &Map<String, Value>, name: &str, default: u32) -> Result<u32, ApiError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ApiError::invalid(name, "must be a whole number")),
    }
}

/// An id from the path; anything but a UUID is 404, like an unknown id.
fn path_id(id: &str, what: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("{what} {id:?}")))
}

fn template_json(template: &Template) -> Value {
    let mut value = json!(template);
    value["columns"] = json!(template.columns());
    value
}

/// `POST /v1/templates` `{"name", "language", "components"}` → 201 with the template, its
/// derived parameter counts and its CSV columns.
pub async fn create_template(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let map = object(&body, &["name", "language", "components"])?;
    let components = map
        .get("components")
        .cloned()
        .ok_or_else(|| ApiError::invalid("components", "is required"))?;
    let template = messages::create_template(
        state.pool(),
        tenant,
        &text(&map, "name")?,
        &text(&map, "language")?,
        &components,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(template_json(&template))).into_response())
}

fn csv_response(filename: &str, body: String) -> Response {
    (
        [
            (CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /v1/templates/{id}/sample.csv`: the template's columns and an example row.
pub async fn sample_csv(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let template = messages::template(state.pool(), tenant, path_id(&id, "template")?).await?;
    Ok(csv_response(
        &format!("{}-sample.csv", template.name),
        messages::sample_csv(&template),
    ))
}

/// `PUT /v1/providers/whatsapp` `{"api_url"?, "token", "phone_number_id", "app_secret",
/// "verify_token"}`: replaces the tenant's WhatsApp account. The answer names no secret.
pub async fn put_provider(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let map = object(
        &body,
        &[
            "api_url",
            "token",
            "phone_number_id",
            "app_secret",
            "verify_token",
        ],
    )?;
    let api_url = match map.get("api_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.trim().to_owned()),
        Some(_) => return Err(ApiError::invalid("api_url", "must be a string")),
    };
    let settings = WhatsAppSettings {
        api_url,
        token: text(&map, "token")?,
        phone_number_id: text(&map, "phone_number_id")?,
        app_secret: text(&map, "app_secret")?,
        verify_token: text(&map, "verify_token")?,
    };
    messages::put_settings(state.pool(), tenant, &settings).await?;
    Ok(Json(json!({
        "provider": "whatsapp",
        "api_url": settings.api_url,
        "phone_number_id": settings.phone_number_id,
        "webhook_path": format!("/v1/webhooks/whatsapp/{tenant}"),
    })))
}

// ---------------------------------------------------------------------------------------------
// Campaigns

/// Where a campaign upload's recipients come from.
enum Upload {
    Csv(Bytes),
    Json(Vec<Value>),
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_csv_mime(mime: &str) -> bool {
    matches!(mime, "text/csv" | "application/csv" | "text/x-csv")
}

/// `POST /v1/message-campaigns`: a JSON body `{"name", "template_id", "recipients": [{column:
/// value…}…]}`, a CSV body with `?template_id=…&name=…`, or a multipart form with the fields
/// `template_id`, `name` and the CSV in `file`. → 201 with the draft campaign and a row report.
pub async fn create_campaign(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<HashMap<String, String>>,
    request: Request,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let limit = state.config().import_body_limit;
    let mime = media_type(request.headers());
    let mut fields: HashMap<String, String> = query;
    let upload = if mime == "multipart/form-data" {
        let mut form = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::BadRequest {
                field: "(body)".into(),
                message: e.body_text(),
            })?;
        let mut file = None;
        while let Some(field) = form.next_field().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::BadRequest {
                    field: "(body)".into(),
                    message: e.body_text(),
                }
            }
        })? {
            let name = field.name().unwrap_or_default().to_owned();
            let bytes = field.bytes().await.map_err(|e| ApiError::BadRequest {
                field: name.clone(),
                message: e.body_text(),
            })?;
            if name == "file" {
                file = Some(bytes);
            } else {
                fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        Upload::Csv(file.ok_or_else(|| ApiError::BadRequest {
            field: "file".into(),
            message: "the form holds no file; send the CSV as a part named `file`".into(),
        })?)
    } else if is_csv_mime(&mime) {
        Upload::Csv(
            Bytes::from_request(request, &state)
                .await
                .map_err(|e| body_rejection(e, limit))?,
        )
    } else if is_json_mime(&mime) {
        let bytes = Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_rejection(e, limit))?;
        let body: Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        let map = object(&body, &["name", "template_id", "recipients"])?;
        for key in ["name", "template_id"] {
            fields.insert(key.to_owned(), text(&map, key)?);
        }
        match map.get("recipients") {
            Some(Value::Array(items)) => Upload::Json(items.clone()),
            _ => return Err(ApiError::invalid("recipients", "must be a list of objects")),
        }
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "application/json, text/csv or multipart/form-data",
        ));
    };
    let template_id = fields
        .get("template_id")
        .ok_or_else(|| ApiError::invalid("template_id", "is required"))?;
    let template_id: Uuid = template_id
        .parse()
        .map_err(|_| ApiError::invalid("template_id", "must be a template id (UUID)"))?;
    let name = fields
        .get("name")
        .cloned()
        .ok_or_else(|| ApiError::invalid("name", "is required"))?;
    let template = match messages::template(state.pool(), tenant, template_id).await {
        Err(herald_store::Error::NotFound { what }) => {
            return Err(ApiError::invalid(
                "template_id",
                format!("{what} not found"),
            ));
        }
        other => other?,
    };
    let rows = match upload {
        Upload::Json(items) => messages::parse_recipients_json(&items, &template),
        Upload::Csv(bytes) => {
            messages::parse_recipients_csv(&bytes, &template).map_err(|e| match e {
                herald_store::Error::Invalid {
                    field: "file",
                    reason,
                } => ApiError::MalformedCsv(reason),
                other => other.into(),
            })?
        }
    };
    let (campaign, report) =
        messages::create_campaign(state.pool(), tenant, &name, &template, rows).await?;
    tracing::info!(%tenant, campaign = %campaign.id, accepted = report.accepted,
        rejected = report.rejected, duplicates = report.duplicates, "message campaign created");
    let mut body = json!(campaign);
    body["report"] = json!(report);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn campaign_view(
    state: &AppState,
    tenant: TenantId,
    campaign: &Campaign,
) -> Result<Value, ApiError> {
    let stats = messages::stats(state.pool(), tenant, campaign.id).await?;
    let mut body = json!(campaign);
    body["stats"] = json!(stats);
    Ok(body)
}

/// `GET /v1/message-campaigns/{id}`: the campaign and its live stats.
pub async fn get_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let mut conn = state.pool().acquire().await?;
    let campaign = messages::campaign(&mut conn, tenant, id, false).await?;
    drop(conn);
    Ok(Json(campaign_view(&state, tenant, &campaign).await?))
}

/// `GET /v1/message-campaigns/{id}/stats`: total, pending, attempting, sent, delivered, read,
/// failed, unknown.
pub async fn campaign_stats(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    Ok(Json(json!(
        messages::stats(state.pool(), tenant, id).await?
    )))
}

/// `POST /v1/message-campaigns/{id}/send` `{"rate_per_sec": 1–1000, "concurrency": 1–100}`
/// → 202: the draft starts sending, one send step per recipient.
pub async fn send_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let map = object(&body, &["rate_per_sec", "concurrency"])?;
    let rate = number(&map, "rate_per_sec", DEFAULT_RATE_PER_SEC)?;
    let concurrency = number(&map, "concurrency", DEFAULT_CONCURRENCY)?;
    let campaign =
        herald_jobs::whatsapp::start_sending(state.pool(), tenant, id, rate, concurrency).await?;
    tracing::info!(%tenant, campaign = %id, rate, concurrency, "message campaign sending");
    let view = campaign_view(&state, tenant, &campaign).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

async fn action_view(
    state: &AppState,
    tenant: TenantId,
    campaign: Campaign,
    extra: Option<(&str, Value)>,
) -> Result<Response, ApiError> {
    let mut view = campaign_view(state, tenant, &campaign).await?;
    if let Some((name, value)) = extra {
        view[name] = value;
    }
    Ok((StatusCode::OK, Json(view)).into_response())
}

/// `POST /v1/message-campaigns/{id}/pause`.
pub async fn pause_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let campaign = herald_jobs::whatsapp::pause(state.pool(), tenant, id).await?;
    action_view(&state, tenant, campaign, None).await
}

/// `POST /v1/message-campaigns/{id}/resume`.
pub async fn resume_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let campaign = herald_jobs::whatsapp::resume(state.pool(), tenant, id).await?;
    action_view(&state, tenant, campaign, None).await
}

/// `POST /v1/message-campaigns/{id}/stop`.
pub async fn stop_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let campaign = herald_jobs::whatsapp::stop(state.pool(), tenant, id).await?;
    action_view(&state, tenant, campaign, None).await
}

/// `POST /v1/message-campaigns/{id}/retry-failed`.
pub async fn retry_failed(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let (campaign, retried) = herald_jobs::whatsapp::retry_failed(state.pool(), tenant, id).await?;
    action_view(&state, tenant, campaign, Some(("retried", json!(retried)))).await
}

/// `GET /v1/message-campaigns/{id}/failed.csv`: the failed recipients in the template's columns
/// plus `error_code,error` (drop those two to upload the file again).
pub async fn failed_csv(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "message campaign")?;
    let mut conn = state.pool().acquire().await?;
    let campaign = messages::campaign(&mut conn, tenant, id, false).await?;
    drop(conn);
    let template = messages::template(state.pool(), tenant, campaign.template_id).await?;
    let failed = messages::failed_recipients(state.pool(), tenant, id).await?;
    let out = messages::failed_csv(&template, &failed);
    Ok(csv_response(&format!("{id}-failed.csv"), out))
}

// ---------------------------------------------------------------------------------------------
// Webhooks

fn webhook_tenant(id: &str) -> Result<TenantId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("tenant {id:?}")))
}

fn same_secret(a: &str, b: &str) -> bool {
    // Digests of equal length compared whole: no early exit on the first differing byte.
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// `GET /v1/webhooks/whatsapp/{tenant_id}?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`:
/// Meta's verification handshake; answers the challenge when the verify token is the tenant's,
/// else 403.
pub async fn verify_webhook(
    State(state): State<AppState>,
    Params(tenant_id): Params<String>,
    QueryParams(query): QueryParams<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let tenant = webhook_tenant(&tenant_id)?;
    let settings = messages::settings(state.pool(), tenant).await?;
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query.get("hub.verify_token").map(String::as_str);
    let challenge = query.get("hub.challenge");
    match (settings, mode, token, challenge) {
        (Some(settings), Some("subscribe"), Some(token), Some(challenge))
            if same_secret(token, &settings.verify_token) =>
        {
            Ok((
                StatusCode::OK,
                [(CONTENT_TYPE, "text/plain; charset=utf-8")],
                challenge.clone(),
            )
                .into_response())
        }
        _ => Err(ApiError::Forbidden(
            "webhook verification refused: hub.mode must be subscribe and hub.verify_token the tenant's",
        )),
    }
}

/// `POST /v1/webhooks/whatsapp/{tenant_id}`: Meta's status events, signed with the tenant's app
/// secret (`X-Hub-Signature-256`); a missing or wrong signature is 401 and changes nothing.
/// Each event moves its send only forward.
pub async fn status_webhook(
    State(state): State<AppState>,
    Params(tenant_id): Params<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let refused = ApiError::Unauthorized("missing or invalid X-Hub-Signature-256");
    let Ok(tenant) = tenant_id.parse::<TenantId>() else {
        return Err(refused);
    };
    let Some(settings) = messages::settings(state.pool(), tenant).await? else {
        return Err(refused);
    };
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    if !verify_signature(&settings.app_secret, &body, signature) {
        tracing::warn!(%tenant, "WhatsApp webhook with a bad signature refused");
        return Err(refused);
    }
    let outcome = herald_jobs::whatsapp::apply_webhook(state.pool(), tenant, &body)
        .await
        .map_err(|e| match e {
            herald_store::Error::Invalid { reason, .. } => ApiError::MalformedJson(reason),
            other => other.into(),
        })?;
    Ok((StatusCode::OK, Json(json!(outcome))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_compared_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
    }
}
