-- Holds a limit back after the provider refused a request for going too fast, for a wait that
-- doubles while the refusals keep coming and falls back to its base after a quiet spell.
--
-- KEYS[1]: the limit's state (its TAT in microseconds, as admit.lua keeps it).
-- KEYS[2]: the limit's hold: the instant the hold ends, in microseconds (as hold.lua).
-- KEYS[3]: the back-off: "<start> <end> <length>" of the last hold it set, in microseconds.
-- ARGV[1]: how long ago the refused request was admitted, in microseconds.
-- ARGV[2]: the base wait, in microseconds.
-- ARGV[3]: the longest wait, in microseconds.
-- ARGV[4]: the quiet spell, in microseconds: a refusal more than this after the last hold
--          ended starts again at the base wait.
-- ARGV[5]: the limit's burst tolerance in microseconds.
-- ARGV[6]: now in microseconds, or '' to use Redis's own clock.
--
-- A request admitted before the last hold began was refused for what that hold already
-- answers: it neither lengthens nor renews the hold. Any other refusal sets a hold from now,
-- twice as long as the last one if that ended less than a quiet spell ago. A hold never
-- shortens one already in force (hold.lua's). Returns {instant the hold in force ends (now if
-- none), length of the hold this refusal set (0 if none)}, instants in microseconds.
local now
if ARGV[6] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[6])
end
local admitted_at = now - tonumber(ARGV[1])
local base = tonumber(ARGV[2])
local longest = tonumber(ARGV[3])
local quiet = tonumber(ARGV[4])
local held_until = tonumber(redis.call('GET', KEYS[2]) or '0')

local last = redis.call('GET', KEYS[3])
local last_start, last_end, last_len
if last then
  local a, b, c = string.match(last, '^(%d+) (%d+) (%d+)$')
  last_start, last_end, last_len = tonumber(a), tonumber(b), tonumber(c)
end

if last_start and admitted_at < last_start then
  return {string.format('%.0f', math.max(held_until, now)), '0'}
end

local len = base
if last_end and now < last_end + quiet then
  len = math.min(last_len * 2, longest)
end
local until_us = now + len

redis.call('SET', KEYS[3], string.format('%.0f %.0f %.0f', now, until_us, len),
  'PX', math.ceil((len + quiet) / 1000) + 1000)
if until_us > held_until then
  redis.call('SET', KEYS[2], string.format('%.0f', until_us), 'PX', math.ceil(len / 1000) + 1000)
  held_until = until_us
end
local target = until_us + tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if target > tat then
  redis.call('SET', KEYS[1], string.format('%.0f', target),
    'PX', math.ceil((target - now) / 1000) + 1000)
end
return {string.format('%.0f', held_until), string.format('%.0f', len)}
