-- Call campaigns (voice agents): the tenant's users (who own campaigns and have a concurrent-call
-- limit), agents (voice assistants at the provider), contacts, the tenant's voice-provider
-- account, campaigns with their calling window, and one row per call.
--
-- Slots themselves live in Redis (herald-admission); Postgres holds every call's state, so the
-- dispatch work can always be re-derived from here.

create table call_users (
    tenant_id               uuid not null references tenants (id),
    id                      uuid not null,
    name                    text not null,
    concurrent_calls_limit  int not null default 2,
    created_at              timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint call_users_name_length check (char_length(name) between 1 and 200),
    constraint call_users_limit_range check (concurrent_calls_limit between 1 and 1000)
);

create table call_agents (
    tenant_id        uuid not null references tenants (id),
    id               uuid not null,
    name             text not null,
    assistant_id     text not null,
    phone_number_id  text not null,
    created_at       timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint call_agents_name_length check (char_length(name) between 1 and 200),
    constraint call_agents_ids_not_empty check (assistant_id <> '' and phone_number_id <> '')
);

-- A contact's phone is E.164 (validated on the way in, checked again here); extra fields from
-- an import are kept as the call's context.
create table contacts (
    tenant_id   uuid not null references tenants (id),
    id          uuid not null,
    phone       text not null,
    name        text null,
    context     jsonb not null default '{}'::jsonb,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint contacts_phone_unique unique (tenant_id, phone),
    constraint contacts_phone_e164 check (phone ~ '^\+[1-9][0-9]{6,14}$'),
    constraint contacts_context_object check (jsonb_typeof(context) = 'object')
);

-- The tenant's voice-provider account: where to call, with which key, the secret its webhooks
-- carry, and how many concurrent calls the account allows (the system limit).
create table voice_providers (
    tenant_id       uuid primary key references tenants (id),
    api_url         text not null,
    api_key         text not null,
    webhook_secret  text not null,
    system_limit    int not null default 10,
    updated_at      timestamptz not null default now(),
    constraint voice_providers_limit_range check (system_limit between 1 and 10000),
    constraint voice_providers_secret_not_empty check (webhook_secret <> '')
);

create table call_campaigns (
    tenant_id        uuid not null references tenants (id),
    id               uuid not null,
    name             text not null,
    user_id          uuid not null,
    agent_id         uuid not null,
    next_action      text null,
    first_call_time  time not null,
    last_call_time   time not null,
    time_zone        text not null,
    start_date       date not null,
    status           text not null default 'active',
    pause_reason     text null,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, user_id) references call_users (tenant_id, id),
    foreign key (tenant_id, agent_id) references call_agents (tenant_id, id),
    constraint call_campaigns_status check
        (status in ('active', 'paused', 'cancelled', 'completed')),
    constraint call_campaigns_window_not_empty check (first_call_time <> last_call_time),
    constraint call_campaigns_name_length check (char_length(name) between 1 and 200)
);

create index call_campaigns_newest_idx on call_campaigns (tenant_id, created_at desc);

-- One call per (campaign, contact). `priority` 0 = a named contact, 1 = unnamed; `seq` is the
-- FIFO order within a priority. `provider_call_id` is set once the provider accepted the call;
-- release is keyed by it.
create table calls (
    tenant_id         uuid not null references tenants (id),
    id                uuid not null,
    campaign_id       uuid not null,
    user_id           uuid not null,
    contact_id        uuid not null,
    phone             text not null,
    name              text null,
    context           jsonb not null default '{}'::jsonb,
    priority          smallint not null,
    seq               bigint generated always as identity,
    state             text not null default 'queued',
    provider_call_id  text null,
    outcome           text null,
    ended_reason      text null,
    error             text null,
    duration_ms       bigint null,
    attempts          int not null default 0,
    dialed_at         timestamptz null,
    ended_at          timestamptz null,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, campaign_id) references call_campaigns (tenant_id, id) on delete cascade,
    foreign key (tenant_id, user_id) references call_users (tenant_id, id),
    constraint calls_one_per_contact unique (tenant_id, campaign_id, contact_id),
    constraint calls_provider_call_id_unique unique (tenant_id, provider_call_id),
    constraint calls_state check (state in
        ('queued', 'dialing', 'in_call', 'completed', 'failed', 'cancelled', 'busy', 'no-answer')),
    constraint calls_priority check (priority in (0, 1))
);

-- Dispatch's work list: the next queued call of each user, priority then FIFO.
create index calls_queued_idx on calls (tenant_id, user_id, priority, seq) where state = 'queued';
-- Calls holding a slot (dialing or in a call), for stats and the lease sweep.
create index calls_live_idx on calls (tenant_id, dialed_at) where state in ('dialing', 'in_call');
create index calls_campaign_idx on calls (tenant_id, campaign_id, state);
