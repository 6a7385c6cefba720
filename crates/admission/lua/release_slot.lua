-- Frees `slot` in the tenant's, the user's and the fleet's slot sets.
--
-- KEYS[1]: the tenant's slots; KEYS[2]: the user's slots; KEYS[3]: the fleet's slots (members
-- `<tenant> <slot>`); KEYS[4]: the turn each of the tenant's slots was granted at; KEYS[5]: the
-- tenant's retired slots. ARGV[1]: the slot; ARGV[2]: the tenant; ARGV[3]: how long to refuse
-- the slot id afterwards, in milliseconds (0: the slot may be taken again at once, its call is
-- not over).
-- Returns 1 when this call freed a slot the tenant held, 0 when it was not held (already
-- released, or its lease expired): releasing twice frees one slot once.
local freed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2] .. ' ' .. ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local retire = tonumber(ARGV[3])
if retire > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[5], now + retire, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  local ttl = redis.call('PTTL', KEYS[5])
  if ttl < retire * 2 then
    redis.call('PEXPIRE', KEYS[5], retire * 2)
  end
end
return freed
