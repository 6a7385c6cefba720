-- Multichannel sequences: an ordered list of steps each lead walks, one job per step.
--
-- A sender account is the account a channel's effects go out from (a LinkedIn profile, a
-- mailbox); daily and weekly caps are counted per sender account across every sequence using it.
create table sender_accounts (
    tenant_id  uuid not null references tenants (id),
    id         uuid not null,
    channel    text not null,
    name       text not null,
    created_at timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint sender_accounts_one_per_name unique (tenant_id, channel, name),
    constraint sender_accounts_channel check
        (channel in ('email', 'linkedin', 'instagram', 'whatsapp', 'voice')),
    constraint sender_accounts_name_not_empty check (name <> '')
);

-- `steps` and `rules` are stored as validated at save time (`herald_store::sequences::steps`)
-- and validated again before each step runs. `senders` maps a channel to a sender account id.
create table sequences (
    tenant_id  uuid not null references tenants (id),
    id         uuid not null,
    name       text not null,
    steps      jsonb not null,
    rules      jsonb not null,
    senders    jsonb not null,
    status     text not null default 'draft',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    started_at timestamptz null,
    primary key (tenant_id, id),
    constraint sequences_status check (status in ('draft', 'active', 'paused', 'stopped')),
    constraint sequences_steps_list check (jsonb_typeof(steps) = 'array')
);

create index sequences_newest_idx on sequences (tenant_id, created_at desc);

-- A lead walks its sequence: `current_step` is the next step to run (its job is in the outbox),
-- due at `next_run_at`. `replied` and `stopped` end the walk early; `failed` names its error.
create table sequence_leads (
    tenant_id    uuid not null,
    id           uuid not null,
    sequence_id  uuid not null,
    external_id  text null,
    variables    jsonb not null,
    state        text not null default 'active',
    current_step int not null default 0,
    next_run_at  timestamptz null,
    error        text null,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, sequence_id) references sequences (tenant_id, id),
    constraint sequence_leads_one_per_person unique (tenant_id, sequence_id, external_id),
    constraint sequence_leads_state check
        (state in ('active', 'stopped', 'replied', 'completed', 'failed')),
    constraint sequence_leads_step check (current_step >= 0)
);

create index sequence_leads_state_idx on sequence_leads (tenant_id, sequence_id, state);

-- One executed step of one lead: unique per (lead, step), so a step job that runs twice
-- records (and does) nothing the second time. A send step points at its send.
create table sequence_activities (
    tenant_id         uuid not null,
    id                uuid not null,
    sequence_id       uuid not null,
    lead_id           uuid not null,
    step              int not null,
    step_type         text not null,
    channel           text null,
    outcome           text not null,
    sender_account_id uuid null,
    send_id           uuid null,
    job_id            text not null,
    created_at        timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint sequence_activities_once unique (tenant_id, lead_id, step),
    foreign key (tenant_id, lead_id) references sequence_leads (tenant_id, id),
    foreign key (tenant_id, send_id) references sends (tenant_id, id),
    foreign key (tenant_id, sender_account_id) references sender_accounts (tenant_id, id),
    constraint sequence_activities_outcome check
        (outcome in ('executed', 'waited', 'yes', 'no'))
);

-- Caps: a sender account's activities since the start of the day or week.
create index sequence_activities_sender_idx on sequence_activities
    (tenant_id, sender_account_id, created_at) where sender_account_id is not null;
create index sequence_activities_sequence_idx on sequence_activities (tenant_id, sequence_id, step);

-- What the outside world told herald about a lead (inbound webhooks): conditions read these.
-- One row per (lead, signal): a repeated event changes nothing.
create table sequence_signals (
    tenant_id   uuid not null,
    lead_id     uuid not null,
    signal      text not null,
    received_at timestamptz not null default now(),
    primary key (tenant_id, lead_id, signal),
    foreign key (tenant_id, lead_id) references sequence_leads (tenant_id, id),
    constraint sequence_signals_signal check (signal in ('connected', 'replied', 'opened', 'clicked'))
);
