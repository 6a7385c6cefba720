-- Give back jobs this worker fetched but never started (graceful shutdown), or abandons
-- after its drain time: back to the ready set at their old place, the attempt not counted.
-- ARGV: prefix, then id, token pairs. Returns how many were released.
local n = 0
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local jk = jkey(id)
  local st = redis.call('HMGET', jk, 's', 'tok', 't', 'sc')
  if st[1] == 'a' and st[2] == token then
    redis.call('ZREM', K_LEASES, id)
    redis.call('HINCRBY', jk, 'a', -1)
    make_ready(id, jk, tonumber(st[4]))
    tc_move(st[3], 'a', 'r')
    n = n + 1
  end
end
notify(n)
tc_flush()
return n
