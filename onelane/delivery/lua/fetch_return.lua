-- Give the messages of a fetch list back to the head of their queue, oldest first in line.
-- KEYS[1] the fetch list (each take pushes at its left: the oldest is rightmost)
-- KEYS[2] the queue's list (consumers take from the right)
-- KEYS[3] the index of fetch lists (hash)
-- KEYS[4] the queue's ready list (its right end is the head of the queue while it holds any)
-- ARGV[1] '1': also forget the fetch list in the index (its worker is gone)
-- ARGV[2 ..] (optional) only these messages, newest first, each moved only if the fetch list still
-- holds it (a message its worker recorded as unacked meanwhile stays where it is); none: all of them
-- Returns the messages moved, newest first.
local moved = {}
local head = redis.call('LLEN', KEYS[4]) > 0 and KEYS[4] or KEYS[2]
if #ARGV > 1 then
    for i = 2, #ARGV do
        if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
            redis.call('RPUSH', head, ARGV[i])
            moved[#moved + 1] = ARGV[i]
        end
    end
end
while #ARGV == 1 do
    local item = redis.call('LMOVE', KEYS[1], head, 'LEFT', 'RIGHT')
    if not item then
        break
    end
    moved[#moved + 1] = item
end
if ARGV[1] == '1' then
    redis.call('HDEL', KEYS[3], KEYS[1])
end
return moved
