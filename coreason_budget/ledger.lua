-- coreason-budget ledger: every operation is one call of this script, so it
-- is atomic and costs one round trip. Every check happens before the first
-- write: a refused or failing call changes nothing.
--
-- KEYS: only those the operation touches (each key costs the client time to send)
--   KEYS[1]     day hash: the day's counters, field per scope ("u:<id>", "p:<id>", "g", "m:<model>")
--   then        for writes, the record: a reservation (reserve, commit, release) or an
--               operation-id marker (spend, replay)
--   then        for reserve, check and usage, the limits hash: per-entity limit
--               overrides, same field names, no TTL
--
-- ARGV[1]  a header of space-separated words (one argument, not ten, for the same reason):
--            op         reserve | commit | release | spend | replay | check | usage | today
--                       (today: only which day it is, by the shared clock)
--                       (replay: a spend from a client's local spool, made on `day`)
--            day        the day the client believes it is (days since 1970-01-01, UTC)
--            now        injected time in ms, or "-" for the server's clock (the
--                       one clock all workers share)
--            amount     nano-dollars: the estimate, the spend or the actual cost
--            retention  ms counters and reservations live after their day ends
--            op_ttl     ms an operation-id marker lives at least (it also lives as
--                       long as the day it charged)
--            n          the number of scopes (at most 4), then n default limits
--                       (-1: tracked, never limited)
-- ARGV[2 .. n+1]  the scopes' fields, narrowest first (ids may hold any character)
-- ARGV[n+2]       for every write: the same scopes as a record keeps them,
--                 "<n> <len 1> .. <len n>\n" then the fields back to back (lengths
--                 in bytes)
--
-- A reservation is a string, "<state> <day> <held> " then its scopes as ARGV[n+2]
-- gives them. One SET NX both creates it with its expiry and refuses a second.
-- A tombstone (a settlement whose reservation the store had lost) holds "-".
-- An operation-id marker is "<amount> " then the scopes: what the id paid for,
-- so that the id reused for another payment is refused, not taken for a retry.
--
-- Replies: the day the operation was booked on (an integer) when it did what
-- was asked; otherwise a list whose first word says why (NO, DUP, DONE, GONE,
-- DAY, NONE: no such reservation to settle by id, CONFLICT: the id was used for another payload, BIG: a counter would
-- pass what Redis can count, WRONGDAY: a settlement naming another day than its
-- reservation's), or usage's values.
--
-- Amounts stay below 2^53 (the client bounds them), so Lua's doubles hold them exactly.

-- The helpers take everything they use as arguments: a function that captures
-- the script's locals allocates them as upvalues on every call (half a
-- microsecond of a reserve's nine, measured).

-- The time in ms: the injected stamp, or the server's clock (the one clock all
-- workers share).
local function clock(stamp)
    if stamp ~= '-' then return tonumber(stamp) end
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- ms until day d's counters and reservations expire: negative once it is past
-- retention. (A day is 86400000 ms, here and below.)
local function expiry(d, retention, now)
    return (d + 1) * 86400000 + tonumber(retention) - now
end

local function default_limits(defaults_s)  -- n <= 4
    return {string.match(defaults_s, '^(%S+) ?(%S*) ?(%S*) ?(%S*)$')}
end

-- The first (narrowest) scope the amount does not fit, as the refusal, or nil.
-- Fits when spent + amount <= limit and spent < limit: an exhausted scope
-- refuses even a zero estimate.
local function refusal(n, amount, spent, overrides, defaults_s)
    if n == 0 then return nil end
    local defaults = default_limits(defaults_s)
    for i = 1, n do
        local limit = overrides[i] or defaults[i]
        local l = tonumber(limit)
        if l >= 0 then
            local s = tonumber(spent[i] or '0')
            if not (s < l and s + amount <= l) then
                return {'NO', string.format('%d', i), spent[i] or '0', limit}
            end
        end
    end
    return nil
end

-- BIG: field i could not take the amount. A counters key that is no hash
-- at all is no answer about an amount: the store's own error, fail closed.
local function too_big(i, err)
    if string.find(err, 'WRONGTYPE', 1, true) then return redis.error_reply(err) end
    return {'BIG', string.format('%d', i)}
end

-- Add delta to fields[first .. last]. Returns true when that created a
-- field (the day's hash is only ever created here, with all the fields of its
-- first charge, so when none was new the hash existed and already has its
-- expiry: only a new field needs the caller to (re)arm it), false when it did
-- not, or nil, the index (from 1) of the first field that could not take
-- delta and the store's error: it would pass what a Redis integer holds, or it holds something that
-- is not a count. Then the increments already made are taken back (a field
-- this call created is deleted): a script's writes are not undone when a
-- later one fails, so nothing is left half-written. Trying costs one call per
-- field; reading every field first cost one more call per charge.
local function charge(counters, fields, first, last, delta, ds)
    if delta == 0 then return false end
    ds = ds or string.format('%d', delta)
    local fresh = false
    for i = first, last do
        local v = redis.pcall('HINCRBY', counters, fields[i], ds)
        if type(v) ~= 'number' then
            for j = first, i - 1 do
                if redis.call('HINCRBY', counters, fields[j], string.format('%d', -delta)) == 0
                    and delta > 0 then
                    redis.call('HDEL', counters, fields[j])  -- made by this call: unmade
                end
            end
            return nil, i - first + 1, v.err or tostring(v)
        end
        if v == delta then fresh = true end
    end
    return fresh
end

local unpack = unpack or table.unpack  -- Lua 5.1 (Redis) or later (fakeredis)
-- One match for the fixed words; the defaults are split only by the ops that
-- read them. (Splitting every word costs more than the rest of a check.)
local op, day, stamp, amount_s, retention, op_ttl, n_s, defaults_s = string.match(
    ARGV[1], '^(%a+) (%d+) (%S+) (%d+) (%d+) (%d+) (%d) ?(.*)$')
if not op then
    return redis.error_reply('malformed ledger header')
end
local amount, n, d = tonumber(amount_s), tonumber(n_s), tonumber(day)
local counters, record, limits = KEYS[1], KEYS[2], KEYS[3]
if op == 'check' or op == 'usage' or op == 'today' then
    record, limits = nil, KEYS[2]
end

-- Keys were named by the client for the day it believed it was; if the shared
-- clock disagrees (drift near midnight), write nothing and tell it which day it is.
-- A commit or release names its reservation's day (and rarely needs the time).
-- A replayed spend names the day it was made, which an outage may have pushed
-- into the past (it must land there, not today), but never a day that has not
-- begun: the client then retries on today.
local now
if op ~= 'commit' and op ~= 'release' then
    now = clock(stamp)
    local today = math.floor(now / 86400000)
    if (op == 'replay' and d > today) or (op ~= 'replay' and d ~= today) then
        return {'DAY', string.format('%d', today), string.format('%d', now)}
    end
end

-- Today's spent and limit overrides of each scope, for the ops that read them.
local spent, overrides
if n > 0 and (op == 'check' or op == 'reserve' or op == 'usage') then
    overrides = redis.call('HMGET', limits, unpack(ARGV, 2, n + 1))
    spent = redis.call('HMGET', counters, unpack(ARGV, 2, n + 1))
end

if op == 'check' then
    return refusal(n, amount, spent, overrides, defaults_s) or d

elseif op == 'usage' then
    local defaults = default_limits(defaults_s)
    local reply = {'OK'}
    for i = 1, n do
        reply[#reply + 1] = spent[i] or '0'
        reply[#reply + 1] = overrides[i] or defaults[i]
    end
    return reply

elseif op == 'today' then
    -- A report reads the day's hash itself, incrementally (HSCAN): one script
    -- reading a million fields would hold every other caller for a second.
    return d

elseif op == 'spend' or op == 'replay' then
    -- The money is gone: a spend is recorded even past the limit, but only once.
    -- Only a replay can name a day past retention: its counters are gone, so is the charge.
    local ttl = expiry(d, retention, now)
    if ttl <= 0 then return {'GONE', 'expired'} end
    -- The marker outlives the charge it guards: a spool replayed days later
    -- (a crashed job's, picked up on its next run) must still find it.
    local paid = amount_s .. ' ' .. ARGV[n + 2]
    if not redis.call('SET', record, paid, 'NX', 'PX', math.max(ttl, tonumber(op_ttl))) then
        if redis.call('GET', record) ~= paid then return {'CONFLICT'} end
        return {'DUP'}
    end
    local fresh, big, err = charge(counters, ARGV, 2, n + 1, amount, amount_s)
    if big then
        redis.call('DEL', record)  -- the marker of a charge not made
        return too_big(big, err)
    end
    if fresh then redis.call('PEXPIRE', counters, ttl) end
    return d

elseif op == 'reserve' then
    -- Refused, or already made (a retry whose first reply was lost): the hold
    -- it took is the answer, even if no second one would fit now.
    local no = refusal(n, amount, spent, overrides, defaults_s)
    local prior = no and redis.call('GET', record)
    if no and not prior then return no end
    if not prior then
        local ttl = expiry(d, retention, now)
        local value = 'held ' .. day .. ' ' .. amount_s .. ' ' .. ARGV[n + 2]
        if redis.call('SET', record, value, 'NX', 'PX', ttl) then
            local fresh, big, err = charge(counters, ARGV, 2, n + 1, amount, amount_s)
            if big then
                redis.call('DEL', record)  -- the hold not taken
                return too_big(big, err)
            end
            if fresh then redis.call('PEXPIRE', counters, ttl) end
            return d
        end
        prior = redis.call('GET', record)
    end
    -- The same id for another hold (other scopes, another estimate) is no retry.
    local state, held_day, held, scopes = string.match(prior, '^(%a+) (%d+) (%S+) ()')
    if string.sub(prior, scopes) ~= ARGV[n + 2] or (held ~= '-' and held ~= amount_s) then
        return {'CONFLICT'}
    end
    return {'DUP', state, held_day, held}

elseif op == 'commit' or op == 'release' then
    local state = op == 'commit' and 'committed' or 'released'
    local rec = redis.call('GET', record)
    if not rec and n == 0 then
        return {'NONE'}  -- settled by id alone (no scopes to record it in): unknown
    end
    if not rec then
        -- No record: the store lost it (restart without persistence, flush) or
        -- the day is past retention. The spend happened, so record it on its
        -- day while that day is still kept, and leave a tombstone so a retry
        -- of this settle does not charge again.
        local ttl = expiry(d, retention, clock(stamp))
        if ttl <= 0 then return {'GONE', 'expired'} end
        if op == 'commit' then
            local fresh, big, err = charge(counters, ARGV, 2, n + 1, amount, amount_s)
            if big then return too_big(big, err) end
            if fresh then redis.call('PEXPIRE', counters, ttl) end
        end
        -- The tombstone keeps the scopes, so the id still names whose it was.
        redis.call('SET', record, state .. ' ' .. day .. ' - ' .. ARGV[n + 2], 'PX', ttl)
        return {'GONE', 'recorded'}
    end
    local was, held_day, held, scopes = string.match(rec, '^(%a+) (%d+) (%S+) ()')
    if was ~= 'held' then
        return {'DONE', was}
    end
    if held_day ~= day then
        return {'WRONGDAY', held_day}  -- its counters are another day's hash: nothing to do here
    end
    local delta = amount - tonumber(held)
    local fresh, big, err
    if string.sub(rec, scopes) == ARGV[n + 2] then
        fresh, big, err = charge(counters, ARGV, 2, n + 1, delta)  -- the usual case: no cutting up
    else
        -- Settled naming other scopes than it holds (never by this library's
        -- client): the record's own fields are the ones to settle.
        local lengths, at = string.match(rec, '^%d+([ %d]*)\n()', scopes)
        local fields = {}
        for length in string.gmatch(lengths, '%d+') do
            local after = at + tonumber(length)
            fields[#fields + 1] = string.sub(rec, at, after - 1)
            at = after
        end
        fresh, big, err = charge(counters, fields, 1, #fields, delta)
    end
    if big then return too_big(big, err) end
    if fresh then  -- a refund never creates a field; a charge above the hold may
        redis.call('PEXPIRE', counters, expiry(d, retention, clock(stamp)))
    end
    redis.call('SET', record, state .. string.sub(rec, #was + 1), 'KEEPTTL')
    return d
end

return redis.error_reply('unknown ledger operation ' .. tostring(op))
