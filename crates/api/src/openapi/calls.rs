//! The call campaigns' part of the OpenAPI document (paths and schemas), merged into
//! [`super::document`].

use serde_json::{Value, json};

use super::{error_response, idempotency_param, json_body, json_response, param, tenant_only};

fn campaign_param() -> Value {
    param(
        "id",
        "path",
        "A call campaign id.",
        json!({"type": "string", "format": "uuid"}),
    )
}

fn write_errors(mut responses: Value) -> Value {
    if let Value::Object(map) = &mut responses {
        map.insert("400".into(), error_response("Malformed JSON."));
        map.insert(
            "415".into(),
            error_response("Content-Type is not application/json."),
        );
        map.insert(
            "422".into(),
            error_response("A field is wrong; error.field names it."),
        );
    }
    tenant_only(responses)
}

fn campaign_action(summary: &str) -> Value {
    json!({"post": {
        "summary": summary,
        "parameters": [campaign_param(), idempotency_param()],
        "responses": tenant_only(json!({
            "200": json_response("The campaign.", "CallCampaignEnvelope"),
            "404": error_response("No such campaign for this tenant."),
            "409": error_response("The campaign is not in a state that allows it, or it serves a sequence's call step (pause, start or stop the sequence instead).")
        }))
    }})
}

pub(super) fn paths() -> Value {
    let campaign_query = [
        ("name", "The campaign's name."),
        ("user_id", "The user who owns it."),
        ("agent_id", "The agent that calls."),
        ("next_action", "Optional: what the agent should aim for."),
        ("first_call_time", "HH:MM: calls start no earlier."),
        (
            "last_call_time",
            "HH:MM: calls start before this (earlier than first_call_time: the window crosses midnight).",
        ),
        ("time_zone", "IANA time zone, e.g. Europe/London."),
        ("start_date", "YYYY-MM-DD; default today in the time zone."),
    ];
    let upload_params: Vec<Value> = campaign_query
        .iter()
        .map(|(name, description)| {
            let mut p = param(name, "query", description, json!({"type": "string"}));
            p["required"] = json!(!matches!(*name, "next_action" | "start_date"));
            p
        })
        .chain([idempotency_param()])
        .collect();
    json!({
        "/v1/users": {"post": {
            "summary": "Create a user who owns call campaigns, with a concurrent-call limit (default 2).",
            "parameters": [idempotency_param()],
            "requestBody": json_body("CallUserRequest"),
            "responses": write_errors(json!({"201": json_response("The user.", "CallUser")}))
        }},
        "/v1/agents": {"post": {
            "summary": "Register a voice assistant at the provider and the number it calls from.",
            "parameters": [idempotency_param()],
            "requestBody": json_body("CallAgentRequest"),
            "responses": write_errors(json!({"201": json_response("The agent.", "CallAgent")}))
        }},
        "/v1/agents/{id}": {"delete": {
            "summary": "Remove an agent: no campaign may use it any more; every active campaign using it is paused, with the reason in its pause_reason (calls in progress finish). Such a campaign resumes once given another agent_id.",
            "parameters": [param("id", "path", "An agent id.", json!({"type": "string", "format": "uuid"})), idempotency_param()],
            "responses": tenant_only(json!({
                "200": json_response("Removed, and the campaigns paused.", "CallAgentRemoved"),
                "404": error_response("No such agent for this tenant (or already removed).")
            }))
        }},
        "/v1/contacts/{id}": {"delete": {
            "summary": "Delete a contact; its queued calls in every campaign are cancelled (calls in progress finish).",
            "parameters": [param("id", "path", "A contact id.", json!({"type": "string", "format": "uuid"})), idempotency_param()],
            "responses": tenant_only(json!({
                "200": json_response("Deleted.", "ContactDeleted"),
                "404": error_response("No such contact for this tenant.")
            }))
        }},
        "/v1/contacts": {"post": {
            "summary": "Store contacts (phone in E.164, optional name, other fields kept as call context). Bad rows are reported with their line and column and never block good ones.",
            "parameters": [idempotency_param()],
            "requestBody": {"required": true, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ContactsUpload"}},
                "text/csv": {"schema": {"type": "string", "description": "A header naming phone (and optionally name; other columns become context)."}},
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The CSV (or a JSON file of the application/json shape)."}
                }}}
            }},
            "responses": write_errors(json!({"200": json_response("What was stored and refused.", "ContactsReport")}))
        }},
        "/v1/providers/voice": {"put": {
            "summary": "Set the tenant's voice-provider account: API URL (default VOICE_API_URL), key, webhook secret, system limit (default 10).",
            "requestBody": json_body("VoiceProviderRequest"),
            "responses": write_errors(json!({"200": json_response("Stored (the key and secret are not repeated).", "VoiceProvider")}))
        }},
        "/v1/call-campaigns": {
            "post": {
                "summary": "Create a call campaign from existing contacts; its calls are queued and dispatched inside the calling window.",
                "parameters": [idempotency_param()],
                "requestBody": json_body("CallCampaignRequest"),
                "responses": write_errors(json!({
                    "201": json_response("The campaign and how many calls were queued.", "CallCampaignCreated"),
                    "404": error_response("A user, agent or contact that is not the tenant's.")
                }))
            },
            "get": {
                "summary": "The tenant's call campaigns, newest first.",
                "parameters": [param("limit", "query", "Most campaigns returned.", json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 50}))],
                "responses": tenant_only(json!({
                    "200": json_response("The campaigns.", "CallCampaignList"),
                    "400": error_response("Bad limit.")
                }))
            }
        },
        "/v1/call-campaigns:upload": {"post": {
            "summary": "Create a call campaign from a CSV of contacts: a text/csv body with the settings in the query, or a multipart form with the settings as fields (or in the query) and the CSV in a part named file. Row-level report; bad rows never block good ones; a file that is not CSV or is too big is 400 and nothing is written.",
            "parameters": upload_params,
            "requestBody": {"required": true, "content": {
                "text/csv": {"schema": {"type": "string"}},
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "name": {"type": "string"}, "user_id": {"type": "string", "format": "uuid"},
                    "agent_id": {"type": "string", "format": "uuid"}, "next_action": {"type": "string"},
                    "first_call_time": {"type": "string"}, "last_call_time": {"type": "string"},
                    "time_zone": {"type": "string"}, "start_date": {"type": "string", "format": "date"}
                }}}
            }},
            "responses": write_errors(json!({
                "201": json_response("The campaign, the calls queued and the refused rows.", "CallCampaignCreated"),
                "404": error_response("A user or agent that is not the tenant's.")
            }))
        }},
        "/v1/call-campaigns/templates/{file}": {"get": {
            "summary": "A CSV template: basic.csv (phone, name) or advanced.csv (with context columns).",
            "parameters": [param("file", "path", "basic.csv or advanced.csv", json!({"type": "string", "enum": ["basic.csv", "advanced.csv"]}))],
            "responses": tenant_only(json!({
                "200": {"description": "The template.", "content": {"text/csv": {"schema": {"type": "string"}}}},
                "404": error_response("No such template.")
            }))
        }},
        "/v1/call-campaigns/{id}": {
            "get": {
                "summary": "One call campaign with its stats.",
                "parameters": [campaign_param()],
                "responses": tenant_only(json!({
                    "200": json_response("The campaign.", "CallCampaignEnvelope"),
                    "404": error_response("No such campaign for this tenant.")
                }))
            },
            "patch": {
                "summary": "Change an active or paused campaign: name, agent, next action, calling window, time zone, start date (validated as on create; absent fields keep their value, next_action null clears it). An active campaign is dispatched again at once.",
                "parameters": [campaign_param(), idempotency_param()],
                "requestBody": json_body("CallCampaignPatch"),
                "responses": write_errors(json!({
                    "200": json_response("The campaign.", "CallCampaignEnvelope"),
                    "404": error_response("No such campaign, or an agent that is not the tenant's or was removed."),
                    "409": error_response("The campaign is cancelled or completed, or it serves a sequence's call step.")
                }))
            },
            "delete": {
                "summary": "Delete a campaign and its calls; 409 while calls are in progress.",
                "parameters": [campaign_param()],
                "responses": tenant_only(json!({
                    "200": {"description": "Deleted.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "404": error_response("No such campaign for this tenant."),
                    "409": error_response("Calls are in progress, or the campaign serves a sequence's call step.")
                }))
            }
        },
        "/v1/call-campaigns/{id}/stats": {"get": {
            "summary": "Calls by state and the average duration.",
            "parameters": [campaign_param()],
            "responses": tenant_only(json!({
                "200": json_response("The stats.", "CallCampaignStats"),
                "404": error_response("No such campaign for this tenant.")
            }))
        }},
        "/v1/call-campaigns/{id}/calls": {"get": {
            "summary": "The campaign's calls in dispatch order (named contacts first, then in the order given), each queued one with `waiting`: why it is not running yet (campaign_paused, start_date_in_future, outside_window, user_limit, system_limit, fleet_limit, waiting_turn), computed from the state at the time of the request.",
            "parameters": [
                campaign_param(),
                param("state", "query", "Only calls in this state.", json!({"type": "string", "enum": ["queued", "dialing", "in_call", "completed", "failed", "cancelled", "busy", "no-answer"]})),
                param("limit", "query", "Most calls returned.", json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 100})),
                param("cursor", "query", "The next_cursor of the previous page.", json!({"type": "string"}))
            ],
            "responses": tenant_only(json!({
                "200": json_response("The calls.", "CallList"),
                "400": error_response("Bad state, limit or cursor."),
                "404": error_response("No such campaign for this tenant.")
            }))
        }},
        "/v1/calls/{id}": {"get": {
            "summary": "One call; a queued one with `waiting`: why it is not running yet.",
            "parameters": [param("id", "path", "A call id.", json!({"type": "string", "format": "uuid"}))],
            "responses": tenant_only(json!({
                "200": json_response("The call.", "CallEnvelope"),
                "404": error_response("No such call for this tenant.")
            }))
        }},
        "/v1/call-campaigns/{id}:pause": campaign_action("Pause: no new calls are dispatched; calls in progress finish."),
        "/v1/call-campaigns/{id}:resume": campaign_action("Resume a paused campaign; dispatch continues at once."),
        "/v1/call-campaigns/{id}:cancel": campaign_action("Cancel: queued calls are cancelled; calls in progress finish."),
        "/v1/webhooks/voice/{tenant_id}": {"post": {
            "summary": "Vapi server messages for the tenant, authenticated by the X-Vapi-Secret header (constant-time comparison). A call-ended message releases the call's slot once, however often it arrives.",
            "security": [],
            "parameters": [
                param("tenant_id", "path", "The tenant.", json!({"type": "string", "format": "uuid"})),
                param("X-Vapi-Secret", "header", "The tenant's webhook secret.", json!({"type": "string"}))
            ],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["message"], "properties": {"message": {"type": "object"}}}}}},
            "responses": {
                "200": {"description": "Received.", "content": {"application/json": {"schema": {"type": "object", "properties": {"received": {"type": "string"}, "duplicate": {"type": "boolean"}}}}}},
                "400": error_response("Not a server message."),
                "401": error_response("Unknown tenant, or a missing or wrong secret; nothing changed.")
            }
        }}
    })
}

pub(super) fn schemas() -> Value {
    let mut schemas = json!({
        "CallUserRequest": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "concurrent_calls_limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 2}
        }},
        "CallUser": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
            "concurrent_calls_limit": {"type": "integer"}, "created_at": {"type": "string", "format": "date-time"}
        }},
        "CallAgentRequest": {"type": "object", "required": ["name", "assistant_id", "phone_number_id"], "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "assistant_id": {"type": "string"}, "phone_number_id": {"type": "string"}
        }},
        "CallAgent": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"}, "assistant_id": {"type": "string"},
            "phone_number_id": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"}
        }},
        "ContactsUpload": {"type": "object", "required": ["contacts"], "additionalProperties": false, "properties": {
            "contacts": {"type": "array", "items": {"type": "object", "required": ["phone"], "properties": {
                "phone": {"type": "string", "description": "E.164, e.g. +14155550100."}, "name": {"type": "string"}
            }, "additionalProperties": true}}
        }},
        "ContactsReport": {"type": "object", "properties": {
            "stored": {"type": "integer"}, "rejected": {"type": "integer"},
            "contact_ids": {"type": "array", "items": {"type": "string", "format": "uuid"}},
            "rejected_rows": {"type": "array", "items": {"type": "object", "properties": {
                "line": {"type": "integer"}, "column": {"type": "string"}, "reason": {"type": "string"}
            }}}
        }},
        "VoiceProviderRequest": {"type": "object", "required": ["api_key", "webhook_secret"], "additionalProperties": false, "properties": {
            "api_url": {"type": "string"}, "api_key": {"type": "string"},
            "webhook_secret": {"type": "string", "minLength": 8}, "system_limit": {"type": "integer", "minimum": 1, "default": 10}
        }},
        "VoiceProvider": {"type": "object", "properties": {
            "api_url": {"type": "string"}, "system_limit": {"type": "integer"}, "webhook_url": {"type": "string"}
        }},
        "CallCampaignRequest": {"type": "object", "additionalProperties": false,
            "required": ["name", "user_id", "agent_id", "contact_ids", "first_call_time", "last_call_time", "time_zone"],
            "properties": {
                "name": {"type": "string"}, "user_id": {"type": "string", "format": "uuid"},
                "agent_id": {"type": "string", "format": "uuid"},
                "contact_ids": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "uuid"}},
                "next_action": {"type": "string"},
                "first_call_time": {"type": "string", "example": "09:00"},
                "last_call_time": {"type": "string", "example": "18:00"},
                "time_zone": {"type": "string", "example": "Europe/London"},
                "start_date": {"type": "string", "format": "date"}
            }
        },
        "CallCampaignPatch": {"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "agent_id": {"type": "string", "format": "uuid"},
            "next_action": {"type": "string", "nullable": true},
            "first_call_time": {"type": "string", "example": "09:00"},
            "last_call_time": {"type": "string", "example": "18:00"},
            "time_zone": {"type": "string", "example": "Europe/London"},
            "start_date": {"type": "string", "format": "date"}
        }},
        "CallAgentRemoved": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "removed": {"type": "boolean"},
            "paused_campaigns": {"type": "array", "items": {"type": "string", "format": "uuid"}}
        }},
        "ContactDeleted": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "deleted": {"type": "boolean"},
            "cancelled_calls": {"type": "integer"}
        }},
        "CallCampaign": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
            "user_id": {"type": "string", "format": "uuid"}, "agent_id": {"type": "string", "format": "uuid"},
            "next_action": {"type": "string", "nullable": true},
            "first_call_time": {"type": "string"}, "last_call_time": {"type": "string"},
            "time_zone": {"type": "string"}, "start_date": {"type": "string", "format": "date"},
            "status": {"type": "string", "enum": ["active", "paused", "cancelled", "completed"]},
            "pause_reason": {"type": "string", "nullable": true},
            "sequence_id": {"type": "string", "format": "uuid", "nullable": true, "description": "Set when the campaign serves a sequence's voice_agent_call step: it follows its sequence (paused, resumed, cancelled with it) and refuses changes by hand (409)."},
            "sequence_step": {"type": "integer", "nullable": true, "description": "The index of that step."},
            "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"}
        }},
        "CallCampaignStats": {"type": "object", "properties": {
            "queued": {"type": "integer"}, "dialing": {"type": "integer"}, "in_call": {"type": "integer"},
            "completed": {"type": "integer"}, "failed": {"type": "integer"}, "busy": {"type": "integer"},
            "no_answer": {"type": "integer"}, "cancelled": {"type": "integer"}, "total": {"type": "integer"},
            "average_duration_ms": {"type": "number", "nullable": true}
        }},
        "CallCampaignCreated": {"type": "object", "properties": {
            "campaign": {"$ref": "#/components/schemas/CallCampaign"}, "queued": {"type": "integer"},
            "stored": {"type": "integer"}, "rejected": {"type": "integer"},
            "rejected_rows": {"type": "array", "items": {"type": "object"}}
        }},
        "CallCampaignEnvelope": {"type": "object", "properties": {
            "campaign": {"$ref": "#/components/schemas/CallCampaign"},
            "stats": {"$ref": "#/components/schemas/CallCampaignStats"},
            "cancelled_calls": {"type": "integer"}
        }},
        "CallCampaignList": {"type": "object", "properties": {"campaigns": {"type": "array", "items": {"$ref": "#/components/schemas/CallCampaign"}}}}
    });
    if let (Value::Object(all), Value::Object(views)) = (&mut schemas, call_view_schemas()) {
        all.extend(views);
    }
    schemas
}

/// The calls' view schemas: a call, why a queued one waits, a page of calls.
fn call_view_schemas() -> Value {
    json!({
        "CallWaiting": {"type": "object", "required": ["reason", "detail"],
            "description": "Why a queued call is not running yet: the first of these that applies, in the order dispatch meets them.",
            "properties": {
                "reason": {"type": "string", "enum": ["campaign_paused", "start_date_in_future", "outside_window", "user_limit", "system_limit", "fleet_limit", "waiting_turn"]},
                "detail": {"type": "string", "description": "The reason in a sentence."},
                "pause_reason": {"type": "string", "nullable": true, "description": "campaign_paused: why the campaign was paused."},
                "opens_at": {"type": "string", "format": "date-time", "description": "start_date_in_future, outside_window: when the calling window opens next."},
                "in_use": {"type": "integer", "description": "user_limit, system_limit: calls in progress."},
                "limit": {"type": "integer", "description": "user_limit, system_limit: the limit; fleet_limit: the fleet-wide cap."},
                "share": {"type": "integer", "description": "fleet_limit: the tenant's fair share of the cap while other tenants compete."},
                "held": {"type": "integer", "description": "fleet_limit: the fleet slots the tenant held when its dispatch was refused."},
                "ahead": {"type": "integer", "description": "waiting_turn: calls of the same user that go first (0: it is the user's next call)."}
            }
        },
        "Call": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "campaign_id": {"type": "string", "format": "uuid"},
            "user_id": {"type": "string", "format": "uuid"}, "contact_id": {"type": "string", "format": "uuid"},
            "phone": {"type": "string"}, "name": {"type": "string", "nullable": true},
            "priority": {"type": "integer", "description": "0 for a named contact (called first), 1 otherwise."},
            "seq": {"type": "integer", "description": "The order calls were queued in (FIFO within a priority)."},
            "state": {"type": "string", "enum": ["queued", "dialing", "in_call", "completed", "failed", "cancelled", "busy", "no-answer"]},
            "outcome": {"type": "string", "nullable": true}, "ended_reason": {"type": "string", "nullable": true},
            "error": {"type": "string", "nullable": true}, "duration_ms": {"type": "integer", "nullable": true},
            "attempts": {"type": "integer"}, "provider_call_id": {"type": "string", "nullable": true},
            "slot_turn": {"type": "integer", "nullable": true, "description": "The tenant's turn at which the call was granted its slot: the order calls were admitted in (starts again after the tenant has been idle for twice the slot lease)."},
            "dialed_at": {"type": "string", "format": "date-time", "nullable": true, "description": "When the call's slot was granted (its lease runs from then)."},
            "ended_at": {"type": "string", "format": "date-time", "nullable": true},
            "created_at": {"type": "string", "format": "date-time"},
            "waiting": {"allOf": [{"$ref": "#/components/schemas/CallWaiting"}], "nullable": true, "description": "Set for queued calls only."}
        }},
        "CallList": {"type": "object", "properties": {
            "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}},
            "next_cursor": {"type": "string", "nullable": true, "description": "Pass as cursor for the next page; null on the last one."}
        }},
        "CallEnvelope": {"type": "object", "properties": {"call": {"$ref": "#/components/schemas/Call"}}}
    })
}
