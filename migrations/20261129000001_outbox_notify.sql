-- Wake the relays when work is written: one notification per inserting statement, delivered
-- when its transaction commits (Postgres folds identical notifications of one transaction).
create function herald_outbox_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('herald_outbox', '');
    return null;
end;
$$;

create trigger outbox_notify
    after insert on outbox
    for each statement
    execute function herald_outbox_notify();
