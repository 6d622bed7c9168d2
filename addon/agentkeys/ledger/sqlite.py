"""SQLite backend: one file, nothing to run. WAL mode so readers never block the proxy.

Every change is atomic even with other processes (the CLI, replicas) on the same file: the two
that every call makes, taking a hold and closing it, are each one statement, with triggers that
keep the key's `held_micros` and `spent_micros` in step; batches of them and the rarer changes use
`BEGIN IMMEDIATE`, which takes the write lock up front. A lock held longer than `busy_timeout` raises
LedgerUnavailable rather than waiting forever.
"""

import sqlite3
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import astuple, fields, replace
from pathlib import Path

from agentkeys.ledger.base import (
    PURGE_BATCH,
    KeyExists,
    KeyRecord,
    LedgerBusy,
    LedgerUnavailable,
    Refusal,
    Reservation,
    StaleHold,
)
from agentkeys.private import create_private_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id        TEXT PRIMARY KEY,
    key_hash      TEXT NOT NULL,
    name          TEXT NOT NULL,
    policy_name   TEXT NOT NULL,
    policy_json   TEXT NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    budget_micros INTEGER NOT NULL CHECK (budget_micros >= 0),
    spent_micros  INTEGER NOT NULL DEFAULT 0,
    held_micros   INTEGER NOT NULL DEFAULT 0,
    revoked_at    REAL,
    parent_id     TEXT,
    depth         INTEGER NOT NULL DEFAULT 0,
    grant_micros  INTEGER NOT NULL DEFAULT 0,
    identity_json TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_parent ON keys (parent_id);
-- The purge reads keys by expiry, and children whose grant is still out, a batch at a time.
CREATE INDEX IF NOT EXISTS keys_by_creation ON keys (created_at, key_id);  -- list_keys, a page at a time
CREATE INDEX IF NOT EXISTS keys_by_expiry ON keys (expires_at);
CREATE INDEX IF NOT EXISTS keys_with_grants ON keys (key_id) WHERE grant_micros > 0;
CREATE TABLE IF NOT EXISTS holds (
    hold_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id        TEXT NOT NULL REFERENCES keys(key_id),
    amount_micros INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    remaining_after_micros INTEGER,  -- what the key had left once this hold was taken
    charge_micros INTEGER  -- set once, to close the hold (see hold_closed)
);
-- A hold taken is held on its key.
CREATE TRIGGER IF NOT EXISTS hold_taken AFTER INSERT ON holds BEGIN
    UPDATE keys SET held_micros = held_micros + NEW.amount_micros WHERE key_id = NEW.key_id;
END;
-- A hold closed at a charge: released from its key, the charge spent, the hold gone.
CREATE TRIGGER IF NOT EXISTS hold_closed AFTER UPDATE OF charge_micros ON holds BEGIN
    UPDATE keys SET held_micros = held_micros - NEW.amount_micros, spent_micros = spent_micros + NEW.charge_micros
        WHERE key_id = NEW.key_id;
    DELETE FROM holds WHERE hold_id = NEW.hold_id;
END;
-- OIDC tokens already exchanged for a key (see `claim_token`), until they expire.
CREATE TABLE IF NOT EXISTS claimed_tokens (
    issuer     TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (issuer, jti)
);
"""
# Columns that files made by earlier versions lack, by table; added when such a file is opened.
ADDED_COLUMNS = {
    "holds": {"remaining_after_micros": "INTEGER", "charge_micros": "INTEGER"},
    "keys": {"identity_json": "TEXT"},
}
# The hold, taken only if the key is live and the amount fits what remains: one atomic statement.
TAKE_HOLD = (
    "INSERT INTO holds (key_id, amount_micros, created_at, remaining_after_micros)"
    " SELECT key_id, :amount, :now, budget_micros - spent_micros - held_micros - :amount FROM keys"
    " WHERE key_id = :key_id AND revoked_at IS NULL AND :now < expires_at"
    " AND budget_micros - spent_micros - held_micros >= :amount"
    " RETURNING hold_id, remaining_after_micros"
)
CLOSE_HOLD = "UPDATE holds SET charge_micros = ? WHERE hold_id = ? AND charge_micros IS NULL RETURNING hold_id"
KEY_COLUMNS = (
    "key_id, key_hash, name, policy_name, policy_json, created_at, expires_at,"
    " budget_micros, spent_micros, held_micros, revoked_at, parent_id, depth, grant_micros, identity_json"
)
# A token is claimed if it never was, or if its earlier claim has expired: one statement either way.
CLAIM_TOKEN = (
    "INSERT INTO claimed_tokens (issuer, jti, expires_at) VALUES (:issuer, :jti, :expires_at)"
    " ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at"
    " WHERE claimed_tokens.expires_at <= :now RETURNING 1"
)
PLACEHOLDERS = ", ".join("?" * len(fields(KeyRecord)))


class SqliteLedger:
    def __init__(self, path: str | Path, busy_timeout_seconds: float = 2.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            create_private_file(self.path)
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            self._use_wal(deadline=time.monotonic() + busy_timeout_seconds)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._add_missing_columns()
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise LedgerUnavailable(f"cannot open {self.path}: {e}") from e

    def _use_wal(self, deadline: float) -> None:
        """Switch the file to WAL, waiting out other openers: SQLite answers this pragma "locked" at
        once, without its busy handler, while another connection is switching the same new file."""
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _add_missing_columns(self) -> None:
        """Bring a file made by an earlier version up to this schema (a new file gets it from SCHEMA)."""
        for table, added in ADDED_COLUMNS.items():
            columns = [row[1] for row in self._db.execute(f"PRAGMA table_info({table})")]
            for name, kind in added.items():
                if columns and name not in columns:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @contextmanager
    def _transaction(self):
        """One write transaction; a busy or broken database becomes LedgerUnavailable."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                raise unavailable(self.path, e) from e

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """One statement on its own (a read, or a write that is atomic by itself): its rows."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                raise unavailable(self.path, e) from e

    def create_key(self, record: KeyRecord) -> None:
        with self._transaction() as db:
            insert_key(db, record)

    def create_child(self, record: KeyRecord, max_children: int, now: float) -> Refusal | None:
        with self._transaction() as db:
            parent = db.execute(
                "SELECT expires_at, revoked_at, budget_micros - spent_micros - held_micros FROM keys WHERE key_id = ?",
                (record.parent_id,),
            ).fetchone()
            if parent is None:
                return Refusal.UNKNOWN
            expires_at, revoked_at, remaining = parent
            if revoked_at is not None:
                return Refusal.REVOKED
            if now >= expires_at:
                return Refusal.EXPIRED
            (live_children,) = db.execute(
                "SELECT COUNT(*) FROM keys WHERE parent_id = ? AND grant_micros > 0", (record.parent_id,)
            ).fetchone()
            if live_children >= max_children:
                return Refusal.TOO_MANY_CHILDREN
            if record.budget_micros > remaining:
                return Refusal.BUDGET
            db.execute(
                "UPDATE keys SET held_micros = held_micros + ? WHERE key_id = ?",
                (record.budget_micros, record.parent_id),
            )
            insert_key(db, replace(record, grant_micros=record.budget_micros))
            return None

    def children(self, key_id: str) -> list[KeyRecord]:
        rows = self._query(f"SELECT {KEY_COLUMNS} FROM keys WHERE parent_id = ? ORDER BY created_at", (key_id,))
        return [KeyRecord(*row) for row in rows]

    def get_key(self, key_id: str) -> KeyRecord | None:
        rows = self._query(f"SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,))
        return KeyRecord(*rows[0]) if rows else None

    def list_keys(self, offset: int = 0, limit: int | None = None) -> list[KeyRecord]:
        page = (limit if limit is not None else -1, offset)  # SQLite: a negative limit is none
        query = f"SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at, key_id LIMIT ? OFFSET ?"
        return [KeyRecord(*row) for row in self._query(query, page)]

    def revoke(self, key_id: str, now: float) -> bool:
        with self._transaction() as db:
            active = db.execute("SELECT 1 FROM keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone()
            db.execute(
                "WITH RECURSIVE tree(key_id) AS (SELECT ? UNION ALL"
                " SELECT keys.key_id FROM keys JOIN tree ON keys.parent_id = tree.key_id)"
                " UPDATE keys SET revoked_at = ? WHERE key_id IN tree AND revoked_at IS NULL",
                (key_id, now),
            )
            return active is not None

    def reserve(self, key_id: str, amount_micros: int, now: float) -> Reservation:
        """Every call's first write, so one statement when the hold fits; else a transaction that says why."""
        taken = self._query(TAKE_HOLD, {"key_id": key_id, "amount": amount_micros, "now": now})
        if taken:
            ((hold_id, remaining),) = taken
            return Reservation(hold_id, None, remaining)
        return self._reserve_or_refuse(key_id, amount_micros, now)

    def _reserve_or_refuse(self, key_id: str, amount_micros: int, now: float) -> Reservation:
        """The hold did not fit a moment ago: look again under the write lock, and take it or say why not."""
        with self._transaction() as db:
            return take_hold_or_refuse(db, key_id, amount_micros, now)

    def reserve_many(self, requests: list[tuple[str, int, float]]) -> list[Reservation]:
        if len(requests) == 1:
            return [self.reserve(*requests[0])]
        with self._transaction() as db:
            return [take_hold(db, *request) or take_hold_or_refuse(db, *request) for request in requests]

    def settle(self, hold_id: int, amount_micros: int) -> bool:
        """Turn a hold into `amount_micros` of spend (0 releases it). False if already settled or swept."""
        return bool(self._query(CLOSE_HOLD, (amount_micros, hold_id)))

    def settle_many(self, settlements: list[tuple[int, int]]) -> list[bool]:
        """Many holds closed in one transaction: deleted in one statement, and each key's balances moved
        once for all of its holds (rather than once per hold, as `hold_closed` would)."""
        if len(settlements) == 1:
            return [self.settle(*settlements[0])]
        charges: dict[int, int] = {}
        for hold_id, amount in settlements:
            charges.setdefault(hold_id, amount)  # a hold named twice is closed by the first, as `settle` would
        with self._transaction() as db:
            closed = db.execute(
                f"DELETE FROM holds WHERE hold_id IN ({', '.join('?' * len(charges))}) AND charge_micros IS NULL"
                " RETURNING hold_id, key_id, amount_micros",
                tuple(charges),
            ).fetchall()
            released, spent = defaultdict(int), defaultdict(int)
            for hold_id, key_id, amount in closed:
                released[key_id] += amount
                spent[key_id] += charges[hold_id]
            db.executemany(
                "UPDATE keys SET held_micros = held_micros - ?, spent_micros = spent_micros + ? WHERE key_id = ?",
                [(released[key_id], spent[key_id], key_id) for key_id in released],
            )
        still_open = {hold_id for hold_id, _, _ in closed}
        answers = []
        for hold_id, _ in settlements:
            answers.append(hold_id in still_open)
            still_open.discard(hold_id)
        return answers

    def sweep_stale_holds(self, now: float, older_than_seconds: float) -> list[StaleHold]:
        """Settle holds left by dead calls at their full amount (see `Ledger.sweep_stale_holds`)."""
        rows = self._query(
            "UPDATE holds SET charge_micros = amount_micros WHERE created_at < ? AND charge_micros IS NULL"
            " RETURNING hold_id, key_id, amount_micros, created_at",
            (now - older_than_seconds,),
        )
        return sorted((StaleHold(*row) for row in rows), key=lambda hold: (hold.created_at, hold.hold_id))

    def purge_expired(self, now: float, limit: int = PURGE_BATCH) -> list[str]:
        """Return finished children's grants, then delete expired keys with nothing open (see `Ledger`)."""
        with self._transaction() as db:
            while finished := db.execute(
                "SELECT key_id, parent_id, grant_micros, spent_micros FROM keys"
                " WHERE grant_micros > 0 AND held_micros = 0 AND (revoked_at IS NOT NULL OR expires_at <= ?)",
                (now,),
            ).fetchall():  # returning a grandchild's grant can finish its parent: repeat until none is left
                for key_id, parent_id, grant, spent in finished:
                    db.execute(
                        "UPDATE keys SET held_micros = held_micros - ?, spent_micros = spent_micros + ?"
                        " WHERE key_id = ?",
                        (grant, spent, parent_id),
                    )
                    db.execute("UPDATE keys SET grant_micros = 0 WHERE key_id = ?", (key_id,))
            rows = db.execute(
                "SELECT key_id FROM keys WHERE expires_at <= ? AND held_micros = 0 AND grant_micros = 0"
                " AND NOT EXISTS (SELECT 1 FROM holds WHERE holds.key_id = keys.key_id) ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
            purged = [key_id for (key_id,) in rows]
            db.executemany("DELETE FROM keys WHERE key_id = ?", rows)
            db.execute("DELETE FROM claimed_tokens WHERE expires_at <= ?", (now,))
            return purged

    def ping(self) -> None:
        """Take the write lock and let it go: a store that cannot be written cannot take a hold either."""
        with self._transaction():
            pass

    def claim_token(self, issuer: str, jti: str, expires_at: float, now: float) -> bool:
        """Remember an exchanged token until it expires; False if it was claimed already (see `Ledger`)."""
        return bool(self._query(CLAIM_TOKEN, {"issuer": issuer, "jti": jti, "expires_at": expires_at, "now": now}))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def nonblocking(self) -> "SqliteLedger":
        """The same file with no busy wait: microseconds on the event loop, or LedgerBusy at once."""
        return type(self)(self.path, busy_timeout_seconds=0)


def insert_key(db: sqlite3.Connection, record: KeyRecord) -> None:
    try:
        db.execute(f"INSERT INTO keys ({KEY_COLUMNS}) VALUES ({PLACEHOLDERS})", astuple(record))
    except sqlite3.IntegrityError as e:
        raise KeyExists(f"key {record.key_id} already exists") from e


def take_hold(db: sqlite3.Connection, key_id: str, amount_micros: int, now: float) -> Reservation | None:
    """The hold, if the key is live and it fits; None if not (`take_hold_or_refuse` then says why)."""
    taken = db.execute(TAKE_HOLD, {"key_id": key_id, "amount": amount_micros, "now": now}).fetchall()
    if not taken:
        return None
    ((hold_id, remaining_after),) = taken
    return Reservation(hold_id, None, remaining_after)


def take_hold_or_refuse(db: sqlite3.Connection, key_id: str, amount_micros: int, now: float) -> Reservation:
    """Inside a transaction: take the hold, or say why not."""
    row = db.execute(
        "SELECT expires_at, revoked_at, budget_micros - spent_micros - held_micros FROM keys WHERE key_id = ?",
        (key_id,),
    ).fetchone()
    if row is None:
        return Reservation(None, Refusal.UNKNOWN)
    expires_at, revoked_at, remaining = row
    if revoked_at is not None:
        return Reservation(None, Refusal.REVOKED, remaining)
    if now >= expires_at:
        return Reservation(None, Refusal.EXPIRED, remaining)
    if amount_micros > remaining:
        return Reservation(None, Refusal.BUDGET, remaining)
    reservation = take_hold(db, key_id, amount_micros, now)
    assert reservation is not None, "the hold fit a moment ago, in this same transaction"
    return reservation


def unavailable(path: Path, error: sqlite3.OperationalError) -> LedgerUnavailable:
    if "locked" in str(error) or "busy" in str(error):
        return LedgerBusy(f"store {path} is locked by another writer: {error}")
    return LedgerUnavailable(f"store {path} unavailable: {error}")
