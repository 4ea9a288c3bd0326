-- Move messages a producer published with a priority into the queue's own list, so they run.
-- kombu keeps such a message in a sub-list per priority level, which onelane's fetch (one
-- list per queue, BLMOVE) never reads. kombu's Redis transport serves level 0 (the queue's
-- own list) first, then the levels in ascending order: here each level in turn goes to the
-- tail of the queue, oldest first, so the order kombu would have served them in is kept.
-- KEYS[1] the queue's list (LPUSH appends at the tail, the fetch takes from the right = head)
-- KEYS[2 ..] the priority sub-lists, in ascending level
-- ARGV[1] the most messages to move in one call
-- Returns the number of messages moved.
local limit = tonumber(ARGV[1])
local moved = 0
for i = 2, #KEYS do
    while moved < limit do
        local m = redis.call('RPOP', KEYS[i])
        if not m then break end
        redis.call('LPUSH', KEYS[1], m)
        moved = moved + 1
    end
end
return moved
