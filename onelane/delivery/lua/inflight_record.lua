-- Write the in-flight record of an attempt about to start, stamped on the Redis clock.
-- KEYS[1] the task's in-flight record (hash)
-- KEYS[2] the queue's in-flight index (sorted set: task id -> deadline, ms)
-- KEYS[3] the task's attempts list (one entry per finished attempt)
-- ARGV[1] task id (member of the index)
-- ARGV[2] ms from now to the attempt's deadline (a little late on purpose: it only says when
--         the reaper may requeue; the lease itself keeps calls apart)
-- ARGV[3 ..] field, value pairs of the record
-- Sets started_ms = now, deadline_ms = now + ARGV[2], attempt = finished attempts + 1.
-- Returns the deadline (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now + tonumber(ARGV[2])
-- ARGV carries every field of the record but the three set here: nothing of an earlier attempt's
-- record survives the HSET (no DEL needed)
local fields = {}
for i = 3, #ARGV do
    fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'started_ms', now, 'deadline_ms', deadline,
           'attempt', redis.call('LLEN', KEYS[3]) + 1, unpack(fields))
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
return deadline
