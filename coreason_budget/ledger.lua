-- coreason-budget ledger: every operation is one call of this script, so it
-- is atomic and costs one round trip, however many budget windows (hour,
-- day, week, month) are kept. Every check happens before the first write: a
-- refused or failing call changes nothing.
--
-- KEYS: only those the operation touches (each key costs the client time to send)
--   KEYS[1 .. k]      the counters of the k windows kept, one hash per period (this
--                     hour, day, week or month), field per scope ("u:<id>", "p:<id>",
--                     "m:<model>", "g")
--   KEYS[k+1 .. 2k]   for reserve, check and usage: each window's limits hash (per-entity
--                     limit overrides, same field names, no TTL)
--   then              for reserve, commit and release, the reservation record; for
--                     spend and replay, m operation-id marker buckets (see below)
--
-- ARGV, one word each (Redis hands a script its arguments as strings ready
-- made; splitting one argument into words in Lua cost 2 us of server time a call):
--   1 .. 10    op         reserve | commit | release | spend | replay | check | usage | now
--                         (now: only the time, by the shared clock)
--                         (replay: a spend from a client's local spool, made at `at`)
--              amount     nano-dollars: the estimate, the spend or the actual cost
--              at         ms: when a settled hold was taken or a replayed spend made;
--                         "-" when not known (settling by the record alone) or not used
--              n          the number of scopes (at most 4)
--              m f        writes: the number of record buckets (after the other keys) and
--                         the UTC day of the first (days since 1970-01-01), one day each;
--                         other ops: 0 -
--              stamp      injected time in ms, or "-" for the server's clock (the
--                         one clock all workers share)
--              retention  ms counters and reservations live after their period ends
--              op_ttl     ms an operation-id marker lives at least (it also lives as
--                         long as the periods it charged)
--              k          the number of windows (at most 4)
--              (the words that vary from call to call first; the rest are the same
--              for every call in the same periods, and the client keeps them ready)
--   then       k pairs "start", "end": the periods KEYS[1 .. k] count, which the
--              client chose for the instant it believed it was (or for `at`)
--   then       for reserve, check and usage: n x k default limits, scope by
--              scope (-1: tracked, never limited)
--   then       the n scopes' fields, narrowest first (ids may hold any character),
--              from ARGV[s] (s: the first index past the words above)
--   ARGV[s+n]    reserve, commit, release: the same scopes as a record keeps them,
--                "<n> <len 1> .. <len n>\n" then the fields back to back (lengths
--                in bytes); spend, replay: a digest of the amount and scopes paid for
--   ARGV[s+n+1]  spend, replay, and reservations: a digest of the operation or
--                reservation id (a field of its bucket)
--   ARGV[s+n+2]  reserve: a digest of its estimate and scopes
--
-- An open reservation is a string, "<state> <at> <held> <digest> " then its
-- scopes as ARGV[s+n] gives them (<digest>: of its estimate and scopes). One SET
-- NX both creates it with its expiry and refuses a second. Settled, it needs no
-- scopes or amounts: the record is deleted and its id's digest becomes a field of
-- a small hash, the bucket of its UTC day, holding "c" or "r" and that digest.
-- A tombstone (a settlement whose reservation the store had lost) is a record
-- holding "-" for the amount and the digest.
-- An operation-id marker is a field of a bucket too (of the day it was made):
-- the id's digest -> a digest of what it paid for, so that the id reused for
-- another payment is refused, not taken for a retry. A bucket is one of
-- `record_buckets` hashes per day, chosen by the id's digest: Redis keeps a hash
-- of up to 128 short fields in one compact block, about 25 bytes a record where
-- a key per record took about 250.

-- Replies: the instant (ms) the operation was booked at (an integer) when it
-- did what was asked; otherwise a list whose first word says why (NO: refused,
-- naming the scope, the window, spent, limit and now; DUP, DONE, GONE, NOW: the
-- periods named are not the current ones, here is the time; NONE: no such
-- reservation to settle by id; CONFLICT: the id was used for another payload;
-- BIG: a counter would pass what Redis can count; WHEN: a settlement named
-- another instant, or periods not holding its reservation's), or usage's values.
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

-- True when instant t lies in every period the header names.
local function within(head, k, t)
    for j = 1, k do
        if not (tonumber(head[9 + 2 * j]) <= t and t < tonumber(head[10 + 2 * j])) then
            return false
        end
    end
    return true
end

-- ms until the soonest-ending period expires: negative once it is past
-- retention (a charge lands in all of its windows, or in none).
local function expiry(head, k, retention, now)
    local soonest = tonumber(head[12])
    for j = 2, k do soonest = math.min(soonest, tonumber(head[10 + 2 * j])) end
    return soonest + tonumber(retention) - now
end

-- The refusal of the first (narrowest) scope the amount does not fit, naming
-- the window of that scope that refuses longest (its period ends last), or
-- nil. Fits when spent + amount <= limit and spent < limit: an exhausted
-- scope refuses even a zero estimate.
local function refusal(head, n, k, amount, spent, overrides, now)
    local base = 10 + 2 * k
    for i = 1, n do
        local no
        for j = 1, k do
            local limit = overrides[j][i] or head[base + (i - 1) * k + j]
            local l = tonumber(limit)
            if l >= 0 then
                local s = tonumber(spent[j][i] or '0')
                if not (s < l and s + amount <= l) then
                    no = {'NO', string.format('%d', i), string.format('%d', j), spent[j][i] or '0',
                          limit, string.format('%d', now)}
                end
            end
        end
        if no then return no end
    end
    return nil
end

-- BIG: field i could not take the amount. A counters key that is no hash
-- at all is no answer about an amount: the store's own error, fail closed.
local function too_big(i, err)
    if string.find(err, 'WRONGTYPE', 1, true) then return redis.error_reply(err) end
    return {'BIG', string.format('%d', i)}
end

-- Add delta to fields[first .. last] in every window's counters. Returns true
-- when that created a field of window j's hash in `fresh[j]` (a period's hash
-- is only ever created here, with all the fields of its first charge, so when
-- none was new the hash existed and already has its expiry: only a new field
-- needs the caller to (re)arm it), or nil, the index (from 1) of the first
-- field that could not take delta and the store's error: it would pass what
-- a Redis integer holds, or it holds something that is not a count. Then the
-- increments already made are taken back (a field this call created is
-- deleted): a script's writes are not undone when a later one fails, so
-- nothing is left half-written. Trying costs one call per field; reading
-- every field first cost one more call per window.
local function charge(k, fields, first, last, delta, ds)
    local fresh = {}
    if delta == 0 then return fresh end
    ds = ds or string.format('%d', delta)
    for j = 1, k do
        for i = first, last do
            local v = redis.pcall('HINCRBY', KEYS[j], fields[i], ds)
            if type(v) ~= 'number' then
                local back = string.format('%d', -delta)
                for jj = 1, j do
                    for ii = first, (jj < j) and last or (i - 1) do
                        if redis.call('HINCRBY', KEYS[jj], fields[ii], back) == 0 and delta > 0 then
                            redis.call('HDEL', KEYS[jj], fields[ii])  -- made by this call: unmade
                        end
                    end
                end
                return nil, i - first + 1, v.err or tostring(v)
            end
            if v == delta then fresh[j] = true end
        end
    end
    return fresh
end

-- Arm the expiry of every period hash a charge created a field in.
local function arm(head, k, fresh, retention, now)
    for j = 1, k do
        if fresh[j] then
            redis.call('PEXPIRE', KEYS[j], tonumber(head[10 + 2 * j]) + tonumber(retention) - now)
        end
    end
end

-- Write a settled record into the bucket of UTC day `day` (made with its expiry
-- by its first write: it outlives the day by the retention and the idempotency TTL).
local function put(bucket, field, value, day, retention, op_ttl, now, stamp)
    redis.call('HSET', bucket, field, value)
    if redis.call('HLEN', bucket) == 1 then
        now = now or clock(stamp)  -- (a settlement reads the time only when it needs it)
        redis.call('PEXPIRE', bucket,
            (day + 1) * 86400000 + math.max(tonumber(retention), tonumber(op_ttl)) - now)
    end
end

-- A settled reservation's entry ("c" or "r", then the digest of its hold) as a state.
local function settled(v)
    return string.sub(v, 1, 1) == 'c' and 'committed' or 'released'
end

local unpack = unpack or table.unpack  -- Lua 5.1 (Redis) or later (fakeredis)
local head = ARGV
local op, amount_s, at_s, stamp, retention, op_ttl = head[1], head[2], head[3], head[7], head[8], head[9]
local n, m, k = tonumber(head[4]), tonumber(head[5]), tonumber(head[10])
local reads = op == 'check' or op == 'usage' or op == 'reserve'
local s = k and n and 11 + 2 * k + (reads and n * k or 0)
if not (op and m and s and #head >= s + n - 1) then
    return redis.error_reply('malformed ledger arguments')
end
local amount = tonumber(amount_s)
local record = KEYS[k + 1]
if reads then
    record = KEYS[2 * k + 1]
end

-- Keys were named by the client for the periods it believed current; if the
-- shared clock disagrees (drift near a boundary), write nothing and tell it
-- the time. A commit or release names its reservation's instant (and rarely
-- needs the time). A replayed spend names when it was made, which an outage
-- may have pushed into the past (it must land there, not now), but never a
-- time that has not come: the client then retries on now.
local now
if op ~= 'commit' and op ~= 'release' then
    now = clock(stamp)
    if op == 'replay' then
        if tonumber(at_s) > now then return {'NOW', string.format('%d', now)} end
    elseif not within(head, k, now) then
        return {'NOW', string.format('%d', now)}
    end
end

-- Now's spent and limit overrides of each scope in each window, for the ops that read them.
local spent, overrides = {}, {}
if n > 0 and reads then
    for j = 1, k do
        overrides[j] = redis.call('HMGET', KEYS[k + j], unpack(ARGV, s, s + n - 1))
        spent[j] = redis.call('HMGET', KEYS[j], unpack(ARGV, s, s + n - 1))
    end
end

if op == 'check' then
    return refusal(head, n, k, amount, spent, overrides, now) or now

elseif op == 'usage' then
    local base = 10 + 2 * k
    local reply = {'OK', string.format('%d', now)}
    for i = 1, n do
        for j = 1, k do
            reply[#reply + 1] = spent[j][i] or '0'
            reply[#reply + 1] = overrides[j][i] or head[base + (i - 1) * k + j]
        end
    end
    return reply

elseif op == 'now' then
    -- A report reads a period's hash itself, incrementally (HSCAN): one script
    -- reading a million fields would hold every other caller for a second.
    return now

elseif op == 'spend' or op == 'replay' then
    -- The money is gone: a spend is recorded even past the limit, but only once.
    -- Only a replay can name a period past retention: its counters are gone, so is the charge.
    local ttl = expiry(head, k, retention, now)
    if ttl <= 0 then return {'GONE', 'expired'} end
    -- Its marker: ARGV[s+n+1] (the id's digest) -> ARGV[s+n] (what it paid for,
    -- digested), in the bucket of one UTC day; KEYS[k+1 .. k+m] are the days a
    -- retry of it may find it in (the idempotency TTL's). A spend is marked on
    -- the store's day (the last bucket), a replay on the day it was made; the
    -- marker outlives the charge it guards: a spool replayed days later (a
    -- crashed job's, picked up on its next run) must still find it.
    local first = tonumber(head[6])
    local day = math.floor((op == 'replay' and tonumber(at_s) or now) / 86400000)
    if day < first or day > first + m - 1 or (op == 'spend' and day ~= first + m - 1) then
        return {'NOW', string.format('%d', now)}
    end
    local field, paid = ARGV[s + n + 1], ARGV[s + n]
    for i = 1, m do
        local v = redis.call('HGET', KEYS[k + i], field)
        if v then
            if v ~= paid then return {'CONFLICT'} end
            return {'DUP'}
        end
    end
    local fresh, big, err = charge(k, ARGV, s, s + n - 1, amount, amount_s)
    if big then return too_big(big, err) end
    put(KEYS[k + day - first + 1], field, paid, day, retention, op_ttl, now)
    arm(head, k, fresh, retention, now)
    return op == 'replay' and tonumber(at_s) or now

elseif op == 'reserve' then
    -- An open hold is a record of its own (ARGV[s+n+1]: its id's digest, ARGV[s+n+2]:
    -- a digest of its estimate and scopes); a settled one is folded into the
    -- bucket of its UTC day, KEYS[2k+2]: today's is read here (an id settled today
    -- holds nothing if reserved again; a retry finds its open record).
    local first, field, paid = tonumber(head[6]), ARGV[s + n + 1], ARGV[s + n + 2]
    if math.floor(now / 86400000) ~= first + m - 1 then
        return {'NOW', string.format('%d', now)}
    end
    for i = 1, m do
        local v = redis.call('HGET', KEYS[2 * k + 1 + i], field)
        if v then  -- settled: this id holds nothing now
            if string.sub(v, 2) ~= paid then return {'CONFLICT'} end
            return {'DUP', settled(v), string.format('%d', (first + i - 1) * 86400000), '-'}
        end
    end
    -- Refused, or already made (a retry whose first reply was lost): the hold
    -- it took is the answer, even if no second one would fit now.
    local no = refusal(head, n, k, amount, spent, overrides, now)
    local prior = no and redis.call('GET', record)
    if no and not prior then return no end
    if not prior then
        local ttl = expiry(head, k, retention, now)
        local value = 'held ' .. string.format('%d', now) .. ' ' .. amount_s .. ' ' .. paid ..
            ' ' .. ARGV[s + n]
        if redis.call('SET', record, value, 'NX', 'PX', ttl) then
            local fresh, big, err = charge(k, ARGV, s, s + n - 1, amount, amount_s)
            if big then
                redis.call('DEL', record)  -- the hold not taken
                return too_big(big, err)
            end
            arm(head, k, fresh, retention, now)
            return now
        end
        prior = redis.call('GET', record)
    end
    -- The same id for another hold (other scopes, another estimate) is no retry.
    local state, held_at, held, scopes = string.match(prior, '^(%a+) (%d+) (%S+) %S+ ()')
    if string.sub(prior, scopes) ~= ARGV[s + n] or (held ~= '-' and held ~= amount_s) then
        return {'CONFLICT'}
    end
    return {'DUP', state, held_at, held}

elseif op == 'commit' or op == 'release' then
    local state = op == 'commit' and 'committed' or 'released'
    local first, field = tonumber(head[6]), ARGV[s + n + 1]
    local rec = redis.call('GET', record)
    if not rec then
        -- Settled before, and folded into the bucket of its day?
        for i = 1, m do
            local v = redis.call('HGET', KEYS[k + 1 + i], field)
            if v then return {'DONE', settled(v)} end
        end
    end
    if not rec and n == 0 then
        return {'NONE'}  -- settled by id alone (no scopes to record it in): unknown
    end
    if not rec then
        -- No record: the store lost it (restart without persistence, flush) or
        -- it is past retention. The spend happened, so record it in the periods
        -- the caller says the hold was taken in while they are still kept, and
        -- leave a tombstone so a retry of this settle does not charge again.
        -- (A release by id alone, undoing a reserve whose outcome is unknown,
        -- leaves its tombstone in now's periods: a reserve arriving late takes nothing.)
        if at_s == '-' and op == 'commit' then return {'NONE'} end
        now = clock(stamp)
        local ttl = expiry(head, k, retention, now)
        if ttl <= 0 then return {'GONE', 'expired'} end
        if at_s == '-' then at_s = string.format('%d', now) end
        if op == 'commit' then
            local fresh, big, err = charge(k, ARGV, s, s + n - 1, amount, amount_s)
            if big then return too_big(big, err) end
            arm(head, k, fresh, retention, now)
        end
        -- The tombstone keeps the scopes, so the id still names whose it was.
        redis.call('SET', record, state .. ' ' .. at_s .. ' - - ' .. ARGV[s + n], 'PX', ttl)
        return {'GONE', 'recorded'}
    end
    local was, held_at, held, paid, scopes = string.match(rec, '^(%a+) (%d+) (%S+) (%S+) ()')
    if was ~= 'held' then
        return {'DONE', was}
    end
    -- Its counters are the periods it was taken in, and its bucket that day's:
    -- named exactly, or (by the record alone) among those the client guessed;
    -- else nothing to do here.
    local day = math.floor(tonumber(held_at) / 86400000)
    if (at_s ~= '-' and held_at ~= at_s) or (at_s == '-' and not within(head, k, tonumber(held_at)))
        or day < first or day > first + m - 1 then
        return {'WHEN', held_at}
    end
    local delta = amount - tonumber(held)
    local fresh, big, err
    if string.sub(rec, scopes) == ARGV[s + n] then
        fresh, big, err = charge(k, ARGV, s, s + n - 1, delta)  -- the usual case: no cutting up
    else
        -- Settled naming other scopes than it holds (never by this library's
        -- client, or by the record alone): the record's own fields are the ones to settle.
        local lengths, at = string.match(rec, '^%d+([ %d]*)\n()', scopes)
        local fields = {}
        for length in string.gmatch(lengths, '%d+') do
            local after = at + tonumber(length)
            fields[#fields + 1] = string.sub(rec, at, after - 1)
            at = after
        end
        fresh, big, err = charge(k, fields, 1, #fields, delta)
    end
    if big then return too_big(big, err) end
    if next(fresh) then  -- a refund never creates a field; a charge above the hold may
        now = clock(stamp)
        arm(head, k, fresh, retention, now)
    end
    -- Settled, it needs no scopes or amounts: a field of its day's bucket (about 25
    -- bytes, where the record took about 250) says how, and what it held.
    redis.call('DEL', record)
    put(KEYS[k + 1 + day - first + 1], field, string.sub(state, 1, 1) .. paid, day, retention,
        op_ttl, now, stamp)
    return tonumber(held_at)
end

return redis.error_reply('unknown ledger operation ' .. tostring(op))
