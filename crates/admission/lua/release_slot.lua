-- Frees `slot` in the tenant's and the user's slot sets.
--
-- KEYS[1]: the tenant's slots; KEYS[2]: the user's slots. ARGV[1]: the slot.
-- Returns 1 when this call freed a slot the tenant held, 0 when it was not held (already
-- released, or its lease expired): releasing twice frees one slot once.
local freed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return freed
