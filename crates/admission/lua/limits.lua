-- Helpers prepended to the rate limiter's scripts (admit, reserve, hold, back_off).

-- Now in microseconds: `arg` when the caller gave an instant, else Redis's own clock (one
-- clock for the whole fleet).
local function now_us(arg)
  if arg == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return tonumber(arg)
end

-- Holds the limit whose TAT is `tat_key` back until `until_us`: records the hold's end under
-- `hold_key` (reserve.lua reads it, so that a hold wins over a reservation whose slot it
-- covers) and pushes the TAT to the hold's end plus the burst tolerance, so nothing is
-- admitted before it. A hold never shortens a longer one. Returns the hold's end and the TAT
-- now in force.
local function hold_until(tat_key, hold_key, until_us, tolerance, now)
  local held_until = tonumber(redis.call('GET', hold_key) or '0')
  if until_us > held_until then
    local ttl_ms = math.max(math.ceil((until_us - now) / 1000), 0) + 1000
    redis.call('SET', hold_key, string.format('%.0f', until_us), 'PX', ttl_ms)
    held_until = until_us
  end
  local target = until_us + tolerance
  local tat = tonumber(redis.call('GET', tat_key) or '0')
  if target > tat then
    local ttl_ms = math.max(math.ceil((target - now) / 1000), 0) + 1000
    redis.call('SET', tat_key, string.format('%.0f', target), 'PX', ttl_ms)
    tat = target
  end
  return held_until, tat
end
