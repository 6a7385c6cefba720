-- Shared helpers, prepended to every herald script.
--
-- KEYS (all under the queue's hash tag, so every script runs on one cluster slot):
--   1 ready (zset, score = band * 2^44 + seq)   2 delayed (zset, score = run-at ms)
--   3 leases (zset, score = lease expiry ms)     4 dead (zset, score = died-at ms)
--   5 done (zset, score = finished-at ms)        6 tenant counts (hash "<tenant>:<state>")
--   7 paused (string)                            8 notify (list of wake-up tokens)
--   9 seq (counter)
-- ARGV[1] is the queue's key prefix ("herald:v1:{queue}:"); job hashes live at prefix .. "j:" .. id.
--
-- Job hash fields: t tenant, p payload, pv payload version, a attempts (deliveries so far),
-- m max attempts, b priority band, sc ready-set score, k dedupe key name, s state
-- (r ready, d delayed, a active, x dead, c completed), tok lease token, w worker,
-- c created ms, f finished ms, e last error, wr why it is waiting, o durable (1: Postgres has the
-- job's outbox row).
local K_READY, K_DELAYED, K_LEASES, K_DEAD, K_DONE, K_TC, K_PAUSED, K_NOTIFY, K_SEQ =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local PREFIX = ARGV[1]
local BAND = 17592186044416 -- 2^44

local function jkey(id) return PREFIX .. 'j:' .. id end

-- Per-tenant state counts move in memory during a script and are written once at its end by
-- tc_flush() (one HINCRBY per tenant and state that changed, not two per job).
local TC = {}
local function tc_add(field, d) TC[field] = (TC[field] or 0) + d end
local function tc_move(tenant, from, to)
  if from then tc_add(tenant .. ':' .. from, -1) end
  if to then tc_add(tenant .. ':' .. to, 1) end
end
local function tc_flush()
  for field, d in pairs(TC) do
    if d ~= 0 then redis.call('HINCRBY', K_TC, field, d) end
  end
  TC = {}
end

-- Calls `cmd key items…` in slices, so that `unpack` never exceeds Lua's stack limit.
-- `step` keeps pairs (score, member) together.
local function call_chunked(cmd, key, items, step)
  local size = 1000 * step
  for i = 1, #items, size do
    local j = i + size - 1
    if j > #items then j = #items end
    redis.call(cmd, key, unpack(items, i, j))
  end
end

local function new_score(band)
  return tonumber(band) * BAND + redis.call('INCR', K_SEQ)
end

local function make_ready(id, jk, score)
  redis.call('ZADD', K_READY, score, id)
  redis.call('HSET', jk, 's', 'r', 'sc', score, 'tok', '')
end

local function make_dead(id, jk, tenant, from, now, err)
  redis.call('ZREM', K_LEASES, id)
  redis.call('ZREM', K_DELAYED, id)
  redis.call('ZADD', K_DEAD, now, id)
  redis.call('ZADD', PREFIX .. 'x:' .. tenant, now, id)
  redis.call('HSET', jk, 's', 'x', 'e', err, 'f', now, 'tok', '')
  tc_move(tenant, from, 'x')
end

local function notify(n)
  if n > 0 then
    if n > 32 then n = 32 end
    local tokens = {}
    for i = 1, n do tokens[i] = '1' end
    redis.call('LPUSH', K_NOTIFY, unpack(tokens))
    redis.call('LTRIM', K_NOTIFY, 0, 63)
  end
end
