-- A callout with a coalesce key has its outcome: its key is free again, and the callouts with
-- that key taken while it ran (parked) go back to the head of the queue, oldest first.
-- KEYS[1] started: key -> JSON {id, tag, at}   KEYS[2] parked: key -> JSON [message]
-- KEYS[3] the ready list (its right end is the head of the queue)   KEYS[4] kombu's list
-- KEYS[5] the list of ids the finished callout carried   KEYS[6] key of: id -> coalesce key
-- ARGV[1] the coalesce key, ARGV[2] the task id that finished
-- Returns how many parked messages went back to the head.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local moved = 0
if raw and cjson.decode(raw).id == ARGV[2] then
    redis.call('HDEL', KEYS[1], ARGV[1])
    local parked = redis.call('HGET', KEYS[2], ARGV[1])
    if parked then
        redis.call('HDEL', KEYS[2], ARGV[1])
        local messages = cjson.decode(parked)
        for i = #messages, 1, -1 do
            -- an empty ready list: kombu's list, whose head is then the queue's (wakes a waiting fetch)
            local head = redis.call('LLEN', KEYS[3]) > 0 and KEYS[3] or KEYS[4]
            redis.call('RPUSH', head, messages[i])
            moved = moved + 1
        end
    end
end
redis.call('DEL', KEYS[5])
redis.call('HDEL', KEYS[6], ARGV[2])
return moved
