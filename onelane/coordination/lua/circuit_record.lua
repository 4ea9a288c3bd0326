-- Record the outcome of one attempt on a resource's circuit breaker.
-- KEYS[1] circuit hash (failures, open_until ms, cooldown ms, opened count)
-- KEYS[2] circuit index (set of resources)
-- ARGV[1] "ok" or "fail" (a retryable failure), ARGV[2] resource name
-- ARGV[3] threshold (consecutive failures that open it)
-- ARGV[4] first cool-down in ms, ARGV[5] cool-down cap in ms
-- Returns {state, failures, open_until_ms, cooldown_ms}; state is "closed" or "open".
-- A success closes the circuit and resets the cool-down; a failure while half-open
-- (after a cool-down) opens it again for twice the last cool-down, up to the cap.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[1] == 'ok' then
    redis.call('HSET', KEYS[1], 'failures', 0, 'open_until', 0, 'cooldown', 0, 'state', 'closed',
               'changed', now)
    return {'closed', 0, 0, 0}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local threshold = tonumber(ARGV[3])
local cooldown = tonumber(redis.call('HGET', KEYS[1], 'cooldown') or '0')
if failures >= threshold then
    if cooldown == 0 then
        cooldown = tonumber(ARGV[4])
    else
        cooldown = math.min(cooldown * 2, tonumber(ARGV[5]))
    end
    local open_until = now + cooldown
    redis.call('HSET', KEYS[1], 'open_until', open_until, 'cooldown', cooldown, 'state', 'open',
               'changed', now)
    redis.call('HINCRBY', KEYS[1], 'opened', 1)
    -- half-open after the cool-down: one more failure re-opens it at once
    redis.call('HSET', KEYS[1], 'failures', threshold - 1)
    return {'open', failures, open_until, cooldown}
end
return {'closed', failures, 0, cooldown}
