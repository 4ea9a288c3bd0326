-- Settle a claim made by intake_claim.lua once its publish is over: confirm it or release it.
-- KEYS[1] the claim: onelane:intake:idem:<lane>:<key>
-- KEYS[2] the task's record: onelane:intake:task:<task id>
-- ARGV[1] the pending value this request wrote (only a claim still holding it is changed)
-- ARGV[2] "confirm" (the task was published) or "release" (it was not)
-- ARGV[3] confirm: the claim's published value (JSON: task_id, fp, state "published")
-- ARGV[4] confirm: how long it lives, ms (the dedupe window)
-- Returns 1 when settled; 0 when another request holds the key now (nothing of it is touched).
local current = redis.call('GET', KEYS[1])
if ARGV[2] == 'release' then
    redis.call('DEL', KEYS[2])
    if current == ARGV[1] then
        redis.call('DEL', KEYS[1])
        return 1
    end
    return 0
end
-- confirm: the message is out, so the key is this task's even if the pending claim expired meanwhile
if current == ARGV[1] or not current then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
    return 1
end
return 0
