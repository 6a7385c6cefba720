-- Lead pools: people a sequence's `lead_generation` step draws from, once per local day, up to
-- its daily limit. A person is known by the tenant's external id, unique within a pool; a
-- generated lead carries it as its `external_id`, which `sequence_leads` already keeps unique
-- per sequence, so nobody is added to one sequence twice.
create table lead_pool_people (
    tenant_id           uuid not null references tenants (id),
    pool                text not null,
    external_person_id  text not null,
    variables           jsonb not null,
    seq                 bigint generated always as identity,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    primary key (tenant_id, pool, external_person_id),
    constraint lead_pool_people_pool_name check (pool ~ '^[A-Za-z0-9._-]{1,100}$'),
    constraint lead_pool_people_external_id check
        (char_length(external_person_id) between 1 and 200),
    constraint lead_pool_people_variables_object check (jsonb_typeof(variables) = 'object')
);

-- Generation takes people in the order they were loaded.
create index lead_pool_people_order_idx on lead_pool_people (tenant_id, pool, seq);

-- One row per sequence and local day on which it drew from its pool, written in the same
-- transaction as the leads it added: a second run for the same day (a re-delivered job, two
-- workers at once) finds the row and adds nothing.
create table lead_generation_runs (
    tenant_id    uuid not null,
    sequence_id  uuid not null,
    local_day    date not null,
    pool         text not null,
    added        int not null default 0,
    ran_at       timestamptz not null default now(),
    primary key (tenant_id, sequence_id, local_day),
    foreign key (tenant_id, sequence_id) references sequences (tenant_id, id)
);
