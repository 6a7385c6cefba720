-- One daily VA assignment per (tenant, date), and its progress through the stages
-- selecting → distributing → syncing → complete (or failed, remembering the stage that failed
-- so a resume continues from there).
create table daily_campaigns (
    tenant_id      uuid not null references tenants (id),
    id             uuid not null,
    campaign_date  date not null,
    target         int not null,
    tables         int not null,
    per_table      int not null,
    stage          text not null default 'selecting',
    failed_stage   text null,
    error          text null,
    selected       int not null default 0,
    shortfall      int not null default 0,
    distributed    int not null default 0,
    batches_total  int not null default 0,
    batches_done   int not null default 0,
    synced         int not null default 0,
    rejected       int not null default 0,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    completed_at   timestamptz null,
    primary key (tenant_id, id),
    constraint daily_campaigns_one_per_date unique (tenant_id, campaign_date),
    constraint daily_campaigns_stage check
        (stage in ('selecting', 'distributing', 'syncing', 'complete', 'failed')),
    constraint daily_campaigns_failed_stage check
        (failed_stage is null or failed_stage in ('selecting', 'distributing', 'syncing')),
    constraint daily_campaigns_shape check
        (target > 0 and tables between 1 and 99 and per_table > 0 and target <= tables * per_table)
);

create index daily_campaigns_newest_idx on daily_campaigns (tenant_id, created_at desc);
