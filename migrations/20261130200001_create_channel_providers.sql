-- A tenant's account at the email, LinkedIn or Instagram provider its sequences act through:
-- where to call (api_url null means the worker's <CHANNEL>_API_URL), the key to call with, and
-- the secret the provider signs its events to herald's sequence webhook with.
create table channel_providers (
    tenant_id      uuid not null references tenants (id),
    channel        text not null,
    api_url        text null,
    api_key        text not null,
    webhook_secret text not null,
    updated_at     timestamptz not null default now(),
    primary key (tenant_id, channel),
    constraint channel_providers_channel check (channel in ('email', 'linkedin', 'instagram')),
    constraint channel_providers_not_empty check (api_key <> '' and webhook_secret <> '')
);
