-- Holds a limit back after the provider refused a request for going too fast, for a wait that
-- doubles while the refusals keep coming and falls back to its base after a quiet spell.
--
-- KEYS[1]: the limit's state (its TAT in microseconds, as admit.lua keeps it).
-- KEYS[2]: the limit's hold: the instant the hold ends, in microseconds (as hold.lua).
-- KEYS[3]: the back-off: "<start> <length>" of the last hold it set, in microseconds.
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
-- shortens one already in force (limits.lua's hold_until). Returns {instant the hold in force ends (now if
-- none), length of the hold this refusal set (0 if none)}, instants in microseconds.
local now = now_us(ARGV[6])
local admitted_at = now - tonumber(ARGV[1])
local base = tonumber(ARGV[2])
local longest = tonumber(ARGV[3])
local quiet = tonumber(ARGV[4])

local last = redis.call('GET', KEYS[3])
local last_start, last_len
if last then
  local a, b = string.match(last, '^(%d+) (%d+)$')
  last_start, last_len = tonumber(a), tonumber(b)
end

if last_start and admitted_at < last_start then
  local held_until = tonumber(redis.call('GET', KEYS[2]) or '0')
  return {string.format('%.0f', math.max(held_until, now)), '0'}
end

local len = base
if last_start and now < last_start + last_len + quiet then
  len = math.min(last_len * 2, longest)
end
redis.call('SET', KEYS[3], string.format('%.0f %.0f', now, len),
  'PX', math.ceil((len + quiet) / 1000) + 1000)
local held_until = hold_until(KEYS[1], KEYS[2], now + len, tonumber(ARGV[5]), now)
return {string.format('%.0f', held_until), string.format('%.0f', len)}
