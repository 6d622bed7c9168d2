"""Rate limits and the loop breaker in Redis: one script checks and takes all of a call's asks, so every
replica counts against the same buckets, slots and counts.

Data (beside the ledger's, under the same prefix), each with a TTL so an idle who leaves nothing behind:

    rate:{limit}:{who}     hash  level, at: a token bucket (see `ledger.limits`)
    slots:{who}            zset  call ids by the time each took its slot
    calls:{who}            str   calls counted against `max_calls`
    same:{who}:{digest}    zset  call ids with this body digest, by time (the loop breaker's window)
"""

import json

from agentkeys.ledger.limits import LimitAnswer, LimitRefusal, LimitRequest, LimitTicket, first_refusal

# Shared by both scripts: the request (ARGV[1], JSON), the clock (`now`), and each ask's buckets.
LIMITS_PRELUDE = """
local PREFIX = 'agentkeys:'
local r = cjson.decode(ARGV[1])
local now = tonumber(ARGV[2])

local function num(x) return string.format('%.17g', x) end
local function bucket_name(name, who) return PREFIX .. 'rate:' .. name .. ':' .. who end
local function slots_name(who) return PREFIX .. 'slots:' .. who end
local function calls_name(who) return PREFIX .. 'calls:' .. who end
local function same_name(who, digest) return PREFIX .. 'same:' .. who .. ':' .. digest end

local function drained(capacity, level, at)
    return math.max(0, level - math.max(0, now - at) * capacity / 60)
end
local function bucket(name, who)
    local v = redis.call('HMGET', bucket_name(name, who), 'level', 'at')
    if not v[1] then return 0, now end
    return tonumber(v[1]), tonumber(v[2])
end
local function move_bucket(name, who, capacity, weight)
    local level, at = bucket(name, who)
    local new = math.max(0, drained(capacity, level, at) + weight)
    redis.call('HSET', bucket_name(name, who), 'level', num(new), 'at', num(math.max(at, now)))
    redis.call('EXPIRE', bucket_name(name, who), math.ceil(new * 60 / capacity) + 60)
end
-- ask: {who, requests_per_minute, tokens_per_minute, concurrent_calls, max_calls}, 0 where not set
local function weights(ask)
    local found = {}
    if ask[2] > 0 then table.insert(found, {'requests_per_minute', ask[2], 1}) end
    if ask[3] > 0 and r.tokens > 0 then table.insert(found, {'tokens_per_minute', ask[3], r.tokens}) end
    return found
end
-- identical asks, {who, digest, limit, window}, once per who and digest, with the longest window
local function digests()
    local found, order = {}, {}
    for _, ask in ipairs(r.identical) do
        local name = same_name(ask[1], ask[2])
        if not found[name] then table.insert(order, name); found[name] = ask[4] end
        found[name] = math.max(found[name], ask[4])
    end
    return order, found
end
"""

# ARGV: request, now. Returns {} when every ask was taken, else the refusals, five values each:
# limit, who, allowed, retry_after in ms (-1: never), window in ms (-1: none).
TAKE = """
local refusals = {}
local function refuse(limit, who, allowed, retry_ms, window_ms)
    for _, v in ipairs({limit, who, allowed, retry_ms, window_ms}) do table.insert(refusals, v) end
end
for _, ask in ipairs(r.rates) do
    local who = ask[1]
    if ask[4] > 0 then
        redis.call('ZREMRANGEBYSCORE', slots_name(who), '-inf', '(' .. num(now - r.stale_after))
        if redis.call('ZCARD', slots_name(who)) >= ask[4] then refuse('concurrent_calls', who, ask[4], 1000, -1) end
    end
    for _, w in ipairs(weights(ask)) do
        local level, at = bucket(w[1], who)
        local over = drained(w[2], level, at) + w[3] - w[2]
        if over > 0 then
            local retry_ms = -1
            if w[3] <= w[2] then retry_ms = math.ceil(over * 60000 / w[2]) end
            refuse(w[1], who, w[2], retry_ms, -1)
        end
    end
    if ask[5] > 0 and tonumber(redis.call('GET', calls_name(who)) or 0) >= ask[5] then
        refuse('max_calls', who, ask[5], -1, -1)
    end
end
local names, longest = digests()
for _, name in ipairs(names) do
    redis.call('ZREMRANGEBYSCORE', name, '-inf', num(now - longest[name]))
end
for _, ask in ipairs(r.identical) do
    local seen = redis.call('ZCOUNT', same_name(ask[1], ask[2]), '(' .. num(now - ask[4]), '+inf')
    if seen >= ask[3] then refuse('max_identical_calls', ask[1], ask[3], -1, math.floor(ask[4] * 1000)) end
end
if #refusals > 0 then return refusals end
for _, ask in ipairs(r.rates) do
    local who = ask[1]
    if ask[4] > 0 then
        redis.call('ZADD', slots_name(who), num(now), r.call_id)
        redis.call('EXPIRE', slots_name(who), math.ceil(r.stale_after) + 60)
    end
    for _, w in ipairs(weights(ask)) do move_bucket(w[1], who, w[2], w[3]) end
    if ask[5] > 0 then
        redis.call('INCR', calls_name(who))
        redis.call('EXPIRE', calls_name(who), math.ceil(r.lifetime))
    end
end
for _, name in ipairs(names) do
    redis.call('ZADD', name, num(now), r.call_id)
    redis.call('EXPIRE', name, math.ceil(longest[name]) + 1)
end
return {}
"""

# ARGV: request, now, the tokens the call used ('': it was never forwarded: give everything back).
GIVE_BACK = """
local forwarded = ARGV[3] ~= ''
local used = tonumber(ARGV[3]) or 0
for _, ask in ipairs(r.rates) do
    local who = ask[1]
    redis.call('ZREM', slots_name(who), r.call_id)
    for _, w in ipairs(weights(ask)) do
        if w[1] == 'tokens_per_minute' then
            move_bucket(w[1], who, w[2], used - w[3])
        elseif not forwarded then
            move_bucket(w[1], who, w[2], -w[3])
        end
    end
    if ask[5] > 0 and not forwarded and tonumber(redis.call('GET', calls_name(who)) or 0) > 0 then
        redis.call('DECR', calls_name(who))
    end
end
if not forwarded then
    local names = digests()
    for _, name in ipairs(names) do redis.call('ZREM', name, r.call_id) end
end
return 1
"""


def request_json(request: LimitRequest) -> str:
    rates = [
        [ask.who, ask.requests_per_minute or 0, ask.tokens_per_minute or 0, ask.concurrent_calls or 0,
         ask.max_calls or 0]
        for ask in request.rates
    ]  # fmt: skip
    identical = [[ask.who, ask.digest, ask.limit, ask.window_seconds] for ask in request.identical]
    return json.dumps(
        {"call_id": request.call_id, "tokens": request.tokens, "stale_after": request.stale_after,
         "lifetime": request.lifetime, "rates": rates, "identical": identical}
    )  # fmt: skip


def limit_answer(request: LimitRequest, now: float, flat: list) -> LimitAnswer:
    """The take script's answer: {} (taken), or five values per refusal."""
    if not flat:
        return LimitAnswer(LimitTicket(request, now))
    refusals = [
        LimitRefusal(
            limit, who, int(allowed), None if int(retry_ms) < 0 else int(retry_ms) / 1000,
            None if int(window_ms) < 0 else int(window_ms) / 1000,
        )
        for limit, who, allowed, retry_ms, window_ms in (flat[i : i + 5] for i in range(0, len(flat), 5))
    ]  # fmt: skip
    return LimitAnswer(None, first_refusal(refusals))
