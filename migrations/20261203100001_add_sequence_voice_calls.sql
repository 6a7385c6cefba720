-- A sequence's `voice_agent_call` step places its calls through the call-campaign machinery
-- (slots per user, per tenant and fleet-wide, the calling window, release): each such step has
-- one call campaign of its own, created the first time the step runs and marked with the
-- sequence and step it belongs to, so it is never confused with a campaign made by hand.
alter table call_campaigns
    add column sequence_id   uuid null,
    add column sequence_step int null,
    add constraint call_campaigns_sequence_step_both
        check ((sequence_id is null) = (sequence_step is null)),
    add constraint call_campaigns_sequence_fk
        foreign key (tenant_id, sequence_id) references sequences (tenant_id, id);

create unique index call_campaigns_one_per_sequence_step
    on call_campaigns (tenant_id, sequence_id, sequence_step) where sequence_id is not null;

-- A call step's activity names its call (one call per lead and step) and, once the call has
-- ended, its outcome: `calling` until then, then the call's outcome. The end of the call moves
-- the lead on in the same transaction, and only the update away from `calling` does.
alter table sequence_activities
    add column call_id uuid null,
    add constraint sequence_activities_call_fk
        foreign key (tenant_id, call_id) references calls (tenant_id, id);

create unique index sequence_activities_call_idx
    on sequence_activities (tenant_id, call_id) where call_id is not null;

alter table sequence_activities drop constraint sequence_activities_outcome;
alter table sequence_activities add constraint sequence_activities_outcome check
    (outcome in ('executed', 'waited', 'yes', 'no',
                 'calling', 'completed', 'busy', 'no-answer', 'failed', 'cancelled'));
