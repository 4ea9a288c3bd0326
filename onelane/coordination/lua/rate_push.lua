-- Slow a rate-limited resource down: no call starts before now + ARGV[1] ms (Retry-After).
-- KEYS[1] the theoretical arrival time (ms), ARGV[1] delay in ms. Returns the new TAT.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if want > tat then
    redis.call('SET', KEYS[1], want, 'PX', tonumber(ARGV[1]) + 60000)
    return want
end
return tat
