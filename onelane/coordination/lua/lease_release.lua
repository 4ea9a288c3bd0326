-- Release a lease, only if the caller holds it, and wake one waiter.
-- KEYS[1] lease key, KEYS[2] holder hash, KEYS[3] lease index, KEYS[4] release signal list
-- ARGV[1] token of the caller, ARGV[2] lease name, ARGV[3] signal ttl in ms
-- Returns 1 when released, 0 when the token did not hold the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 0)
redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[3]))
return 1
