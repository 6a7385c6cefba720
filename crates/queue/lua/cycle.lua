-- One round trip of a worker: apply acknowledgements, do a bounded slice of maintenance
-- (expired leases, due delayed jobs, completed-job retention), then fetch up to `want` jobs.
-- ARGV: prefix, now, want, lease ms, worker id, token prefix, maintenance limit,
--       keep completed count, keep completed ms, dedupe key retention ms, number of acks,
--       then 5 per ack: id, token, kind (ok|retry|defer|dead), ms (retry delay or defer until), error.
-- Returns { next_due_ms or -1, {ack results: 1 applied, 2 applied and dead, 0 stale token},
--           fetched: id, tenant, payload, payload version, attempt, max attempts, token, durable, ... }
local now = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local worker = ARGV[5]
local token_prefix = ARGV[6]
local limit = tonumber(ARGV[7])
local keep_count = tonumber(ARGV[8])
local keep_ms = tonumber(ARGV[9])
local key_ttl = tonumber(ARGV[10])
local nacks = tonumber(ARGV[11])

-- 1. Acknowledgements. Each must carry the lease token it was fetched with: a worker whose
-- lease expired and was taken over cannot complete or fail the job any more.
local results = {}
-- Completed jobs leave the lease set and enter the done set in one call each, after the loop.
local done_ids, done_zadd = {}, {}
-- With no completed jobs kept, finished jobs leave the lease set and are deleted in batches.
local lease_ids, gone_now = {}, {}
for i = 0, nacks - 1 do
  local base = 12 + i * 5
  local id, token, kind, ms, err = ARGV[base], ARGV[base + 1], ARGV[base + 2], tonumber(ARGV[base + 3]), ARGV[base + 4]
  local jk = jkey(id)
  local st = redis.call('HMGET', jk, 's', 'tok', 't', 'k', 'a', 'm')
  if st[1] ~= 'a' or st[2] ~= token then
    results[#results + 1] = 0
  else
    local tenant = st[3]
    if kind == 'ok' and keep_count == 0 then
      -- No completed jobs kept: the job goes at once (its dedupe key stays for its retention).
      lease_ids[#lease_ids + 1] = id
      gone_now[#gone_now + 1] = jk
      tc_move(tenant, 'a', nil)
      if st[4] and st[4] ~= '' then redis.call('PEXPIRE', st[4], key_ttl) end
      results[#results + 1] = 1
    elseif kind == 'ok' then
      done_ids[#done_ids + 1] = id
      done_zadd[#done_zadd + 1] = now
      done_zadd[#done_zadd + 1] = id
      redis.call('HSET', jk, 's', 'c', 'f', now, 'tok', '', 'wr', '')
      tc_move(tenant, 'a', 'c')
      if st[4] and st[4] ~= '' then redis.call('PEXPIRE', st[4], key_ttl) end
      results[#results + 1] = 1
    elseif kind == 'defer' then
      -- Not a failure: give the attempt back and wait.
      redis.call('ZREM', K_LEASES, id)
      redis.call('HINCRBY', jk, 'a', -1)
      redis.call('ZADD', K_DELAYED, ms, id)
      redis.call('HSET', jk, 's', 'd', 'wr', err, 'tok', '')
      tc_move(tenant, 'a', 'd')
      results[#results + 1] = 1
    elseif kind == 'dead' or tonumber(st[5]) >= tonumber(st[6]) then
      make_dead(id, jk, tenant, 'a', now, err)
      results[#results + 1] = 2
    else
      redis.call('ZREM', K_LEASES, id)
      redis.call('ZADD', K_DELAYED, now + ms, id)
      redis.call('HSET', jk, 's', 'd', 'e', err, 'wr', 'retry backoff', 'tok', '')
      tc_move(tenant, 'a', 'd')
      results[#results + 1] = 1
    end
  end
end
if #done_ids > 0 then
  call_chunked('ZREM', K_LEASES, done_ids, 1)
  call_chunked('ZADD', K_DONE, done_zadd, 2)
end
if #lease_ids > 0 then
  call_chunked('ZREM', K_LEASES, lease_ids, 1)
  for i = 1, #gone_now, 1000 do
    local j = i + 999
    if j > #gone_now then j = #gone_now end
    redis.call('UNLINK', unpack(gone_now, i, j))
  end
end

-- 2. Leases that expired: the worker died or stalled. The delivery already counted as an
-- attempt; re-deliver, or dead-letter when the budget is spent.
local woken = 0
local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  local jk = jkey(id)
  local st = redis.call('HMGET', jk, 't', 'a', 'm', 'sc')
  redis.call('ZREM', K_LEASES, id)
  if st[1] then
    local a, m = tonumber(st[2]), tonumber(st[3])
    local err = 'lease expired on attempt ' .. a .. ' of ' .. m .. ' (worker lost or stalled)'
    if a >= m then
      make_dead(id, jk, st[1], 'a', now, err)
    else
      make_ready(id, jk, tonumber(st[4]))
      redis.call('HSET', jk, 'e', err)
      tc_move(st[1], 'a', 'r')
      woken = woken + 1
    end
  end
end

-- 3. Delayed jobs that are due.
local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local jk = jkey(id)
  redis.call('ZREM', K_DELAYED, id)
  local st = redis.call('HMGET', jk, 't', 'b')
  if st[1] then
    make_ready(id, jk, new_score(st[2]))
    tc_move(st[1], 'd', 'r')
    woken = woken + 1
  end
end

-- 4. Completed-job retention, by count then by age, a bounded slice per call.
local function forget_done(ids)
  if #ids == 0 then return end
  local gone = {}
  for _, id in ipairs(ids) do
    local jk = jkey(id)
    local st = redis.call('HMGET', jk, 's', 't')
    if st[1] == 'c' then
      gone[#gone + 1] = jk
      tc_move(st[2], 'c', nil)
    end
  end
  call_chunked('ZREM', K_DONE, ids, 1)
  for i = 1, #gone, 1000 do
    local j = i + 999
    if j > #gone then j = #gone end
    redis.call('UNLINK', unpack(gone, i, j))
  end
end
local excess = redis.call('ZCARD', K_DONE) - keep_count
if excess > 0 then
  if excess > limit then excess = limit end
  forget_done(redis.call('ZRANGE', K_DONE, 0, excess - 1))
end
forget_done(redis.call('ZRANGEBYSCORE', K_DONE, '-inf', now - keep_ms, 'LIMIT', 0, limit))

-- 5. Fetch.
local fetched = {}
local leases = {}
if want > 0 and redis.call('EXISTS', K_PAUSED) == 0 then
  local popped = redis.call('ZPOPMIN', K_READY, want)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local jk = jkey(id)
    local st = redis.call('HMGET', jk, 't', 'p', 'pv', 'm', 'o', 'a')
    if st[1] then
      local a = (tonumber(st[6]) or 0) + 1
      local token = token_prefix .. ':' .. i
      redis.call('HSET', jk, 'a', a, 's', 'a', 'tok', token, 'w', worker, 'wr', '')
      leases[#leases + 1] = now + lease_ms
      leases[#leases + 1] = id
      tc_move(st[1], 'r', 'a')
      fetched[#fetched + 1] = id
      fetched[#fetched + 1] = st[1]
      fetched[#fetched + 1] = st[2]
      fetched[#fetched + 1] = st[3]
      fetched[#fetched + 1] = a
      fetched[#fetched + 1] = st[4]
      fetched[#fetched + 1] = token
      fetched[#fetched + 1] = st[5]
    end
  end
end
if #leases > 0 then call_chunked('ZADD', K_LEASES, leases, 2) end
if woken > #fetched / 8 then notify(woken - #fetched / 8) end

-- When is there next something to do without a push: the earliest delayed job or lease expiry.
local next_due = -1
local d = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if d[2] then next_due = tonumber(d[2]) end
local l = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
if l[2] and (next_due < 0 or tonumber(l[2]) < next_due) then next_due = tonumber(l[2]) end

local reply = { next_due, results }
for i = 1, #fetched do reply[#reply + 1] = fetched[i] end
tc_flush()
return reply
