-- coreason-budget ledger: every operation is one call of this script, so it
-- is atomic and costs one round trip. Every check happens before the first
-- write: a refused or failing call changes nothing.
--
-- KEYS[1]  day hash: the day's counters, field per scope ("u:<id>", "p:<id>", "g", "m:<model>")
-- KEYS[2]  limits hash: per-entity limit overrides, same field names, no TTL
-- KEYS[3]  record: a reservation hash ("reserve", "settle") or an operation-id marker
--          ("spend", "replay")
--
-- ARGV[1]  a header of space-separated words (one argument, not nine: each
--          argument costs the client time to pack):
--            op         reserve | settle | spend | replay | check | usage | report
--                       (replay: a spend from a client's local spool, made on `day`)
--            day        the day the client believes it is (days since 1970-01-01, UTC)
--            now        injected time in ms, or "-" for the server's clock (the
--                       one clock all workers share)
--            retention  ms counters and reservations live after their day ends
--            op_ttl     ms an operation-id marker lives
--            amount     nano-dollars: the estimate, the spend or the actual cost
--            n          the number of scopes, then n default limits
--                       (-1: tracked, never limited)
-- ARGV[2 .. n+1]  the scopes' fields, narrowest first (ids may hold any character)
-- ARGV[n+2]       for settle: the state to settle into ("committed" or "released")
--
-- Amounts stay below 2^53 (the client bounds them), so Lua's doubles hold them exactly.

local DAY_MS = 86400000
local unpack = unpack or table.unpack  -- Lua 5.1 (Redis) or later (fakeredis)
local counters, limits, record = KEYS[1], KEYS[2], KEYS[3]
local h = {}
for word in string.gmatch(ARGV[1], '%S+') do h[#h + 1] = word end
local op, day, amount_s = h[1], h[2], h[6]
local amount = tonumber(amount_s)
local n = tonumber(h[7])

local now
if h[3] ~= '-' then
    now = tonumber(h[3])
else
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Keys were named by the client for the day it believed it was; if the shared
-- clock disagrees (drift near midnight), write nothing and tell it which day it is.
-- A settle names its reservation's day. A replayed spend names the day it was
-- made, which an outage may have pushed into the past (it must land there, not
-- today), but never a day that has not begun: the client then retries on today.
if op ~= 'settle' then
    local today = math.floor(now / DAY_MS)
    local d = tonumber(day)
    if (op == 'replay' and d > today) or (op ~= 'replay' and d ~= today) then
        return {'DAY', string.format('%d', today), string.format('%d', now)}
    end
end

local expire_ms = (tonumber(day) + 1) * DAY_MS + tonumber(h[4]) - now

local fields = {}
for i = 1, n do fields[i] = ARGV[1 + i] end
local function default_limit(i) return h[7 + i] end

-- The first (narrowest) scope the amount does not fit, or nil.
-- Fits when spent + amount <= limit and spent < limit: an exhausted scope
-- refuses even a zero estimate.
local function refusal()
    if n == 0 then return nil end
    local overrides = redis.call('HMGET', limits, unpack(fields))
    local spent = redis.call('HMGET', counters, unpack(fields))
    for i = 1, n do
        local limit = overrides[i] or default_limit(i)
        if tonumber(limit) >= 0 then
            local s, l = tonumber(spent[i] or '0'), tonumber(limit)
            if not (s < l and s + amount <= l) then
                return {'NO', string.format('%d', i), spent[i] or '0', limit}
            end
        end
    end
    return nil
end

local function charge(charged, delta)
    if expire_ms <= 0 then return end
    if delta ~= 0 then
        local d = string.format('%d', delta)
        for _, f in ipairs(charged) do
            redis.call('HINCRBY', counters, f, d)
        end
    end
    redis.call('PEXPIRE', counters, expire_ms)
end

if op == 'check' then
    return refusal() or {'OK'}

elseif op == 'usage' then
    local spent = redis.call('HMGET', counters, unpack(fields))
    local overrides = redis.call('HMGET', limits, unpack(fields))
    local reply = {'OK'}
    for i = 1, n do
        reply[#reply + 1] = spent[i] or '0'
        reply[#reply + 1] = overrides[i] or default_limit(i)
    end
    return reply

elseif op == 'report' then
    return {'OK', day, redis.call('HGETALL', counters), redis.call('HGETALL', limits)}

elseif op == 'spend' or op == 'replay' then
    -- The money is gone: a spend is recorded even past the limit, but only once.
    if redis.call('EXISTS', record) == 1 then
        return {'DUP'}
    end
    -- Only a replay can name a day past retention: its counters are gone, so is the charge.
    if expire_ms <= 0 then return {'GONE', 'expired'} end
    charge(fields, amount)
    redis.call('SET', record, '1', 'PX', h[5])
    return {'OK'}

elseif op == 'reserve' then
    local prior = redis.call('HMGET', record, 'state', 'day', 'held')
    if prior[1] then
        return {'DUP', prior[1], prior[2], prior[3]}
    end
    local no = refusal()
    if no then return no end
    charge(fields, amount)
    local entry = {'state', 'held', 'day', day, 'held', amount_s, 'n', n}
    for i, f in ipairs(fields) do
        entry[#entry + 1] = 'f' .. i
        entry[#entry + 1] = f
    end
    redis.call('HSET', record, unpack(entry))
    redis.call('PEXPIRE', record, expire_ms)
    return {'OK', 'held', day, amount_s}

elseif op == 'settle' then
    local state = ARGV[n + 2]
    local rec = redis.call('HMGET', record, 'state', 'day', 'held', 'n')
    if not rec[1] then
        -- No record: the store lost it (restart without persistence, flush) or
        -- the day is past retention. The spend happened, so record it on its
        -- day while that day is still kept, and leave a tombstone so a retry
        -- of this settle does not charge again.
        if expire_ms <= 0 then return {'GONE', 'expired'} end
        if state == 'committed' then charge(fields, amount) end
        redis.call('HSET', record, 'state', state, 'day', day, 'held', '0', 'n', '0',
                   'charged', amount_s)
        redis.call('PEXPIRE', record, expire_ms)
        return {'GONE', 'recorded'}
    end
    if rec[1] ~= 'held' then
        return {'DONE', rec[1]}
    end
    if rec[2] ~= day then
        return redis.error_reply('reservation belongs to day ' .. rec[2] .. ', not ' .. day)
    end
    local names = {}
    for i = 1, tonumber(rec[4]) do names[i] = 'f' .. i end
    local held_in = #names > 0 and redis.call('HMGET', record, unpack(names)) or {}
    charge(held_in, amount - tonumber(rec[3]))
    redis.call('HSET', record, 'state', state, 'charged', amount_s)
    return {'OK', state}
end

return redis.error_reply('unknown ledger operation ' .. tostring(op))
