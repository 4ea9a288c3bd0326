-- Give back what a worker that is gone left in its fetch list, but for the callouts it was still
-- running whose attempt's deadline is ahead (the API may still be working on them): each goes back
-- once its deadline has passed, its attempt's in-flight record dropped with it while that still
-- names the worker. One step, on Redis's clock; kombu's unacked hash is never touched (a message in
-- a fetch list has no unacked copy: one under its tag is another delivery's).
-- KEYS[1] the fetch list (newest at the left)   KEYS[2] the queue's list   KEYS[3] the index of
-- fetch lists   KEYS[4] the queue's ready list (its right end is the head of the queue while it
-- holds any)   KEYS[5] the queue's in-flight index   KEYS[5 + i] the in-flight record of item i
-- ARGV[1] the worker's token   ARGV[2 .. 1 + n] the items as read, newest first
-- ARGV[2 + n .. 1 + 2n] their task ids
-- Returns {the items moved, newest first; the task ids left waiting for their deadline}. The fetch
-- list leaves the index once empty.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = (#ARGV - 1) / 2
local head = redis.call('LLEN', KEYS[4]) > 0 and KEYS[4] or KEYS[2]
local moved, waiting = {}, {}
for i = 1, n do
    local item, task_id, record = ARGV[1 + i], ARGV[1 + n + i], KEYS[5 + i]
    local deadline = tonumber(redis.call('HGET', record, 'deadline_ms') or '0') or 0
    if deadline > now then
        waiting[#waiting + 1] = task_id
    elseif redis.call('LREM', KEYS[1], 1, item) == 1 then
        if redis.call('HGET', record, 'owner') == ARGV[1] then
            redis.call('DEL', record)
            redis.call('ZREM', KEYS[5], task_id)
        end
        redis.call('RPUSH', head, item)
        moved[#moved + 1] = item
    end
end
if redis.call('LLEN', KEYS[1]) == 0 then
    redis.call('HDEL', KEYS[3], KEYS[1])
end
return {moved, waiting}
