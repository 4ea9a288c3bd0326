-- Extend a lease, only if the caller still holds it (compare-and-set on the token).
-- KEYS[1] lease key, KEYS[2] holder hash, KEYS[3] lease index
-- ARGV[1] token of the caller, ARGV[2] new ttl in ms, ARGV[3] lease name
-- KEYS[4], ARGV[4] (a slot only) its semaphore's slot set and the slot's number: its deadline follows
-- Returns {1, deadline_ms} when renewed, {0, current token or ''} when not held.
-- the value is the token, or the token and lines naming the holder (a quick grant)
local current = redis.call('GET', KEYS[1])
current = current and string.match(current, '^[^\n]*')
if current ~= ARGV[1] then
    return {0, current or ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[2], 'renewed', now, 'deadline', now + ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], now + ttl, ARGV[3])
if KEYS[4] then
    redis.call('ZADD', KEYS[4], now + ttl, ARGV[4])
end
return {1, now + ttl}
