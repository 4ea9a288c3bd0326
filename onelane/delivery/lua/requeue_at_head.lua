-- Move one unacknowledged message back to the HEAD of its queue, and drop kombu's
-- unacked copy in the same step, so kombu never restores it a second time.
-- KEYS[1] kombu unacked hash (delivery tag -> JSON [message, exchange, routing key])
-- KEYS[2] kombu unacked index (sorted set: delivery tag -> delivery time, s)
-- KEYS[3] the queue's list (LPUSH appends at the tail, BRPOP takes from the right = head)
-- KEYS[4] the task's in-flight record (hash)
-- KEYS[5] the queue's in-flight index (sorted set: task id -> deadline, ms)
-- KEYS[6] the queue's receiver records (hash: delivery tag -> worker token)
-- KEYS[7] the queue's ready list (its right end is the head of the queue while it holds any)
-- ARGV[1] delivery tag
-- ARGV[2] the unacked value the caller read ('' when the caller read none)
-- ARGV[3] the message to push (the same message, marked redelivered)
-- ARGV[4] task id (member of the in-flight index)
-- ARGV[5] owner the in-flight record must still name ('' = do not check)
-- ARGV[6] '1': move it only if nobody claims it (no in-flight record and no
-- receiver record): for a message whose receiver is not known
-- Returns 1 moved to the head; 0 kombu held no copy (already restored or acked):
-- only the in-flight record was dropped; -1 the record names another owner now
-- (a new worker took the task), or with ARGV[6] someone claims it: nothing done;
-- -2 the unacked value changed since it was read: nothing done, read again.
if ARGV[6] == '1' then
    if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('HEXISTS', KEYS[6], ARGV[1]) == 1 then
        return -1
    end
end
if ARGV[5] ~= '' then
    local owner = redis.call('HGET', KEYS[4], 'owner')
    if owner and owner ~= ARGV[5] then
        return -1
    end
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
    redis.call('DEL', KEYS[4])
    redis.call('ZREM', KEYS[5], ARGV[4])
    return 0
end
if current ~= ARGV[2] then
    return -2
end
local head = redis.call('LLEN', KEYS[7]) > 0 and KEYS[7] or KEYS[3]
redis.call('RPUSH', head, ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[4])
return 1
