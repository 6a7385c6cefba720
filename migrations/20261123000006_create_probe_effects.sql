-- Effects recorded by the diagnostic `probe` job type: one row per effect key, counting how many
-- times the handler ran for it. Fault tests assert `runs = 1` (effectively-once).
create table probe_effects (
    tenant_id  uuid not null references tenants (id),
    effect_key text not null,
    runs       int not null default 1,
    first_at   timestamptz not null default now(),
    last_at    timestamptz not null default now(),
    primary key (tenant_id, effect_key)
);
