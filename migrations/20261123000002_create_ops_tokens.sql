-- Ops tokens authorise cross-tenant operations (dashboards, dead-letter handling). Only the
-- token's sha256 is kept.
create table ops_tokens (
    id         uuid primary key,
    token_hash text not null unique,
    created_at timestamptz not null default now()
);
