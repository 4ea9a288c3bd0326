-- Take one of N slots of a capped resource (a distributed semaphore of N leases).
-- KEYS[1] the resource's fencing counter (shared by all slots)
-- KEYS[2] lease index (sorted set: lease name -> deadline ms)
-- KEYS[3] adaptive cap hash (field 'cap', a float; absent = N)
-- KEYS[4 .. 3+N] the slot lease keys
-- ARGV[1] token, ARGV[2] ttl ms, ARGV[3] N, ARGV[4] 1 if the cap is adaptive
-- ARGV[5 .. 4+N] the slot lease names (index members)
-- Returns {1, slot (1-based), fence, deadline_ms, now_ms, cap} when granted,
-- else {0, ms until the soonest slot expires, held, cap}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[3])
local cap = n
if ARGV[4] == '1' then
    local c = tonumber(redis.call('HGET', KEYS[3], 'cap') or n)
    cap = math.max(1, math.min(n, math.floor(c)))
end
local held, free, soonest = 0, nil, nil
for i = 1, n do
    local pttl = redis.call('PTTL', KEYS[3 + i])
    if pttl == -2 then
        if not free then free = i end
    else
        held = held + 1
        if pttl >= 0 and (not soonest or pttl < soonest) then soonest = pttl end
    end
end
if held >= cap or not free then
    return {0, soonest or 50, held, cap}
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[3 + free], ARGV[1], 'PX', ttl)
if redis.call('EXISTS', KEYS[1]) == 0 then
    -- a new counter starts from the Redis clock in microseconds (see lease_acquire.lua)
    redis.call('SET', KEYS[1], t[1] .. string.rep('0', 6 - string.len(t[2])) .. t[2])
end
local fence = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[4 + free])
return {1, free, fence, now + ttl, now, cap}
