-- Hand a slot from its holder, whose attempt has ended, straight to a waiting task of the same
-- process: the slot never comes free, so the waiter needs no try of its own. One step: the
-- slot's key passes from the old token to the new one (never free, never two holders), with a new
-- fence and deadline, and the new attempt's in-flight record is written as a grant writes it.
-- KEYS[1] the slot's lease key   KEYS[2] the resource's fencing counter   KEYS[3] lease index
-- KEYS[4] slot set (slot number -> deadline ms)   KEYS[5] the new attempt's in-flight record (hash)
-- KEYS[6] its queue's in-flight index   KEYS[7] the list whose length + 1 is its attempt number
-- ARGV[1] the holder's token   ARGV[2] the waiter's token   ARGV[3] ttl ms   ARGV[4] slot number
-- ARGV[5] the slot's lease name   ARGV[6] task id (member of the index)
-- ARGV[7] ms from the grant to the attempt's deadline   ARGV[8 ..] the record's other fields
-- (field, value pairs)
-- Returns {1, fence, deadline_ms, now_ms} handed over; {0} the holder no longer held the slot
-- (its deadline passed, the reaper took it): nothing written, the waiter tries for a slot itself.
-- A waiter's token already holding the slot (the same handoff again, its reply lost) is handed
-- it again, with a new fence.
local current = redis.call('GET', KEYS[1])
local holder = current and string.match(current, '^[^\n]*')
if holder ~= ARGV[1] and holder ~= ARGV[2] then
    return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
local fence = redis.call('INCR', KEYS[2])
-- every counter seeded from a clock in microseconds since 1970 is above this (lease.py FENCE_FLOOR)
if fence < 1e15 then
    -- a counter that vanished (evicted) while its slot was held: seeded from the Redis clock in
    -- microseconds, above every token granted before (as semaphore_acquire.lua)
    redis.call('SET', KEYS[2], t[1] .. string.rep('0', 6 - string.len(t[2])) .. t[2])
    fence = redis.call('INCR', KEYS[2])
end
redis.call('ZADD', KEYS[3], now + ttl, ARGV[5])
redis.call('ZADD', KEYS[4], now + ttl, ARGV[4])
local due = now + tonumber(ARGV[7])
local call = {'HSET', KEYS[5], 'lease', ARGV[5], 'lease_token', ARGV[2], 'fence', fence, 'started_ms', now,
              'deadline_ms', due, 'attempt', redis.call('LLEN', KEYS[7]) + 1}
for i = 8, #ARGV do
    call[#call + 1] = ARGV[i]
end
redis.call(unpack(call))
redis.call('ZADD', KEYS[6], due, ARGV[6])
return {1, fence, now + ttl, now}
