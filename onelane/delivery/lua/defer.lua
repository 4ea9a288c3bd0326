-- Move an unacknowledged message into the queue's delay set (a relaxed-order retry),
-- dropping kombu's unacked copy and the in-flight record in the same step.
-- KEYS[1] kombu unacked hash, KEYS[2] kombu unacked index, KEYS[3] delay set (message -> due ms)
-- KEYS[4] in-flight record, KEYS[5] in-flight index
-- ARGV[1] delivery tag, ARGV[2] the unacked value the caller read, ARGV[3] the message to
-- store (marked redelivered), ARGV[4] due time in ms, ARGV[5] task id
-- Returns 1 deferred, 0 kombu held no copy (nothing done), -2 changed since read.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
    return 0
end
if current ~= ARGV[2] then
    return -2
end
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[5])
return 1
