-- Claim a message this worker took off its queue (BLMOVE into its fetch list): record it
-- as unacked, in kombu's own layout, and take it out of the fetch list in one step.
-- KEYS[1] the worker's fetch list
-- KEYS[2] kombu unacked hash (delivery tag -> JSON [message, exchange, routing key])
-- KEYS[3] kombu unacked index (sorted set: delivery tag -> delivery time, s)
-- ARGV[1] the message exactly as fetched, ARGV[2] its delivery tag,
-- ARGV[3] the unacked value, ARGV[4] the delivery time (s, the worker's clock, as kombu)
-- Returns 1 claimed; 0 the message is no longer in the fetch list (the reaper gave it
-- back to the queue while this worker was cut off): the worker must not deliver it.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
    return 0
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
