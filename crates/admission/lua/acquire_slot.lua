-- Takes one concurrency slot for `slot` against a per-user and a per-tenant limit at once, or
-- neither. A slot is a sorted-set member scored by its lease expiry (milliseconds): an expired
-- lease frees the slot by itself, so a call-ended signal that never comes cannot leak it.
--
-- KEYS[1]: the tenant's slots; KEYS[2]: the user's slots; KEYS[3]: the tenant's round-robin
-- cursor (the user served last).
-- ARGV: now_ms ('' = Redis's clock), lease_ms, user_limit, tenant_limit, slot, user.
--
-- Returns {1, lease_until} when taken, {2, lease_until} when `slot` already held one (a re-run
-- takes nothing more), {0, earliest} when the user is full, {-1, earliest} when the tenant is
-- full; `earliest` is when the first of the full set's leases expires.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local lease = tonumber(ARGV[2])
local user_limit = tonumber(ARGV[3])
local tenant_limit = tonumber(ARGV[4])
local slot = ARGV[5]

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)

local held = redis.call('ZSCORE', KEYS[1], slot)
if held then
  return {2, tonumber(held)}
end

local function earliest(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    return tonumber(first[2])
  end
  return now
end

if redis.call('ZCARD', KEYS[2]) >= user_limit then
  return {0, earliest(KEYS[2])}
end
if redis.call('ZCARD', KEYS[1]) >= tenant_limit then
  return {-1, earliest(KEYS[1])}
end

local until_ms = now + lease
redis.call('ZADD', KEYS[1], until_ms, slot)
redis.call('ZADD', KEYS[2], until_ms, slot)
redis.call('SET', KEYS[3], ARGV[6])
-- Idle tenants and users leave nothing behind once their last lease is over.
for i = 1, 3 do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < lease * 2 then
    redis.call('PEXPIRE', KEYS[i], lease * 2)
  end
end
return {1, until_ms}
