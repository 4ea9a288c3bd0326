-- Move due messages from the delay set to the TAIL of the queue (relaxed order).
-- KEYS[1] delay set (message -> due ms), KEYS[2] the queue list (LPUSH = tail)
-- ARGV[1] at most this many messages
-- Returns the number moved. Safe to run from many places at once: each message moves once.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, message in ipairs(due) do
    redis.call('ZREM', KEYS[1], message)
    redis.call('LPUSH', KEYS[2], message)
end
return #due
