//! The multichannel sequences' part of the OpenAPI document (paths and schemas), merged into
//! [`super::document`].

use serde_json::{Value, json};

use super::{error_response, idempotency_param, json_body, json_response, param, tenant_only};

fn sequence_param() -> Value {
    param(
        "id",
        "path",
        "A sequence id, as returned by POST /v1/sequences.",
        json!({"type": "string", "format": "uuid"}),
    )
}

fn pool_param() -> Value {
    param(
        "name",
        "path",
        "A lead pool's name: 1 to 100 letters, digits, '-', '_' or '.'.",
        json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"}),
    )
}

fn action(summary: &str) -> Value {
    json!({"post": {
        "summary": summary,
        "parameters": [sequence_param(), idempotency_param()],
        "responses": tenant_only(json!({
            "200": json_response("The sequence and its stats.", "Sequence"),
            "404": error_response("No such sequence for this tenant."),
            "409": error_response("The sequence is not in a state that allows it.")
        }))
    }})
}

fn provider(channel: &str, env: &str) -> Value {
    json!({"put": {
        "summary": format!("Set the tenant's {channel} provider account for sequences: api_url (defaults to the workers' {env}), api_key (bearer key herald calls with) and webhook_secret (the provider signs its events to POST /v1/webhooks/sequences/{{tenant_id}} with it). The answer names no secret. Wire formats: docs/providers.md."),
        "requestBody": json_body("ChannelProvider"),
        "responses": tenant_only(json!({
            "200": json_response("Saved.", "ChannelProviderSaved"),
            "400": error_response("Malformed JSON."),
            "415": error_response("Content-Type is not application/json."),
            "422": error_response("A field is wrong; error.field names it.")
        }))
    }})
}

pub(super) fn paths() -> Value {
    json!({
        "/v1/providers/email": provider("email", "EMAIL_API_URL"),
        "/v1/providers/linkedin": provider("LinkedIn", "LINKEDIN_API_URL"),
        "/v1/providers/instagram": provider("Instagram", "INSTAGRAM_API_URL"),
        "/v1/sequences": {
            "post": {
                "summary": "Create a draft sequence: ordered steps and sending rules, validated now (and again before each step runs). Message templates may use {{first_name}}, {{last_name}}, {{company_name}}, {{title}}, {{email}}, {{phone}}, {{linkedin_url}}, {{instagram_handle}}.",
                "parameters": [idempotency_param()],
                "requestBody": json_body("SequenceRequest"),
                "responses": tenant_only(json!({
                    "201": json_response("The draft sequence.", "Sequence"),
                    "400": error_response("Malformed JSON."),
                    "415": error_response("Content-Type is not application/json."),
                    "422": error_response("A step or rule is wrong: error.field is its path (steps[2].subject, rules.caps[0].daily) and the message names the step's index and type.")
                }))
            },
            "get": {
                "summary": "The tenant's sequences, newest first.",
                "responses": tenant_only(json!({"200": json_response("The sequences.", "SequenceList")}))
            }
        },
        "/v1/sequences/{id}": {"get": {
            "summary": "One sequence with its stats.",
            "parameters": [sequence_param()],
            "responses": tenant_only(json!({
                "200": json_response("The sequence.", "Sequence"),
                "404": error_response("No such sequence for this tenant.")
            }))
        }},
        "/v1/sequences/{id}/stats": {"get": {
            "summary": "Leads by state; per step: executed, yes/no for conditions, sends by status (sent, delivered, failed, unknown…); leads per signal (replied, connected, opened, clicked).",
            "parameters": [sequence_param()],
            "responses": tenant_only(json!({
                "200": json_response("The counts.", "SequenceStats"),
                "404": error_response("No such sequence for this tenant.")
            }))
        }},
        "/v1/sequences/{id}/leads": {"post": {
            "summary": "Add leads (JSON). A lead already in the sequence (same external_id) is skipped. In an active sequence each new lead starts at once.",
            "parameters": [sequence_param(), idempotency_param()],
            "requestBody": json_body("LeadsRequest"),
            "responses": tenant_only(json!({
                "201": json_response("The new leads' ids and the duplicates skipped.", "AddedLeads"),
                "400": error_response("Malformed JSON."),
                "404": error_response("No such sequence for this tenant."),
                "409": error_response("The sequence is stopped."),
                "415": error_response("Content-Type is not application/json."),
                "422": error_response("A lead field is unknown or not a string, or a lead lacks the address a step's channel needs (error.field: leads[3].email).")
            }))
        }},
        "/v1/sequences/{id}/start": action("Start a draft (or resume a paused) sequence: every active lead's current step is scheduled."),
        "/v1/sequences/{id}/pause": action("Pause: step jobs end without acting; start resumes each lead at its step."),
        "/v1/sequences/{id}/stop": action("Stop for good: active leads become stopped."),
        "/v1/sequences/{id}/leads/{lead_id}": {"get": {
            "summary": "One lead: state, current step, its executed steps (activities with their sends' statuses) and the signals received.",
            "parameters": [sequence_param(), param("lead_id", "path", "A lead id, as returned when the lead was added.", json!({"type": "string", "format": "uuid"}))],
            "responses": tenant_only(json!({
                "200": json_response("The lead's timeline.", "LeadTimeline"),
                "404": error_response("No such lead in this tenant's sequence.")
            }))
        }},
        "/v1/lead-pools/{name}/people": {"post": {
            "summary": "Load people into a lead pool (created by its first person), row by row: each person has the lead shape of POST /v1/sequences/{id}/leads with external_id required (unique in the pool; a person already there gets the new variables and keeps their place). A rejected row is reported and skipped; the others are stored.",
            "parameters": [pool_param(), idempotency_param()],
            "requestBody": json_body("LeadPoolPeopleRequest"),
            "responses": tenant_only(json!({
                "200": json_response("The row report.", "LeadPoolLoadReport"),
                "400": error_response("Malformed JSON, or a pool name that is not 1 to 100 letters, digits, '-', '_' or '.'."),
                "415": error_response("Content-Type is not application/json."),
                "422": error_response("The body is not {\"people\": [...]} or holds more than 10000 people.")
            }))
        }},
        "/v1/lead-pools/{name}": {"get": {
            "summary": "A lead pool's counts: people, people already a lead of a sequence, leads drawn per sequence.",
            "parameters": [pool_param()],
            "responses": tenant_only(json!({
                "200": json_response("The counts.", "LeadPool"),
                "400": error_response("A pool name that is not 1 to 100 letters, digits, '-', '_' or '.'."),
                "404": error_response("No one in this tenant's pool of that name.")
            }))
        }},
        "/v1/webhooks/sequences/{tenant_id}": {"post": {
            "summary": "Inbound events about leads and their sends: one event {lead_id | send_id, event, at?, reason?} or {events: [...]} (1 to 1000). event: replied, opened, clicked, connected (recorded on the lead; a reply stops it; the send moves to read) or delivered, bounced, failed (the send's status, forward only). Signed with X-Herald-Signature: sha256=<hex HMAC-SHA256 of the raw body> with the tenant's HMAC secret, or with a provider's webhook_secret (which covers only that channel's sends, by send_id). A repeated or late event changes nothing.",
            "security": [],
            "parameters": [
                param("tenant_id", "path", "The tenant the lead belongs to.", json!({"type": "string", "format": "uuid"})),
                param("X-Herald-Signature", "header", "sha256=<hex HMAC>", json!({"type": "string"}))
            ],
            "requestBody": json_body("SequenceEvent"),
            "responses": {
                "200": json_response("Recorded: for one event, new is false for a repeat; for a batch, counts and one outcome (new, repeat, unknown) per event.", "SequenceEventOutcome"),
                "400": error_response("A signed body that is not JSON."),
                "401": error_response("Missing or invalid signature: nothing changed."),
                "404": error_response("One event about a lead or send this tenant does not have (a batch reports it as unknown instead)."),
                "422": error_response("An event is wrong; error.field names it (events[3].event). Nothing was applied.")
            }
        }}
    })
}

pub(super) fn schemas() -> Value {
    json!({
        "SequenceRequest": {"type": "object", "required": ["name", "steps"], "additionalProperties": false, "properties": {
            "name": {"type": "string"},
            "steps": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"type": "object", "required": ["type"], "description": "email_send {subject, body}; email_followup {body}; whatsapp_send {template, language, params?}; linkedin_visit; linkedin_connect {note?}; linkedin_message {message}; linkedin_follow; instagram_dm {message}; instagram_follow; instagram_like; delay {days?, hours?}; condition {if: connected|replied|opened|clicked, yes, no} (later step indexes; the step count ends the sequence). voice_agent_call {user_id, agent_id} (both the tenant's, checked on save and before the step runs; one call through the call-campaign slots and the sequence's window; the lead needs an E.164 phone and moves on when the call ends; a completed call records the connected signal); lead_generation {daily_limit: 1..10000, pool} (only as the first step, followed by others: once per local day while active, up to daily_limit people of the lead pool who are not yet leads start at step 1).", "properties": {"type": {"type": "string"}}}},
            "rules": {"type": "object", "additionalProperties": false, "properties": {
                "time_zone": {"type": "string", "default": "UTC"},
                "window": {"type": "object", "properties": {"start": {"type": "string", "example": "09:00"}, "end": {"type": "string", "example": "18:00"}}},
                "caps": {"type": "array", "items": {"type": "object", "required": ["action"], "properties": {
                    "action": {"type": "string", "description": "An action step type (linkedin_connect) or a channel (linkedin)."},
                    "daily": {"type": "integer", "minimum": 1}, "weekly": {"type": "integer", "minimum": 1}
                }}},
                "jitter_secs": {"type": "object", "properties": {"min": {"type": "integer", "minimum": 0}, "max": {"type": "integer", "maximum": 86400}}}
            }},
            "senders": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Channel → sender account name (default: default). Caps count per sender account."}
        }},
        "Sequence": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
            "status": {"type": "string", "enum": ["draft", "active", "paused", "stopped"]},
            "steps": {"type": "array", "items": {"type": "object"}}, "rules": {"type": "object"},
            "senders": {"type": "object", "additionalProperties": {"type": "string"}},
            "stats": {"$ref": "#/components/schemas/SequenceStats"},
            "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": "string", "format": "date-time", "nullable": true}
        }},
        "SequenceList": {"type": "object", "properties": {"sequences": {"type": "array", "items": {"$ref": "#/components/schemas/Sequence"}}}},
        "SequenceStats": {"type": "object", "properties": {
            "leads": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "active, stopped, replied, completed, failed."},
            "steps": {"type": "array", "items": {"type": "object", "properties": {
                "step": {"type": "integer"}, "step_type": {"type": "string"}, "executed": {"type": "integer"},
                "yes": {"type": "integer"}, "no": {"type": "integer"},
                "sends": {"type": "object", "additionalProperties": {"type": "integer"}},
                "calls": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "A voice_agent_call step's calls by outcome: calling (not ended yet), completed, busy, no-answer, failed, cancelled."}
            }}},
            "signals": {"type": "object", "additionalProperties": {"type": "integer"}}
        }},
        "LeadsRequest": {"type": "object", "required": ["leads"], "additionalProperties": false, "properties": {"leads": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "string"}, "description": "external_id and the template variables."}}}},
        "AddedLeads": {"type": "object", "properties": {"added": {"type": "array", "items": {"type": "string", "format": "uuid"}}, "duplicates": {"type": "integer"}}},
        "LeadTimeline": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "state": {"type": "string", "enum": ["active", "stopped", "replied", "completed", "failed"]},
            "current_step": {"type": "integer"}, "next_run_at": {"type": "string", "format": "date-time", "nullable": true},
            "error": {"type": "string", "nullable": true}, "variables": {"type": "object"},
            "activities": {"type": "array", "items": {"type": "object", "properties": {
                "step": {"type": "integer"}, "step_type": {"type": "string"}, "channel": {"type": "string", "nullable": true},
                "outcome": {"type": "string", "enum": ["executed", "waited", "yes", "no", "calling", "completed", "busy", "no-answer", "failed", "cancelled"], "description": "A voice_agent_call step is calling until its call ends, then the call's outcome."},
                "call_id": {"type": "string", "format": "uuid", "nullable": true, "description": "The call a voice_agent_call step placed (GET /v1/calls/{id})."},
                "send_id": {"type": "string", "nullable": true}, "send_status": {"type": "string", "nullable": true},
                "provider_message_id": {"type": "string", "nullable": true}, "at": {"type": "string", "format": "date-time"}
            }}},
            "signals": {"type": "array", "items": {"type": "object", "properties": {"signal": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}}}
        }},
        "SequenceEvent": {"type": "object", "additionalProperties": false, "description": "One event, or {\"events\": [event, ...]} (1 to 1000). An event has lead_id or send_id (not both); a provider-signed event must use send_id.", "properties": {
            "lead_id": {"type": "string", "format": "uuid"}, "send_id": {"type": "string", "format": "uuid"},
            "event": {"type": "string", "enum": ["replied", "opened", "clicked", "connected", "delivered", "bounced", "failed"]},
            "at": {"type": "string", "format": "date-time", "description": "When it happened at the provider (informative)."},
            "reason": {"type": "string", "description": "Why a send bounced or failed; kept on the send."},
            "events": {"type": "array", "maxItems": 1000, "items": {"type": "object"}}
        }},
        "SequenceEventOutcome": {"type": "object", "properties": {
            "lead_id": {"type": "string"}, "send_id": {"type": "string"}, "event": {"type": "string"}, "new": {"type": "boolean"},
            "received": {"type": "integer"}, "repeats": {"type": "integer"}, "unknown": {"type": "integer"},
            "results": {"type": "array", "items": {"type": "object", "properties": {"send_id": {"type": "string"}, "lead_id": {"type": "string"}, "event": {"type": "string"}, "outcome": {"type": "string", "enum": ["new", "repeat", "unknown"]}}}}
        }},
        "LeadPoolPeopleRequest": {"type": "object", "required": ["people"], "additionalProperties": false, "properties": {"people": {"type": "array", "maxItems": 10000, "items": {"type": "object", "required": ["external_id"], "additionalProperties": {"type": "string"}, "description": "external_id (1 to 200 characters) and the template variables (first_name, last_name, company_name, title, email, phone (E.164 when given), linkedin_url, instagram_handle)."}}}},
        "LeadPoolLoadReport": {"type": "object", "properties": {
            "pool": {"type": "string"}, "accepted": {"type": "integer"},
            "added": {"type": "integer", "description": "Accepted people new to the pool."},
            "updated": {"type": "integer", "description": "Accepted people already in the pool (variables replaced)."},
            "rejected": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "field": {"type": "string", "example": "people[3].external_id"}, "reason": {"type": "string"}}}}
        }},
        "LeadPool": {"type": "object", "properties": {
            "name": {"type": "string"}, "people": {"type": "integer"},
            "in_sequences": {"type": "integer", "description": "People that are a lead of at least one sequence (by external id)."},
            "drawn_by_sequence": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "Sequence id → leads its lead_generation step drew from this pool."}
        }},
        "ChannelProvider": {"type": "object", "required": ["api_key", "webhook_secret"], "additionalProperties": false, "properties": {
            "api_url": {"type": "string", "nullable": true, "description": "The provider's base URL; null or absent: the workers' <CHANNEL>_API_URL."},
            "api_key": {"type": "string", "maxLength": 4096}, "webhook_secret": {"type": "string", "maxLength": 4096}
        }},
        "ChannelProviderSaved": {"type": "object", "properties": {
            "provider": {"type": "string", "enum": ["email", "linkedin", "instagram"]}, "api_url": {"type": "string", "nullable": true},
            "webhook_path": {"type": "string", "description": "Where the provider posts its events: /v1/webhooks/sequences/{tenant_id}."}
        }}
    })
}
