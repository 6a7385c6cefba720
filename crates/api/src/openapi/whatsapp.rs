//! The WhatsApp template campaigns' part of the OpenAPI document (paths and schemas), merged
//! into [`super::document`].

use serde_json::{Value, json};

use super::{error_response, idempotency_param, json_body, json_response, param, tenant_only};

fn id_param(what: &str) -> Value {
    param(
        "id",
        "path",
        what,
        json!({"type": "string", "format": "uuid"}),
    )
}

fn campaign_param() -> Value {
    id_param("A message campaign id, as returned by POST /v1/message-campaigns.")
}

fn tenant_param() -> Value {
    param(
        "tenant_id",
        "path",
        "The tenant whose WhatsApp account Meta calls back for.",
        json!({"type": "string", "format": "uuid"}),
    )
}

fn csv(description: &str) -> Value {
    json!({"description": description, "content": {"text/csv": {"schema": {"type": "string"}}}})
}

fn action(summary: &str) -> Value {
    json!({"post": {
        "summary": summary,
        "parameters": [campaign_param(), idempotency_param()],
        "responses": tenant_only(json!({
            "200": json_response("The campaign and its stats.", "MessageCampaign"),
            "404": error_response("No such campaign for this tenant."),
            "409": error_response("The campaign is not in a state that allows it.")
        }))
    }})
}

pub(super) fn paths() -> Value {
    json!({
        "/v1/templates": {"post": {
            "summary": "Register a WhatsApp template {name, language, components} with {{n}} placeholders in the header, body and URL buttons; the parameter counts and CSV columns are derived.",
            "parameters": [idempotency_param()],
            "requestBody": json_body("TemplateRequest"),
            "responses": tenant_only(json!({
                "201": json_response("The template with its columns.", "Template"),
                "400": error_response("Malformed JSON."),
                "409": error_response("A template with this name and language exists."),
                "415": error_response("Content-Type is not application/json."),
                "422": error_response("A field is wrong (placeholders not numbered 1…n, unsupported header format, …); error.field names it.")
            }))
        }},
        "/v1/templates/{id}/sample.csv": {"get": {
            "summary": "A CSV whose columns match the template exactly: country_code,phone_number,header_param_1,body_param_1…,button_url_param; with one example row.",
            "parameters": [id_param("A template id.")],
            "responses": tenant_only(json!({
                "200": csv("The sample CSV."),
                "404": error_response("No such template for this tenant.")
            }))
        }},
        "/v1/providers/whatsapp": {"put": {
            "summary": "Set the tenant's WhatsApp Cloud API account. api_url defaults to the workers' WHATSAPP_API_URL. The answer names no secret.",
            "requestBody": json_body("WhatsAppProvider"),
            "responses": tenant_only(json!({
                "200": {"description": "Saved.", "content": {"application/json": {"schema": {"type": "object"}}}},
                "400": error_response("Malformed JSON."),
                "415": error_response("Content-Type is not application/json."),
                "422": error_response("A field is wrong; error.field names it.")
            }))
        }},
        "/v1/message-campaigns": {"post": {
            "summary": "Create a draft campaign of a template with its recipients: JSON {name, template_id, recipients}, a CSV body with ?template_id=&name=, or a multipart form (template_id, name, file). Rows are validated against the template's columns (phone numbers included); bad rows are reported and never block good ones.",
            "parameters": [
                idempotency_param(),
                param("template_id", "query", "With a CSV body: the template.", json!({"type": "string", "format": "uuid"})),
                param("name", "query", "With a CSV body: the campaign's name.", json!({"type": "string"}))
            ],
            "requestBody": {"required": true, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/MessageCampaignRequest"}},
                "text/csv": {"schema": {"type": "string", "description": "A header naming exactly the template's columns (any order), then one recipient per line."}},
                "multipart/form-data": {"schema": {"type": "object", "required": ["file", "template_id", "name"], "properties": {
                    "file": {"type": "string", "format": "binary"}, "template_id": {"type": "string"}, "name": {"type": "string"}
                }}}
            }},
            "responses": tenant_only(json!({
                "201": json_response("The draft campaign with a row report.", "CreatedMessageCampaign"),
                "400": error_response("Not CSV at all (malformed_csv), or malformed JSON."),
                "413": error_response("Body over the import size limit."),
                "415": error_response("Content-Type is not JSON, CSV or multipart."),
                "422": error_response("A field is wrong, an unknown template, or a CSV header that does not name exactly the template's columns (field: columns).")
            }))
        }},
        "/v1/message-campaigns/{id}": {"get": {
            "summary": "One campaign with its live stats.",
            "parameters": [campaign_param()],
            "responses": tenant_only(json!({
                "200": json_response("The campaign.", "MessageCampaign"),
                "404": error_response("No such campaign for this tenant.")
            }))
        }},
        "/v1/message-campaigns/{id}/stats": {"get": {
            "summary": "Live counts: total, pending, attempting, sent, delivered, read, failed, unknown.",
            "parameters": [campaign_param()],
            "responses": tenant_only(json!({
                "200": json_response("The counts.", "MessageStats"),
                "404": error_response("No such campaign for this tenant.")
            }))
        }},
        "/v1/message-campaigns/{id}/send": {"post": {
            "summary": "Start sending a draft: one send step per recipient, admitted by the fleet-wide rate limit of the tenant's sender number.",
            "parameters": [campaign_param(), idempotency_param()],
            "requestBody": json_body("SendRequest"),
            "responses": tenant_only(json!({
                "202": json_response("Sending.", "MessageCampaign"),
                "400": error_response("Malformed JSON."),
                "404": error_response("No such campaign for this tenant."),
                "409": error_response("Not a draft, or WhatsApp is not configured for the tenant."),
                "415": error_response("Content-Type is not application/json."),
                "422": error_response("rate_per_sec not 1–1000 or concurrency not 1–100.")
            }))
        }},
        "/v1/message-campaigns/{id}/pause": action("Pause a sending campaign: recipients not yet attempted stay pending."),
        "/v1/message-campaigns/{id}/resume": action("Resume a paused campaign: a send step for every pending recipient."),
        "/v1/message-campaigns/{id}/stop": action("Stop a campaign for good: pending recipients are never sent."),
        "/v1/message-campaigns/{id}/retry-failed": action("Failed recipients back to pending and sent again (retried: how many)."),
        "/v1/message-campaigns/{id}/failed.csv": {"get": {
            "summary": "The failed recipients in the template's columns plus error_code,error.",
            "parameters": [campaign_param()],
            "responses": tenant_only(json!({
                "200": csv("The failed recipients."),
                "404": error_response("No such campaign for this tenant.")
            }))
        }},
        "/v1/webhooks/whatsapp/{tenant_id}": {
            "get": {
                "summary": "Meta's verification handshake: answers hub.challenge when hub.mode is subscribe and hub.verify_token is the tenant's.",
                "security": [],
                "parameters": [
                    tenant_param(),
                    param("hub.mode", "query", "subscribe", json!({"type": "string"})),
                    param("hub.verify_token", "query", "The tenant's verify token.", json!({"type": "string"})),
                    param("hub.challenge", "query", "Echoed back.", json!({"type": "string"}))
                ],
                "responses": {
                    "200": {"description": "The challenge.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "403": error_response("Wrong mode or verify token."),
                    "404": error_response("Not a tenant id.")
                }
            },
            "post": {
                "summary": "Meta's status webhooks (entry[].changes[].value.statuses[]), verified by X-Hub-Signature-256 (HMAC-SHA256 of the raw body with the app secret). Statuses only move forward.",
                "security": [],
                "parameters": [tenant_param(), param("X-Hub-Signature-256", "header", "sha256=<hex HMAC>", json!({"type": "string"}))],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": json_response("What the events did.", "WebhookOutcome"),
                    "400": error_response("A signed body that is not a WhatsApp webhook."),
                    "401": error_response("Missing or invalid signature: nothing changed.")
                }
            }
        }
    })
}

pub(super) fn schemas() -> Value {
    json!({
        "TemplateRequest": {"type": "object", "required": ["name", "language", "components"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "description": "Meta's template name: lower-case letters, digits, _."},
            "language": {"type": "string", "example": "en_US"},
            "components": {"type": "array", "items": {"type": "object"}, "description": "HEADER (format TEXT), BODY, FOOTER, BUTTONS as registered with Meta."}
        }},
        "Template": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"}, "language": {"type": "string"},
            "components": {"type": "array", "items": {"type": "object"}},
            "params": {"type": "object", "properties": {"header": {"type": "integer"}, "body": {"type": "integer"}, "url_buttons": {"type": "array", "items": {"type": "integer"}}}},
            "columns": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "string", "format": "date-time"}
        }},
        "WhatsAppProvider": {"type": "object", "required": ["token", "phone_number_id", "app_secret", "verify_token"], "additionalProperties": false, "properties": {
            "api_url": {"type": "string", "nullable": true}, "token": {"type": "string"}, "phone_number_id": {"type": "string"},
            "app_secret": {"type": "string"}, "verify_token": {"type": "string"}
        }},
        "MessageCampaignRequest": {"type": "object", "required": ["name", "template_id", "recipients"], "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "template_id": {"type": "string", "format": "uuid"},
            "recipients": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Keyed by the template's columns."}}
        }},
        "SendRequest": {"type": "object", "additionalProperties": false, "properties": {
            "rate_per_sec": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}
        }},
        "MessageStats": {"type": "object", "properties": {
            "total": {"type": "integer"}, "pending": {"type": "integer"}, "attempting": {"type": "integer"}, "sent": {"type": "integer"},
            "delivered": {"type": "integer"}, "read": {"type": "integer"}, "failed": {"type": "integer"},
            "unknown": {"type": "integer", "description": "Attempted, outcome not yet known (settled by status webhooks)."}
        }},
        "MessageCampaign": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"}, "template_id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["draft", "sending", "paused", "stopped", "completed"]},
            "rate_per_sec": {"type": "integer", "nullable": true}, "concurrency": {"type": "integer", "nullable": true},
            "stats": {"$ref": "#/components/schemas/MessageStats"},
            "retried": {"type": "integer", "description": "retry-failed only."},
            "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": "string", "format": "date-time", "nullable": true}, "completed_at": {"type": "string", "format": "date-time", "nullable": true}
        }},
        "CreatedMessageCampaign": {"allOf": [{"$ref": "#/components/schemas/MessageCampaign"}, {"type": "object", "properties": {"report": {"type": "object", "properties": {
            "accepted": {"type": "integer"}, "duplicates": {"type": "integer"}, "rejected": {"type": "integer"},
            "duplicate_rows": {"type": "array", "items": {"type": "object", "properties": {"line": {"type": "integer"}, "phone": {"type": "string"}}}},
            "rejected_rows": {"type": "array", "items": {"type": "object", "properties": {"line": {"type": "integer"}, "reason": {"type": "string"}}}}
        }}}}]},
        "WebhookOutcome": {"type": "object", "properties": {"applied": {"type": "integer"}, "ignored": {"type": "integer"}, "unmatched": {"type": "integer"}}}
    })
}
