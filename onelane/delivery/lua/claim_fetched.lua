-- Claim a message its worker runs from its fetch list (a callout about to be given back at the
-- head or deferred): off the fetch list and, only if it was still there, recorded as unacked in
-- kombu's layout, with its receiver on the bulk queue, in one step. A message no longer there was given back
-- meanwhile (its worker counted as gone): nothing is written, so it never exists twice.
-- KEYS[1] the fetch list   KEYS[2] kombu's unacked hash   KEYS[3] kombu's unacked index
-- KEYS[4] the queue's receiver records (hash: delivery tag -> worker token)
-- ARGV[1] the message as the fetch list holds it   ARGV[2] its delivery tag
-- ARGV[3] its unacked value ([message, exchange, routing key])   ARGV[4] the time, s (kombu's score)
-- ARGV[5] the receiving worker's token ('' on a lane: its guard says whose it is)
-- Returns 1 claimed (or claimed already: the same claim again, its reply lost); 0 the fetch list no
-- longer held it and the claim is not there either: nothing done.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
    return redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] and 1 or 0
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[4], ARGV[2], ARGV[5])
end
return 1
