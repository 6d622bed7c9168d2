"""Rate limits and the loop breaker, as the store counts them: what one call asks, what it was given.

Everything a call counts against is named by a plain "who" (`key:ID`, `account:ID`), so the store
does not care whose limits they are: the gate lists them, the store takes them all in one atomic step
(one transaction in SQLite, one script in Redis) or none of them, and says which one refused.

Requests and tokens per minute are token buckets (as the providers' own limits are): a bucket holds a
minute's allowance, is refilled continuously, and a call takes its weight from it (1 request; its
tokens). So a who can make N calls at once, then one each 60/N seconds; in any T seconds at most
N + N*T/60. The bucket is stored as the weight in use (`level`) when last touched (`at`): it drains at
N per minute. Concurrent calls are slots, each with the time it was taken: a slot older than
`stale_after` (its proxy died) no longer counts, so a crash never keeps a who from calling.
"""

from dataclasses import dataclass

MINUTE = 60.0


@dataclass(frozen=True)
class RateAsk:
    """What one call takes from one who's limits (None: that limit is not set)."""

    who: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_calls: int | None = None
    max_calls: int | None = None  # in the who's whole life (a key's `max_calls`)


@dataclass(frozen=True)
class IdenticalAsk:
    """The loop breaker: at most `limit` calls with this body digest within `window_seconds`."""

    who: str
    digest: str
    limit: int
    window_seconds: float


@dataclass(frozen=True)
class LimitRequest:
    """One call's asks, taken together or not at all."""

    call_id: str  # names the call's slot and its identical-call entry, to give them back
    tokens: int  # the call's weight in tokens (its hold's bound); 0 for an unmetered call
    rates: tuple[RateAsk, ...] = ()
    identical: tuple[IdenticalAsk, ...] = ()
    stale_after: float = 900.0  # a slot older than this was left by a proxy that died
    lifetime: float = 86400.0  # how long a who's call count is kept after it was last counted


@dataclass(frozen=True)
class LimitRefusal:
    """Which limit refused the call, for which who, and when trying again could pass (None: it cannot)."""

    limit: str  # requests_per_minute | tokens_per_minute | concurrent_calls | max_calls | max_identical_calls
    who: str
    allowed: int
    retry_after: float | None
    window_seconds: float | None = None  # of a max_identical_calls refusal


@dataclass(frozen=True)
class LimitTicket:
    """What a call was given, to hand back when it ends (`Ledger.return_limits`)."""

    request: LimitRequest
    taken_at: float


@dataclass(frozen=True)
class LimitAnswer:
    ticket: LimitTicket | None
    refusal: LimitRefusal | None = None


def drained(capacity: int, level: float, at: float, now: float) -> float:
    """The weight still in a bucket of `capacity` per minute at `now`, that held `level` at `at`."""
    return max(0.0, level - max(0.0, now - at) * capacity / MINUTE)


def bucket_wait(capacity: int, level: float, at: float, weight: int, now: float) -> float:
    """Seconds until `weight` fits that bucket (0: it fits now)."""
    over = drained(capacity, level, at, now) + weight - capacity
    return max(0.0, over * MINUTE / capacity)


LOOP_LIMITS = ("max_calls", "max_identical_calls")


def first_refusal(refusals: list[LimitRefusal]) -> LimitRefusal:
    """The refusal to give: a loop's first (trying again cannot help), else the one that lasts longest."""
    loops = [refusal for refusal in refusals if refusal.limit in LOOP_LIMITS]
    if loops:
        return loops[0]
    return max(refusals, key=lambda refusal: float("inf") if refusal.retry_after is None else refusal.retry_after)
