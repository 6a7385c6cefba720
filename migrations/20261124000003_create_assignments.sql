-- Which profile a daily campaign gave to which VA table and position, and its sync ledger: the
-- Airtable record it became and when, or Airtable's reason for refusing it. `table_no = 0` means
-- selected but not yet distributed. A profile is assigned once per tenant, ever.
create table assignments (
    tenant_id          uuid not null,
    campaign_id        uuid not null,
    profile_id         uuid not null,
    campaign_date      date not null,
    table_no           int not null default 0,
    position           int not null default 0,
    status             text not null default 'assigned',
    airtable_record_id text null,
    synced_at          timestamptz null,
    sync_error         text null,
    created_at         timestamptz not null default now(),
    primary key (tenant_id, campaign_id, profile_id),
    foreign key (tenant_id, campaign_id) references daily_campaigns (tenant_id, id),
    foreign key (tenant_id, profile_id) references profiles (tenant_id, id),
    constraint assignments_profile_once unique (tenant_id, profile_id),
    constraint assignments_status check (status in ('assigned', 'unfollow')),
    constraint assignments_placed check
        ((table_no = 0 and position = 0) or (table_no > 0 and position > 0))
);

-- No two profiles share a table position within a campaign.
create unique index assignments_position_idx on assignments (tenant_id, campaign_id, table_no, position)
    where table_no > 0;

-- Cleanup walks assignments by age.
create index assignments_date_idx on assignments (tenant_id, campaign_date);

-- One row per sync request (a batch of at most 10 records of one table); the fan-in counts
-- batches that reached a final state.
create table sync_batches (
    tenant_id   uuid not null,
    campaign_id uuid not null,
    table_no    int not null,
    batch_no    int not null,
    records     int not null,
    status      text not null default 'pending',
    error       text null,
    updated_at  timestamptz not null default now(),
    primary key (tenant_id, campaign_id, table_no, batch_no),
    foreign key (tenant_id, campaign_id) references daily_campaigns (tenant_id, id),
    constraint sync_batches_status check (status in ('pending', 'synced', 'rejected', 'failed'))
);
