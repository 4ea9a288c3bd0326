-- Release a lease, only if the caller holds it, and wake one waiter.
-- KEYS[1] lease key, KEYS[2] holder hash, KEYS[3] lease index, KEYS[4] release signal list
-- KEYS[5] (a slot only) its semaphore's slot set (slot number -> deadline; slot i scores i when free)
-- ARGV[1] token of the caller, ARGV[2] lease name, ARGV[3] signal ttl in ms
-- ARGV[4] (a slot only) the slot's number
-- Returns 1 when released, 0 when the token did not hold the lease.
-- the value is the token, or the token and lines naming the holder (a quick grant)
local current = redis.call('GET', KEYS[1])
if not current or string.match(current, '^[^\n]*') ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if KEYS[5] then
    redis.call('ZADD', KEYS[5], ARGV[4], ARGV[4])  -- free in the slot set: slot i scores i, long past
end
-- the signal is one element at most: a standing one already wakes the next waiter
if redis.call('EXISTS', KEYS[4]) == 0 then
    redis.call('LPUSH', KEYS[4], '1')
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[3]))
end
return 1
