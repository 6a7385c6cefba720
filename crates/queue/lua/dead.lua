-- Retry or discard a dead job. ARGV: prefix, action (retry|discard), id, tenant ('' = any),
-- dedupe key retention ms. Returns 1 when done, 0 when the job is not dead (or not the tenant's).
local action, id, tenant, key_ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local jk = jkey(id)
local st = redis.call('HMGET', jk, 's', 't', 'b', 'k')
if st[1] ~= 'x' or (tenant ~= '' and st[2] ~= tenant) then return 0 end
redis.call('ZREM', K_DEAD, id)
redis.call('ZREM', PREFIX .. 'x:' .. st[2], id)
if action == 'retry' then
  redis.call('HSET', jk, 'a', 0, 'f', '')
  make_ready(id, jk, new_score(st[3]))
  tc_move(st[2], 'x', 'r')
  notify(1)
else
  redis.call('DEL', jk)
  if st[4] and st[4] ~= '' then redis.call('PEXPIRE', st[4], key_ttl) end
  tc_move(st[2], 'x', nil)
end
tc_flush()
return 1
