-- The transactional outbox: every state change that creates work writes a row here in the same
-- transaction; the relay publishes rows to Redis; the reconciler re-publishes rows Redis lost.
create table outbox (
    id              uuid primary key,
    tenant_id       uuid not null references tenants (id),
    queue           text not null,
    payload         jsonb not null,
    payload_version int not null,
    priority        smallint not null default 1,
    max_attempts    int null,
    run_at          timestamptz null,
    job_key         text null,
    created_at      timestamptz not null default now(),
    published_at    timestamptz null,
    completed_at    timestamptz null,
    dead_at         timestamptz null,
    last_error      text null,
    constraint outbox_priority_band check (priority between 0 and 2),
    constraint outbox_payload_version_non_negative check (payload_version >= 0),
    constraint outbox_max_attempts_positive check (max_attempts is null or max_attempts > 0)
);

-- The relay's work list: unpublished rows, oldest first.
create index outbox_unpublished_idx on outbox (created_at) where published_at is null;

-- Published rows still in flight, by age.
create index outbox_in_flight_idx on outbox (published_at)
    where completed_at is null and dead_at is null;

-- The reconciler's keyset walk over published, unfinished rows.
create index outbox_in_flight_by_id_idx on outbox (id)
    where published_at is not null and completed_at is null and dead_at is null;

-- Pruning finished rows by the instant they finished.
create index outbox_finished_idx on outbox ((coalesce(completed_at, dead_at)))
    where completed_at is not null or dead_at is not null;
