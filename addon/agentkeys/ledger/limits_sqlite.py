"""Rate limits and the loop breaker in SQLite: every process on the file (replicas on one host, the CLI)
counts against the same rows, each call's asks checked and taken in one write transaction.

Every call with limits pays for this transaction, so it is kept to a few statements: a bucket is moved
by one upsert that drains it and adds the weight in SQL, and rows that no longer count (stale slots,
identical-call entries past their window) are skipped when counting and deleted at the next purge.
"""

import sqlite3

from agentkeys.ledger.limits import (
    MINUTE,
    LimitAnswer,
    LimitRefusal,
    LimitRequest,
    LimitTicket,
    RateAsk,
    bucket_wait,
    first_refusal,
)

LIMITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_buckets (
    who        TEXT NOT NULL,
    limit_name TEXT NOT NULL,  -- requests_per_minute | tokens_per_minute
    level      REAL NOT NULL,  -- the weight in the bucket at `at`; it drains at the limit per minute
    at         REAL NOT NULL,
    PRIMARY KEY (who, limit_name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS call_slots (
    who      TEXT NOT NULL,
    call_id  TEXT NOT NULL,
    taken_at REAL NOT NULL,
    PRIMARY KEY (who, call_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS call_counts (
    who     TEXT PRIMARY KEY,
    calls   INTEGER NOT NULL,
    last_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identical_calls (
    who     TEXT NOT NULL,
    digest  TEXT NOT NULL,
    call_id TEXT NOT NULL,
    at      REAL NOT NULL,
    until   REAL NOT NULL,  -- past this it is outside every window that counts it: the purge deletes it
    PRIMARY KEY (who, digest, call_id)
) WITHOUT ROWID;
"""
# A bucket drained to `now` (as `ledger.limits.drained`), with `weight` added (negative: given back).
MOVE_BUCKET = (
    "INSERT INTO rate_buckets (who, limit_name, level, at) VALUES (:who, :name, MAX(0.0, :weight), :now)"
    " ON CONFLICT (who, limit_name) DO UPDATE SET"
    " level = MAX(0.0, MAX(0.0, level - MAX(0.0, :now - at) * :capacity / :minute) + :weight), at = MAX(at, :now)"
)
COUNTS = (
    "SELECT (SELECT COUNT(*) FROM call_slots WHERE who = :who AND taken_at >= :since),"
    " (SELECT calls FROM call_counts WHERE who = :who)"
)
# Per-who state nobody has touched for this long is gone: a bucket drains in a minute, slots are stale
# by then, and a call count outlives its key.
FORGOTTEN_AFTER = 7 * 86400


def take_limits(db: sqlite3.Connection, request: LimitRequest, now: float) -> LimitAnswer:
    """Inside a write transaction: every ask of `request` taken, or none and the refusal that decided it."""
    refusals = list(refusals_of(db, request, now))
    if refusals:
        return LimitAnswer(None, first_refusal(refusals))
    slots = [(ask.who, request.call_id, now) for ask in request.rates if ask.concurrent_calls is not None]
    execute_each(db, "INSERT INTO call_slots (who, call_id, taken_at) VALUES (?, ?, ?)", slots)
    execute_each(db, MOVE_BUCKET, bucket_moves(request, now, given_back=False))
    execute_each(
        db,
        "INSERT INTO call_counts (who, calls, last_at) VALUES (?, 1, ?)"
        " ON CONFLICT (who) DO UPDATE SET calls = calls + 1, last_at = excluded.last_at",
        [(ask.who, now) for ask in request.rates if ask.max_calls is not None],
    )
    execute_each(
        db,
        "INSERT INTO identical_calls (who, digest, call_id, at, until) VALUES (?, ?, ?, ?, ?)",
        [(who, digest, request.call_id, now, now + window) for (who, digest), window in digests(request).items()],
    )
    return LimitAnswer(LimitTicket(request, now))


def refusals_of(db: sqlite3.Connection, request: LimitRequest, now: float):
    """The refusal of each limit the call does not fit."""
    for ask in request.rates:
        taken, calls = db.execute(COUNTS, {"who": ask.who, "since": now - request.stale_after}).fetchone()
        if ask.concurrent_calls is not None and taken >= ask.concurrent_calls:
            yield LimitRefusal("concurrent_calls", ask.who, ask.concurrent_calls, 1.0)
        buckets = {name: (level, at) for name, level, at in db.execute(
            "SELECT limit_name, level, at FROM rate_buckets WHERE who = ?", (ask.who,))}  # fmt: skip
        for name, capacity, weight in weights(ask, request):
            level, at = buckets.get(name, (0.0, now))
            wait = bucket_wait(capacity, level, at, weight, now)
            if wait:
                yield LimitRefusal(name, ask.who, capacity, wait if weight <= capacity else None)
        if ask.max_calls is not None and calls is not None and calls >= ask.max_calls:
            yield LimitRefusal("max_calls", ask.who, ask.max_calls, None)
    for ask in request.identical:
        (seen,) = db.execute(
            "SELECT COUNT(*) FROM identical_calls WHERE who = ? AND digest = ? AND at > ?",
            (ask.who, ask.digest, now - ask.window_seconds),
        ).fetchone()
        if seen >= ask.limit:
            yield LimitRefusal("max_identical_calls", ask.who, ask.limit, None, ask.window_seconds)


def return_limits(db: sqlite3.Connection, ticket: LimitTicket, used_tokens: int | None, now: float) -> None:
    """Inside a write transaction: give back a call's slot; and its tokens beyond `used_tokens` (more
    taken when it used more); `used_tokens` None: the call was never forwarded, everything goes back."""
    request = ticket.request
    execute_each(
        db,
        "DELETE FROM call_slots WHERE who = ? AND call_id = ?",
        [(ask.who, request.call_id) for ask in request.rates if ask.concurrent_calls is not None],
    )
    execute_each(db, MOVE_BUCKET, bucket_moves(request, now, given_back=True, used_tokens=used_tokens))
    if used_tokens is not None:
        return
    execute_each(
        db,
        "UPDATE call_counts SET calls = MAX(calls - 1, 0) WHERE who = ?",
        [(ask.who,) for ask in request.rates if ask.max_calls is not None],
    )
    execute_each(
        db,
        "DELETE FROM identical_calls WHERE who = ? AND digest = ? AND call_id = ?",
        [(who, digest, request.call_id) for who, digest in digests(request)],
    )


def forget_idle(db: sqlite3.Connection, now: float) -> None:
    """Drop rows that no longer count (see `purge_expired`)."""
    cutoff = now - FORGOTTEN_AFTER
    db.execute("DELETE FROM rate_buckets WHERE at < ?", (cutoff,))
    db.execute("DELETE FROM call_slots WHERE taken_at < ?", (cutoff,))
    db.execute("DELETE FROM call_counts WHERE last_at < ?", (cutoff,))
    db.execute("DELETE FROM identical_calls WHERE until < ?", (now,))


def weights(ask: RateAsk, request: LimitRequest) -> list[tuple[str, int, int]]:
    """The buckets this ask counts in: (name, capacity per minute, the call's weight in it)."""
    found = []
    if ask.requests_per_minute is not None:
        found.append(("requests_per_minute", ask.requests_per_minute, 1))
    if ask.tokens_per_minute is not None and request.tokens:
        found.append(("tokens_per_minute", ask.tokens_per_minute, request.tokens))
    return found


def bucket_moves(request: LimitRequest, now: float, given_back: bool, used_tokens: int | None = None) -> list[dict]:
    """MOVE_BUCKET's parameters for each bucket of the call: its weight taken, or (`given_back`) its
    tokens corrected to `used_tokens`, and, when it was never forwarded (None), its request too."""
    moves = []
    for ask in request.rates:
        for name, capacity, weight in weights(ask, request):
            if not given_back:
                moved = weight
            elif name == "tokens_per_minute":
                moved = (used_tokens or 0) - weight
            elif used_tokens is None:
                moved = -weight
            else:
                continue  # a request forwarded stays counted
            moves.append({"who": ask.who, "name": name, "weight": moved, "now": now, "capacity": capacity,
                          "minute": MINUTE})  # fmt: skip
    return moves


def digests(request: LimitRequest) -> dict[tuple[str, str], float]:
    """Each (who, digest) the loop breaker counts the call under, with its longest window."""
    longest: dict[tuple[str, str], float] = {}
    for ask in request.identical:
        longest[ask.who, ask.digest] = max(longest.get((ask.who, ask.digest), 0.0), ask.window_seconds)
    return longest


def execute_each(db: sqlite3.Connection, sql: str, rows: list) -> None:
    """`executemany`, skipped when there is nothing to do (most calls set only some limits)."""
    if rows:
        db.executemany(sql, rows)
