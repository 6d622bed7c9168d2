"""SQLite backend: one file, nothing to run. WAL mode so readers never block the proxy.

Every change is atomic even with other processes (the CLI, replicas) on the same file: the two
that every call makes, taking a hold and closing it, are each one statement, with triggers that
keep the key's `held_micros` and `spent_micros` in step; batches of them and the rarer changes use
`BEGIN IMMEDIATE`, which takes the write lock up front. A lock held longer than `busy_timeout` raises
LedgerUnavailable rather than waiting forever.

Time: a SQLite file is on one machine's local disk, so every proxy sharing it reads the one clock of
that machine; the ledger reads it itself (`time.time()`) for every `now` the caller leaves out.
Holds are named by the proxy (`new_hold_id`), as on Redis.
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
    AccountExists,
    AccountRecord,
    KeyExists,
    KeyRecord,
    LedgerBusy,
    LedgerUnavailable,
    PeriodSpend,
    Refusal,
    Reservation,
    StaleHold,
    key_of_hold,
    named_hold,
)
from agentkeys.ledger.limits import LimitAnswer, LimitRequest, LimitTicket
from agentkeys.ledger.limits_sqlite import LIMITS_SCHEMA, forget_idle, return_limits, take_limits
from agentkeys.ledger.periods import Calendar
from agentkeys.private import create_private_file

HOLDS_TABLE = """
CREATE TABLE IF NOT EXISTS holds (
    hold_id       TEXT PRIMARY KEY,  -- named by the proxy: its key's id, a dot, random (see new_hold_id)
    key_id        TEXT NOT NULL REFERENCES keys(key_id),
    amount_micros INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    renewed_at    REAL NOT NULL,  -- when its proxy last said its call is alive (sweep_stale_holds)
    remaining_after_micros INTEGER,  -- what the key (and its account's period) had left once it was taken
    charge_micros INTEGER,  -- set once, to close the hold (see hold_closed_in_period)
    account_id    TEXT,  -- the key's account, and the period the hold is charged to whenever it closes
    period_id     TEXT
);
"""
SCHEMA = (
    """
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
    identity_json TEXT,
    account_id    TEXT,
    seal          TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_parent ON keys (parent_id);
-- The purge reads keys by expiry, and children whose grant is still out, a batch at a time.
CREATE INDEX IF NOT EXISTS keys_by_creation ON keys (created_at, key_id);  -- list_keys, a page at a time
CREATE INDEX IF NOT EXISTS keys_by_expiry ON keys (expires_at);
CREATE INDEX IF NOT EXISTS keys_with_grants ON keys (key_id) WHERE grant_micros > 0;
"""
    + HOLDS_TABLE
    + """-- Names of holds cancelled before (or without) their reserve reaching the store (see cancel_hold).
CREATE TABLE IF NOT EXISTS cancelled_holds (
    hold_id TEXT PRIMARY KEY,
    key_id  TEXT NOT NULL
);
-- Holds a sweep settled, until their key is purged (see was_swept).
CREATE TABLE IF NOT EXISTS swept_holds (
    hold_id TEXT PRIMARY KEY,
    key_id  TEXT NOT NULL
);
-- OIDC tokens already exchanged for a key (see `claim_token`), until they expire.
CREATE TABLE IF NOT EXISTS claimed_tokens (
    issuer     TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (issuer, jti)
);
-- What a stored response or a conversation carries into a call that continues it (`learn_context`);
-- tokens -1: forgotten at changed_at (something was added that no call has measured).
CREATE TABLE IF NOT EXISTS contexts (
    ref        TEXT PRIMARY KEY,
    tokens     INTEGER NOT NULL,
    changed_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""
)
# Accounts (users or tenants of the operator's product) and their books, one row per period.
ACCOUNTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id    TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    plan_name     TEXT NOT NULL,
    period        TEXT NOT NULL,
    budget_micros INTEGER NOT NULL CHECK (budget_micros >= 0),
    created_at    REAL NOT NULL,
    status        TEXT NOT NULL DEFAULT 'active'
);
CREATE TABLE IF NOT EXISTS account_periods (
    account_id    TEXT NOT NULL,
    period_id     TEXT NOT NULL,
    spent_micros  INTEGER NOT NULL DEFAULT 0,
    held_micros   INTEGER NOT NULL DEFAULT 0,
    top_up_micros INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, period_id)
);
CREATE INDEX IF NOT EXISTS keys_by_account ON keys (account_id);
"""
# The books kept by the store itself, on every hold taken and closed.
TRIGGERS = """
-- A hold taken is held on its key, and on its account's period if the key has an account.
CREATE TRIGGER IF NOT EXISTS hold_taken_in_period AFTER INSERT ON holds BEGIN
    UPDATE keys SET held_micros = held_micros + NEW.amount_micros WHERE key_id = NEW.key_id;
    INSERT INTO account_periods (account_id, period_id, held_micros)
        SELECT NEW.account_id, NEW.period_id, NEW.amount_micros WHERE NEW.account_id IS NOT NULL
        ON CONFLICT (account_id, period_id) DO UPDATE SET held_micros = held_micros + excluded.held_micros;
END;
-- A hold closed at a charge: released from its key (and period), the charge spent, the hold gone.
CREATE TRIGGER IF NOT EXISTS hold_closed_in_period AFTER UPDATE OF charge_micros ON holds BEGIN
    UPDATE keys SET held_micros = held_micros - NEW.amount_micros, spent_micros = spent_micros + NEW.charge_micros
        WHERE key_id = NEW.key_id;
    UPDATE account_periods
        SET held_micros = held_micros - NEW.amount_micros, spent_micros = spent_micros + NEW.charge_micros
        WHERE account_id = NEW.account_id AND period_id = NEW.period_id;
    DELETE FROM holds WHERE hold_id = NEW.hold_id;
END;
"""
SCHEMA += ACCOUNTS_SCHEMA + TRIGGERS
# Columns that files made by earlier versions lack, by table; added when such a file is opened.
ADDED_COLUMNS = {
    "holds": {
        "remaining_after_micros": "INTEGER",
        "charge_micros": "INTEGER",
        "account_id": "TEXT",
        "period_id": "TEXT",
    },
    "keys": {"identity_json": "TEXT", "account_id": "TEXT", "seal": "TEXT"},
}
# Files made by earlier versions numbered their holds; such a table is renamed, and its open holds
# copied into the named one (each named after its key and its old number).
NUMBERED_HOLDS = "holds_numbered"
COPY_NUMBERED_HOLDS = (
    "INSERT INTO holds (hold_id, key_id, amount_micros, created_at, renewed_at, remaining_after_micros,"
    " account_id, period_id)"
    " SELECT key_id || '.' || hold_id, key_id, amount_micros, created_at, created_at, remaining_after_micros,"
    f" account_id, period_id FROM {NUMBERED_HOLDS} WHERE charge_micros IS NULL"
)
# Triggers of earlier versions, which knew no accounts: replaced in one transaction when such a file is opened.
REPLACED_TRIGGERS = ("hold_taken", "hold_closed")
CURRENT_TRIGGERS = ("hold_taken_in_period", "hold_closed_in_period")
# Which of :day, :week and :month is the current period of the key's account `a`.
ACCOUNT_PERIOD = "(CASE a.period WHEN 'day' THEN :day WHEN 'week' THEN :week ELSE :month END)"
# A key `k` with its account `a` and that account's current period `p` (NULL where there is none).
KEY_ACCOUNT_PERIOD = (
    "keys k LEFT JOIN accounts a ON a.account_id = k.account_id"
    f" LEFT JOIN account_periods p ON p.account_id = k.account_id AND p.period_id = {ACCOUNT_PERIOD}"
)
KEY_REMAINING = "(k.budget_micros - k.spent_micros - k.held_micros)"
ACCOUNT_REMAINING = (
    "(a.budget_micros + COALESCE(p.top_up_micros, 0) - COALESCE(p.spent_micros, 0) - COALESCE(p.held_micros, 0))"
)
# The least of what remains to the key and to its account's period (the key's alone without an account).
REMAINING = f"MIN({KEY_REMAINING}, COALESCE({ACCOUNT_REMAINING}, {KEY_REMAINING}))"
# The hold, taken only if the key is live and the amount fits what remains to it and, for a key of an
# account, the account is active and the amount fits its current period: one atomic statement. A name
# taken already is ignored (the caller then finds that hold, or learns why not), as is a name cancelled;
# and nothing is taken if the key's record no longer grants what the proxy verified (:budget and on).
NAMED_HOLD = (
    "INSERT OR IGNORE INTO holds"
    " (hold_id, key_id, amount_micros, created_at, renewed_at, remaining_after_micros, account_id, period_id)"
    f" SELECT :hold_id, k.key_id, :amount, :now, :now, {REMAINING} - :amount, a.account_id,"
    f" CASE WHEN a.account_id IS NOT NULL THEN {ACCOUNT_PERIOD} END"
    f" FROM {KEY_ACCOUNT_PERIOD}"
    " WHERE k.key_id = :key_id AND k.revoked_at IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM cancelled_holds WHERE hold_id = :hold_id)"
    " AND (:budget IS NULL OR (k.budget_micros = :budget AND k.expires_at = :expires_at"
    " AND k.policy_json = :policy_json AND k.account_id IS :account_id))"
)
TAKE_HOLD = (
    NAMED_HOLD
    + " AND :now < k.expires_at"
    + f" AND {KEY_REMAINING} >= :amount"
    + f" AND (k.account_id IS NULL OR (a.status = 'active' AND {ACCOUNT_REMAINING} >= :amount))"
    + " RETURNING hold_id, remaining_after_micros"
)
# Shadow mode's hold: taken whatever the budget and lifetime, for a key that is known and not revoked
# (and, for a key of an account, whose account is active), on its account's current period as any hold.
TAKE_HOLD_REGARDLESS = (
    NAMED_HOLD + " AND (k.account_id IS NULL OR a.status = 'active')" + " RETURNING hold_id, remaining_after_micros"
)
CLOSE_HOLD = (
    "UPDATE holds SET charge_micros = ? WHERE hold_id = ? AND key_id = ? AND charge_micros IS NULL RETURNING hold_id"
)
KEY_COLUMNS = (
    "key_id, key_hash, name, policy_name, policy_json, created_at, expires_at,"
    " budget_micros, spent_micros, held_micros, revoked_at, parent_id, depth, grant_micros, identity_json, account_id,"
    " seal"
)
ACCOUNT_COLUMNS = "account_id, name, plan_name, period, budget_micros, created_at, status"
PERIOD_COLUMNS = "account_id, period_id, spent_micros, held_micros, top_up_micros"
# A token is claimed if it never was, or if its earlier claim has expired: one statement either way.
CLAIM_TOKEN = (
    "INSERT INTO claimed_tokens (issuer, jti, expires_at) VALUES (:issuer, :jti, :expires_at)"
    " ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at"
    " WHERE claimed_tokens.expires_at <= :now RETURNING 1"
)
# The larger figure wins; a forgetting newer than the call that measured stays; an expired row is replaced.
LEARN_CONTEXT = (
    "INSERT INTO contexts (ref, tokens, changed_at, expires_at) VALUES (:ref, :tokens, :started_at, :expires_at)"
    " ON CONFLICT (ref) DO UPDATE SET"
    " tokens = CASE WHEN contexts.tokens < 0 OR contexts.expires_at <= :started_at THEN excluded.tokens"
    " ELSE max(contexts.tokens, excluded.tokens) END,"
    " changed_at = max(contexts.changed_at, excluded.changed_at),"
    " expires_at = max(contexts.expires_at, excluded.expires_at)"
    " WHERE contexts.tokens >= 0 OR contexts.changed_at < :started_at OR contexts.expires_at <= :started_at"
)
FORGET_CONTEXT = (
    "INSERT INTO contexts (ref, tokens, changed_at, expires_at) VALUES (:ref, -1, :now, :expires_at)"
    " ON CONFLICT (ref) DO UPDATE SET tokens = -1, changed_at = :now,"
    " expires_at = max(contexts.expires_at, excluded.expires_at)"
)
PLACEHOLDERS = ", ".join("?" * len(fields(KeyRecord)))


class SqliteLedger:
    def __init__(self, path: str | Path, busy_timeout_seconds: float = 2.0, calendar: Calendar | None = None):
        self.path = Path(path)
        self.calendar = calendar or Calendar()
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
            self._name_numbered_holds()
            self._replace_old_triggers()
            self._db.executescript(SCHEMA + LIMITS_SCHEMA)
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

    def _name_numbered_holds(self) -> None:
        """Bring a file whose holds were numbered (earlier versions) to named holds, keeping its open ones."""
        if not self._holds_are_numbered():
            return
        with self._transaction() as db:
            if not self._holds_are_numbered():  # another opener did it first
                return
            db.execute(f"ALTER TABLE holds RENAME TO {NUMBERED_HOLDS}")
            for trigger in REPLACED_TRIGGERS + CURRENT_TRIGGERS:  # they went with the renamed table
                db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
            db.execute(HOLDS_TABLE)
            db.execute(COPY_NUMBERED_HOLDS)  # before the triggers exist again: the keys and periods hold these
            db.execute(f"DROP TABLE {NUMBERED_HOLDS}")
            for statement in statements(ACCOUNTS_SCHEMA + TRIGGERS):  # in this transaction: no hold escapes them
                db.execute(statement)

    def _holds_are_numbered(self) -> bool:
        columns = {row[1]: row[2] for row in self._db.execute("PRAGMA table_info(holds)")}
        return columns.get("hold_id", "").upper() == "INTEGER"

    def _replace_old_triggers(self) -> None:
        """Drop the triggers of a file made before accounts, in the transaction that creates their successors,
        so no hold is ever taken with neither in place."""
        names = ", ".join("?" * len(REPLACED_TRIGGERS))
        if not self._db.execute(
            f"SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name IN ({names})", REPLACED_TRIGGERS
        ).fetchone():
            return
        drops = "".join(f"DROP TRIGGER IF EXISTS {name};" for name in REPLACED_TRIGGERS)
        self._db.executescript(f"BEGIN IMMEDIATE; {drops} {ACCOUNTS_SCHEMA} {TRIGGERS} COMMIT;")

    def now(self) -> float:
        return time.time()

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

    def create_child(self, record: KeyRecord, max_children: int, now: float | None = None) -> Refusal | None:
        now = this_machines(now)
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

    def revoke(self, key_id: str, now: float | None = None) -> bool:
        now = this_machines(now)
        with self._transaction() as db:
            active = db.execute("SELECT 1 FROM keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone()
            db.execute(
                "WITH RECURSIVE tree(key_id) AS (SELECT ? UNION ALL"
                " SELECT keys.key_id FROM keys JOIN tree ON keys.parent_id = tree.key_id)"
                " UPDATE keys SET revoked_at = ? WHERE key_id IN tree AND revoked_at IS NULL",
                (key_id, now),
            )
            return_finished_grants(db, now)
            return active is not None

    def reserve(
        self,
        key_id: str,
        amount_micros: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
    ) -> Reservation:
        """Every call's first write, so one statement when the hold fits; else a transaction that says why."""
        request = self._hold(key_id, amount_micros, now, hold_id, grant)
        taken = self._query(TAKE_HOLD, request)
        if taken:
            ((hold_id, remaining),) = taken
            return Reservation(hold_id, None, remaining)
        with self._transaction() as db:  # it did not fit a moment ago (or is taken already): look under the lock
            return take_hold_or_refuse(db, request)

    def reserve_many(self, requests: list[tuple]) -> list[Reservation]:
        if len(requests) == 1:
            return [self.reserve(*requests[0])]
        holds = [self._hold(*request) for request in requests]
        with self._transaction() as db:
            return [take_hold(db, hold) or take_hold_or_refuse(db, hold) for hold in holds]

    def _hold(
        self,
        key_id: str,
        amount: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
    ) -> dict:
        """TAKE_HOLD's arguments: the time the store's (this machine's) if not given, the hold named, the ids
        of the current day, week and month (one of which is the account's), and the grant (budget, lifetime,
        policy, account) the key's record must still show, if given."""
        now = this_machines(now)
        ids = self.calendar.period_ids(now)
        return {
            "key_id": key_id, "amount": amount, "now": now, "hold_id": named_hold(key_id, hold_id),
            "day": ids.day, "week": ids.week, "month": ids.month,
            "budget": grant and grant.budget_micros, "expires_at": grant and grant.expires_at,
            "policy_json": grant and grant.policy_json, "account_id": grant and grant.account_id,
        }  # fmt: skip

    def hold_regardless(
        self,
        key_id: str,
        amount_micros: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
    ) -> Reservation:
        """A hold past the budget or the lifetime (see `Ledger.hold_regardless`); a rare call, so one
        transaction that also says why a hold was not taken."""
        hold = self._hold(key_id, amount_micros, now, hold_id, grant)
        with self._transaction() as db:
            taken = db.execute(TAKE_HOLD_REGARDLESS, hold).fetchall()
            if taken:
                ((hold_id, remaining_after),) = taken
                return Reservation(hold_id, None, remaining_after)
            # says which: taken already (a retry), unknown, tampered, cancelled, revoked, suspended
            refused = take_hold_or_refuse(db, dict(hold, amount=0, now=0.0))
            return refused if refused.hold_id is not None else Reservation(None, refused.refusal)

    def settle(self, hold_id: str, amount_micros: int) -> bool:
        """Turn a hold into `amount_micros` of spend (0 releases it). False if already settled or swept."""
        return bool(self._query(CLOSE_HOLD, (amount_micros, hold_id, key_of_hold(hold_id))))

    def settle_many(self, settlements: list[tuple[str, int]]) -> list[bool]:
        """Many holds closed in one transaction: deleted in one statement, and each key's balances moved
        once for all of its holds (rather than once per hold, as `hold_closed` would)."""
        if len(settlements) == 1:
            return [self.settle(*settlements[0])]
        charges: dict[str, int] = {}
        for hold_id, amount in settlements:
            charges.setdefault(hold_id, amount)  # a hold named twice is closed by the first, as `settle` would
        with self._transaction() as db:
            closed = db.execute(
                f"DELETE FROM holds WHERE hold_id IN ({', '.join('?' * len(charges))}) AND charge_micros IS NULL"
                " RETURNING hold_id, key_id, amount_micros, account_id, period_id",
                tuple(charges),
            ).fetchall()
            closed = [hold for hold in closed if key_of_hold(hold[0]) == hold[1]]  # only a hold on the key it names
            released, spent = defaultdict(int), defaultdict(int)  # by key id, and by (account id, period id)
            for hold_id, key_id, amount, account_id, period_id in closed:
                for books in (key_id, (account_id, period_id)) if account_id else (key_id,):
                    released[books] += amount
                    spent[books] += charges[hold_id]
            db.executemany(
                "UPDATE keys SET held_micros = held_micros - ?, spent_micros = spent_micros + ? WHERE key_id = ?",
                [(released[books], spent[books], books) for books in released if isinstance(books, str)],
            )
            db.executemany(
                "UPDATE account_periods SET held_micros = held_micros - ?, spent_micros = spent_micros + ?"
                " WHERE account_id = ? AND period_id = ?",
                [(released[books], spent[books], *books) for books in released if isinstance(books, tuple)],
            )
        still_open = {hold_id for hold_id, *_ in closed}
        answers = []
        for hold_id, _ in settlements:
            answers.append(hold_id in still_open)
            still_open.discard(hold_id)
        return answers

    def was_swept(self, hold_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM swept_holds WHERE hold_id = ?", (hold_id,)))

    def cancel_hold(self, hold_id: str) -> bool:
        with self._transaction() as db:
            if db.execute(CLOSE_HOLD, (0, hold_id, key_of_hold(hold_id))).fetchall():
                return True
            db.execute("INSERT OR IGNORE INTO cancelled_holds VALUES (?, ?)", (hold_id, key_of_hold(hold_id)))
            return False

    def renew_holds(self, hold_ids: list[str], now: float | None = None) -> None:
        if not hold_ids:
            return
        now = this_machines(now)
        with self._transaction() as db:
            db.executemany(
                "UPDATE holds SET renewed_at = ? WHERE hold_id = ?", [(now, hold_id) for hold_id in hold_ids]
            )

    def sweep_stale_holds(self, now: float | None, older_than_seconds: float) -> list[StaleHold]:
        """Settle holds left by dead calls at their full amount (see `Ledger.sweep_stale_holds`)."""
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE holds SET charge_micros = amount_micros WHERE renewed_at < ? AND charge_micros IS NULL"
                " RETURNING hold_id, key_id, amount_micros, created_at",
                (this_machines(now) - older_than_seconds,),
            ).fetchall()
            db.executemany("INSERT OR IGNORE INTO swept_holds VALUES (?, ?)", [row[:2] for row in rows])
        return sorted((StaleHold(*row) for row in rows), key=lambda hold: (hold.created_at, hold.hold_id))

    def purge_expired(self, now: float | None = None, limit: int = PURGE_BATCH) -> list[str]:
        """Return finished children's grants, then delete expired keys with nothing open (see `Ledger`)."""
        now = this_machines(now)
        with self._transaction() as db:
            return_finished_grants(db, now)
            rows = db.execute(
                "SELECT key_id FROM keys WHERE expires_at <= ? AND held_micros = 0 AND grant_micros = 0"
                " AND NOT EXISTS (SELECT 1 FROM holds WHERE holds.key_id = keys.key_id) ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
            purged = [key_id for (key_id,) in rows]
            db.executemany("DELETE FROM keys WHERE key_id = ?", rows)
            db.executemany("DELETE FROM cancelled_holds WHERE key_id = ?", rows)
            db.executemany("DELETE FROM swept_holds WHERE key_id = ?", rows)
            db.execute("DELETE FROM claimed_tokens WHERE expires_at <= ?", (now,))
            forget_idle(db, now)
            db.execute("DELETE FROM contexts WHERE expires_at <= ?", (now,))
            return purged

    def take_limits(self, request: LimitRequest, now: float) -> LimitAnswer:
        with self._transaction() as db:
            return take_limits(db, request, now)

    def return_limits(self, ticket: LimitTicket, used_tokens: int | None, now: float) -> None:
        with self._transaction() as db:
            return_limits(db, ticket, used_tokens, now)

    def ping(self) -> None:
        """Take the write lock and let it go: a store that cannot be written cannot take a hold either."""
        with self._transaction():
            pass

    def claim_token(self, issuer: str, jti: str, expires_at: float, now: float | None = None) -> bool:
        """Remember an exchanged token until it expires; False if it was claimed already (see `Ledger`)."""
        claim = {"issuer": issuer, "jti": jti, "expires_at": expires_at, "now": this_machines(now)}
        return bool(self._query(CLAIM_TOKEN, claim))

    # ----- accounts -----

    def create_account(self, record: AccountRecord) -> None:
        with self._transaction() as db:
            try:
                db.execute(f"INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", astuple(record))
            except sqlite3.IntegrityError as e:
                raise AccountExists(f"account {record.account_id} already exists") from e

    def get_account(self, account_id: str) -> AccountRecord | None:
        rows = self._query(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?", (account_id,))
        return AccountRecord(*rows[0]) if rows else None

    def list_accounts(self) -> list[AccountRecord]:
        rows = self._query(f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, account_id")
        return [AccountRecord(*row) for row in rows]

    def update_account(self, record: AccountRecord) -> bool:
        return bool(
            self._query(
                "UPDATE accounts SET name = ?, plan_name = ?, period = ?, budget_micros = ?, status = ?"
                " WHERE account_id = ? RETURNING 1",
                (record.name, record.plan_name, record.period, record.budget_micros, record.status, record.account_id),
            )
        )

    def delete_account(self, account_id: str, now: float) -> bool:
        with self._transaction() as db:
            db.execute(
                "UPDATE keys SET revoked_at = ? WHERE revoked_at IS NULL AND key_id IN"
                " (WITH RECURSIVE tree(key_id) AS (SELECT key_id FROM keys WHERE account_id = ? UNION ALL"
                " SELECT keys.key_id FROM keys JOIN tree ON keys.parent_id = tree.key_id) SELECT key_id FROM tree)",
                (now, account_id),
            )
            db.execute("DELETE FROM account_periods WHERE account_id = ?", (account_id,))
            deleted = db.execute("DELETE FROM accounts WHERE account_id = ? RETURNING 1", (account_id,)).fetchall()
            return bool(deleted)

    def account_keys(self, account_id: str) -> list[KeyRecord]:
        rows = self._query(
            f"SELECT {KEY_COLUMNS} FROM keys WHERE account_id = ? ORDER BY created_at, key_id", (account_id,)
        )
        return [KeyRecord(*row) for row in rows]

    def top_up(self, account_id: str, amount_micros: int, now: float) -> PeriodSpend | None:
        ids = self.calendar.period_ids(now)
        rows = self._query(
            f"INSERT INTO account_periods (account_id, period_id, top_up_micros) SELECT account_id, {ACCOUNT_PERIOD},"
            " :amount FROM accounts a WHERE account_id = :account_id"
            " ON CONFLICT (account_id, period_id) DO UPDATE SET top_up_micros = top_up_micros + excluded.top_up_micros"
            f" RETURNING {PERIOD_COLUMNS}",
            {"account_id": account_id, "amount": amount_micros, "day": ids.day, "week": ids.week, "month": ids.month},
        )
        return PeriodSpend(*rows[0]) if rows else None

    def account_periods(self, account_id: str) -> list[PeriodSpend]:
        rows = self._query(
            f"SELECT {PERIOD_COLUMNS} FROM account_periods WHERE account_id = ? ORDER BY period_id", (account_id,)
        )
        return [PeriodSpend(*row) for row in rows]

    # ----- continuations -----

    def learn_context(self, ref: str, tokens: int, started_at: float, expires_at: float) -> None:
        args = {"ref": ref, "tokens": tokens, "started_at": started_at, "expires_at": expires_at}
        self._query(LEARN_CONTEXT, args)

    def forget_context(self, ref: str, now: float, expires_at: float) -> None:
        self._query(FORGET_CONTEXT, {"ref": ref, "now": now, "expires_at": expires_at})

    def context_tokens(self, ref: str, now: float) -> int | None:
        rows = self._query("SELECT tokens FROM contexts WHERE ref = ? AND expires_at > ? AND tokens >= 0", (ref, now))
        return rows[0][0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def nonblocking(self) -> "SqliteLedger":
        """The same file with no busy wait: microseconds on the event loop, or LedgerBusy at once."""
        return type(self)(self.path, busy_timeout_seconds=0, calendar=self.calendar)


def return_finished_grants(db: sqlite3.Connection, now: float) -> None:
    """Give back to their parents the grants of children that can no longer spend (revoked or expired)
    and have nothing in flight: what they spent becomes the parent's spend, the rest is free again."""
    while finished := db.execute(
        "SELECT key_id, parent_id, grant_micros, spent_micros FROM keys"
        " WHERE grant_micros > 0 AND held_micros = 0 AND (revoked_at IS NOT NULL OR expires_at <= ?)",
        (now,),
    ).fetchall():  # returning a grandchild's grant can finish its parent: repeat until none is left
        for key_id, parent_id, grant, spent in finished:
            db.execute(
                "UPDATE keys SET held_micros = held_micros - ?, spent_micros = spent_micros + ? WHERE key_id = ?",
                (grant, spent, parent_id),
            )
            db.execute("UPDATE keys SET grant_micros = 0 WHERE key_id = ?", (key_id,))


def insert_key(db: sqlite3.Connection, record: KeyRecord) -> None:
    try:
        db.execute(f"INSERT INTO keys ({KEY_COLUMNS}) VALUES ({PLACEHOLDERS})", astuple(record))
    except sqlite3.IntegrityError as e:
        raise KeyExists(f"key {record.key_id} already exists") from e


def this_machines(now: float | None) -> float:
    """The time given (the contract suite's), else this machine's clock: the one clock of a SQLite file."""
    return time.time() if now is None else now


def statements(script: str) -> list[str]:
    """A script's statements one by one (for a transaction already begun: `executescript` would commit it)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    return found


def take_hold(db: sqlite3.Connection, hold: dict) -> Reservation | None:
    """The hold (TAKE_HOLD's arguments) if the key is live and it fits; None if not (`take_hold_or_refuse` says why)."""
    taken = db.execute(TAKE_HOLD, hold).fetchall()
    if not taken:
        return None
    ((hold_id, remaining_after),) = taken
    return Reservation(hold_id, None, remaining_after)


def take_hold_or_refuse(db: sqlite3.Connection, hold: dict) -> Reservation:
    """Inside a transaction: the hold of this name if taken already, else take it, or say why not."""
    taken = db.execute(
        "SELECT remaining_after_micros FROM holds WHERE hold_id = :hold_id AND key_id = :key_id"
        " AND charge_micros IS NULL",
        hold,
    ).fetchone()
    if taken:
        return Reservation(hold["hold_id"], None, taken[0])
    row = db.execute(
        f"SELECT k.expires_at, k.revoked_at, {KEY_REMAINING}, k.account_id, a.status, {REMAINING},"
        f" k.budget_micros, k.policy_json FROM {KEY_ACCOUNT_PERIOD} WHERE k.key_id = :key_id",
        hold,
    ).fetchone()
    if row is None:
        return Reservation(None, Refusal.UNKNOWN)
    expires_at, revoked_at, key_remaining, account_id, account_status, remaining, *grant = row
    granted = (hold["budget"], hold["policy_json"], hold["expires_at"], hold["account_id"])
    if hold["budget"] is not None and granted != (*grant, expires_at, account_id):
        return Reservation(None, Refusal.TAMPERED)
    if db.execute("SELECT 1 FROM cancelled_holds WHERE hold_id = :hold_id", hold).fetchone():
        return Reservation(None, Refusal.CANCELLED, remaining)
    if revoked_at is not None:
        return Reservation(None, Refusal.REVOKED, remaining)
    if hold["now"] >= expires_at:
        return Reservation(None, Refusal.EXPIRED, remaining)
    if account_id is not None and account_status != "active":
        return Reservation(None, Refusal.SUSPENDED, remaining)
    if hold["amount"] > key_remaining:
        return Reservation(None, Refusal.BUDGET, remaining)
    if hold["amount"] > remaining:
        return Reservation(None, Refusal.ACCOUNT_BUDGET, remaining)
    reservation = take_hold(db, hold)
    assert reservation is not None, "the hold fit a moment ago, in this same transaction"
    return reservation


def unavailable(path: Path, error: sqlite3.OperationalError) -> LedgerUnavailable:
    if "locked" in str(error) or "busy" in str(error):
        return LedgerBusy(f"store {path} is locked by another writer: {error}")
    return LedgerUnavailable(f"store {path} unavailable: {error}")
