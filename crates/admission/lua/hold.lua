-- Holds a limit back until an instant: nothing is admitted against KEYS[1] before ARGV[1].
--
-- KEYS[1]: the limit's state (its TAT in microseconds, as admit.lua keeps it).
-- KEYS[2]: the limit's hold: the instant the hold ends, in microseconds. reserve.lua reads it
--          so that a hold wins over a reservation whose slot it covers.
-- ARGV[1]: the instant to hold until, in microseconds.
-- ARGV[2]: the limit's burst tolerance in microseconds.
-- ARGV[3]: now in microseconds, or '' to use Redis's own clock.
--
-- A hold never shortens an existing one. Returns the TAT now in force.
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[3])
end
local until_us = tonumber(ARGV[1])
local held_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if until_us > held_until then
  local ttl_ms = math.max(math.ceil((until_us - now) / 1000), 0) + 1000
  redis.call('SET', KEYS[2], string.format('%.0f', until_us), 'PX', ttl_ms)
end
local target = until_us + tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if target > tat then
  local ttl_ms = math.max(math.ceil((target - now) / 1000), 0) + 1000
  redis.call('SET', KEYS[1], string.format('%.0f', target), 'PX', ttl_ms)
  tat = target
end
return string.format('%.0f', tat)
