-- Claim an Idempotency-Key on a lane for a new task, or say who holds it (the intake's dedupe).
-- KEYS[1] the claim: onelane:intake:idem:<lane>:<key>
-- KEYS[2] the new task's record: onelane:intake:task:<task id>
-- ARGV[1] the claim's value while the task is being published (JSON: task_id, fp, state "pending")
-- ARGV[2] how long a pending claim lives, ms (an intake killed before publishing frees the key then)
-- ARGV[3] the task record's value (the lane)
-- ARGV[4] how long the task record lives, ms (the dedupe window)
-- Returns {1} when claimed (and the task record written), else {0, the claim's current value}.
local current = redis.call('GET', KEYS[1])
if current then
    return {0, current}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return {1}
