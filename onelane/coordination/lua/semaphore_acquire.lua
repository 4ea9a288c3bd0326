-- Take one of N slots of a capped resource (a distributed semaphore of N leases), in O(1) reads.
-- KEYS[1] the resource's fencing counter (shared by all slots)
-- KEYS[2] lease index (sorted set: lease name -> deadline ms)
-- KEYS[3] adaptive cap hash (field 'cap', a float; absent = N)
-- KEYS[4] slot set (sorted set: every slot number 1..N -> its deadline ms; a free slot i scores i,
--         a time long past, so free slots come lowest number first): the lowest score is a free
--         slot or, when it has not passed, the soonest to expire, so a grant
--         or a refusal reads one member (ZRANGE 0 0), whatever N. A hint only: the slot's lease key
--         is the truth, taken with SET NX, so a stale hint can never hand one slot to two holders;
--         a set that is not exactly 1..N is rebuilt from the keys, and with an adaptive cap lowered
--         below N the keys are counted instead (PTTL each), so it cannot exceed the cap.
-- KEYS[5] the release signal (list) the waiters block on
-- KEYS[6 .. 5+N] the slot lease keys
-- ARGV[1] token, ARGV[2] ttl ms, ARGV[3] N, ARGV[4] 1 if the cap is adaptive
-- ARGV[5] the slot lease names without their number: slot i is <ARGV[5]><i> (its index member)
-- ARGV[6] the signal's ttl in ms when this try follows a wait on the signal, else 0: such a try,
--         granted, passes the wake-up on while a slot is still free (a release wakes one waiter,
--         and the ones behind it would sleep out their wait with a slot free)
-- ARGV[7] 1 when an earlier try with this token went unanswered (a lost reply: it may have won a
--         slot), else 0: a slot the token holds is granted again (a new fence, its deadline
--         extended), so a try again never holds two slots. Only then are the slots read one by one.
-- Optionally, the in-flight record of the attempt the slot is for (so the attempt is on record
-- before it starts, with no other write): KEYS[6+N] the record (hash), KEYS[7+N] its queue's
-- in-flight index (task id -> deadline ms), KEYS[8+N] (optional) the list whose length + 1 is the
-- attempt number; ARGV[8] task id, ARGV[9] ms from the grant to the attempt's deadline,
-- ARGV[10 ..] the record's other fields (field, value pairs). Granted: lease, lease_token, fence,
-- started_ms and deadline_ms are the grant's. Not granted, with fields: the record of a task
-- waiting for a slot, due at once (deadline 0: the reaper requeues it as soon as its worker is
-- gone). Not granted, without fields: nothing written.
-- Returns {1, slot (1-based), fence, deadline_ms, now_ms, cap} when granted,
-- else {0, ms until the soonest slot expires, held, cap}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[3])
local ttl = tonumber(ARGV[2])
local HELD, SIGNAL = KEYS[4], KEYS[5]
local SLOT0 = 5  -- slot i's lease key is KEYS[SLOT0 + i]; the record's keys follow the last slot
local pass_on_ttl = tonumber(ARGV[6])
local cap = n
if ARGV[4] == '1' then
    local c = tonumber(redis.call('HGET', KEYS[3], 'cap') or n)
    cap = math.max(1, math.min(n, math.floor(c)))
end

-- the fast path: the slot with the lowest deadline. Passed (a free slot's is its number): {slot}.
-- Not passed: every slot is taken, {nil, busy reply}. A set that is not one member per slot:
-- {nil, nil}.
local function read_hint()
    if redis.call('ZCARD', HELD) ~= n then
        return nil, nil
    end
    local lowest = redis.call('ZRANGE', HELD, 0, 0, 'WITHSCORES')
    local slot, due = tonumber(lowest[1]), tonumber(lowest[2])
    if not slot or slot < 1 or slot > n or slot % 1 ~= 0 then
        return nil, nil
    end
    if due >= now then
        return nil, {0, due - now, n, cap}
    end
    return slot
end

-- the slow path, for a hint that disagrees with the keys (an older onelane wrote it, a holder
-- killed between key and hint, a changed N): every slot's PTTL, and the set rewritten from them
-- (with ``keep_hint``, for a lowered cap, only read: the hint is not the one in doubt then)
local function scan(keep_hint)
    local taken, count, soonest = {}, 0, nil
    local rows = {'ZADD', HELD}
    for i = 1, n do
        local pttl = redis.call('PTTL', KEYS[SLOT0 + i])
        local due = i  -- free: a deadline long past, lowest number first
        if pttl ~= -2 then
            taken[i] = true
            count = count + 1
            if pttl < 0 then pttl = ttl end  -- a key without expiry (hand-made): looked at again later
            due = now + pttl
            if not soonest or pttl < soonest then soonest = pttl end
        end
        rows[#rows + 1] = due
        rows[#rows + 1] = i
    end
    if not keep_hint then
        redis.call('DEL', HELD)
        redis.call(unpack(rows))  -- 2N + 2 values: N is at most MAX_CONCURRENCY, far below Lua's limit
    end
    return taken, count, soonest
end

-- the first slot the scan found free, taken (nil and the refusal when none is, or the cap is reached)
local function take(taken, count, soonest)
    if count >= cap then
        return nil, {0, soonest or 50, count, cap}
    end
    for i = 1, n do
        if not taken[i] and redis.call('SET', KEYS[SLOT0 + i], ARGV[1], 'PX', ttl, 'NX') then
            return i
        end
    end
    return nil, {0, soonest or 50, count, cap}
end

local function stamp(granted, name, fence)
    if #KEYS < SLOT0 + n + 2 then
        return
    end
    local due = 0
    local call = {'HSET', KEYS[SLOT0 + n + 1]}
    local function put(field, value)
        call[#call + 1] = field
        call[#call + 1] = value
    end
    if granted then
        due = now + tonumber(ARGV[9])
        put('lease', name); put('lease_token', ARGV[1]); put('fence', fence)
        put('started_ms', now); put('deadline_ms', due)
    elseif #ARGV >= 10 then
        put('lease', ''); put('lease_token', ''); put('fence', 0); put('started_ms', 0); put('deadline_ms', 0)
    else
        return
    end
    if KEYS[SLOT0 + n + 3] then
        put('attempt', redis.call('LLEN', KEYS[SLOT0 + n + 3]) + 1)
    end
    for i = 10, #ARGV do
        call[#call + 1] = ARGV[i]
    end
    redis.call(unpack(call))
    redis.call('ZADD', KEYS[SLOT0 + n + 2], due, ARGV[8])
end

local free, busy
if ARGV[7] == '1' then
    -- a try again after a lost reply: the slot an unanswered try of this token may have won
    for i = 1, n do
        local v = redis.call('GET', KEYS[SLOT0 + i])
        if v and string.match(v, '^[^\n]*') == ARGV[1] then
            redis.call('PEXPIRE', KEYS[SLOT0 + i], ttl)
            free = i
            break
        end
    end
end
if free then
    -- held already: granted again below
elseif cap < n then
    -- a cap lowered below N (adaptive) is checked against the keys themselves: SET NX alone keeps
    -- at most N holders, and a hint missing a held slot must not let one more in under the cap
    free, busy = take(scan(true))
else
    free, busy = read_hint()
    if free and not redis.call('SET', KEYS[SLOT0 + free], ARGV[1], 'PX', ttl, 'NX') then
        free = nil  -- the hint said free, the key says held: look at every key
    end
    if not free and not busy then
        free, busy = take(scan())
    end
end
if not free then
    stamp(false)
    return busy
end
local fence = redis.call('INCR', KEYS[1])
-- every counter seeded from a clock in microseconds since 1970 is above this (lease.py FENCE_FLOOR)
local FENCE_FLOOR = 1e15
if fence < FENCE_FLOOR then
    -- a counter that did not exist (a new resource, or Redis came back without its data, and a
    -- lease's quick tries counted it up from 1) starts from the Redis clock in microseconds: above
    -- every token granted before (see lease_acquire.lua, FENCE_FLOOR)
    redis.call('SET', KEYS[1], t[1] .. string.rep('0', 6 - string.len(t[2])) .. t[2])
    fence = redis.call('INCR', KEYS[1])
end
local name = ARGV[5] .. free
redis.call('ZADD', KEYS[2], now + ttl, name)
redis.call('ZADD', HELD, now + ttl, free)
stamp(true, name, fence)
if pass_on_ttl > 0 then
    -- the lowest member now is another free slot (a hint: a wrong one costs a waiter a try, no more)
    local lowest = redis.call('ZRANGE', HELD, 0, 0, 'WITHSCORES')
    if lowest[2] and tonumber(lowest[2]) < now and redis.call('EXISTS', SIGNAL) == 0 then
        redis.call('LPUSH', SIGNAL, '1')
        redis.call('PEXPIRE', SIGNAL, pass_on_ttl)
    end
end
return {1, free, fence, now + ttl, now, cap}
