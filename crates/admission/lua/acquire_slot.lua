-- Takes one concurrency slot for `slot` against a per-user and a per-tenant limit at once, and,
-- when a fleet cap is set, against the tenant's fair share of the fleet: all of them or none. A
-- slot is a sorted-set member scored by its lease expiry (milliseconds): an expired lease frees
-- the slot by itself, so a call-ended signal that never comes cannot leak it.
--
-- KEYS[1]: the tenant's slots; KEYS[2]: the user's slots; KEYS[3]: the tenant's round-robin
-- cursor (the user served last); KEYS[4]: the fleet's slots (members `<tenant> <slot>`);
-- KEYS[5]: the fleet's demand (tenant -> instant its demand lapses); KEYS[6]: the fleet's
-- round-robin cursor (the tenant served last); KEYS[7]: the tenant's turn (how many slots it
-- was granted); KEYS[8]: the turn each slot the tenant holds was granted at; KEYS[9]: the
-- tenant's retired slots (slot -> instant it may be taken again).
-- ARGV: now_ms ('' = Redis's clock), lease_ms, user_limit, tenant_limit, slot, user, tenant,
-- fleet_limit (0 = no fleet cap: KEYS[4..6] are not touched), expected turn ('' = any).
--
-- Returns {status, instant, share, held, turn}: {1, lease_until} when taken, {2, lease_until}
-- when `slot` already held one (a re-run takes nothing more), {4, 0} when `slot` was retired
-- (its call is over: a dispatcher that read it as waiting read too early), {3, 0} when the
-- tenant's turn is
-- no longer the expected one (another dispatcher was granted a slot since the caller read the
-- cursor: it must read again, so grants follow the round-robin order exactly), {0, earliest}
-- when the user is full, {-1, earliest} when the tenant is full, {-2, earliest} when every slot
-- of the fleet is held and {-3, earliest} when the tenant holds its fair share of the fleet
-- already; `earliest` is when the first of the full set's leases expires, `share` and `held` the
-- tenant's fleet share and fleet slots (fleet answers only), `turn` the grant's turn (1, 2).
--
-- The fleet part transcribes `herald_admission::fleet::decide` (see that module for the rule);
-- crates/admission/tests/fleet.rs checks that both agree.
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
local tenant = ARGV[7]
local fleet_limit = tonumber(ARGV[8])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)

local held = redis.call('ZSCORE', KEYS[1], slot)
if held then
  return {2, tonumber(held), 0, 0, tonumber(redis.call('HGET', KEYS[8], slot) or '0')}
end

redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
if redis.call('ZSCORE', KEYS[9], slot) then
  return {4, 0, 0, 0, 0}
end

local turn = tonumber(redis.call('GET', KEYS[7]) or '0')
if ARGV[9] ~= '' and turn ~= tonumber(ARGV[9]) then
  return {3, 0, 0, 0, turn}
end

local function earliest(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    return tonumber(first[2])
  end
  return now
end

if redis.call('ZCARD', KEYS[2]) >= user_limit then
  return {0, earliest(KEYS[2]), 0, 0, 0}
end
if redis.call('ZCARD', KEYS[1]) >= tenant_limit then
  -- The tenant cannot use a fleet slot now: it stops competing for one.
  if fleet_limit > 0 then
    redis.call('ZREM', KEYS[5], tenant)
  end
  return {-1, earliest(KEYS[1]), 0, 0, 0}
end

-- Strings in byte order, as Rust orders them (Lua's `<` follows the server's locale).
local function less(a, b)
  local la, lb = #a, #b
  for i = 1, math.min(la, lb) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return la < lb
end

if fleet_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  -- Asking is demand: the tenant competes until its lease-long demand lapses, it withdraws, or
  -- its own limit stops it.
  redis.call('ZADD', KEYS[5], now + lease, tenant)
  local held_by = {}
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local owner = string.match(member, '^(%S+) ')
    if owner then
      held_by[owner] = (held_by[owner] or 0) + 1
      total = total + 1
    end
  end
  local competing = redis.call('ZRANGE', KEYS[5], 0, -1)
  local is_competing = {}
  for _, t in ipairs(competing) do
    is_competing[t] = true
  end
  local kept = 0
  for owner, n in pairs(held_by) do
    if not is_competing[owner] then
      kept = kept + n
    end
  end
  local available = math.max(fleet_limit - kept, 0)
  local n = #competing
  local base = math.floor(available / n)
  local extra = available % n
  -- Round-robin turns after the tenant served last, in byte order of names.
  table.sort(competing, less)
  local last = redis.call('GET', KEYS[6])
  local start = n + 1
  if last then
    for i, t in ipairs(competing) do
      if less(last, t) then
        start = i
        break
      end
    end
  else
    start = 1
  end
  local turn = {}
  for i, t in ipairs(competing) do
    turn[t] = (i - start) % n
  end
  -- The remainder goes to those holding the most, ties by turn.
  table.sort(competing, function(a, b)
    local ha, hb = held_by[a] or 0, held_by[b] or 0
    if ha ~= hb then
      return ha > hb
    end
    return turn[a] < turn[b]
  end)
  local share = base
  for rank, t in ipairs(competing) do
    if t == tenant then
      if rank - 1 < extra then
        share = base + 1
      end
      break
    end
  end
  local mine = held_by[tenant] or 0
  if total >= fleet_limit then
    return {-2, earliest(KEYS[4]), share, mine, 0}
  end
  if mine >= share then
    return {-3, earliest(KEYS[4]), share, mine, 0}
  end
end

local until_ms = now + lease
redis.call('ZADD', KEYS[1], until_ms, slot)
redis.call('ZADD', KEYS[2], until_ms, slot)
redis.call('SET', KEYS[3], ARGV[6])
turn = redis.call('INCR', KEYS[7])
redis.call('HSET', KEYS[8], slot, turn)
local keys = {1, 2, 3, 7, 8}
if fleet_limit > 0 then
  redis.call('ZADD', KEYS[4], until_ms, tenant .. ' ' .. slot)
  redis.call('SET', KEYS[6], tenant)
  keys = {1, 2, 3, 4, 5, 6, 7, 8}
end
-- Idle tenants, users and fleets leave nothing behind once their last lease is over.
for _, i in ipairs(keys) do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < lease * 2 then
    redis.call('PEXPIRE', KEYS[i], lease * 2)
  end
end
return {1, until_ms, 0, 0, turn}
