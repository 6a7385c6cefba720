-- A tenant whose call dispatch was last refused by the fleet-wide cap on concurrent calls
-- (HERALD_CALL_FLEET_LIMIT), with its fair share and what it held then; the row goes away at
-- the tenant's next dispatch run that the fleet does not refuse. Read by the call views to say
-- why a queued call waits (docs/decisions/0008-fleet-call-sharing.md). The slots themselves live
-- in Redis.
create table call_fleet_waits (
    tenant_id    uuid primary key references tenants (id),
    fleet_limit  int not null,
    share        int not null,
    held         int not null,
    recorded_at  timestamptz not null default now(),
    constraint call_fleet_waits_counts check (fleet_limit > 0 and share >= 0 and held >= 0)
);
