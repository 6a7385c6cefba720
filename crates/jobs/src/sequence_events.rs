//! What the outside world tells herald about sequence leads: the body of
//! `POST /v1/webhooks/sequences/{tenant_id}` read, verified and applied. The API handler is a
//! thin wrapper over [`receive`]; tests mount the same function behind a local route.
//!
//! A body is one event or `{"events": [...]}` (at most [`MAX_EVENTS`]). An event names its lead
//! (`lead_id`, herald's own services) or, as providers do, the send it is about (`send_id`, the
//! id herald gave the provider with the action); the lead is then found through the send's
//! activity. Signals (`replied`, `opened`, `clicked`, `connected`) are recorded on the lead —
//! a reply stops it — and also move the send forward to `read` (the recipient evidently saw
//! it: an `unknown` send is settled). `delivered`, `bounced` and `failed` move the send only.
//! Everything is idempotent: a repeated or late event changes nothing.
//!
//! The signature (`X-Herald-Signature: sha256=<hex HMAC-SHA256 of the raw body>`) is checked
//! against the tenant's HMAC secret, which may sign anything, and then against each of the
//! tenant's provider webhook secrets (`PUT /v1/providers/{channel}`), which may only speak about
//! that channel's sends: a provider's event about another channel's send is `unknown`, and a
//! provider may not name leads.

use herald_connectors::whatsapp::verify_signature;
use herald_core::TenantId;
use herald_store::PgPool;
use herald_store::sends::{self, Applied, SendStatus, StatusChange};
use herald_store::sequences::steps::{Channel, Signal};
use herald_store::sequences::{self, providers};
use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// The header carrying the webhook's signature.
pub const SIGNATURE_HEADER: &str = "x-herald-signature";
/// The most events one body may carry.
pub const MAX_EVENTS: usize = 1_000;
/// The longest `reason` kept.
const MAX_REASON_CHARS: usize = 1_000;

/// The event names, in the order the documentation lists them.
pub const EVENTS: &[&str] = &[
    "replied",
    "opened",
    "clicked",
    "connected",
    "delivered",
    "bounced",
    "failed",
];

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Lead(Uuid),
    Send(Uuid),
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Something the lead did; conditions read it.
    Signal(Signal),
    /// The provider delivered the send.
    Delivered,
    /// An email the recipient's server refused.
    Bounced,
    /// The provider gave up on a send it had accepted.
    Failed,
}

impl Kind {
    fn parse(name: &str) -> Option<Kind> {
        match name {
            "delivered" => Some(Kind::Delivered),
            "bounced" => Some(Kind::Bounced),
            "failed" => Some(Kind::Failed),
            other => Signal::parse(other).map(Kind::Signal),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Signal(signal) => signal.as_str(),
            Kind::Delivered => "delivered",
            Kind::Bounced => "bounced",
            Kind::Failed => "failed",
        }
    }
}

/// One event as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub subject: Subject,
    pub kind: Kind,
    /// Why a send bounced or failed, as the provider said.
    pub reason: Option<String>,
}

/// Whose secret signed the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// The tenant's HMAC secret: herald's own services.
    Tenant,
    /// The webhook secret of the tenant's provider account on this channel.
    Provider(Channel),
}

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It changed something.
    New,
    /// It was already known (a duplicate, or a late status).
    Repeat,
    /// No such lead or send for this signer.
    Unknown,
}

/// Why a webhook was refused; nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or invalid X-Herald-Signature")]
    Unauthorized,
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A single-event body about a lead or send herald does not know.
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] herald_store::Error),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> WebhookError {
    WebhookError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Which of the tenant's secrets signed `body`; an unknown tenant is unauthorized.
pub async fn verify(
    pool: &PgPool,
    tenant: TenantId,
    body: &[u8],
    signature: Option<&str>,
) -> Result<Signer, WebhookError> {
    let secret = match herald_store::tenants::hmac_secret(pool, tenant).await {
        Ok(secret) => secret,
        Err(herald_store::Error::NotFound { .. }) => return Err(WebhookError::Unauthorized),
        Err(e) => return Err(e.into()),
    };
    if signature.is_none() {
        return Err(WebhookError::Unauthorized);
    }
    if verify_signature(&secret, body, signature) {
        return Ok(Signer::Tenant);
    }
    for (channel, secret) in providers::webhook_secrets(pool, tenant).await? {
        if verify_signature(&secret, body, signature) {
            return Ok(Signer::Provider(channel));
        }
    }
    Err(WebhookError::Unauthorized)
}

fn parse_event(value: &Value, path: &str, signer: Signer) -> Result<Event, WebhookError> {
    const FIELDS: &[&str] = &["lead_id", "send_id", "event", "at", "reason"];
    let at = |field: &str| {
        if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        }
    };
    let map: &Map<String, Value> = value.as_object().ok_or_else(|| {
        invalid(
            if path.is_empty() { "(body)" } else { path },
            "must be a JSON object",
        )
    })?;
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            at(unknown),
            format!("unknown field; expected {}", FIELDS.join(", ")),
        ));
    }
    let id = |field: &str| -> Result<Option<Uuid>, WebhookError> {
        match map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_str()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| invalid(at(field), "must be an id (a UUID)")),
        }
    };
    let subject = match (id("lead_id")?, id("send_id")?) {
        (Some(lead), None) => Subject::Lead(lead),
        (None, Some(send)) => Subject::Send(send),
        (Some(_), Some(_)) => {
            return Err(invalid(at("send_id"), "give lead_id or send_id, not both"));
        }
        (None, None) => return Err(invalid(at("lead_id"), "or send_id is required")),
    };
    let name = map.get("event").and_then(Value::as_str).unwrap_or_default();
    let kind = Kind::parse(name)
        .ok_or_else(|| invalid(at("event"), format!("must be one of {}", EVENTS.join(", "))))?;
    if let Subject::Lead(_) = subject {
        if !matches!(kind, Kind::Signal(_)) {
            return Err(invalid(
                at("event"),
                format!("{name} is about a send: give its send_id"),
            ));
        }
        if signer != Signer::Tenant {
            return Err(invalid(
                at("lead_id"),
                "a provider's signature covers only its own sends: give the send_id",
            ));
        }
    }
    if map
        .get("at")
        .is_some_and(|v| !v.is_string() && !v.is_null())
    {
        return Err(invalid(at("at"), "must be a timestamp string"));
    }
    let reason = match map.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.chars().take(MAX_REASON_CHARS).collect()),
        Some(_) => return Err(invalid(at("reason"), "must be a string")),
    };
    Ok(Event {
        subject,
        kind,
        reason,
    })
}

/// The events of a body, and whether it was a batch (`{"events": [...]}`).
pub fn parse(body: &[u8], signer: Signer) -> Result<(Vec<Event>, bool), WebhookError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    let Some(events) = value.get("events") else {
        return Ok((vec![parse_event(&value, "", signer)?], false));
    };
    if let Some(other) = value
        .as_object()
        .and_then(|m| m.keys().find(|k| k.as_str() != "events"))
    {
        return Err(invalid(other.clone(), "unknown field next to events"));
    }
    let items = events
        .as_array()
        .filter(|items| (1..=MAX_EVENTS).contains(&items.len()))
        .ok_or_else(|| {
            invalid(
                "events",
                format!("must be a list of 1 to {MAX_EVENTS} events"),
            )
        })?;
    let events = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_event(item, &format!("events[{i}]"), signer))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((events, true))
}

fn moved(applied: Applied) -> Outcome {
    match applied {
        Applied::Moved => Outcome::New,
        Applied::Ignored => Outcome::Repeat,
        Applied::NotFound => Outcome::Unknown,
    }
}

/// Applies one event.
pub async fn apply(
    pool: &PgPool,
    tenant: TenantId,
    signer: Signer,
    event: &Event,
) -> Result<Outcome, herald_store::Error> {
    let send_id = match event.subject {
        Subject::Lead(lead) => {
            let Kind::Signal(signal) = event.kind else {
                return Ok(Outcome::Unknown);
            };
            return match sequences::record_signal(pool, tenant, lead, signal).await {
                Ok(true) => Ok(Outcome::New),
                Ok(false) => Ok(Outcome::Repeat),
                Err(herald_store::Error::NotFound { .. }) => Ok(Outcome::Unknown),
                Err(e) => Err(e),
            };
        }
        Subject::Send(send_id) => send_id,
    };
    let Some((lead, channel)) = sequences::send_lead(pool, tenant, send_id).await? else {
        return Ok(Outcome::Unknown);
    };
    if let Signer::Provider(signer_channel) = signer
        && signer_channel.as_str() != channel
    {
        return Ok(Outcome::Unknown);
    }
    let change = |error_code: Option<&str>| StatusChange {
        send_id: Some(send_id),
        error_code: error_code.map(str::to_owned),
        error: error_code.and(event.reason.clone()),
        ..StatusChange::default()
    };
    Ok(match event.kind {
        Kind::Signal(signal) => {
            let new = sequences::record_signal(pool, tenant, lead, signal).await?;
            let seen =
                sends::apply(pool, tenant, &channel, SendStatus::Read, &change(None)).await?;
            if new || seen == Applied::Moved {
                Outcome::New
            } else {
                Outcome::Repeat
            }
        }
        Kind::Delivered => {
            moved(sends::apply(pool, tenant, &channel, SendStatus::Delivered, &change(None)).await?)
        }
        Kind::Bounced | Kind::Failed => moved(
            sends::apply(
                pool,
                tenant,
                &channel,
                SendStatus::Failed,
                &change(Some(event.kind.as_str())),
            )
            .await?,
        ),
    })
}

/// A webhook body, verified, read and applied; the JSON answer. A single event keeps the
/// original answer `{"lead_id" | "send_id", "event", "new"}` (404 when unknown); a batch
/// answers `{"received", "new", "repeats", "unknown", "results": [...]}` and never 404s (a
/// provider would retry it forever).
pub async fn receive(
    pool: &PgPool,
    tenant: TenantId,
    signature: Option<&str>,
    body: &[u8],
) -> Result<Value, WebhookError> {
    let signer = verify(pool, tenant, body, signature).await?;
    let (events, batch) = parse(body, signer)?;
    let mut results = Vec::with_capacity(events.len());
    for event in &events {
        results.push(apply(pool, tenant, signer, event).await?);
    }
    let subject = |event: &Event| match event.subject {
        Subject::Lead(id) => ("lead_id", id),
        Subject::Send(id) => ("send_id", id),
    };
    if !batch {
        let (Some(event), Some(outcome)) = (events.first(), results.first()) else {
            return Err(invalid("(body)", "no event"));
        };
        let (field, id) = subject(event);
        if *outcome == Outcome::Unknown {
            return Err(WebhookError::NotFound(format!(
                "{} {id}",
                field.trim_end_matches("_id")
            )));
        }
        return Ok(
            json!({field: id, "event": event.kind.as_str(), "new": *outcome == Outcome::New}),
        );
    }
    let count = |wanted: Outcome| results.iter().filter(|o| **o == wanted).count();
    Ok(json!({
        "received": events.len(),
        "new": count(Outcome::New),
        "repeats": count(Outcome::Repeat),
        "unknown": count(Outcome::Unknown),
        "results": events.iter().zip(&results).map(|(event, outcome)| {
            let (field, id) = subject(event);
            json!({field: id, "event": event.kind.as_str(), "outcome": outcome})
        }).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_one_event_or_a_batch_and_errors_name_the_field() {
        let lead = Uuid::now_v7();
        let one = json!({"lead_id": lead, "event": "replied"}).to_string();
        let (events, batch) = parse(one.as_bytes(), Signer::Tenant).unwrap();
        assert!(!batch);
        assert_eq!(events[0].subject, Subject::Lead(lead));
        assert_eq!(events[0].kind, Kind::Signal(Signal::Replied));

        let send = Uuid::now_v7();
        let many = json!({"events": [
            {"send_id": send, "event": "delivered", "at": "2030-01-07T10:00:00Z"},
            {"send_id": send, "event": "bounced", "reason": "550 no such user"}
        ]})
        .to_string();
        let (events, batch) = parse(many.as_bytes(), Signer::Provider(Channel::Email)).unwrap();
        assert!(batch);
        assert_eq!(events[1].kind, Kind::Bounced);
        assert_eq!(events[1].reason.as_deref(), Some("550 no such user"));

        let field = |body: Value, signer| match parse(body.to_string().as_bytes(), signer) {
            Err(WebhookError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(
                json!({"events": [{"send_id": send, "event": "sent"}]}),
                Signer::Tenant
            ),
            "events[0].event"
        );
        assert_eq!(
            field(
                json!({"lead_id": lead, "event": "delivered"}),
                Signer::Tenant
            ),
            "event"
        );
        assert_eq!(
            field(
                json!({"lead_id": lead, "event": "replied"}),
                Signer::Provider(Channel::Linkedin)
            ),
            "lead_id"
        );
        assert_eq!(field(json!({"event": "opened"}), Signer::Tenant), "lead_id");
        assert_eq!(field(json!({"events": []}), Signer::Tenant), "events");
        assert_eq!(
            field(
                json!({"send_id": send, "event": "opened", "extra": 1}),
                Signer::Tenant
            ),
            "extra"
        );
        assert!(matches!(
            parse(b"not json", Signer::Tenant),
            Err(WebhookError::Malformed(_))
        ));
    }
}
