-- GCRA: may one more call start now under a rate of 1 call per interval?
-- KEYS[1] the theoretical arrival time (TAT, ms on the Redis clock)
-- ARGV[1] emission interval in ms (1000 / calls per second)
-- ARGV[2] burst tolerance in ms (0: calls strictly spaced)
-- Returns 0 when the call may start (the TAT advances), else the ms to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now - tonumber(ARGV[2])
if wait > 0 then
    return math.ceil(wait)
end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now + 60000))
return 0
