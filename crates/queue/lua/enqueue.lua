-- Enqueue a batch of jobs. ARGV: prefix, now, n, then 9 per job:
--   id, tenant, payload, payload version, max attempts, band, run-at ms (0 = now), dedupe key ('' = none),
--   durable (1 when Postgres holds the job's outbox row)
-- Returns a flat list: id, duplicate (0/1) per job. A duplicate is a job whose dedupe key is
-- still held (pending, running, dead, or completed within the key's retention) or whose id
-- already exists; the existing job's id is returned.
local now = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}
local woken = 0
local delayed = false
for i = 0, n - 1 do
  local base = 4 + i * 9
  local id, tenant, payload, pv, m, band, run_at, key =
    ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], ARGV[base + 5],
    tonumber(ARGV[base + 6]), ARGV[base + 7]
  local durable = ARGV[base + 8]
  local jk = jkey(id)
  local dup = nil
  local kk = ''
  if key ~= '' then
    kk = PREFIX .. 'k:' .. tenant .. ':' .. key
    dup = redis.call('GET', kk)
  end
  if not dup and redis.call('EXISTS', jk) == 1 then dup = id end
  if dup then
    out[#out + 1] = dup
    out[#out + 1] = 1
  else
    if kk ~= '' then redis.call('SET', kk, id) end
    redis.call('HSET', jk, 't', tenant, 'p', payload, 'pv', pv, 'a', 0, 'm', m, 'b', band,
      'k', kk, 'c', now, 'o', durable)
    if run_at > now then
      redis.call('ZADD', K_DELAYED, run_at, id)
      redis.call('HSET', jk, 's', 'd', 'sc', 0)
      tc_move(tenant, nil, 'd')
      delayed = true
    else
      make_ready(id, jk, new_score(band))
      tc_move(tenant, nil, 'r')
      woken = woken + 1
    end
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
-- A delayed job wakes one idle worker too, so that it learns the new due time now instead of
-- at its next idle check (up to a second late).
if delayed and woken == 0 then woken = 1 end
notify(woken)
tc_flush()
return out
