-- An agent removed by its tenant is kept (its campaigns and calls still name it) but marked:
-- no new campaign may use it, its active campaigns are paused with the reason, and a campaign
-- using it cannot resume until it is given another agent.
alter table call_agents add column removed_at timestamptz null;
