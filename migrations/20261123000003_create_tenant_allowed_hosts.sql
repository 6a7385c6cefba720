-- The hosts a tenant's jobs of herald's built-in `http` type may call. Hosts are stored
-- lower-case so the comparison is exact.
create table tenant_allowed_hosts (
    tenant_id uuid not null references tenants (id),
    host      text not null,
    primary key (tenant_id, host),
    constraint tenant_allowed_hosts_host_lower check (host = lower(host) and host <> '')
);
