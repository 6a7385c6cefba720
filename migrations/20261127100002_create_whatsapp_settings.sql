-- A tenant's WhatsApp Cloud API account: where to send (api_url null means the worker's
-- WHATSAPP_API_URL), as whom, from which business number, and the secrets webhooks are
-- checked with.
create table whatsapp_settings (
    tenant_id       uuid primary key references tenants (id),
    api_url         text null,
    token           text not null,
    phone_number_id text not null,
    app_secret      text not null,
    verify_token    text not null,
    updated_at      timestamptz not null default now(),
    constraint whatsapp_settings_not_empty check
        (token <> '' and phone_number_id <> '' and app_secret <> '' and verify_token <> '')
);
