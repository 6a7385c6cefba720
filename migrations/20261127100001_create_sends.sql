-- One provider send attempt, whatever the channel: recorded as `attempting` (with the job that
-- attempts it) before the provider is called, then moved forward by the provider's answer and
-- its status webhooks. The send id travels with the message (WhatsApp: biz_opaque_callback_data)
-- so a webhook can settle a send whose answer was lost.
create table sends (
    tenant_id           uuid not null references tenants (id),
    id                  uuid not null,
    channel             text not null,
    job_id              text not null,
    status              text not null default 'attempting',
    provider_message_id text null,
    error_code          text null,
    error               text null,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint sends_status check
        (status in ('attempting', 'unknown', 'sent', 'delivered', 'read', 'failed')),
    constraint sends_channel_not_empty check (channel <> '')
);

-- Webhooks without the send id find the send by the provider's message id.
create unique index sends_provider_message_idx on sends (tenant_id, channel, provider_message_id)
    where provider_message_id is not null;

-- Sends in flight: concurrency checks and campaign completion look only at these.
create index sends_attempting_idx on sends (tenant_id, id) where status = 'attempting';
