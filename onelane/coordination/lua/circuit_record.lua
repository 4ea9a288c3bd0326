-- Record the outcome of one attempt on a resource's circuit breaker.
-- KEYS[1] circuit hash (failures, last_failed, open_until ms, cooldown ms, state, opened count)
-- KEYS[2] circuit index (set of resources)
-- ARGV[1] "ok" or "fail" (a retryable failure), ARGV[2] resource name
-- ARGV[3] threshold (consecutive failing callouts that open it)
-- ARGV[4] first cool-down in ms, ARGV[5] cool-down cap in ms
-- ARGV[6] the failing callout's task id ("" = count every failure)
-- Failures count per callout: a callout's own retries count once, so one bad callout
-- cannot open the circuit on its own. A success closes it and resets the cool-down; a
-- failure after a cool-down (half-open: the state is still 'open', its time is up)
-- opens it again at once, for twice the last cool-down, up to the cap.
-- Returns {state, failures, open_until_ms, cooldown_ms, opened_now (1 or 0)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[1] == 'ok' then
    redis.call('HSET', KEYS[1], 'failures', 0, 'last_failed', '', 'open_until', 0, 'cooldown', 0,
               'state', 'closed', 'changed', now)
    return {'closed', 0, 0, 0, 0}
end
local threshold = tonumber(ARGV[3])
local failures
if redis.call('HGET', KEYS[1], 'state') == 'open' then
    failures = threshold
    redis.call('HSET', KEYS[1], 'failures', failures)
elseif ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'last_failed') == ARGV[6] then
    failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
else
    failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    redis.call('HSET', KEYS[1], 'last_failed', ARGV[6])
end
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
    return {'open', failures, open_until, cooldown, 1}
end
return {'closed', failures, 0, cooldown, 0}
