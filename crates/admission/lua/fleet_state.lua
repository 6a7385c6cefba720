-- The fleet's slots, demand and round-robin cursor in one snapshot, with Redis's clock.
--
-- KEYS[1]: the fleet's slots (members `<tenant> <slot>`, scored by lease end); KEYS[2]: the
-- fleet's demand (tenant -> instant it lapses); KEYS[3]: the fleet's cursor.
-- Returns {now_ms, {member, score, ...}, {tenant, until, ...}, cursor or false}. Read-only;
-- bounded by the fleet cap and the number of competing tenants.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {
  now,
  redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES'),
  redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES'),
  redis.call('GET', KEYS[3])
}
