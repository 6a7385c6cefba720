-- Keyed durable enqueues check whether the tenant's key is already taken in the outbox.
create index outbox_job_key_idx on outbox (tenant_id, queue, job_key) where job_key is not null;
