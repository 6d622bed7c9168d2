"""SQLite backend: one file, nothing to run. WAL mode so readers never block the proxy.

Writes use `BEGIN IMMEDIATE`, which takes the write lock up front, so a reserve's check and its
hold are one atomic step even with a second process (the CLI) on the same file. A lock held
longer than `busy_timeout` raises LedgerUnavailable rather than waiting forever.
"""

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from agentkeys.ledger.base import KeyRecord, LedgerBusy, LedgerUnavailable, Refusal, Reservation

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
    revoked_at    REAL
);
CREATE TABLE IF NOT EXISTS holds (
    hold_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id        TEXT NOT NULL REFERENCES keys(key_id),
    amount_micros INTEGER NOT NULL,
    created_at    REAL NOT NULL
);
"""
KEY_COLUMNS = (
    "key_id, key_hash, name, policy_name, policy_json, created_at, expires_at,"
    " budget_micros, spent_micros, held_micros, revoked_at"
)


class SqliteLedger:
    def __init__(self, path: str | Path, busy_timeout_seconds: float = 2.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise LedgerUnavailable(f"cannot open {self.path}: {e}") from e

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
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                raise unavailable(self.path, e) from e

    def create_key(self, record: KeyRecord) -> None:
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key_id, record.key_hash, record.name, record.policy_name, record.policy_json,
                    record.created_at, record.expires_at, record.budget_micros, record.spent_micros,
                    record.held_micros, record.revoked_at,
                ),
            )  # fmt: skip

    def get_key(self, key_id: str) -> KeyRecord | None:
        rows = self._query(f"SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,))
        return KeyRecord(*rows[0]) if rows else None

    def list_keys(self) -> list[KeyRecord]:
        return [KeyRecord(*row) for row in self._query(f"SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at")]

    def revoke(self, key_id: str, now: float) -> bool:
        with self._transaction() as db:
            cursor = db.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now, key_id))
            return cursor.rowcount == 1

    def reserve(self, key_id: str, amount_micros: int, now: float) -> Reservation:
        with self._transaction() as db:
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
            db.execute("UPDATE keys SET held_micros = held_micros + ? WHERE key_id = ?", (amount_micros, key_id))
            cursor = db.execute(
                "INSERT INTO holds (key_id, amount_micros, created_at) VALUES (?, ?, ?)",
                (key_id, amount_micros, now),
            )
            return Reservation(cursor.lastrowid, None, remaining - amount_micros)

    def settle(self, hold_id: int, amount_micros: int) -> bool:
        """Turn a hold into `amount_micros` of spend (0 releases it). False if already settled."""
        with self._transaction() as db:
            row = db.execute("SELECT key_id, amount_micros FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
            if row is None:
                return False
            key_id, held = row
            db.execute("DELETE FROM holds WHERE hold_id = ?", (hold_id,))
            db.execute(
                "UPDATE keys SET held_micros = held_micros - ?, spent_micros = spent_micros + ? WHERE key_id = ?",
                (held, amount_micros, key_id),
            )
            return True

    def purge_expired(self, now: float) -> list[str]:
        """Delete keys past their expiry with nothing in flight; their audit records stay."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT key_id FROM keys WHERE expires_at <= ?"
                " AND NOT EXISTS (SELECT 1 FROM holds WHERE holds.key_id = keys.key_id)",
                (now,),
            ).fetchall()
            purged = [key_id for (key_id,) in rows]
            db.executemany("DELETE FROM keys WHERE key_id = ?", rows)
            return purged

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def nonblocking(self) -> "SqliteLedger":
        """The same file with no busy wait: microseconds on the event loop, or LedgerBusy at once."""
        return type(self)(self.path, busy_timeout_seconds=0)


def unavailable(path: Path, error: sqlite3.OperationalError) -> LedgerUnavailable:
    if "locked" in str(error) or "busy" in str(error):
        return LedgerBusy(f"store {path} is locked by another writer: {error}")
    return LedgerUnavailable(f"store {path} unavailable: {error}")
