//! Multichannel sequences over HTTP: create (steps and sending rules validated: a 422 names the
//! step and the field), list, get, add leads, start, pause, stop, stats, a lead's timeline, the
//! tenant's email, LinkedIn and Instagram provider accounts, and the signed inbound webhook that
//! records replies, opens, clicks, connections and send statuses; and the tenant's lead pools
//! (`POST /v1/lead-pools/{name}/people`, `GET /v1/lead-pools/{name}`) that `lead_generation`
//! steps draw from.
//!
//! Tenant routes act on the tenant's own sequences (an ops token is 403, another tenant's 404).
//! The webhook is public but must carry `X-Herald-Signature: sha256=<hex>`, the HMAC-SHA256 of
//! the raw body with the tenant's HMAC secret (the one herald signs its http jobs with) or with
//! one of its providers' webhook secrets: without a valid one nothing changes (401). Reading,
//! verifying and applying the body is `herald_jobs::sequence_events`.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_core::TenantId;
use herald_jobs::sequence_events::{self, WebhookError};
use herald_store::sequences::pools::{self, PoolPerson};
use herald_store::sequences::providers::{self, ChannelProvider};
use herald_store::sequences::steps::{self, Channel};
use herald_store::sequences::{self, NewLead, NewSequence, Sequence};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::auth::Caller;
use crate::extract::{JsonBody, Params};
use crate::{ApiError, AppState};

/// The header carrying the inbound webhook's signature.
pub const SIGNATURE_HEADER: &str = sequence_events::SIGNATURE_HEADER;

fn object<'a>(body: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, ApiError> {
    let map = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("(body)", "must be a JSON object"))?;
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            unknown.clone(),
            format!("unknown field; expected {}", allowed.join(", ")),
        ));
    }
    Ok(map)
}

fn path_id(id: &str, what: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("{what} {id:?}")))
}

/// `POST /v1/sequences` `{"name", "steps": [...], "rules"?, "senders"?}` → 201, a draft.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let map = object(&body, &["name", "steps", "rules", "senders"])?;
    let name = map
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("name", "is required (a string)"))?;
    let steps = steps::parse_steps(map.get("steps").unwrap_or(&Value::Null))
        .map_err(|e| ApiError::invalid(e.path(), e.to_string()))?;
    // Calls name the tenant's user and agent: they must exist now (and still when the step
    // runs).
    let mut conn = state
        .pool()
        .acquire()
        .await
        .map_err(herald_store::Error::from)?;
    sequences::check_step_references(&mut conn, tenant, &steps)
        .await?
        .map_err(|e| ApiError::invalid(e.path(), e.to_string()))?;
    drop(conn);
    let rules = steps::parse_rules(map.get("rules"))
        .map_err(|e| ApiError::invalid(e.field.clone(), e.to_string()))?;
    let mut senders = BTreeMap::new();
    if let Some(value) = map.get("senders").filter(|v| !v.is_null()) {
        let items = value
            .as_object()
            .ok_or_else(|| ApiError::invalid("senders", "must map a channel to an account name"))?;
        for (channel, account) in items {
            let field = format!("senders.{channel}");
            let channel = Channel::parse(channel).ok_or_else(|| {
                ApiError::invalid(
                    field.clone(),
                    "is not a channel (email, linkedin, instagram, whatsapp)",
                )
            })?;
            let account = account
                .as_str()
                .ok_or_else(|| ApiError::invalid(field, "must be a string"))?;
            senders.insert(channel, account.to_owned());
        }
    }
    let sequence = sequences::create(
        state.pool(),
        tenant,
        &NewSequence {
            name: name.to_owned(),
            steps,
            rules,
            senders,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!(sequence))).into_response())
}

/// `GET /v1/sequences`: the tenant's sequences, newest first (at most 500).
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let list = sequences::list(state.pool(), tenant, 500).await?;
    Ok(Json(json!({ "sequences": list })))
}

async fn view(state: &AppState, tenant: TenantId, sequence: &Sequence) -> Result<Value, ApiError> {
    let stats = sequences::stats(state.pool(), tenant, sequence).await?;
    let mut body = json!(sequence);
    body["stats"] = json!(stats);
    Ok(body)
}

/// `GET /v1/sequences/{id}`: the sequence and its stats.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let sequence = sequences::get(state.pool(), tenant, path_id(&id, "sequence")?).await?;
    Ok(Json(view(&state, tenant, &sequence).await?))
}

/// `GET /v1/sequences/{id}/stats`: leads by state, per-step counts, signals.
pub async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let sequence = sequences::get(state.pool(), tenant, path_id(&id, "sequence")?).await?;
    Ok(Json(json!(
        sequences::stats(state.pool(), tenant, &sequence).await?
    )))
}

/// `POST /v1/sequences/{id}/leads` `{"leads": [{"external_id"?, "first_name", …}]}`: each lead's
/// fields are [`steps::VARIABLES`]; a lead lacking the address a step's channel needs is 422.
pub async fn add_leads(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "sequence")?;
    let sequence = sequences::get(state.pool(), tenant, id).await?;
    let needed: Vec<&str> = sequence
        .parsed_steps()
        .map(|s| steps::needed_variables(&s))
        .unwrap_or_default();
    let map = object(&body, &["leads"])?;
    let items = map
        .get("leads")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("leads", "must be a list of objects"))?;
    let mut leads = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let lead = parse_lead(item, &needed).map_err(|(field, reason)| {
            ApiError::invalid(
                if field.is_empty() {
                    format!("leads[{i}]")
                } else {
                    format!("leads[{i}].{field}")
                },
                reason,
            )
        })?;
        leads.push(lead);
    }
    let added = herald_jobs::sequences::add_leads(state.pool(), tenant, id, &leads).await?;
    Ok((StatusCode::CREATED, Json(json!(added))).into_response())
}

/// One lead object (`{"external_id"?, "first_name", …}`): each field a string, one of
/// `external_id` and [`steps::VARIABLES`]; `needed` variables must be present and not empty. The
/// error is `(field, reason)`, the field empty for the object itself.
fn parse_lead(item: &Value, needed: &[&str]) -> Result<NewLead, (String, String)> {
    let fields = item
        .as_object()
        .ok_or_else(|| (String::new(), "must be an object".to_owned()))?;
    let mut lead = NewLead {
        external_id: None,
        variables: BTreeMap::new(),
    };
    for (key, value) in fields {
        let text = value
            .as_str()
            .ok_or_else(|| (key.clone(), "must be a string".to_owned()))?
            .trim()
            .to_owned();
        if key == "external_id" {
            lead.external_id = Some(text);
        } else if steps::VARIABLES.contains(&key.as_str()) {
            lead.variables.insert(key.clone(), text);
        } else {
            return Err((
                key.clone(),
                format!(
                    "unknown field; expected external_id, {}",
                    steps::VARIABLES.join(", ")
                ),
            ));
        }
    }
    if let Some(missing) = needed
        .iter()
        .find(|v| lead.variables.get(**v).is_none_or(|s| s.is_empty()))
    {
        return Err((
            (*missing).to_owned(),
            "is required by this sequence's steps".to_owned(),
        ));
    }
    Ok(lead)
}

fn pool_name(name: &str) -> Result<&str, ApiError> {
    steps::check_pool_name(name).map_err(|reason| ApiError::BadRequest {
        field: "name".into(),
        message: format!("lead pool name {reason}"),
    })?;
    Ok(name)
}

/// `POST /v1/lead-pools/{name}/people` `{"people": [{"external_id", "first_name", …}]}` (the
/// lead shape of `POST /v1/sequences/{id}/leads`, `external_id` required): loads people into the
/// pool, row by row. Returns 200 with `{accepted, added, updated, rejected: [{index, field,
/// reason}]}`; a rejected row is skipped, the others are stored. A person already in the pool
/// gets the new variables and keeps their place in the draw order.
pub async fn load_pool(
    State(state): State<AppState>,
    caller: Caller,
    Params(name): Params<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let name = pool_name(&name)?;
    let map = object(&body, &["people"])?;
    let items = map
        .get("people")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("people", "must be a list of objects"))?;
    if items.len() > pools::MAX_PEOPLE_PER_REQUEST {
        return Err(ApiError::invalid(
            "people",
            format!(
                "at most {} people per request",
                pools::MAX_PEOPLE_PER_REQUEST
            ),
        ));
    }
    let mut people = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let person = parse_lead(item, &[]).and_then(|lead| {
            let id = lead.external_id.unwrap_or_default();
            if id.is_empty() {
                return Err(("external_id".to_owned(), "is required".to_owned()));
            }
            if id.chars().count() > pools::MAX_EXTERNAL_ID_LEN {
                return Err((
                    "external_id".to_owned(),
                    format!("must be at most {} characters", pools::MAX_EXTERNAL_ID_LEN),
                ));
            }
            if let Some(phone) = lead.variables.get("phone").filter(|p| !p.is_empty()) {
                herald_store::calls::normalize_phone(phone)
                    .map_err(|reason| ("phone".to_owned(), reason))?;
            }
            let mut variables = lead.variables;
            variables.retain(|_, v| !v.is_empty());
            Ok(PoolPerson {
                external_person_id: id,
                variables,
            })
        });
        match person {
            Ok(person) => people.push(person),
            Err((field, reason)) => rejected.push(json!({
                "index": i,
                "field": if field.is_empty() { format!("people[{i}]") } else { format!("people[{i}].{field}") },
                "reason": reason,
            })),
        }
    }
    let loaded = pools::load(state.pool(), tenant, name, &people).await?;
    Ok(Json(json!({
        "pool": name,
        "accepted": people.len(),
        "added": loaded.added,
        "updated": loaded.updated,
        "rejected": rejected,
    })))
}

/// `GET /v1/lead-pools/{name}`: how many people the pool holds, how many are leads of a
/// sequence, and how many each sequence drew; 404 for a pool with nobody in it.
pub async fn get_pool(
    State(state): State<AppState>,
    caller: Caller,
    Params(name): Params<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let name = pool_name(&name)?;
    Ok(Json(json!(pools::view(state.pool(), tenant, name).await?)))
}

async fn action(
    state: AppState,
    caller: Caller,
    id: String,
    which: &str,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "sequence")?;
    let pool = state.pool();
    let sequence = match which {
        "start" => herald_jobs::sequences::start(pool, tenant, id).await?,
        "pause" => herald_jobs::sequences::pause(pool, tenant, id).await?,
        _ => herald_jobs::sequences::stop(pool, tenant, id).await?,
    };
    Ok(Json(view(&state, tenant, &sequence).await?))
}

/// `POST /v1/sequences/{id}/start`: a draft or paused sequence becomes active; every active
/// lead's current step job is written.
pub async fn start(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    action(state, caller, id, "start").await
}

/// `POST /v1/sequences/{id}/pause`.
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    action(state, caller, id, "pause").await
}

/// `POST /v1/sequences/{id}/stop`: final; active leads become stopped.
pub async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    Params(id): Params<String>,
) -> Result<Json<Value>, ApiError> {
    action(state, caller, id, "stop").await
}

/// `GET /v1/sequences/{id}/leads/{lead_id}`: the lead, its executed steps and its signals.
pub async fn lead_timeline(
    State(state): State<AppState>,
    caller: Caller,
    Params((id, lead_id)): Params<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let id = path_id(&id, "sequence")?;
    let lead_id = path_id(&lead_id, "lead")?;
    let lead = sequences::lead(state.pool(), tenant, lead_id).await?;
    if lead.sequence_id != id {
        return Err(ApiError::not_found(format!("lead {lead_id}")));
    }
    let timeline = sequences::timeline(state.pool(), tenant, lead_id).await?;
    let signals = sequences::signals(state.pool(), tenant, lead_id).await?;
    let mut body = json!(lead);
    body["activities"] = json!(timeline);
    body["signals"] = json!(
        signals
            .into_iter()
            .map(|(signal, at)| json!({"signal": signal, "at": at}))
            .collect::<Vec<_>>()
    );
    Ok(Json(body))
}

/// `PUT /v1/providers/{email|linkedin|instagram}` `{"api_url"?, "api_key", "webhook_secret"}`:
/// the tenant's account at that channel's provider (the URL defaults to the workers'
/// `<CHANNEL>_API_URL`). The answer names no secret.
async fn put_provider(
    state: &AppState,
    caller: &Caller,
    channel: Channel,
    body: &Value,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant()?;
    let map = object(body, &["api_url", "api_key", "webhook_secret"])?;
    let text = |field: &str| -> Result<Option<String>, ApiError> {
        match map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(ApiError::invalid(field, "must be a string")),
        }
    };
    let required = |field: &str| {
        text(field)?.ok_or_else(|| ApiError::invalid(field, "is required (a string)"))
    };
    let provider = ChannelProvider {
        channel,
        api_url: text("api_url")?,
        api_key: required("api_key")?,
        webhook_secret: required("webhook_secret")?,
    };
    providers::put(state.pool(), tenant, &provider).await?;
    Ok(Json(json!({
        "provider": channel.as_str(),
        "api_url": provider.api_url,
        "webhook_path": format!("/v1/webhooks/sequences/{tenant}"),
    })))
}

/// `PUT /v1/providers/email`.
pub async fn put_email_provider(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    put_provider(&state, &caller, Channel::Email, &body).await
}

/// `PUT /v1/providers/linkedin`.
pub async fn put_linkedin_provider(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    put_provider(&state, &caller, Channel::Linkedin, &body).await
}

/// `PUT /v1/providers/instagram`.
pub async fn put_instagram_provider(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    put_provider(&state, &caller, Channel::Instagram, &body).await
}

/// `POST /v1/webhooks/sequences/{tenant_id}`: one event `{"lead_id" | "send_id", "event",
/// "at"?, "reason"?}` or `{"events": [...]}`, signed with `X-Herald-Signature`. A reply stops
/// the lead; see `herald_jobs::sequence_events` for the rest.
pub async fn inbound_webhook(
    State(state): State<AppState>,
    Params(tenant_id): Params<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let unauthorized = || ApiError::Unauthorized("missing or invalid X-Herald-Signature");
    let tenant = TenantId(tenant_id.parse().map_err(|_| unauthorized())?);
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    match sequence_events::receive(state.pool(), tenant, signature, &body).await {
        Ok(answer) => Ok(Json(answer)),
        Err(WebhookError::Unauthorized) => Err(unauthorized()),
        Err(WebhookError::Malformed(e)) => Err(ApiError::MalformedJson(e)),
        Err(WebhookError::Invalid { field, reason }) => Err(ApiError::invalid(field, reason)),
        Err(WebhookError::NotFound(what)) => Err(ApiError::not_found(what)),
        Err(WebhookError::Store(e)) => Err(e.into()),
    }
}
