"""Redis backend: one store shared by many proxy replicas (sidecars in many pods, one budget).

Every operation that reads and then writes is one Lua script, which Redis runs with nothing else
interleaved, so `reserve`'s check of the remaining budget and its hold are one atomic step no matter
how many proxies call at once: the hard cap holds across replicas.

Data (all names start with `agentkeys:`):

    key:{key_id}   hash   every KeyRecord field (money in integer micro-dollars), open_holds (its open
                          holds and its live children's grants: what keeps it from a TTL), live_children,
                          and one field per open hold, `hold:{hold_id}` = "amount created_at remaining"
                          (then " account_id period_id" for a key of an account: the period it is charged to),
                          and per cancelled hold name, `cancelled:{hold_id}`
    keys           zset   key ids by created_at (list_keys)
    expiry         zset   key ids by expires_at (purge_expired)
    children:{id}  set    a key's child key ids (a purged child leaves it; it goes with its key)
    grants         zset   child key ids whose budget is still held on their parent, by expires_at
    holds          zset   open hold ids by when they were taken or last renewed (sweep_stale_holds)
    token:{digest} string an exchanged OIDC token (digest of its issuer and jti): its expires_at, and a TTL to it
    account:{id}   hash   every AccountRecord field
    accounts       zset   account ids by created_at (list_accounts)
    account_keys:{id} set the ids of the keys minted for an account
    period:{account_id}:{period_id} hash  spent_micros, held_micros, top_up_micros: one period's books
    periods:{id}   set    the period ids an account has books for
    rate:…, slots:…, calls:…, same:…   rate limits and the loop breaker (see `ledger.limits_redis`)

A hold lives in its key's hash, so the hold and the amount it keeps held on the key are one Redis
key: they cannot part (a hold cannot vanish and leave its amount stuck). Hold names are made by the
proxy (`new_hold_id`: the key's id and 64 random bits), never by a counter in Redis, so a Redis that
lost its data cannot give an old call's name to a new hold, and a settlement closes a hold only on
the key its name gives. A hold of an account's key is also held on the account's period, in that
period's own hash, which has no TTL (an account's books are kept until the account is deleted).

Time is Redis's `TIME`, read inside each script: every replica compares expiry and hold ages with
the one clock, and books a hold to the account period that clock is in (the proxy hands the ids of
the periods around its own present, `DayWindow`, since Lua knows no time zones). Each key hash
carries a TTL of its remaining lifetime plus RETENTION_SECONDS, so keys
vanish even if no proxy ever purges them, while `keys show` still works for a while after expiry. A
key with an open hold, or a child whose budget is still held on its parent, has no TTL: the TTL
must never take a key whose books are still open; it is set again when they close.

Redis must never evict: `maxmemory-policy` must be `noeviction` (checked on every new connection and
by `ping`; see `check_eviction_policy`). The scripts find a hold's key from the hold, so they touch
keys they were not given in KEYS: use a single Redis (or a primary with replicas), not Redis Cluster.

Failures: no command is retried. A script whose answer was lost may have run, and running `reserve`
twice under two names would take two holds; the caller refuses the call instead (LedgerUnavailable)
and cancels the hold by its name (`cancel_hold`), and the next call gets a fresh connection, so the
proxy recovers by itself when Redis is back.
"""

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, astuple, fields, replace
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentkeys.ledger.base import (
    PURGE_BATCH,
    AccountExists,
    AccountRecord,
    KeyExists,
    KeyRecord,
    LedgerUnavailable,
    PeriodSpend,
    Refusal,
    Reservation,
    StaleHold,
    StoreMisconfigured,
    key_of_hold,
    named_hold,
)
from agentkeys.ledger.limits import LimitAnswer, LimitRequest, LimitTicket
from agentkeys.ledger.limits_redis import GIVE_BACK, LIMITS_PRELUDE, TAKE, limit_answer, request_json
from agentkeys.ledger.periods import Calendar, DayWindow

PREFIX = "agentkeys:"
RETENTION_SECONDS = 24 * 3600
SAFE_EVICTION_POLICY = "noeviction"

KEY_FIELDS = [field.name for field in fields(KeyRecord)]
ACCOUNT_FIELDS = [field.name for field in fields(AccountRecord)]
ACCOUNT_NUMBER_FIELDS = {"budget_micros": int, "created_at": float}
PERIOD_FIELDS = ["spent_micros", "held_micros", "top_up_micros"]
NUMBER_FIELDS = {
    "created_at": float,
    "expires_at": float,
    "revoked_at": float,
    "budget_micros": int,
    "spent_micros": int,
    "held_micros": int,
    "depth": int,
    "grant_micros": int,
}

# Shared by every script: key names, the store's clock, and the steps several scripts take.
PRELUDE = f"""
local PREFIX = '{PREFIX}'
local RETENTION = {RETENTION_SECONDS}
local KEYS_BY_CREATION = PREFIX .. 'keys'
local KEYS_BY_EXPIRY = PREFIX .. 'expiry'
local OPEN_HOLDS = PREFIX .. 'holds'
local OPEN_GRANTS = PREFIX .. 'grants'

local function key_name(key_id) return PREFIX .. 'key:' .. key_id end
local function children_name(key_id) return PREFIX .. 'children:' .. key_id end
local function key_of_hold(hold_id) return string.match(hold_id, '^([^.]+)%.') end

-- The time given (only the contract suite gives one), else Redis's own clock: one clock for every replica.
local function clock(given)
    if given and given ~= '' then return tonumber(given) end
    local now = redis.call('TIME')
    return tonumber(now[1]) + tonumber(now[2]) / 1000000
end

local function account_name(account_id) return PREFIX .. 'account:' .. account_id end
local function account_keys_name(account_id) return PREFIX .. 'account_keys:' .. account_id end
local function periods_name(account_id) return PREFIX .. 'periods:' .. account_id end
local function period_name(account_id, period_id) return PREFIX .. 'period:' .. account_id .. ':' .. period_id end

-- The id of the period of an account's kind (day, week or month) that `now` falls in. ARGV from `first`
-- holds the day the proxy took for the present (its start and end) and the ids of the day, week and
-- month before, during and after that day (see `DayWindow`): the store's clock picks among them.
local function current_period(kind, now, first)
    local part = 5
    if now < tonumber(ARGV[first]) then part = 2 elseif now >= tonumber(ARGV[first + 1]) then part = 8 end
    local of_kind = 2
    if kind == 'day' then of_kind = 0 elseif kind == 'week' then of_kind = 1 end
    return ARGV[first + part + of_kind]
end

-- A hold's fields, as its key's hash keeps them: amount, created_at, remaining[, account_id, period_id].
local function hold_fields(hold)
    local found = {{}}
    for part in string.gmatch(hold, '%S+') do table.insert(found, part) end
    return found
end

-- What an account has left in one period's books (`p`: spent, held, top_up as HMGET gave them).
local function account_remaining(budget, p)
    return tonumber(budget) + tonumber(p[3] or 0) - tonumber(p[1] or 0) - tonumber(p[2] or 0)
end

-- Revoke a key and every descendant at `now`.
local function revoke_tree(root_id, now)
    local pending = {{root_id}}
    while #pending > 0 do
        local key_id = table.remove(pending)
        local name = key_name(key_id)
        if redis.call('EXISTS', name) == 1 and redis.call('HEXISTS', name, 'revoked_at') == 0 then
            redis.call('HSET', name, 'revoked_at', now)
        end
        for _, child_id in ipairs(redis.call('SMEMBERS', children_name(key_id))) do
            table.insert(pending, child_id)
        end
    end
end

-- HINCRBY by a Lua number written as an integer: Lua would send 0 - 0 as "-0", which Redis refuses,
-- and a script that fails halfway keeps the writes it made before the failure.
local function incr(key, field, delta)
    return redis.call('HINCRBY', key, field, string.format('%d', delta))
end

-- Let an idle key live until RETENTION seconds after its expiry, as seen from `now`.
local function arm_ttl(key, now)
    local expires_at = tonumber(redis.call('HGET', key, 'expires_at'))
    redis.call('EXPIRE', key, math.ceil(math.max(expires_at - now, 0) + RETENTION))
end

-- Drop a hold and charge `charge` micro-dollars for it (nil: its full amount); the charge also goes to
-- the account period the hold was taken in, whatever the period is now (unless the account was deleted).
-- Returns the hold's key_id, amount and created_at, or nil if it is not open (its index entry goes either way).
local function close_hold(hold_id, charge, now)
    redis.call('ZREM', OPEN_HOLDS, hold_id)
    local key_id = key_of_hold(hold_id)
    if not key_id then return nil end
    local key = key_name(key_id)
    local hold = redis.call('HGET', key, 'hold:' .. hold_id)
    if not hold then return nil end
    local fields = hold_fields(hold)
    local amount, created_at, account_id, period_id = fields[1], fields[2], fields[4], fields[5]
    redis.call('HDEL', key, 'hold:' .. hold_id)
    incr(key, 'held_micros', -tonumber(amount))
    incr(key, 'spent_micros', tonumber(charge or amount))
    if account_id and redis.call('EXISTS', account_name(account_id)) == 1 then
        local period = period_name(account_id, period_id)
        incr(period, 'held_micros', -tonumber(amount))
        incr(period, 'spent_micros', tonumber(charge or amount))
    end
    if incr(key, 'open_holds', -1) == 0 and tonumber(redis.call('HGET', key, 'grant_micros') or 0) == 0 then
        arm_ttl(key, now)
    end
    return {{key_id, amount, created_at}}
end
"""

# Give back to their parents the grants of children that can no longer spend (revoked or expired) and
# have nothing in flight, repeating, since returning a grandchild's can finish its parent.
RETURN_FINISHED_GRANTS = """
local function return_finished_grants(now)
    local returned = true
    while returned do
        returned = false
        for _, child_id in ipairs(redis.call('ZRANGE', OPEN_GRANTS, 0, -1)) do
            local child = key_name(child_id)
            local c = redis.call('HMGET', child, 'parent_id', 'grant_micros', 'spent_micros', 'open_holds',
                                 'revoked_at', 'expires_at')
            if not c[1] then
                redis.call('ZREM', OPEN_GRANTS, child_id)
            elseif tonumber(c[4]) == 0 and (c[5] or now >= tonumber(c[6])) then
                local parent = key_name(c[1])
                if redis.call('EXISTS', parent) == 1 then
                    incr(parent, 'held_micros', -tonumber(c[2]))
                    incr(parent, 'spent_micros', tonumber(c[3]))
                    incr(parent, 'live_children', -1)
                    local idle = incr(parent, 'open_holds', -1) == 0
                    if idle and tonumber(redis.call('HGET', parent, 'grant_micros')) == 0 then arm_ttl(parent, now) end
                end
                redis.call('HSET', child, 'grant_micros', 0)
                arm_ttl(child, now)
                redis.call('ZREM', OPEN_GRANTS, child_id)
                returned = true
            end
        end
    end
end
"""

# Store a key from its field/value pairs (ARGV from `first`); false if the id is taken.
CREATE_KEY = """
local function create_key(key_id, first, now)
    local key = key_name(key_id)
    if redis.call('EXISTS', key) == 1 then return false end
    redis.call('HSET', key, 'open_holds', 0, 'live_children', 0, unpack(ARGV, first))
    redis.call('ZADD', KEYS_BY_CREATION, redis.call('HGET', key, 'created_at'), key_id)
    redis.call('ZADD', KEYS_BY_EXPIRY, redis.call('HGET', key, 'expires_at'), key_id)
    arm_ttl(key, now)
    local account_id = redis.call('HGET', key, 'account_id')
    if account_id then redis.call('SADD', account_keys_name(account_id), key_id) end
    return true
end
"""

# ARGV: now, key_id, then the record's field/value pairs.
CREATE = """
if create_key(ARGV[2], 3, clock(ARGV[1])) then return 1 end
return 0
"""

# ARGV: parent_id, max_children, now, the child's budget, its key_id, then its field/value pairs.
# Returns '' when created, else the refusal. The child has no TTL while its budget is held on its parent.
CREATE_CHILD = """
local parent = key_name(ARGV[1])
local max_children, now, budget = tonumber(ARGV[2]), clock(ARGV[3]), tonumber(ARGV[4])
local p = redis.call('HMGET', parent, 'expires_at', 'revoked_at', 'budget_micros', 'spent_micros', 'held_micros',
                     'live_children')
if not p[1] then return 'unknown' end
if p[2] then return 'revoked' end
if now >= tonumber(p[1]) then return 'expired' end
if tonumber(p[6] or 0) >= max_children then return 'too_many_children' end
if budget > tonumber(p[3]) - tonumber(p[4]) - tonumber(p[5]) then return 'budget' end
if not create_key(ARGV[5], 6, now) then return 'exists' end
redis.call('PERSIST', key_name(ARGV[5]))
incr(parent, 'held_micros', budget)
incr(parent, 'open_holds', 1)
incr(parent, 'live_children', 1)
redis.call('PERSIST', parent)
redis.call('SADD', children_name(ARGV[1]), ARGV[5])
redis.call('ZADD', OPEN_GRANTS, redis.call('HGET', key_name(ARGV[5]), 'expires_at'), ARGV[5])
return ''
"""

# ARGV: key_id, now. Revokes the key and every descendant.
REVOKE = """
local key = key_name(ARGV[1])
if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoked_at') == 1 then return 0 end
local now = string.format('%.6f', clock(ARGV[2]))
revoke_tree(ARGV[1], now)
return_finished_grants(tonumber(now))
return 1
"""

# ARGV: key_id, amount_micros, now, hold_id, then the grant the proxy verified (budget_micros, expires_at,
# SHA-1 of policy_json, account_id) or four '', then "regardless" (shadow mode's hold: whatever the budget
# and lifetime) or '', then the day window (`DayWindow`: a key of an account is held on its account's
# current period too). Returns {1 or 0 (taken or not), refusal or '', remaining_micros}: the least of what
# the key and its account's period have left.
RESERVE = """
local key = key_name(ARGV[1])
local amount, now, hold_id, regardless = tonumber(ARGV[2]), clock(ARGV[3]), ARGV[4], ARGV[9] == 'regardless'
local k = redis.call('HMGET', key, 'expires_at', 'revoked_at', 'budget_micros', 'spent_micros', 'held_micros',
                     'account_id', 'hold:' .. hold_id, 'cancelled:' .. hold_id)
if not k[1] then return {0, 'unknown', 0} end
if ARGV[5] ~= '' and (tonumber(k[3]) ~= tonumber(ARGV[5]) or tonumber(k[1]) ~= tonumber(ARGV[6])
                      or (k[6] or '') ~= ARGV[8]
                      or redis.sha1hex(redis.call('HGET', key, 'policy_json') or '') ~= ARGV[7]) then
    return {0, 'tampered', 0}
end
if k[7] then return {1, '', tonumber(hold_fields(k[7])[3])} end  -- this hold, asked for again
local key_remaining = tonumber(k[3]) - tonumber(k[4]) - tonumber(k[5])
local remaining, account_id, period_id, status = key_remaining, k[6], nil, nil
if account_id then
    local a = redis.call('HMGET', account_name(account_id), 'status', 'period', 'budget_micros')
    status = a[1]
    if status then
        period_id = current_period(a[2], now, 10)
        local p = redis.call('HMGET', period_name(account_id, period_id), 'spent_micros', 'held_micros',
                             'top_up_micros')
        remaining = math.min(remaining, account_remaining(a[3], p))
    end
end
if k[8] then return {0, 'cancelled', remaining} end
if k[2] then return {0, 'revoked', remaining} end
if not regardless and now >= tonumber(k[1]) then return {0, 'expired', remaining} end
if account_id and status ~= 'active' then return {0, 'suspended', remaining} end
if not regardless and amount > key_remaining then return {0, 'budget', remaining} end
if not regardless and amount > remaining then return {0, 'account_budget', remaining} end
incr(key, 'held_micros', amount)
incr(key, 'open_holds', 1)
redis.call('PERSIST', key)
local hold = string.format('%d %.6f %d', amount, now, remaining - amount)
if account_id then
    hold = hold .. ' ' .. account_id .. ' ' .. period_id
    incr(period_name(account_id, period_id), 'held_micros', amount)
    redis.call('SADD', periods_name(account_id), period_id)
end
redis.call('HSET', key, 'hold:' .. hold_id, hold)
redis.call('ZADD', OPEN_HOLDS, now, hold_id)
return {1, '', remaining - amount}
"""

# ARGV: account_id, created_at, then the record's field/value pairs. 1 if created, 0 if the id is taken.
CREATE_ACCOUNT = """
local account = account_name(ARGV[1])
if redis.call('EXISTS', account) == 1 then return 0 end
redis.call('HSET', account, unpack(ARGV, 3))
redis.call('ZADD', PREFIX .. 'accounts', ARGV[2], ARGV[1])
return 1
"""

# ARGV: account_id, then the field/value pairs to change. 1 if changed, 0 if the account is unknown.
UPDATE_ACCOUNT = """
local account = account_name(ARGV[1])
if redis.call('EXISTS', account) == 0 then return 0 end
redis.call('HSET', account, unpack(ARGV, 2))
return 1
"""

# ARGV: account_id, now. Revokes its keys (and their children), forgets it and its books. 1 if it existed.
DELETE_ACCOUNT = """
local account_id, now = ARGV[1], string.format('%.6f', clock(ARGV[2]))
for _, key_id in ipairs(redis.call('SMEMBERS', account_keys_name(account_id))) do
    revoke_tree(key_id, now)
end
for _, period_id in ipairs(redis.call('SMEMBERS', periods_name(account_id))) do
    redis.call('DEL', period_name(account_id, period_id))
end
redis.call('DEL', periods_name(account_id), account_keys_name(account_id))
redis.call('ZREM', PREFIX .. 'accounts', account_id)
return redis.call('DEL', account_name(account_id))
"""

# ARGV: account_id, amount_micros, now, then the day window (`DayWindow`). Returns the period's id and its
# spent, held and top_up, or an empty list if the account is unknown.
TOP_UP = """
local a = redis.call('HMGET', account_name(ARGV[1]), 'period')
if not a[1] then return {} end
local period_id = current_period(a[1], clock(ARGV[3]), 4)
local period = period_name(ARGV[1], period_id)
incr(period, 'top_up_micros', tonumber(ARGV[2]))
redis.call('SADD', periods_name(ARGV[1]), period_id)
local p = redis.call('HMGET', period, 'spent_micros', 'held_micros', 'top_up_micros')
return {period_id, p[1] or '0', p[2] or '0', p[3] or '0'}
"""

# ARGV: hold_id, amount_micros, now
SETTLE = """
if close_hold(ARGV[1], ARGV[2], clock(ARGV[3])) then return 1 end
return 0
"""

# ARGV: hold_id, now. Releases the hold, or remembers its name on its key so a late reserve takes nothing.
CANCEL = """
if close_hold(ARGV[1], 0, clock(ARGV[2])) then return 1 end
local key = key_name(key_of_hold(ARGV[1]) or '')
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'cancelled:' .. ARGV[1], 1) end
return 0
"""

# ARGV: now, then hold ids. Only holds still open are renewed (XX: a closed one is not brought back).
RENEW = """
local now = clock(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', OPEN_HOLDS, 'XX', now, ARGV[i]) end
return 0
"""

# ARGV: older_than_seconds, now. Returns a flat list of hold_id, key_id, amount_micros, created_at for
# each hold settled; holds whose key is gone leave the index.
SWEEP = """
local now = clock(ARGV[2])
local swept = {}
for _, hold_id in ipairs(redis.call('ZRANGEBYSCORE', OPEN_HOLDS, '-inf', '(' .. (now - tonumber(ARGV[1])))) do
    local hold = close_hold(hold_id, nil, now)
    if hold then
        redis.call('HSET', key_name(hold[1]), 'swept:' .. hold_id, 1)  -- for `was_swept`, gone with its key
        table.insert(swept, hold_id)
        table.insert(swept, hold[1])
        table.insert(swept, hold[2])
        table.insert(swept, hold[3])
    end
end
return swept
"""

# ARGV: now, limit. Returns finished children's grants to their parents, then removes up to `limit`
# expired keys with nothing open, those that expired first, with their children's list and their place in
# their parent's and their account's. Returns the ids of the keys it removed (including any whose TTL had
# already removed them).
PURGE = """
local now = clock(ARGV[1])
return_finished_grants(now)
local limit = tonumber(ARGV[2])
local purged, kept = {}, 0  -- kept: expired keys still in use, which stay in the index before the rest
while #purged < limit do
    local batch = redis.call('ZRANGEBYSCORE', KEYS_BY_EXPIRY, '-inf', now, 'LIMIT', kept, limit - #purged)
    if #batch == 0 then break end
    for _, key_id in ipairs(batch) do
        local key = key_name(key_id)
        local open = redis.call('HMGET', key, 'open_holds', 'grant_micros', 'parent_id', 'account_id')
        if not open[1] or (tonumber(open[1]) == 0 and tonumber(open[2] or 0) == 0) then
            if open[3] then redis.call('SREM', children_name(open[3]), key_id) end
            if open[4] then redis.call('SREM', account_keys_name(open[4]), key_id) end
            redis.call('DEL', key, children_name(key_id))
            redis.call('ZREM', KEYS_BY_CREATION, key_id)
            redis.call('ZREM', KEYS_BY_EXPIRY, key_id)
            table.insert(purged, key_id)
        else
            kept = kept + 1
        end
    end
end
return purged
"""


# KEYS: the claimed token's name. ARGV: expires_at, now. 1 if claimed, 0 if claimed already.
# The claim's TTL runs to the token's expiry on Redis's clock, so Redis forgets it by itself.
CLAIM_TOKEN = """
local now = clock(ARGV[2])
local claimed_until = redis.call('GET', KEYS[1])
if claimed_until and tonumber(claimed_until) > now then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', math.max(1, math.ceil(tonumber(ARGV[1]) - now)))
return 1
"""


# KEYS: the context's name. ARGV: tokens, started_at, expires_at, TTL seconds. As SqliteLedger's
# LEARN_CONTEXT: the larger figure wins; a forgetting newer than the measuring call stays.
LEARN_CONTEXT = """
local known = redis.call('HMGET', KEYS[1], 'tokens', 'changed_at', 'expires_at')
local tokens, changed, expires = ARGV[1], ARGV[2], ARGV[3]
if known[1] and tonumber(known[3]) > tonumber(ARGV[2]) then
    if tonumber(known[1]) < 0 and tonumber(known[2]) >= tonumber(ARGV[2]) then return 0 end
    if tonumber(known[1]) > tonumber(tokens) then tokens = known[1] end
    if tonumber(known[2]) > tonumber(changed) then changed = known[2] end
    if tonumber(known[3]) > tonumber(expires) then expires = known[3] end
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'changed_at', changed, 'expires_at', expires)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# KEYS: the context's name. ARGV: now, expires_at, TTL seconds.
FORGET_CONTEXT = """
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if expires and tonumber(expires) > tonumber(ARGV[2]) then ARGV[2] = expires end
redis.call('HSET', KEYS[1], 'tokens', -1, 'changed_at', ARGV[1], 'expires_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RedisLedger:
    def __init__(self, url: str, timeout_seconds: float = 1.0, calendar: Calendar | None = None):
        """`url`: redis://[[user]:password@]host:port/db, or rediss:// for TLS.

        Nothing is sent until the first operation, so a proxy starts while Redis is down and refuses
        calls until it is back. `timeout_seconds` bounds connecting and each answer: a refusal is better
        than a call that waits on an unreachable store.
        """
        self.calendar = calendar or Calendar()
        parts = urlsplit(url)
        self.where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            redis_connect_func=self._connected,
        )
        script = self._redis.register_script
        self._create = script(PRELUDE + CREATE_KEY + CREATE)
        self._revoke = script(PRELUDE + RETURN_FINISHED_GRANTS + REVOKE)
        self._create_child = script(PRELUDE + CREATE_KEY + CREATE_CHILD)
        self._reserve, self._settle = script(PRELUDE + RESERVE), script(PRELUDE + SETTLE)
        self._cancel, self._renew = script(PRELUDE + CANCEL), script(PRELUDE + RENEW)
        self._sweep, self._purge = script(PRELUDE + SWEEP), script(PRELUDE + RETURN_FINISHED_GRANTS + PURGE)
        self._claim_token = script(PRELUDE + CLAIM_TOKEN)
        self._create_account, self._update_account = script(PRELUDE + CREATE_ACCOUNT), script(PRELUDE + UPDATE_ACCOUNT)
        self._delete_account, self._top_up = script(PRELUDE + DELETE_ACCOUNT), script(PRELUDE + TOP_UP)
        self._take_limits, self._give_back = script(LIMITS_PRELUDE + TAKE), script(LIMITS_PRELUDE + GIVE_BACK)
        self._learn_context, self._forget_context = script(LEARN_CONTEXT), script(FORGET_CONTEXT)

    def _connected(self, connection) -> None:
        """Every new connection (a Redis restarted or replaced may be set up anew) first checks that Redis
        never evicts: an evicted key, hold or child would take its money out of the books."""
        connection.on_connect()
        connection.send_command("INFO", "memory")
        self.check_eviction_policy(connection.read_response())

    def check_eviction_policy(self, memory_info: str | dict) -> None:
        """StoreMisconfigured unless Redis's `maxmemory-policy` is `noeviction`.

        Every other policy may drop keys this store needs: `allkeys-*` any of them (key records, holds,
        indexes), `volatile-*` those with a TTL (idle keys, children whose budget is still held on their
        parent). With `noeviction` a full Redis refuses writes instead, and the proxy refuses calls (503).
        """
        if isinstance(memory_info, str):
            memory_info = dict(line.split(":", 1) for line in memory_info.splitlines() if ":" in line)
        policy = str(memory_info.get("maxmemory_policy", "")).strip()
        if policy != SAFE_EVICTION_POLICY:
            raise EvictingStore(
                f"store {self.where} may evict keys (maxmemory-policy {policy or 'unknown'}): an evicted key,"
                f" hold or child takes its money out of the books. Set `maxmemory-policy {SAFE_EVICTION_POLICY}`"
                " (redis.conf, or CONFIG SET): a full Redis then refuses writes, and the proxy refuses calls"
            )

    def refuse_if_evicting(self) -> None:
        """At start-up: StoreMisconfigured if Redis answers and may evict; nothing if it answers and may not,
        or does not answer yet (it is checked again on each new connection)."""
        try:
            self.ping()
        except StoreMisconfigured:
            raise
        except LedgerUnavailable:
            pass

    @contextmanager
    def _store(self):
        """Turn any failure of the store into LedgerUnavailable, so the gate refuses (fail closed)."""
        try:
            yield
        except EvictingStore as e:
            raise StoreMisconfigured(str(e)) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise LedgerUnavailable(f"store {self.where} unreachable: {e}") from e
        except redis.RedisError as e:  # out of memory, read-only replica, ...
            raise LedgerUnavailable(f"store {self.where} failed: {e}") from e

    def now(self) -> float:
        with self._store():
            seconds, microseconds = self._redis.time()
        return seconds + microseconds / 1_000_000

    def create_key(self, record: KeyRecord) -> None:
        with self._store():
            created = self._create(args=["", record.key_id, *field_pairs(record)])
        if not created:
            raise KeyExists(f"key {record.key_id} already exists")

    def create_child(self, record: KeyRecord, max_children: int, now: float | None = None) -> Refusal | None:
        child = replace(record, grant_micros=record.budget_micros)
        with self._store():
            refusal = self._create_child(
                args=[
                    record.parent_id,
                    max_children,
                    given(now),
                    child.budget_micros,
                    child.key_id,
                    *field_pairs(child),
                ]
            )
        if refusal == "exists":
            raise KeyExists(f"key {record.key_id} already exists")
        return Refusal(refusal) if refusal else None

    def children(self, key_id: str) -> list[KeyRecord]:
        with self._store():
            child_ids = self._redis.smembers(f"{PREFIX}children:{key_id}")
            found = self._records(child_ids)
        return sorted(found, key=lambda record: record.created_at)

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._store():
            return key_record(self._redis.hmget(key_name(key_id), KEY_FIELDS))

    def list_keys(self, offset: int = 0, limit: int | None = None) -> list[KeyRecord]:
        """Oldest first (a page: `limit` after `offset`). Not one snapshot: a key created or purged
        meanwhile may be in or out."""
        if limit == 0:
            return []
        last = -1 if limit is None else offset + limit - 1  # ZRANGE's stop is inclusive; -1 is the end
        with self._store():
            return self._records(self._redis.zrange(f"{PREFIX}keys", offset, last))

    def _records(self, key_ids) -> list[KeyRecord]:
        """The records of these keys in one round trip, leaving out any that no longer exist."""
        with self._redis.pipeline() as pipe:
            for key_id in key_ids:
                pipe.hmget(key_name(key_id), KEY_FIELDS)
            found = pipe.execute()
        return [record for record in map(key_record, found) if record is not None]

    def revoke(self, key_id: str, now: float | None = None) -> bool:
        with self._store():
            return bool(self._revoke(args=[key_id, given(now)]))

    def reserve(
        self,
        key_id: str,
        amount_micros: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
    ) -> Reservation:
        (reservation,) = self.reserve_many([(key_id, amount_micros, now, hold_id, grant)])
        return reservation

    def reserve_many(self, requests: list[tuple]) -> list[Reservation]:
        named = [self._hold(*request) for request in requests]
        answers = self._in_one_round_trip(self._reserve, [arguments for _, arguments in named])
        return [reservation(hold_id, answer) for (hold_id, _), answer in zip(named, answers, strict=True)]

    def hold_regardless(
        self,
        key_id: str,
        amount_micros: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
    ) -> Reservation:
        hold_id, arguments = self._hold(key_id, amount_micros, now, hold_id, grant, regardless=True)
        (answer,) = self._in_one_round_trip(self._reserve, [arguments])
        return reservation(hold_id, answer)

    def _hold(
        self,
        key_id: str,
        amount: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
        regardless: bool = False,
    ) -> tuple[str, list]:
        """A reserve's hold name (`new_hold_id` when the caller left that to the ledger) and RESERVE's arguments."""
        hold_id = named_hold(key_id, hold_id)
        checked = ("", "", "", "")
        if grant is not None:
            policy_sha = hashlib.sha1(grant.policy_json.encode()).hexdigest()
            checked = (grant.budget_micros, repr(grant.expires_at), policy_sha, grant.account_id or "")
        mode = "regardless" if regardless else ""
        return hold_id, [key_id, amount, given(now), hold_id, *checked, mode, *self._day_window(now)]

    def _day_window(self, now: float | None) -> list:
        """The periods around `now` (this machine's clock if None) for a script to pick from by Redis's clock."""
        return window_arguments(self.calendar.day_window(time.time() if now is None else now))

    def settle(self, hold_id: str, amount_micros: int) -> bool:
        """Turn a hold into `amount_micros` of spend (0 releases it). False if already settled or swept."""
        (settled,) = self.settle_many([(hold_id, amount_micros)])
        return settled

    def settle_many(self, settlements: list[tuple[str, int]]) -> list[bool]:
        answers = self._in_one_round_trip(self._settle, [(hold_id, amount, "") for hold_id, amount in settlements])
        return [bool(settled) for settled in answers]

    def was_swept(self, hold_id: str) -> bool:
        with self._store():
            return bool(self._redis.hexists(key_name(key_of_hold(hold_id)), f"swept:{hold_id}"))

    def cancel_hold(self, hold_id: str) -> bool:
        with self._store():
            return bool(self._cancel(args=[hold_id, ""]))

    def renew_holds(self, hold_ids: list[str], now: float | None = None) -> None:
        if hold_ids:
            with self._store():
                self._renew(args=[given(now), *hold_ids])

    def _in_one_round_trip(self, script, argument_lists: list[tuple]) -> list:
        """The script once per argument list, each atomic by itself, sent in one pipeline of EVALSHAs.

        Not redis-py's script pipeline, which asks SCRIPT EXISTS first: a second round trip, and one
        that can time out with the script itself never sent. A Redis that does not know the script
        (restarted) answers NOSCRIPT having run nothing, so loading it and sending again is safe.
        """
        with self._store():
            try:
                return self._evalsha_each(script, argument_lists)
            except redis.exceptions.NoScriptError:
                self._redis.script_load(script.script)
                return self._evalsha_each(script, argument_lists)

    def _evalsha_each(self, script, argument_lists: list[tuple]) -> list:
        pipeline = self._redis.pipeline(transaction=False)
        for arguments in argument_lists:
            pipeline.evalsha(script.sha, 0, *arguments)
        return pipeline.execute()

    def sweep_stale_holds(self, now: float | None, older_than_seconds: float) -> list[StaleHold]:
        """Settle holds left by dead calls at their full amount (see `Ledger.sweep_stale_holds`)."""
        with self._store():
            flat = self._sweep(args=[older_than_seconds, given(now)])
        swept = [
            StaleHold(hold_id, key_id, int(amount), float(created_at))
            for hold_id, key_id, amount, created_at in (flat[i : i + 4] for i in range(0, len(flat), 4))
        ]
        return sorted(swept, key=lambda hold: (hold.created_at, hold.hold_id))

    def purge_expired(self, now: float | None = None, limit: int = PURGE_BATCH) -> list[str]:
        """Delete up to `limit` keys past their expiry with nothing in flight; their audit records stay.
        (Claimed tokens need no purge: their TTL removes them.)"""
        with self._store():
            return self._purge(args=[given(now), limit])

    def ping(self) -> None:
        """Redis answers, and still never evicts (a `CONFIG SET` may have changed that since connecting)."""
        with self._store():
            self.check_eviction_policy(self._redis.info("memory"))

    def claim_token(self, issuer: str, jti: str, expires_at: float, now: float | None = None) -> bool:
        """Remember an exchanged token until it expires; False if it was claimed already (see `Ledger`)."""
        with self._store():
            return bool(self._claim_token(keys=[claimed_token_name(issuer, jti)], args=[expires_at, given(now)]))

    # ----- accounts -----

    def create_account(self, record: AccountRecord) -> None:
        with self._store():
            created = self._create_account(args=[record.account_id, record.created_at, *field_pairs(record)])
        if not created:
            raise AccountExists(f"account {record.account_id} already exists")

    def get_account(self, account_id: str) -> AccountRecord | None:
        with self._store():
            return account_record(self._redis.hmget(account_name(account_id), ACCOUNT_FIELDS))

    def list_accounts(self) -> list[AccountRecord]:
        with self._store():
            with self._redis.pipeline() as pipe:
                for account_id in self._redis.zrange(f"{PREFIX}accounts", 0, -1):
                    pipe.hmget(account_name(account_id), ACCOUNT_FIELDS)
                found = pipe.execute()
        return [record for record in map(account_record, found) if record is not None]

    def update_account(self, record: AccountRecord) -> bool:
        changed = {name: getattr(record, name) for name in ("name", "plan_name", "period", "budget_micros", "status")}
        with self._store():
            return bool(self._update_account(args=[record.account_id, *(i for pair in changed.items() for i in pair)]))

    def delete_account(self, account_id: str, now: float | None = None) -> bool:
        with self._store():
            return bool(self._delete_account(args=[account_id, given(now)]))

    def account_keys(self, account_id: str) -> list[KeyRecord]:
        """The account's keys; ids of keys that their TTL removed are dropped from its index on the way."""
        index = f"{PREFIX}account_keys:{account_id}"
        with self._store():
            key_ids = self._redis.smembers(index)
            found = self._records(key_ids)
            gone = key_ids - {record.key_id for record in found}
            if gone:
                self._redis.srem(index, *gone)
        return sorted(found, key=lambda record: (record.created_at, record.key_id))

    def top_up(self, account_id: str, amount_micros: int, now: float | None = None) -> PeriodSpend | None:
        with self._store():
            answer = self._top_up(args=[account_id, amount_micros, given(now), *self._day_window(now)])
        if not answer:
            return None
        period_id, spent, held, top_up = answer
        return PeriodSpend(account_id, period_id, int(spent), int(held), int(top_up))

    def account_periods(self, account_id: str) -> list[PeriodSpend]:
        with self._store():
            period_ids = sorted(self._redis.smembers(f"{PREFIX}periods:{account_id}"))
            with self._redis.pipeline() as pipe:
                for period_id in period_ids:
                    pipe.hmget(f"{PREFIX}period:{account_id}:{period_id}", PERIOD_FIELDS)
                found = pipe.execute()
        return [
            PeriodSpend(account_id, period_id, *(int(value or 0) for value in values))
            for period_id, values in zip(period_ids, found, strict=True)
        ]

    # ----- rate limits and the loop breaker -----

    def take_limits(self, request: LimitRequest, now: float) -> LimitAnswer:
        with self._store():
            return limit_answer(request, now, self._take_limits(args=[request_json(request), now]))

    def return_limits(self, ticket: LimitTicket, used_tokens: int | None, now: float) -> None:
        used = "" if used_tokens is None else used_tokens
        with self._store():
            self._give_back(args=[request_json(ticket.request), now, used])

    # ----- continuations -----

    def learn_context(self, ref: str, tokens: int, started_at: float, expires_at: float) -> None:
        """As `Ledger` says; Redis forgets the context by itself once its TTL (from the caller's clock) runs out."""
        seconds = max(1, math.ceil(expires_at - started_at))
        with self._store():
            self._learn_context(keys=[context_name(ref)], args=[tokens, started_at, expires_at, seconds])

    def forget_context(self, ref: str, now: float, expires_at: float) -> None:
        seconds = max(1, math.ceil(expires_at - now))
        with self._store():
            self._forget_context(keys=[context_name(ref)], args=[now, expires_at, seconds])

    def context_tokens(self, ref: str, now: float) -> int | None:
        with self._store():
            tokens, expires_at = self._redis.hmget(context_name(ref), "tokens", "expires_at")
        if tokens is None or int(tokens) < 0 or float(expires_at) <= now:
            return None
        return int(tokens)

    def close(self) -> None:
        self._redis.close()

    def nonblocking(self) -> None:
        """A network store cannot promise an answer without waiting."""
        return None


class EvictingStore(redis.RedisError):
    """Raised while connecting (where redis-py expects a RedisError) when Redis may evict keys."""


def given(now: float | None) -> float | str:
    """A time for a script: the one given, or '' for the script to read Redis's own clock."""
    return "" if now is None else now


def window_arguments(window: DayWindow) -> list:
    """A `DayWindow` as a script's arguments: the day's bounds, then the ids before, during and after it."""
    return [repr(window.starts_at), repr(window.ends_at), *astuple(window.before), *astuple(window.during),
            *astuple(window.after)]  # fmt: skip


def reservation(hold_id: str, answer: list) -> Reservation:
    """The reserve script's answer: [taken, refusal or empty, remaining]."""
    _, refusal, remaining = answer
    if refusal:
        return Reservation(None, Refusal(refusal), remaining)
    return Reservation(hold_id, None, remaining)


def field_pairs(record: KeyRecord | AccountRecord) -> list:
    """The record as HSET's field, value, field, value… (None fields left out)."""
    return [item for name, value in asdict(record).items() if value is not None for item in (name, value)]


def key_name(key_id: str) -> str:
    return f"{PREFIX}key:{key_id}"


def account_name(account_id: str) -> str:
    return f"{PREFIX}account:{account_id}"


def account_record(values: list[str | None]) -> AccountRecord | None:
    """An AccountRecord from its hash's fields in ACCOUNT_FIELDS order; None if the hash does not exist."""
    return hash_record(AccountRecord, ACCOUNT_FIELDS, ACCOUNT_NUMBER_FIELDS, values)


def claimed_token_name(issuer: str, jti: str) -> str:
    """A fixed-length name for any issuer and jti, with no way for one pair to spell another."""
    return f"{PREFIX}token:{hashlib.sha256(json.dumps([issuer, jti]).encode()).hexdigest()}"


def context_name(ref: str) -> str:
    """A context's key, hashed: the reference comes from the agent (a response id, a conversation id)."""
    return f"{PREFIX}context:{hashlib.sha256(ref.encode()).hexdigest()}"


def key_record(values: list[str | None]) -> KeyRecord | None:
    """A KeyRecord from the key hash's fields in KEY_FIELDS order; None if the hash does not exist."""
    return hash_record(KeyRecord, KEY_FIELDS, NUMBER_FIELDS, values)


def hash_record(record_type, field_names: list[str], numbers: dict, values: list[str | None]):
    """A record from a hash's fields in `field_names` order, numbers converted; None if the hash does not exist."""
    if values[0] is None:
        return None
    return record_type(
        **{
            name: numbers.get(name, str)(value) if value is not None else None
            for name, value in zip(field_names, values, strict=True)
        }
    )
