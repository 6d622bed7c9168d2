"""Rate limits and the loop breaker: which limits a call counts against, and what a refusal says.

A call counts against the limits of every "who" above it: its key, the key's parent and their
ancestors (a child can never call faster than the tree it was carved from), and any other level
that `Limiter.extra_levels` adds (an account's plan). The store takes all of them in one atomic step
(`Ledger.take_limits`), so the limits hold across replicas on Redis and across the processes that
share one SQLite file. A key whose tree sets no limit costs nothing here: no store operation at all.

The call's ticket is given back when it ends, whatever happens: at settlement its slot is freed and
its tokens corrected to what it used; a call never forwarded gives back everything it took.
"""

import asyncio
import hashlib
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from agentkeys.calls import CallRequest, Denial
from agentkeys.credentials import without_query_credentials
from agentkeys.ledger import KeyRecord, LimitRefusal, LimitRequest, LimitTicket
from agentkeys.ledger.limits import IdenticalAsk, RateAsk
from agentkeys.plans import PlanFile
from agentkeys.policy import IdenticalCalls, PolicyFile, RateLimits, Scope, format_duration, scope_of
from agentkeys.providers.base import DenyKind
from agentkeys.store import Store

log = logging.getLogger(__name__)

DIGEST_ON_LOOP_BYTES = 32 * 1024  # a larger body is digested on a worker thread (as the gate reads one)
# A who's call count (`max_calls`) is kept this long past its last call: longer than any key lives.
CALL_COUNT_LIFETIME = 3650 * 86400


@dataclass(frozen=True)
class Level:
    """One who a call counts against, the limits it sets, and how a refusal names it."""

    who: str  # "key:ID", "account:ID": the store's name for it
    described: str  # "key k_…", "parent key k_…", "account acme"
    rate_limits: RateLimits
    max_calls: int | None = None
    source: str = ""  # where the limits were set: "policy NAME", "plan NAME"

    @property
    def limited(self) -> bool:
        return self.rate_limits.any or self.max_calls is not None


ExtraLevels = Callable[[KeyRecord], Awaitable[list[Level]]]


async def no_extra_levels(key: KeyRecord) -> list[Level]:
    return []


def account_levels(store: Store, plans: dict[str, PlanFile]) -> ExtraLevels:
    """The level of a key's account, limited by its plan's `rate_limits`. Without any plan that sets a
    limit it asks the store nothing, so keys of accounts pay for it only where limits exist."""
    if not any(plan_file.plan.rate_limits.any for plan_file in plans.values()):
        return no_extra_levels

    async def levels(key: KeyRecord) -> list[Level]:
        if key.account_id is None:
            return []
        account = await store.account(key.account_id)
        plan_file = plans.get(account.plan_name) if account else None
        if plan_file is None or not plan_file.plan.rate_limits.any:
            return []
        plan = plan_file.plan
        who, described = f"account:{key.account_id}", f"account {key.account_id}"
        return [Level(who, described, plan.rate_limits, None, f"plan {plan.name}")]

    return levels


class Limiter:
    def __init__(
        self,
        store: Store,
        policies: dict[str, PolicyFile],
        stale_after: float,
        extra_levels: ExtraLevels = no_extra_levels,
    ):
        self.store = store
        self.policies = policies
        self.stale_after = stale_after
        self.extra_levels = extra_levels  # the levels above a key that are not keys (an account's plan)

    async def take(self, call: CallRequest, key: KeyRecord, policy: Scope, tokens: int) -> LimitTicket | None:
        """Count the call against every level's limits and the key's loop breaker; Denial if one refuses."""
        levels = await self.levels(key, policy)
        rates = tuple(ask_of(level) for level in levels if level.limited)
        identical = await identical_asks(call, key, policy.max_identical_calls)
        if not rates and not identical:
            return None
        request = LimitRequest(
            call_id=os.urandom(12).hex(), tokens=tokens, rates=rates, identical=identical,
            stale_after=self.stale_after, lifetime=CALL_COUNT_LIFETIME,
        )  # fmt: skip
        answer = await self.store.take_limits(request)
        if answer.refusal:
            raise refusal_denial(answer.refusal, levels, key, tokens)
        return answer.ticket

    async def levels(self, key: KeyRecord, policy: Scope) -> list[Level]:
        """The key's own limits, its ancestors' (their records never change but for spend: cached), and
        any level above them."""
        levels = [key_level(key, policy, f"key {key.key_id}")]
        parent_id = key.parent_id
        while parent_id is not None:
            parent = await self.store.known_key(parent_id)
            if parent is None:
                break
            scope = scope_of(parent.policy_json, self.policies)
            levels.append(key_level(parent, scope, f"parent key {parent.key_id}"))
            parent_id = parent.parent_id
        return levels + await self.extra_levels(key)

    async def give_back(self, ticket: LimitTicket | None, used_tokens: int | None) -> None:
        """The call has ended: `used_tokens` it used (None: it was never forwarded: all goes back). If the
        store fails, the slot frees itself once stale (`stale_hold_after`); the call's settlement stands."""
        if ticket is None:
            return
        try:
            await self.store.return_limits(ticket, used_tokens)
        except Exception:
            log.warning("giving back the rate limits of call %s failed", ticket.request.call_id, exc_info=True)

    @asynccontextmanager
    async def given_back_on_failure(self, ticket: LimitTicket | None):
        """Give the ticket back if the steps inside refuse or fail: the call will not be forwarded."""
        try:
            yield
        except BaseException:
            await self.give_back(ticket, None)
            raise


def key_level(key: KeyRecord, policy: Scope, described: str) -> Level:
    return Level(f"key:{key.key_id}", described, policy.rate_limits, policy.max_calls, f"policy {policy.name}")


def ask_of(level: Level) -> RateAsk:
    limits = level.rate_limits
    return RateAsk(
        level.who, limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_calls, level.max_calls
    )


async def identical_asks(call: CallRequest, key: KeyRecord, limits: list[IdenticalCalls]) -> tuple[IdenticalAsk, ...]:
    """The loop breaker's asks; a large body is digested off the loop, so it delays only its own call."""
    if not limits:
        return ()
    if len(call.body) > DIGEST_ON_LOOP_BYTES:
        digest = await asyncio.get_running_loop().run_in_executor(None, request_digest, call)
    else:
        digest = request_digest(call)
    return tuple(IdenticalAsk(f"key:{key.key_id}", digest, limit.calls, limit.window) for limit in limits)


def request_digest(call: CallRequest) -> str:
    """What makes two calls the same: provider, method, path, query (no credentials) and the parsed body,
    canonicalised (keys sorted, no spacing), so a loop is not hidden by reordered keys or whitespace.

    The body of a metered call was already read strictly (`providers.base.parse_json_object`) by then,
    so the plain parser is enough here, and three times faster."""
    try:
        body = json.dumps(json.loads(call.body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = call.body.decode("utf-8", "surrogateescape")  # not JSON (a GET's empty body): its bytes are all it is
    query = without_query_credentials(call.query)
    text = json.dumps([call.provider, call.method, call.path, query, body], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def used_tokens(tokens_counted: int, usage_tokens: int | None, charged: bool) -> int:
    """The tokens a call is counted for once it ends: the provider's usage when it reported one, the count
    taken at admission when it charged without one (the full hold), none when nothing was charged."""
    if usage_tokens is not None:
        return usage_tokens
    return tokens_counted if charged else 0


def refusal_denial(refusal: LimitRefusal, levels: list[Level], key: KeyRecord, tokens: int) -> Denial:
    """What the agent is told, naming the limit, the level that set it (its policy or plan) and when to retry."""
    level = next((level for level in levels if level.who == refusal.who), None)
    who = level.described if level else refusal.who
    source = f" of {level.source}" if level and level.source else ""
    allowed = refusal.allowed
    if refusal.limit == "max_identical_calls":
        window = format_duration(refusal.window_seconds or 0)
        message = (
            f"agentkeys: loop broken: {who} has sent this same request {allowed} times within {window}"
            f" (max_identical_calls: {allowed} per {window}{source}); an agent repeating itself is stuck,"
            " so the call is refused"
        )
        return Denial(DenyKind.LOOP, message, key)
    if refusal.limit == "max_calls":
        message = (
            f"agentkeys: loop broken: {who} has made all the {allowed:,} calls it may make"
            f" (max_calls: {allowed:,}{source}); it makes no more"
        )
        return Denial(DenyKind.LOOP, message, key)
    if refusal.retry_after is None:
        message = (
            f"agentkeys: this call counts up to {tokens:,} tokens (its input bound and output limit), more than"
            f" {who} may use in a minute (tokens_per_minute: {allowed:,}{source}); lower its max_tokens"
        )
        return Denial(DenyKind.RATE_LIMITED, message, key)
    limits = {
        "requests_per_minute": f"make {allowed:,} requests a minute",
        "tokens_per_minute": f"use {allowed:,} tokens a minute (this call counts up to {tokens:,})",
        "concurrent_calls": f"have {allowed:,} calls in flight at once",
    }
    wait = math.ceil(refusal.retry_after * 10) / 10
    message = (
        f"agentkeys: rate limit: {who} may {limits[refusal.limit]} ({refusal.limit}{source}); try again in {wait:g}s"
    )
    return Denial(DenyKind.RATE_LIMITED, message, key, retry_after=refusal.retry_after)
