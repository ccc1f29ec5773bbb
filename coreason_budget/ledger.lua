-- coreason-budget ledger: every operation is one call of this script, so it
-- is atomic and costs one round trip. Every check happens before the first
-- write: a refused or failing call changes nothing.
--
-- KEYS[1]  day hash: the day's counters, field per scope ("u:<id>", "p:<id>", "g", "m:<model>")
-- KEYS[2]  limits hash: per-entity limit overrides, same field names, no TTL
-- KEYS[3]  record: a reservation hash ("reserve", "settle") or an operation-id marker ("spend")
--
-- ARGV[1]  op: reserve | settle | spend | check | usage | report
-- ARGV[2]  day the client believes it is (days since 1970-01-01, UTC)
-- ARGV[3]  injected time in ms, or "" to use the server's clock (the one clock all workers share)
-- ARGV[4]  retention in ms: counters and reservations live until their day ends plus this
-- ARGV[5]  lifetime of an operation-id marker in ms
-- ARGV[6]  amount in nano-dollars (the estimate, the spend or the actual cost)
-- ARGV[7]  number of scopes n, then n pairs: field, default limit (-1: tracked, never limited)
-- after the pairs, for settle: the state to settle into ("committed" or "released")
--
-- Amounts stay below 2^53 (the client bounds them), so Lua's doubles hold them exactly.

local DAY_MS = 86400000
local counters, limits, record = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
local day = ARGV[2]
local amount = tonumber(ARGV[6])
local n = tonumber(ARGV[7])

local now
if ARGV[3] ~= '' then
    now = tonumber(ARGV[3])
else
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Keys were named by the client for the day it believed it was; if the shared
-- clock disagrees (drift near midnight), write nothing and tell it which day it is.
if op ~= 'settle' then
    local today = math.floor(now / DAY_MS)
    if today ~= tonumber(day) then
        return {'DAY', string.format('%d', today), string.format('%d', now)}
    end
end

local expire_ms = (tonumber(day) + 1) * DAY_MS + tonumber(ARGV[4]) - now

local function field(i) return ARGV[6 + 2 * i] end
local function default_limit(i) return ARGV[7 + 2 * i] end

-- The first (narrowest) scope the amount does not fit, or nil.
-- Fits when spent + amount <= limit and spent < limit: an exhausted scope
-- refuses even a zero estimate.
local function refusal()
    for i = 1, n do
        local limit = redis.call('HGET', limits, field(i)) or default_limit(i)
        if tonumber(limit) >= 0 then
            local spent = redis.call('HGET', counters, field(i)) or '0'
            local s, l = tonumber(spent), tonumber(limit)
            if not (s < l and s + amount <= l) then
                return {'NO', string.format('%d', i), spent, limit}
            end
        end
    end
    return nil
end

local function charge(fields, delta)
    if expire_ms <= 0 then return end
    if delta ~= 0 then
        local d = string.format('%d', delta)
        for _, f in ipairs(fields) do
            redis.call('HINCRBY', counters, f, d)
        end
    end
    redis.call('PEXPIRE', counters, expire_ms)
end

local function arg_fields()
    local fields = {}
    for i = 1, n do fields[i] = field(i) end
    return fields
end

if op == 'check' then
    return refusal() or {'OK'}

elseif op == 'usage' then
    local reply = {'OK'}
    for i = 1, n do
        reply[#reply + 1] = redis.call('HGET', counters, field(i)) or '0'
        reply[#reply + 1] = redis.call('HGET', limits, field(i)) or default_limit(i)
    end
    return reply

elseif op == 'report' then
    return {'OK', day, redis.call('HGETALL', counters), redis.call('HGETALL', limits)}

elseif op == 'spend' then
    -- The money is gone: a spend is recorded even past the limit, but only once.
    if redis.call('EXISTS', record) == 1 then
        return {'DUP'}
    end
    charge(arg_fields(), amount)
    redis.call('SET', record, '1', 'PX', ARGV[5])
    return {'OK'}

elseif op == 'reserve' then
    local prior = redis.call('HMGET', record, 'state', 'day', 'held')
    if prior[1] then
        return {'DUP', prior[1], prior[2], prior[3]}
    end
    local no = refusal()
    if no then return no end
    local fields = arg_fields()
    charge(fields, amount)
    redis.call('HSET', record, 'state', 'held', 'day', day, 'held', ARGV[6], 'n', n)
    for i, f in ipairs(fields) do
        redis.call('HSET', record, 'f' .. i, f)
    end
    redis.call('PEXPIRE', record, expire_ms)
    return {'OK', 'held', day, ARGV[6]}

elseif op == 'settle' then
    local state = ARGV[8 + 2 * n]
    local rec = redis.call('HMGET', record, 'state', 'day', 'held', 'n')
    if not rec[1] then
        -- No record: the store lost it (restart without persistence, flush) or
        -- the day is past retention. The spend happened, so record it on its
        -- day while that day is still kept, and leave a tombstone so a retry
        -- of this settle does not charge again.
        if expire_ms <= 0 then return {'GONE', 'expired'} end
        if state == 'committed' then charge(arg_fields(), amount) end
        redis.call('HSET', record, 'state', state, 'day', day, 'held', '0', 'n', '0',
                   'charged', ARGV[6])
        redis.call('PEXPIRE', record, expire_ms)
        return {'GONE', 'recorded'}
    end
    if rec[1] ~= 'held' then
        return {'DONE', rec[1]}
    end
    if rec[2] ~= day then
        return redis.error_reply('reservation belongs to day ' .. rec[2] .. ', not ' .. day)
    end
    local fields = {}
    for i = 1, tonumber(rec[4]) do
        fields[i] = redis.call('HGET', record, 'f' .. i)
    end
    charge(fields, amount - tonumber(rec[3]))
    redis.call('HSET', record, 'state', state, 'charged', ARGV[6])
    return {'OK', state}
end

return redis.error_reply('unknown ledger operation ' .. tostring(op))
