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

-- Sets `key` to `value` (microseconds) if that is later than what it holds, expiring a second
-- after that instant. Returns the value in force.
local function raise(key, value, now)
  local current = tonumber(redis.call('GET', key) or '0')
  if value <= current then
    return current
  end
  local ttl_ms = math.max(math.ceil((value - now) / 1000), 0) + 1000
  redis.call('SET', key, string.format('%.0f', value), 'PX', ttl_ms)
  return value
end

-- Holds the limit whose TAT is `tat_key` back until `until_us`: records the hold's end under
-- `hold_key` (reserve.lua reads it, so that a hold wins over a reservation whose slot it
-- covers) and pushes the TAT to the hold's end plus the burst tolerance, so nothing is
-- admitted before it. A hold never shortens a longer one. Returns the hold's end and the TAT
-- now in force.
local function hold_until(tat_key, hold_key, until_us, tolerance, now)
  return raise(hold_key, until_us, now), raise(tat_key, until_us + tolerance, now)
end
