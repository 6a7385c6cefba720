-- WhatsApp template campaigns and their recipients. A recipient is pending until a send step
-- records a send for it (send_id); its delivery status is the send's.
create table message_campaigns (
    tenant_id    uuid not null references tenants (id),
    id           uuid not null,
    name         text not null,
    template_id  uuid not null,
    status       text not null default 'draft',
    rate_per_sec int null,
    concurrency  int null,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    started_at   timestamptz null,
    completed_at timestamptz null,
    primary key (tenant_id, id),
    foreign key (tenant_id, template_id) references message_templates (tenant_id, id),
    constraint message_campaigns_status check
        (status in ('draft', 'sending', 'paused', 'stopped', 'completed')),
    constraint message_campaigns_rate check (rate_per_sec is null or rate_per_sec between 1 and 1000),
    constraint message_campaigns_concurrency check (concurrency is null or concurrency between 1 and 100)
);

create index message_campaigns_newest_idx on message_campaigns (tenant_id, created_at desc);

create table message_recipients (
    tenant_id   uuid not null,
    campaign_id uuid not null,
    id          uuid not null,
    line        int not null,
    country_code text not null,
    phone       text not null,
    params      jsonb not null,
    send_id     uuid null,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, campaign_id) references message_campaigns (tenant_id, id),
    constraint message_recipients_one_per_phone unique (tenant_id, campaign_id, phone),
    constraint message_recipients_phone check (phone ~ '^[1-9][0-9]{7,14}$')
);

-- A send belongs to at most one recipient.
create unique index message_recipients_send_idx on message_recipients (tenant_id, send_id)
    where send_id is not null;

-- Recipients still to be sent, per campaign: resume, completion and stats.
create index message_recipients_pending_idx on message_recipients (tenant_id, campaign_id)
    where send_id is null;
