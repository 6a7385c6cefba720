-- The tenant's turn at which a call's slot was granted (1 for the tenant's first grant, 2 for the
-- next …; it starts again once the tenant has been idle for twice the slot lease): the order
-- dispatch admitted calls in, exactly, however many dispatchers ran at once
-- (docs/decisions/0008-fleet-call-sharing.md). Null until the call is dialled.
alter table calls add column slot_turn bigint null;
