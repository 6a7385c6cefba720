-- Admits one request against every limit in KEYS at once, or none of them (GCRA).
--
-- KEYS[i]: the limit's state, its theoretical arrival time (TAT) in microseconds.
-- ARGV[1]: now in microseconds, or '' to use Redis's own clock (one clock for the fleet).
-- ARGV[2i], ARGV[2i+1]: KEYS[i]'s emission interval and burst tolerance, in microseconds.
--
-- Returns {1, now} when admitted, {0, earliest} when not: `earliest` is the first instant
-- (microseconds) at which every limit would admit. A refusal changes nothing, so a request
-- the token refuses does not use the base's slot.
local now = now_us(ARGV[1])

local earliest = 0
local next_tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then
    tat = now
  end
  local allowed_at = tat - tolerance
  if allowed_at > now and allowed_at > earliest then
    earliest = allowed_at
  end
  next_tats[i] = tat + interval
end

if earliest > 0 then
  return {0, string.format('%.0f', earliest)}
end

for i, key in ipairs(KEYS) do
  -- The state expires once it no longer constrains anyone, so idle limits cost no memory.
  local ttl_ms = math.ceil((next_tats[i] - now) / 1000) + 1000
  redis.call('SET', key, string.format('%.0f', next_tats[i]), 'PX', ttl_ms)
end
return {1, string.format('%.0f', now)}
