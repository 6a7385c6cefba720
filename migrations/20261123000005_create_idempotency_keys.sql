-- Responses to POST requests that carried an `Idempotency-Key`, replayed when the same key
-- comes back with the same request.
create table idempotency_keys (
    tenant_id    uuid not null references tenants (id),
    key          text not null,
    request_hash text not null,
    status_code  smallint not null,
    response     jsonb not null,
    created_at   timestamptz not null default now(),
    primary key (tenant_id, key)
);

create index idempotency_keys_created_at_idx on idempotency_keys (created_at);
