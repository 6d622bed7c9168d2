"""Rate limits and the loop breaker in SQLite: every process on the file (replicas on one host, the CLI)
counts against the same rows, each call's asks checked and taken in one write transaction."""

import sqlite3

from agentkeys.ledger.limits import (
    LimitAnswer,
    LimitRefusal,
    LimitRequest,
    LimitTicket,
    RateAsk,
    bucket_wait,
    drained,
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
    PRIMARY KEY (who, digest, call_id)
) WITHOUT ROWID;
"""
SAVE_BUCKET = (
    "INSERT INTO rate_buckets (who, limit_name, level, at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (who, limit_name) DO UPDATE SET level = excluded.level, at = excluded.at"
)
# Per-who state nobody has touched for this long is gone: a bucket drains in a minute, slots and
# identical-call entries are stale by then, and a call count outlives its key.
FORGOTTEN_AFTER = 7 * 86400


def take_limits(db: sqlite3.Connection, request: LimitRequest, now: float) -> LimitAnswer:
    """Inside a write transaction: every ask of `request` taken, or none and the refusal that decided it."""
    refusals = list(refusals_of(db, request, now))
    if refusals:
        return LimitAnswer(None, first_refusal(refusals))
    for ask in request.rates:
        if ask.concurrent_calls is not None:
            slot = (ask.who, request.call_id, now)
            db.execute("INSERT INTO call_slots (who, call_id, taken_at) VALUES (?, ?, ?)", slot)
        for name, capacity, weight in weights(ask, request):
            move_bucket(db, ask.who, name, capacity, weight, now)
        if ask.max_calls is not None:
            db.execute(
                "INSERT INTO call_counts (who, calls, last_at) VALUES (?, 1, ?)"
                " ON CONFLICT (who) DO UPDATE SET calls = calls + 1, last_at = excluded.last_at",
                (ask.who, now),
            )
    for who, digest in {(ask.who, ask.digest) for ask in request.identical}:
        db.execute(
            "INSERT INTO identical_calls (who, digest, call_id, at) VALUES (?, ?, ?, ?)",
            (who, digest, request.call_id, now),
        )
    return LimitAnswer(LimitTicket(request, now))


def refusals_of(db: sqlite3.Connection, request: LimitRequest, now: float):
    """The refusal of each limit the call does not fit."""
    for ask in request.rates:
        if ask.concurrent_calls is not None:
            db.execute("DELETE FROM call_slots WHERE who = ? AND taken_at < ?", (ask.who, now - request.stale_after))
            (taken,) = db.execute("SELECT COUNT(*) FROM call_slots WHERE who = ?", (ask.who,)).fetchone()
            if taken >= ask.concurrent_calls:
                yield LimitRefusal("concurrent_calls", ask.who, ask.concurrent_calls, 1.0)
        for name, capacity, weight in weights(ask, request):
            level, at = bucket(db, ask.who, name, now)
            wait = bucket_wait(capacity, level, at, weight, now)
            if wait:
                yield LimitRefusal(name, ask.who, capacity, wait if weight <= capacity else None)
        if ask.max_calls is not None:
            row = db.execute("SELECT calls FROM call_counts WHERE who = ?", (ask.who,)).fetchone()
            if row and row[0] >= ask.max_calls:
                yield LimitRefusal("max_calls", ask.who, ask.max_calls, None)
    if request.identical:
        longest = max(ask.window_seconds for ask in request.identical)
        for who, digest in {(ask.who, ask.digest) for ask in request.identical}:
            db.execute(
                "DELETE FROM identical_calls WHERE who = ? AND digest = ? AND at <= ?", (who, digest, now - longest)
            )
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
    for ask in request.rates:
        db.execute("DELETE FROM call_slots WHERE who = ? AND call_id = ?", (ask.who, request.call_id))
        for name, capacity, weight in weights(ask, request):
            given_back = weight - (used_tokens or 0) if name == "tokens_per_minute" else weight
            if name == "tokens_per_minute" or used_tokens is None:  # a request forwarded stays counted
                move_bucket(db, ask.who, name, capacity, -given_back, now)
        if ask.max_calls is not None and used_tokens is None:
            db.execute("UPDATE call_counts SET calls = MAX(calls - 1, 0) WHERE who = ?", (ask.who,))
    if used_tokens is None:
        for who, digest in {(ask.who, ask.digest) for ask in request.identical}:
            db.execute(
                "DELETE FROM identical_calls WHERE who = ? AND digest = ? AND call_id = ?",
                (who, digest, request.call_id),
            )


def forget_idle(db: sqlite3.Connection, now: float) -> None:
    """Drop per-who state untouched for FORGOTTEN_AFTER (see `purge_expired`)."""
    cutoff = now - FORGOTTEN_AFTER
    db.execute("DELETE FROM rate_buckets WHERE at < ?", (cutoff,))
    db.execute("DELETE FROM call_slots WHERE taken_at < ?", (cutoff,))
    db.execute("DELETE FROM call_counts WHERE last_at < ?", (cutoff,))
    db.execute("DELETE FROM identical_calls WHERE at < ?", (cutoff,))


def weights(ask: RateAsk, request: LimitRequest) -> list[tuple[str, int, int]]:
    """The buckets this ask counts in: (name, capacity per minute, the call's weight in it)."""
    found = []
    if ask.requests_per_minute is not None:
        found.append(("requests_per_minute", ask.requests_per_minute, 1))
    if ask.tokens_per_minute is not None and request.tokens:
        found.append(("tokens_per_minute", ask.tokens_per_minute, request.tokens))
    return found


def bucket(db: sqlite3.Connection, who: str, name: str, now: float) -> tuple[float, float]:
    row = db.execute("SELECT level, at FROM rate_buckets WHERE who = ? AND limit_name = ?", (who, name)).fetchone()
    return row or (0.0, now)


def move_bucket(db: sqlite3.Connection, who: str, name: str, capacity: int, weight: int, now: float) -> None:
    """Add `weight` (negative: give it back) to the bucket as it is at `now`."""
    level, at = bucket(db, who, name, now)
    db.execute(SAVE_BUCKET, (who, name, max(0.0, drained(capacity, level, at, now) + weight), max(at, now)))
