-- Admits one request against every limit at once (GCRA, as admit.lua), and when it cannot,
-- reserves the request's slot so the caller comes back to a slot that is already its own.
--
-- KEYS[1..n]: the limits' states, their theoretical arrival times (TAT) in microseconds.
-- KEYS[n+1..2n]: the same limits' holds (the instant a 429 lock-out ends), as hold.lua keeps them.
-- KEYS[2n+1]: the reservation (its slot in microseconds).
-- ARGV[1]: now in microseconds, or '' to use Redis's own clock (one clock for the fleet).
-- ARGV[2]: grace in microseconds: how late after its slot a reservation is still honoured.
-- ARGV[2i+1], ARGV[2i+2]: KEYS[i]'s emission interval and burst tolerance, in microseconds.
--
-- Returns {1, now} when admitted (on the reservation, or on a free slot) and {0, slot} when
-- not: the request's slot is then reserved, every TAT already counts it, and the caller
-- should come back at `slot`. A reservation is honoured once, from its slot to slot + grace,
-- and only if no hold covers the slot; otherwise it is forfeited (its slot stays unused) and
-- the request reserves again behind everyone already waiting.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local grace = tonumber(ARGV[2])
local n = (#KEYS - 1) / 2
local reservation_key = KEYS[2 * n + 1]

local reserved = redis.call('GET', reservation_key)
if reserved then
  local slot = tonumber(reserved)
  local held_until = 0
  for i = 1, n do
    local hold = tonumber(redis.call('GET', KEYS[n + i]) or '0')
    if hold > held_until then
      held_until = hold
    end
  end
  if slot >= held_until then
    if now < slot then
      return {0, string.format('%.0f', slot)}
    end
    if now <= slot + grace then
      -- The TATs counted this request when the slot was reserved: nothing is paid twice.
      redis.call('DEL', reservation_key)
      return {1, string.format('%.0f', now)}
    end
  end
  -- A hold covers the slot, or the caller came back too late for its slot to be safe.
  redis.call('DEL', reservation_key)
end

local slot = now
local tats = {}
for i = 1, n do
  local tolerance = tonumber(ARGV[2 * i + 2])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  tats[i] = tat
  local allowed_at = math.max(tat, now) - tolerance
  if allowed_at > slot then
    slot = allowed_at
  end
end

for i = 1, n do
  local interval = tonumber(ARGV[2 * i + 1])
  local next_tat = math.max(tats[i], slot) + interval
  -- The state expires once it no longer constrains anyone, so idle limits cost no memory.
  local ttl_ms = math.ceil((next_tat - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', next_tat), 'PX', ttl_ms)
end

if slot <= now then
  return {1, string.format('%.0f', now)}
end
local reservation_ttl_ms = math.ceil((slot + grace - now) / 1000) + 1000
redis.call('SET', reservation_key, string.format('%.0f', slot), 'PX', reservation_ttl_ms)
return {0, string.format('%.0f', slot)}
