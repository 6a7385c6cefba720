-- The tenant's pool of Instagram profiles for the daily VA assignment. A profile is used at most
-- once: `used_on` is set (with the campaign that took it) when a daily campaign selects it.
create table profiles (
    tenant_id   uuid not null references tenants (id),
    id          uuid not null,
    external_id text null,
    username    text not null,
    full_name   text null,
    created_at  timestamptz not null default now(),
    used_on     date null,
    used_by     uuid null,
    primary key (tenant_id, id),
    constraint profiles_username_unique unique (tenant_id, username),
    constraint profiles_username_not_empty check (username <> ''),
    constraint profiles_used_together check ((used_on is null) = (used_by is null))
);

-- The select job's work list: the tenant's unused profiles in import order (ids are UUID v7).
create index profiles_unused_idx on profiles (tenant_id, id) where used_on is null;
