-- The fetch of an onelane queue: move what arrived in kombu's list to the ready list (coalescing
-- callouts that share a coalesce key while they wait), then take the head of the ready list and
-- record it as unacked, in kombu's own layout, in the same step.
--
-- The queue is the ready list followed by kombu's list: the ready list's right end is the head,
-- kombu's left end the tail (producers LPUSH there). A message is at every moment in one of the
-- two lists, parked, carried (its task id in a carrier's newest entry), or unacked: never nowhere.
--
-- KEYS[1] kombu's list of the queue        KEYS[2] the ready list
-- KEYS[3] kombu unacked hash               KEYS[4] kombu unacked index
-- KEYS[5] waiting: key -> carrier id       KEYS[6] started: key -> JSON {id, tag, at}
-- KEYS[7] parked: key -> JSON [message]    KEYS[8] newest: carrier id -> the newest body (base64)
-- KEYS[9] key of: id -> coalesce key       KEYS[10] counts (hash)
-- KEYS[11] the worker's fetch list (unreadable messages)
-- KEYS[12] the queue's receiver records (hash: delivery tag -> worker token; the bulk queue's)
-- ARGV[1] 'take' or 'absorb'   ARGV[2] now (s, the worker's clock, as kombu)   ARGV[3] now (ms)
-- ARGV[4] how many messages a drain reads at most   ARGV[5] '1': drain kombu's list before taking
-- ARGV[6] the name of a carried list without its task id: <ARGV[6]><id> is the list of JSON
-- {id, batch} that callout carries (one list per carrier, appended to: a record changed 10 000
-- times costs 10 000 appends, not a growing document rewritten each time; standalone Redis)
-- ARGV[7] the worker's token, written as the receiver of the message taken, in the same step as
-- its unacked record ('' = none: a lane has one consumer, its guard says who)
-- absorb: ARGV[8] n, then n groups of 5 (message, coalesce key or '', task id, batch id or '',
-- '1' if it must neither carry nor be carried: delivered again, or with an expiry or an ETA):
-- kombu's n oldest messages, oldest first, exactly as read.
-- Returns {'msg', message, n} taken and unacked, n messages left in the ready list (the worker's
-- next take may be a plain LMOVE from it); {'drain', messages newest first} read kombu's list
-- first (absorb them); {'empty'} nothing to take; {'bad', message} unreadable, moved to the
-- fetch list (the caller dead-letters it).
local QUEUE, READY, UNACKED, UNACKED_INDEX = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local WAITING, STARTED, PARKED, NEWEST = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local KEY_OF, COUNTS, FETCH = KEYS[9], KEYS[10], KEYS[11]
local now, now_ms, batch, drain_first = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local CARRIED_PREFIX = ARGV[6]
local RECEIVERS, RECEIVER = KEYS[12], ARGV[7]

local BODY = '^{"body"%s*:%s*"[^"]*"'

local function body_of(message)
    return string.match(message, '^{"body"%s*:%s*"([^"]*)"')
end

local function with_body(message, body)
    local _, stop = string.find(message, BODY)
    return '{"body": "' .. body .. '"' .. string.sub(message, stop + 1)
end

local function started_id(key)
    local raw = redis.call('HGET', STARTED, key)
    return raw and cjson.decode(raw).id
end

local function copy(list)
    local out = {}
    for _, v in ipairs(list or {}) do
        out[#out + 1] = v
    end
    return out
end

-- cjson encodes an empty Lua table as {}: a list read back either way
local function list_of(raw)
    return raw and copy(cjson.decode(raw)) or {}
end

-- a newer callout with a waiting carrier's key: the carrier will send its arguments
local function coalesce(message, id, batch_id, carrier)
    local carried = CARRIED_PREFIX .. carrier
    redis.call('RPUSH', carried, cjson.encode({id = id, batch = batch_id}))
    local own = CARRIED_PREFIX .. id  -- what this one carried before (a restored carrier)
    if redis.call('EXISTS', own) == 1 then
        for _, x in ipairs(redis.call('LRANGE', own, 0, -1)) do
            redis.call('RPUSH', carried, x)
        end
        redis.call('DEL', own)
    end
    redis.call('HDEL', KEY_OF, id)
    redis.call('HSET', NEWEST, carrier, body_of(message))
    redis.call('HINCRBY', COUNTS, 'coalesced', 1)
end

-- one message read from kombu's list, to the tail of the ready list (or carried by a waiting one)
local function admit(message, key, id, batch_id, solo)
    if key ~= '' and id ~= '' then
        if not solo and started_id(key) ~= id then
            local carrier = redis.call('HGET', WAITING, key)
            if carrier and carrier ~= id then
                coalesce(message, id, batch_id, carrier)
                return
            end
            if not carrier then
                redis.call('HSET', WAITING, key, id)
            end
        end
        redis.call('HSET', KEY_OF, id, key)
    end
    redis.call('LPUSH', READY, message)
end

local function park(key, message)
    local parked = list_of(redis.call('HGET', PARKED, key))
    parked[#parked + 1] = message
    redis.call('HSET', PARKED, key, cjson.encode(parked))
end

-- the head of the ready list, unacked; a keyed one whose key is running elsewhere is parked
local function take()
    while true do
        local message = redis.call('RPOP', READY)
        if not message then
            return {'empty'}
        end
        local ok, envelope = pcall(cjson.decode, message)
        local props = ok and type(envelope) == 'table' and envelope.properties
        local tag = type(props) == 'table' and props.delivery_tag
        if type(tag) ~= 'string' then
            redis.call('LPUSH', FETCH, message)
            return {'bad', message}
        end
        local headers = type(envelope.headers) == 'table' and envelope.headers or {}
        local id = headers.id
        local key = type(id) == 'string' and redis.call('HGET', KEY_OF, id)
        local parked = false
        if key then
            local running = started_id(key)
            if running and running ~= id then
                park(key, message)
                parked = true
            else
                redis.call('HSET', STARTED, key, cjson.encode({id = id, tag = tag, at = now_ms}))
                if redis.call('HGET', WAITING, key) == id then
                    redis.call('HDEL', WAITING, key)
                end
                local newest = redis.call('HGET', NEWEST, id)
                if newest then  -- it sends the newest arguments; the ids it carries stay in its list
                    message = with_body(message, newest)
                    redis.call('HDEL', NEWEST, id)
                end
            end
        end
        if not parked then
            local info = type(props.delivery_info) == 'table' and props.delivery_info or {}
            local exchange = type(info.exchange) == 'string' and info.exchange or ''
            local routing_key = type(info.routing_key) == 'string' and info.routing_key or ''
            redis.call('ZADD', UNACKED_INDEX, now, tag)
            redis.call('HSET', UNACKED, tag,
                '[' .. message .. ', ' .. cjson.encode(exchange) .. ', ' .. cjson.encode(routing_key) .. ']')
            if RECEIVER ~= '' then
                redis.call('HSET', RECEIVERS, tag, RECEIVER)
            end
            return {'msg', message, redis.call('LLEN', READY)}
        end
    end
end

local function next_step()
    if drain_first and redis.call('LLEN', QUEUE) > 0 then
        return {'drain', redis.call('LRANGE', QUEUE, -batch, -1)}
    end
    return take()
end

if ARGV[1] == 'absorb' then
    local n = tonumber(ARGV[8])
    local oldest = redis.call('LRANGE', QUEUE, -n, -1)  -- newest first
    if #oldest ~= n then
        return next_step()
    end
    for i = 1, n do
        if oldest[n - i + 1] ~= ARGV[8 + (i - 1) * 5 + 1] then
            return next_step()  -- another worker took some of them meanwhile: read again
        end
    end
    redis.call('LTRIM', QUEUE, 0, -n - 1)
    for i = 1, n do
        local at = 8 + (i - 1) * 5
        admit(ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5] == '1')
    end
end
return next_step()
