-- A provider's event names only herald's send id: find the activity (and its lead) by it.
create index sequence_activities_send_idx on sequence_activities (tenant_id, send_id)
    where send_id is not null;
