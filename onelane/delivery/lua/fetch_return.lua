-- Give every message of a fetch list back to the head of its queue, oldest first in line.
-- KEYS[1] the fetch list (BLMOVE pushed each fetch at its left: the oldest is rightmost)
-- KEYS[2] the queue's list (consumers take from the right)
-- KEYS[3] the index of fetch lists (hash)
-- KEYS[4] the queue's ready list (its right end is the head of the queue while it holds any)
-- ARGV[1] '1': also forget the fetch list in the index (its worker is gone)
-- Returns the messages moved, newest first.
local moved = {}
local head = redis.call('LLEN', KEYS[4]) > 0 and KEYS[4] or KEYS[2]
while true do
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
