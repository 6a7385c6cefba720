-- Tenants: one customer account each. The API token and the webhook HMAC secret are issued at
-- creation; only the token's sha256 is kept, so a leaked table does not leak working tokens.
create table tenants (
    id          uuid primary key,
    name        text not null unique,
    time_zone   text not null default 'UTC',
    token_hash  text not null unique,
    hmac_secret text not null,
    created_at  timestamptz not null default now(),
    constraint tenants_name_length check (char_length(name) between 1 and 100),
    constraint tenants_time_zone_not_empty check (time_zone <> '')
);
