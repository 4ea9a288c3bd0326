-- Adaptive cap (AIMD): halve on overload, grow by 1/cap on success, within [1, N].
-- KEYS[1] adaptive hash (cap as a float string, last_down ms)
-- ARGV[1] "up" or "down", ARGV[2] N (the declared cap), ARGV[3] ms between two decreases
-- (one burst of failures halves the cap once). Returns the new cap as a string.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[2])
local cap = tonumber(redis.call('HGET', KEYS[1], 'cap') or n)
if ARGV[1] == 'down' then
    local last = tonumber(redis.call('HGET', KEYS[1], 'last_down') or '0')
    if now - last >= tonumber(ARGV[3]) then
        cap = math.max(1, cap / 2)
        redis.call('HSET', KEYS[1], 'last_down', now)
    end
else
    cap = math.min(n, cap + 1 / cap)
end
redis.call('HSET', KEYS[1], 'cap', tostring(cap), 'n', n)
return tostring(cap)
