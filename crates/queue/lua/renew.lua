-- Extend the leases of running jobs. ARGV: prefix, now, lease ms, then id, token pairs.
-- Returns 1 per renewed lease, 0 where the lease was lost (expired and taken over, or acked).
local now = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local st = redis.call('HMGET', jkey(id), 's', 'tok')
  if st[1] == 'a' and st[2] == token then
    redis.call('ZADD', K_LEASES, 'XX', now + lease_ms, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
