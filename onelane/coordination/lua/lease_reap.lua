-- Clear the index entry of a lease whose deadline passed without a release.
-- KEYS[1] lease key, KEYS[2] holder hash, KEYS[3] lease index
-- ARGV[1] lease name, ARGV[2] now in ms (Redis clock) as seen by the reaper
-- Returns 1 when a zombie entry was cleared, 0 when the lease is alive (its
-- index score is corrected from its real expiry) or the entry was not due.
-- Safe to run twice at once: the second run finds nothing to do.
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
    return 0
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then
    redis.call('ZADD', KEYS[3], tonumber(ARGV[2]) + pttl, ARGV[1])
    return 0
end
if pttl == -1 then
    -- a lease key without expiry is never written by onelane; give it one so it cannot block forever
    redis.call('PEXPIRE', KEYS[1], 1)
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
