-- Grant a lease if it is free (or already ours, or held by a token we may steal).
-- KEYS[1] lease key (string with an expiry: the owner's token; or, written by a quick grant without
--         this script, the token followed by lines naming the holder: token, host, pid, since, label)
-- KEYS[2] holder hash (who holds it: token, host, pid, label, since, renewed, deadline)
-- KEYS[3] fencing counter (incremented on every new grant; one below FENCE_FLOOR — new, or
--         Redis came back without its data and a quick grant counted it up from 1 — starts again at
--         the Redis clock in microseconds, so tokens never go backwards)
-- KEYS[4] lease index (sorted set: lease name -> deadline, ms on the Redis clock)
-- ARGV[1] token of the caller
-- ARGV[2] ttl in ms (the lease expires this long after the grant)
-- ARGV[3] host, ARGV[4] pid, ARGV[5] label (free text shown to operators)
-- ARGV[6] since, ms ("" = now on the Redis clock)
-- ARGV[7] lease name (member of the index)
-- ARGV[8] steal token: "" or a token that may be replaced (a provably dead holder)
-- Optionally, the in-flight record of the attempt the grant is for, written granted or not (so
-- the attempt needs no write of its own): KEYS[5] the record (hash), KEYS[6] its index (sorted
-- set: member -> deadline ms), KEYS[7] the list whose length + 1 is the attempt number;
-- ARGV[9] the member, ARGV[10] ms from now to the attempt's deadline, ARGV[11 ..] the record's
-- other fields (field, value pairs). Sets lease, lease_token, fence (0 when not granted),
-- started_ms, deadline_ms and attempt.
-- Returns {1, fence, deadline_ms, now_ms} when granted (a re-grant to the same
-- token keeps its fence), else {0, pttl_ms, token, host, pid, label, renewed_ms, since_ms, now_ms}.
-- every counter seeded from a clock in microseconds since 1970 is above this (2001-09-09; lease.py
-- and semaphore_acquire.lua hold the same number)
local FENCE_FLOOR = 1e15
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local deadline = now + ttl
local current = redis.call('GET', KEYS[1])
-- the holder's token, and what a quick grant wrote of its holder in the same value
local holder, q_host, q_pid, q_since, q_label
if current then
    holder, q_host, q_pid, q_since, q_label = string.match(current, '^([^\n]*)\n([^\n]*)\n([^\n]*)\n([^\n]*)\n(.*)$')
    holder = holder or current
end
local fence

local function stamp(granted_fence)
    if not KEYS[7] then
        return
    end
    local due = now + tonumber(ARGV[10])
    local fields = {}
    for i = 11, #ARGV do
        fields[#fields + 1] = ARGV[i]
    end
    -- every field of the record is written: nothing of an earlier attempt's record survives
    redis.call('HSET', KEYS[5], 'lease', ARGV[7], 'lease_token', ARGV[1], 'fence', granted_fence,
               'started_ms', now, 'deadline_ms', due, 'attempt', redis.call('LLEN', KEYS[7]) + 1, unpack(fields))
    redis.call('ZADD', KEYS[6], due, ARGV[9])
end

if holder == ARGV[1] then
    fence = tonumber(redis.call('GET', KEYS[3]) or '0')
elseif current == false or (ARGV[8] ~= '' and holder == ARGV[8]) then
    fence = redis.call('INCR', KEYS[3])
else
    stamp(0)
    local h = redis.call('HMGET', KEYS[2], 'host', 'pid', 'label', 'renewed', 'since')
    if q_host then
        h = {q_host, q_pid, q_label, h[4] or q_since, q_since}
    end
    return {0, redis.call('PTTL', KEYS[1]), holder, h[1] or '', h[2] or '', h[3] or '',
            tonumber(h[4] or '0'), tonumber(h[5] or '0'), now}
end
if fence < FENCE_FLOOR then
    -- a counter that did not exist (a new lease, or Redis came back without its data) starts
    -- from the Redis clock in microseconds: above every token granted before
    redis.call('SET', KEYS[3], t[1] .. string.rep('0', 6 - string.len(t[2])) .. t[2])
    fence = redis.call('INCR', KEYS[3])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
local since = ARGV[6]
if since == '' then since = tostring(now) end
if holder == ARGV[1] then
    since = redis.call('HGET', KEYS[2], 'since') or q_since or since
end
-- every field is written, so no earlier holder's field survives (no DEL needed)
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'host', ARGV[3], 'pid', ARGV[4], 'label', ARGV[5],
           'since', since, 'renewed', now, 'deadline', deadline, 'fence', fence)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[4], deadline, ARGV[7])
stamp(fence)
return {1, fence, deadline, now}
