-- Admits one request against every limit at once (GCRA, as admit.lua), and when it cannot,
-- reserves the request's slot so the caller comes back to a slot that is already its own.
-- Optionally under a cap: a second GCRA counted on the instants requests are actually admitted,
-- which every admission must pass too, so that late reservations never bunch.
--
-- KEYS[1..n]: the limits' states, their theoretical arrival times (TAT) in microseconds.
-- KEYS[n+1..2n]: the same limits' holds (the instant a 429 lock-out ends), as hold.lua keeps them.
-- KEYS[2n+1]: the reservation (the instant it may be taken, in microseconds).
-- KEYS[2n+2]: the cap's state (its TAT over admission instants), only when ARGV[3] > 0.
-- KEYS[2n+3]: the cap's queue: the instant the last request the cap refused was sent back to.
-- ARGV[1]: now in microseconds, or '' to use Redis's own clock (one clock for the fleet).
-- ARGV[2]: grace in microseconds: how late after its instant a reservation is still honoured.
-- ARGV[3], ARGV[4]: the cap's emission interval and tolerance in microseconds (0, 0: no cap).
-- ARGV[2i+3], ARGV[2i+4]: KEYS[i]'s emission interval and burst tolerance, in microseconds.
--
-- Returns {1, now} when admitted (on the reservation, or on a free slot) and {0, instant}
-- when not: the request's slot is then reserved, every TAT already counts it, and the caller
-- should come back at `instant`. A reservation is honoured once, from its instant to instant +
-- grace, only if no hold covers it, and only if the cap allows an admission now; when the cap
-- does not, the reservation moves to the instant the cap names (nothing is forfeited). A
-- reservation a hold covers or the caller came back to too late is forfeited (its slot stays
-- unused) and the request reserves again behind everyone already waiting.
local now = now_us(ARGV[1])
local grace = tonumber(ARGV[2])
local cap_interval = tonumber(ARGV[3])
local cap_tolerance = tonumber(ARGV[4])
local n = (#ARGV - 4) / 2
local reservation_key = KEYS[2 * n + 1]
local cap_key = KEYS[2 * n + 2]
local cap_queue_key = KEYS[2 * n + 3]

-- The first instant the cap admits (at most `now` when it admits now).
local function cap_allows_at()
  if cap_interval == 0 then
    return now
  end
  local tat = tonumber(redis.call('GET', cap_key) or '0')
  return math.max(tat, now) - cap_tolerance
end

-- Counts an admission at `now` against the cap.
local function cap_take()
  if cap_interval == 0 then
    return
  end
  local tat = math.max(tonumber(redis.call('GET', cap_key) or '0'), now) + cap_interval
  local ttl_ms = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', cap_key, string.format('%.0f', tat), 'PX', ttl_ms)
end

-- The instant a new request the cap refuses comes back at: no earlier than the cap allows, and
-- one cap interval behind the request it refused before, so that requests refused together (a
-- crowd of steps the limits let through) come back in order, one per interval, instead of all
-- at the cap's next instant, where all but one would be refused again, round after round.
local function cap_queue(cap_at)
  local tail = tonumber(redis.call('GET', cap_queue_key) or '0')
  local at = math.max(cap_at, tail + cap_interval)
  local ttl_ms = math.ceil((at - now) / 1000) + 1000
  redis.call('SET', cap_queue_key, string.format('%.0f', at), 'PX', ttl_ms)
  return at
end

local function reserve(at)
  local ttl_ms = math.ceil((at + grace - now) / 1000) + 1000
  redis.call('SET', reservation_key, string.format('%.0f', at), 'PX', ttl_ms)
  return {0, string.format('%.0f', at)}
end

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
      local cap_at = cap_allows_at()
      if cap_at > now then
        -- Admitting it now would put more requests in a moment than the cap allows (others
        -- were admitted on their own slots meanwhile): it keeps its place, a little later.
        return reserve(cap_at)
      end
      -- The TATs counted this request when the slot was reserved: nothing is paid twice.
      redis.call('DEL', reservation_key)
      cap_take()
      return {1, string.format('%.0f', now)}
    end
  end
  -- A hold covers the slot, or the caller came back too late for its slot to be kept.
  redis.call('DEL', reservation_key)
end

local slot = now
local tats = {}
for i = 1, n do
  local tolerance = tonumber(ARGV[2 * i + 4])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  tats[i] = tat
  local allowed_at = math.max(tat, now) - tolerance
  if allowed_at > slot then
    slot = allowed_at
  end
end

for i = 1, n do
  local interval = tonumber(ARGV[2 * i + 3])
  local next_tat = math.max(tats[i], slot) + interval
  -- The state expires once it no longer constrains anyone, so idle limits cost no memory.
  local ttl_ms = math.ceil((next_tat - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', next_tat), 'PX', ttl_ms)
end

local cap_at = cap_allows_at()
if slot <= now and cap_at <= now then
  cap_take()
  return {1, string.format('%.0f', now)}
end
if cap_at > slot then
  -- The slot is free by the limits but the cap is taken until after it: in line.
  return reserve(cap_queue(math.max(slot, cap_at)))
end
return reserve(slot)
