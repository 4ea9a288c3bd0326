-- Hand a slot from its holder, whose attempt has ended, straight to a waiting task of the same
-- process: the slot never comes free, so the waiter needs no try of its own. One step: the
-- slot's key passes from the old token to the new one (never free, never two holders), with a new
-- fence and deadline, and the new attempt's in-flight record is written as a grant writes it.
-- The slot's entries in the lease index and the slot set keep the deadline of the grant that took
-- it from Redis (at most KEEP_S and one call earlier than the key's): both are hints, each ZADD
-- here would cost as much as the record's HSET, and an early one only costs a look at the key —
-- the reaper finds the lease alive and moves its entry to the key's expiry (lease_reap.lua), a try
-- finds the key held (SET NX) and reads the slots' keys (semaphore_acquire.lua). A release resets both.
-- KEYS[1] the slot's lease key   KEYS[2] the resource's fencing counter
-- KEYS[3] the new attempt's in-flight record (hash)   KEYS[4] its queue's in-flight index
-- KEYS[5] the list whose length + 1 is its attempt number
-- ARGV[1] the holder's token   ARGV[2] the waiter's token   ARGV[3] ttl ms   ARGV[4] the slot's lease name
-- ARGV[5] task id (member of the index)   ARGV[6] ms from the grant to the attempt's deadline
-- ARGV[7 ..] the record's other fields (field, value pairs)
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
local due = now + tonumber(ARGV[6])
local call = {'HSET', KEYS[3], 'lease', ARGV[4], 'lease_token', ARGV[2], 'fence', fence, 'started_ms', now,
              'deadline_ms', due, 'attempt', redis.call('LLEN', KEYS[5]) + 1}
for i = 7, #ARGV do
    call[#call + 1] = ARGV[i]
end
redis.call(unpack(call))
redis.call('ZADD', KEYS[4], due, ARGV[5])
return {1, fence, now + ttl, now}
