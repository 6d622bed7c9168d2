"""The ledger contract, on every backend: keys, holds, the hard cap (across threads and processes),
crash recovery. A few tests are about one store's own machinery (SQLite's file locks; Redis's TTLs
and outages) and say so in their names.
"""

import multiprocessing
import random
import sqlite3
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import REDIS_SERVER, RedisServer, free_port

from agentkeys.ledger import (
    AccountExists,
    AccountRecord,
    Calendar,
    KeyExists,
    KeyRecord,
    LedgerBusy,
    LedgerUnavailable,
    RedisLedger,
    Refusal,
    SqliteLedger,
    StaleHold,
    StoreMisconfigured,
    open_ledger,
)
from agentkeys.ledger import redis as redis_module
from agentkeys.ledger.base import key_of_hold
from agentkeys.ledger.redis import RETENTION_SECONDS

NOW = 1_000_000.0
BACKENDS = ["sqlite", "redis"]


def record(key_id: str = "k1", budget: int = 1_000, expires_at: float = NOW + 3600, **fields) -> KeyRecord:
    return KeyRecord(
        key_id=key_id,
        key_hash=f"hash-of-{key_id}",
        name=f"key {key_id}",
        policy_name="test",
        policy_json="{}",
        created_at=fields.pop("created_at", NOW),
        expires_at=expires_at,
        budget_micros=budget,
        **fields,
    )


@pytest.fixture(scope="session")
def redis_server():
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


@contextmanager
def empty_store(kind: str, request: pytest.FixtureRequest):
    """The URL of an empty store: a new SQLite file, or the session's Redis, flushed."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            yield f"sqlite:///{Path(directory) / 'ledger.db'}"
    else:
        server = request.getfixturevalue("redis_server")
        server.flushdb()
        yield server.url


@pytest.fixture(params=BACKENDS)
def store(request):
    with empty_store(request.param, request) as url:
        yield url


@pytest.fixture
def ledger(store):
    opened = open_ledger(store)
    yield opened
    opened.close()


def open_patiently(url: str):
    """A handle that waits out lock contention rather than refusing (SQLite), for the concurrency tests."""
    if url.startswith("sqlite:///"):
        return SqliteLedger(url.removeprefix("sqlite:///"), busy_timeout_seconds=30)
    return open_ledger(url)


def balances(ledger, key_id: str = "k1") -> tuple[int, int]:
    key = ledger.get_key(key_id)
    return key.spent_micros, key.held_micros


# ----- keys -----


def test_create_get_and_list_keys(ledger):
    first, second = record("a", created_at=NOW), record("b", created_at=NOW + 1, budget=5)
    ledger.create_key(second)
    ledger.create_key(first)
    assert ledger.get_key("a") == first
    assert ledger.get_key("b") == second
    assert ledger.get_key("nope") is None
    assert [k.key_id for k in ledger.list_keys()] == ["a", "b"]  # oldest first


def test_ping_answers_on_a_working_store(ledger):
    assert ledger.ping() is None
    ledger.create_key(record())
    assert ledger.ping() is None and ledger.get_key("k1") == record(), "a ping changes nothing"


def test_duplicate_key_id_is_refused(ledger):
    ledger.create_key(record("a"))
    with pytest.raises(KeyExists):
        ledger.create_key(record("a", budget=5))
    assert ledger.list_keys() == [record("a")]


def test_revoke_once(ledger):
    ledger.create_key(record())
    assert ledger.revoke("k1", NOW + 5) is True
    assert ledger.revoke("k1", NOW + 6) is False
    assert ledger.get_key("k1").revoked_at == NOW + 5
    assert ledger.revoke("nope", NOW) is False


# ----- reserve -----


def test_reserve_within_budget_takes_a_hold(ledger):
    ledger.create_key(record(budget=1_000))
    reservation = ledger.reserve("k1", 600, NOW)
    assert reservation.hold_id is not None and reservation.refusal is None
    assert reservation.remaining_micros == 400
    assert balances(ledger) == (0, 600)
    assert ledger.reserve("k1", 400, NOW).remaining_micros == 0  # exactly the rest fits


def test_reserve_over_budget_is_refused_with_what_remains(ledger):
    ledger.create_key(record(budget=1_000))
    ledger.reserve("k1", 700, NOW)
    reservation = ledger.reserve("k1", 301, NOW)
    assert (reservation.hold_id, reservation.refusal, reservation.remaining_micros) == (None, Refusal.BUDGET, 300)
    assert balances(ledger) == (0, 700)


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        (lambda ledger: ledger.revoke("k1", NOW), Refusal.REVOKED),
        (lambda ledger: None, Refusal.EXPIRED),
        (lambda ledger: None, Refusal.UNKNOWN),
    ],
    ids=["revoked", "expired", "unknown"],
)
def test_reserve_on_an_unusable_key_is_refused(ledger, setup, refusal):
    ledger.create_key(record("k1"))
    setup(ledger)
    key_id = "other" if refusal is Refusal.UNKNOWN else "k1"
    now = NOW + 3600 if refusal is Refusal.EXPIRED else NOW  # expiry is inclusive
    reservation = ledger.reserve(key_id, 1, now)
    assert (reservation.hold_id, reservation.refusal) == (None, refusal)
    assert balances(ledger) == (0, 0)


def test_a_hold_regardless_goes_past_the_budget_and_the_lifetime_and_is_charged_its_cost(ledger):
    ledger.create_key(record(budget=1_000, expires_at=NOW + 10))
    ledger.reserve("k1", 900, NOW)
    past_budget = ledger.hold_regardless("k1", 300, NOW)
    assert (past_budget.refusal, past_budget.remaining_micros) == (None, -200)
    past_lifetime = ledger.hold_regardless("k1", 50, NOW + 20)
    assert (past_lifetime.refusal, past_lifetime.remaining_micros) == (None, -250)
    assert balances(ledger) == (0, 1_250)
    assert ledger.settle(past_budget.hold_id, 400) is True  # its real cost, above what it held
    assert ledger.settle(past_lifetime.hold_id, 0) is True
    assert balances(ledger) == (400, 900)
    assert ledger.reserve("k1", 1, NOW).refusal is Refusal.BUDGET  # an ordinary hold still keeps to the budget


@pytest.mark.parametrize("unusable", ["revoked", "unknown"])
def test_a_hold_regardless_is_refused_to_a_revoked_or_unknown_key(ledger, unusable):
    ledger.create_key(record("k1"))
    ledger.revoke("k1", NOW)
    key_id = "k1" if unusable == "revoked" else "other"
    reservation = ledger.hold_regardless(key_id, 1, NOW)
    assert (reservation.hold_id, reservation.refusal) == (None, Refusal(unusable))
    assert balances(ledger) == (0, 0)


# ----- settle -----


@pytest.mark.parametrize("amount", [0, 1, 250, 600])
def test_settle_moves_the_hold_to_spend_exactly_once(ledger, amount):
    ledger.create_key(record(budget=1_000))
    hold = ledger.reserve("k1", 600, NOW).hold_id
    assert ledger.settle(hold, amount) is True
    assert balances(ledger) == (amount, 0)
    assert ledger.settle(hold, amount) is False
    assert balances(ledger) == (amount, 0)
    assert ledger.get_key("k1").remaining_micros == 1_000 - amount


def test_settle_unknown_hold(ledger):
    assert ledger.settle("k1.0123456789abcdef", 10) is False


def test_settle_frees_budget_for_the_next_reserve(ledger):
    ledger.create_key(record(budget=1_000))
    hold = ledger.reserve("k1", 1_000, NOW).hold_id
    assert ledger.reserve("k1", 1, NOW).refusal is Refusal.BUDGET
    ledger.settle(hold, 300)
    assert ledger.reserve("k1", 700, NOW).refusal is None


def test_reserve_many_reserves_in_order_as_reserve_would(ledger):
    ledger.create_key(record("k1", budget=1_000))
    ledger.create_key(record("gone", budget=1_000))
    ledger.revoke("gone", NOW)
    first, second, third, fourth, fifth = ledger.reserve_many(
        [("k1", 600, NOW), ("k1", 600, NOW), ("k1", 400, NOW), ("gone", 1, NOW), ("nobody", 1, NOW)]
    )
    assert first.refusal is None and first.remaining_micros == 400
    assert second.refusal is Refusal.BUDGET and second.remaining_micros == 400  # the first took its share
    assert third.refusal is None and third.remaining_micros == 0 and third.hold_id != first.hold_id
    assert (fourth.refusal, fifth.refusal) == (Refusal.REVOKED, Refusal.UNKNOWN)
    assert balances(ledger) == (0, 1_000)
    assert ledger.reserve_many([("k1", 1, NOW)])[0].refusal is Refusal.BUDGET


def test_settle_many_settles_each_hold_as_settle_would(ledger):
    ledger.create_key(record("k1", budget=1_000))
    ledger.create_key(record("k2", budget=1_000))
    first, second = ledger.reserve("k1", 300, NOW).hold_id, ledger.reserve("k1", 200, NOW).hold_id
    third = ledger.reserve("k2", 400, NOW).hold_id
    ledger.settle(second, 50)  # already settled: reported False, charged nothing more
    settled = ledger.settle_many([(first, 100), (second, 999), (third, 0), ("k1.0123456789abcdef", 7), (first, 300)])
    assert settled == [True, False, True, False, False]
    assert balances(ledger, "k1") == (150, 0) and balances(ledger, "k2") == (0, 0)
    assert ledger.settle_many([(first, 100)]) == [False]


def test_a_store_file_from_before_holds_closed_by_trigger_still_settles_its_open_holds(tmp_path):
    """Files of earlier versions lack two columns of `holds`, its triggers, the keys' `identity_json` and the
    claimed tokens, and number their holds; opening one adds them, and names each open hold after its key
    and its number."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE keys (key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, name TEXT NOT NULL,"
        " policy_name TEXT NOT NULL, policy_json TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,"
        " budget_micros INTEGER NOT NULL, spent_micros INTEGER NOT NULL DEFAULT 0,"
        " held_micros INTEGER NOT NULL DEFAULT 0, revoked_at REAL, parent_id TEXT,"
        " depth INTEGER NOT NULL DEFAULT 0, grant_micros INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE holds (hold_id INTEGER PRIMARY KEY AUTOINCREMENT, key_id TEXT NOT NULL,"
        " amount_micros INTEGER NOT NULL, created_at REAL NOT NULL);"
        f"INSERT INTO keys VALUES ('k1', 'h', 'n', 'p', '{{}}', {NOW}, {NOW + 3600}, 1000, 0, 300, NULL, NULL, 0, 0);"
        f"INSERT INTO holds (key_id, amount_micros, created_at) VALUES ('k1', 300, {NOW});"
    )
    old.close()
    ledger = SqliteLedger(path)
    try:
        assert ledger.get_key("k1").identity_json is None
        assert ledger.claim_token("https://issuer", "jti", NOW + 60, NOW) is True
        assert ledger.settle("k1.1", 100) is True  # the hold the earlier version took
        new = ledger.reserve("k1", 200, NOW)
        assert new.refusal is None and new.remaining_micros == 700
        assert ledger.settle(new.hold_id, 50) is True
        assert balances(ledger) == (150, 0)
    finally:
        ledger.close()


# ----- hold names: the proxy's, proven at settlement, idempotent, cancellable -----


def test_a_hold_is_named_for_its_key_and_settled_only_by_that_name(ledger):
    ledger.create_key(record("a", budget=1_000))
    ledger.create_key(record("b", budget=1_000))
    hold = ledger.reserve("a", 300, NOW, hold_id="a.00000000000000aa").hold_id
    assert hold == "a.00000000000000aa"
    assert ledger.settle("b.00000000000000aa", 10) is False, "the same random part on another key is another hold"
    assert ledger.settle("a.00000000000000ab", 10) is False
    assert balances(ledger, "a") == (0, 300) and balances(ledger, "b") == (0, 0)
    other = ledger.reserve("b", 100, NOW).hold_id
    assert key_of_hold(other) == "b" and other != hold
    assert ledger.settle(hold, 10) is True
    assert balances(ledger, "a") == (10, 0) and balances(ledger, "b") == (0, 100)


def test_a_hold_asked_for_again_by_its_name_is_the_same_hold(ledger):
    """A reserve retried after its answer was lost finds the hold it took, and takes no second one."""
    ledger.create_key(record(budget=1_000))
    first = ledger.reserve("k1", 600, NOW, hold_id="k1.0000000000000001")
    again = ledger.reserve("k1", 600, NOW, hold_id="k1.0000000000000001")
    assert first == again and (again.hold_id, again.remaining_micros) == ("k1.0000000000000001", 400)
    assert ledger.reserve_many([("k1", 600, NOW, "k1.0000000000000001")]) == [first]
    assert balances(ledger) == (0, 600)


def test_a_cancelled_hold_is_freed_and_its_name_takes_nothing_later(ledger):
    ledger.create_key(record(budget=1_000))
    taken = ledger.reserve("k1", 600, NOW, hold_id="k1.0000000000000001").hold_id
    assert ledger.cancel_hold(taken) is True
    assert balances(ledger) == (0, 0)
    assert ledger.cancel_hold(taken) is False  # once
    # The cancellation reached the store before the reserve did (its answer lost on the way there):
    assert ledger.cancel_hold("k1.0000000000000002") is False
    late = ledger.reserve("k1", 600, NOW, hold_id="k1.0000000000000002")
    assert (late.hold_id, late.refusal) == (None, Refusal.CANCELLED)
    assert balances(ledger) == (0, 0)
    assert ledger.sweep_stale_holds(NOW + 1, older_than_seconds=0) == [], "nothing was left for a sweep to charge"


def test_a_hold_name_for_another_key_is_refused(ledger):
    ledger.create_key(record(budget=1_000))
    with pytest.raises(ValueError, match="not named for key k1"):
        ledger.reserve("k1", 1, NOW, hold_id="k2.0000000000000001")
    assert balances(ledger) == (0, 0)


def tamper(url: str, key_id: str, **fields) -> None:
    """Change a key's record behind the ledger's back, as anyone who can write to the store could."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            for name, value in fields.items():
                db.execute(f"UPDATE keys SET {name} = ? WHERE key_id = ?", (value, key_id))
    else:
        with redis.Redis.from_url(url) as raw:
            raw.hset(f"agentkeys:key:{key_id}", mapping=fields)


@pytest.mark.parametrize(
    "edit",
    [{"budget_micros": 1_000_000}, {"expires_at": NOW + 999_999}, {"policy_json": '{"models": ["*"]}'}],
    ids=["budget", "expiry", "policy"],
)
def test_a_hold_on_a_record_changed_in_the_store_since_the_proxy_verified_it_is_refused(store, ledger, edit):
    verified = record(budget=1_000)
    ledger.create_key(verified)
    assert ledger.reserve("k1", 600, NOW, grant=verified).refusal is None
    tamper(store, "k1", **edit)
    refused = ledger.reserve("k1", 1, NOW, grant=verified)
    assert (refused.hold_id, refused.refusal) == (None, Refusal.TAMPERED)
    assert balances(ledger) == (0, 600)


def test_sqlite_a_store_file_from_before_accounts_gets_their_triggers_and_keeps_its_holds(tmp_path):
    """A file of the version before accounts has triggers `hold_taken` and `hold_closed` that know no periods:
    opening it replaces them (in one transaction), and its open hold, named after its key and its old number
    (its holds were numbered), still settles on its key."""
    path = tmp_path / "before-accounts.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE keys (key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, name TEXT NOT NULL,"
        " policy_name TEXT NOT NULL, policy_json TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,"
        " budget_micros INTEGER NOT NULL, spent_micros INTEGER NOT NULL DEFAULT 0,"
        " held_micros INTEGER NOT NULL DEFAULT 0, revoked_at REAL, parent_id TEXT,"
        " depth INTEGER NOT NULL DEFAULT 0, grant_micros INTEGER NOT NULL DEFAULT 0, identity_json TEXT);"
        "CREATE TABLE holds (hold_id INTEGER PRIMARY KEY AUTOINCREMENT, key_id TEXT NOT NULL,"
        " amount_micros INTEGER NOT NULL, created_at REAL NOT NULL, remaining_after_micros INTEGER,"
        " charge_micros INTEGER);"
        "CREATE TRIGGER hold_taken AFTER INSERT ON holds BEGIN"
        " UPDATE keys SET held_micros = held_micros + NEW.amount_micros WHERE key_id = NEW.key_id; END;"
        "CREATE TRIGGER hold_closed AFTER UPDATE OF charge_micros ON holds BEGIN"
        " UPDATE keys SET held_micros = held_micros - NEW.amount_micros,"
        " spent_micros = spent_micros + NEW.charge_micros WHERE key_id = NEW.key_id;"
        " DELETE FROM holds WHERE hold_id = NEW.hold_id; END;"
        f"INSERT INTO keys VALUES ('k1', 'h', 'n', 'p', '{{}}', {NOW}, {NOW + 3600}, 1000, 0, 0, NULL, NULL, 0, 0,"
        " NULL);"
        f"INSERT INTO holds (key_id, amount_micros, created_at) VALUES ('k1', 300, {NOW});"
    )
    old.close()
    ledger = SqliteLedger(path)
    try:
        triggers = {
            name for (name,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        }
        assert triggers == {"hold_taken_in_period", "hold_closed_in_period"}
        assert balances(ledger) == (0, 300)  # the old trigger held it
        assert ledger.settle("k1.1", 100) is True
        ledger.create_account(account(budget=500))
        ledger.create_key(record("k2", account_id="a1"))
        held = ledger.reserve("k2", 400, NOW)
        assert ledger.reserve("k2", 200, NOW).refusal is Refusal.ACCOUNT_BUDGET
        assert ledger.settle(held.hold_id, 50) and period_books(ledger) == {"1970-01-12": (50, 0)}
        assert balances(ledger) == (100, 0)
    finally:
        ledger.close()


# ----- purge -----


def test_purge_expired_deletes_only_expired_keys_without_holds(ledger):
    ledger.create_key(record("expired", expires_at=NOW + 10))
    ledger.create_key(record("expired-busy", expires_at=NOW + 10))
    ledger.create_key(record("active", expires_at=NOW + 1000))
    ledger.create_key(record("revoked-active", expires_at=NOW + 1000))
    ledger.revoke("revoked-active", NOW)
    hold = ledger.reserve("expired-busy", 5, NOW).hold_id

    assert ledger.purge_expired(NOW + 9) == []
    assert ledger.purge_expired(NOW + 10) == ["expired"]
    assert {k.key_id for k in ledger.list_keys()} == {"expired-busy", "active", "revoked-active"}

    ledger.settle(hold, 5)  # once its last call settles, it goes too
    assert ledger.purge_expired(NOW + 11) == ["expired-busy"]
    assert {k.key_id for k in ledger.list_keys()} == {"active", "revoked-active"}


def test_keys_are_listed_oldest_first_a_page_at_a_time(ledger):
    for i in range(5):
        ledger.create_key(record(f"k{i}", created_at=NOW + i))
    ids = lambda records: [key.key_id for key in records]  # noqa: E731
    assert ids(ledger.list_keys()) == ["k0", "k1", "k2", "k3", "k4"]
    assert ids(ledger.list_keys(0, 2)) == ["k0", "k1"]
    assert ids(ledger.list_keys(2, 2)) == ["k2", "k3"]
    assert ids(ledger.list_keys(4, 2)) == ["k4"]
    assert ids(ledger.list_keys(3)) == ["k3", "k4"]
    assert ledger.list_keys(5, 2) == [] and ledger.list_keys(0, 0) == []


def test_a_purge_deletes_at_most_its_limit_earliest_expiry_first_and_skips_keys_in_use(ledger):
    for i in range(7):
        ledger.create_key(record(f"k{i}", expires_at=NOW + 10 + i))
    hold = ledger.reserve("k0", 5, NOW).hold_id  # the first to expire is still in use: it stays, the rest go
    assert ledger.purge_expired(NOW + 100, limit=3) == ["k1", "k2", "k3"]
    assert ledger.purge_expired(NOW + 100, limit=3) == ["k4", "k5", "k6"]
    assert ledger.purge_expired(NOW + 100, limit=3) == []
    ledger.settle(hold, 5)
    assert ledger.purge_expired(NOW + 100, limit=3) == ["k0"]
    assert ledger.list_keys() == []


# ----- crash recovery: holds left by dead calls -----


def test_sweep_settles_stale_holds_at_their_full_amount_exactly_once(ledger):
    ledger.create_key(record("k1", budget=1_000))
    ledger.create_key(record("k2", budget=500))
    first = ledger.reserve("k1", 100, NOW).hold_id
    empty = ledger.reserve("k1", 0, NOW + 1).hold_id
    other_key = ledger.reserve("k2", 50, NOW + 5).hold_id
    recent = ledger.reserve("k1", 200, NOW + 10).hold_id
    ledger.revoke("k2", NOW + 6)  # a revoked key's holds are swept all the same

    swept = ledger.sweep_stale_holds(NOW + 70, older_than_seconds=60)  # created before NOW + 10

    assert swept == [  # oldest first
        StaleHold(first, "k1", 100, NOW),
        StaleHold(empty, "k1", 0, NOW + 1),
        StaleHold(other_key, "k2", 50, NOW + 5),
    ]
    assert balances(ledger, "k1") == (100, 200)  # charged in full; the recent hold stays
    assert balances(ledger, "k2") == (50, 0)
    assert ledger.settle(first, 10) is False  # the dead call's late settlement changes nothing
    assert balances(ledger, "k1") == (100, 200)
    assert ledger.sweep_stale_holds(NOW + 70, older_than_seconds=60) == []
    assert ledger.settle(recent, 150) is True
    assert balances(ledger, "k1") == (250, 0)


def test_renewed_holds_are_not_swept_while_their_calls_live(ledger):
    """A proxy renews the holds of its live calls: only a hold left unrenewed for the whole age is stale."""
    ledger.create_key(record(budget=1_000))
    alive = ledger.reserve("k1", 100, NOW).hold_id
    dead = ledger.reserve("k1", 200, NOW).hold_id
    ledger.renew_holds([alive, "k1.0000000000000009"], now=NOW + 50)  # a closed or unknown hold is not brought back
    assert ledger.sweep_stale_holds(NOW + 70, older_than_seconds=60) == [StaleHold(dead, "k1", 200, NOW)]
    assert balances(ledger) == (200, 100)
    assert ledger.settle(alive, 40) is True, "the live call settles its own hold, once"
    assert ledger.sweep_stale_holds(NOW + 500, older_than_seconds=0) == []
    assert balances(ledger) == (240, 0)
    ledger.renew_holds([])  # nothing to renew: nothing asked of the store


def test_sweep_of_a_ledger_without_holds(ledger):
    assert ledger.sweep_stale_holds(NOW, older_than_seconds=0) == []


def test_swept_holds_no_longer_keep_an_expired_key_from_being_purged(ledger):
    ledger.create_key(record(expires_at=NOW + 10))
    ledger.reserve("k1", 5, NOW)
    assert ledger.purge_expired(NOW + 20) == []
    ledger.sweep_stale_holds(NOW + 20, older_than_seconds=15)
    assert ledger.purge_expired(NOW + 20) == ["k1"]


# ----- growth: what a key leaves behind goes with it -----


def stored_items(url: str) -> int:
    """How many things the store holds: rows of every table (SQLite), or keys (Redis)."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return sum(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables)
    with redis.Redis.from_url(url) as raw:
        return raw.dbsize()


def test_everything_a_tree_of_keys_wrote_is_deleted_once_it_expires_and_is_purged(store):
    """Keys, children (and their lists), holds settled, swept and cancelled, names cancelled before their
    reserve: once every key has expired and been purged, the store holds what it held before, but for an
    account's books, kept on purpose (a period's spend outlives its keys), which go with the account."""
    ledger = open_ledger(store)
    try:
        before = stored_items(store)
        ledger.create_account(account("a1", budget=10_000))
        ledger.create_key(record("acct", budget=1_000, expires_at=NOW + 100, account_id="a1"))
        spend(ledger, "acct", 10)
        ledger.reserve("acct", 40, NOW)  # swept: charged in full to its period too
        ledger.cancel_hold(ledger.reserve("acct", 20, NOW).hold_id)
        ledger.create_key(record("p", budget=10_000, expires_at=NOW + 100))
        ledger.create_key(record("idle", budget=10, expires_at=NOW + 50))
        for n in range(3):
            assert ledger.create_child(child(f"c{n}", "p", 1_000, expires_at=NOW + 60), 5, NOW) is None
            spend(ledger, f"c{n}", 100)
        ledger.create_child(child("g", "c0", 200, expires_at=NOW + 60, depth=2), 5, NOW)
        spend(ledger, "g", 50)
        ledger.revoke("c1", NOW + 1)
        ledger.reserve("p", 300, NOW)  # a call whose proxy died: swept
        ledger.cancel_hold(ledger.reserve("p", 30, NOW).hold_id)
        ledger.cancel_hold("p.00000000000000ff")  # a name cancelled before its reserve arrived
        ledger.sweep_stale_holds(NOW + 20, older_than_seconds=10)
        assert period_books(ledger) == {"1970-01-12": (50, 0)}
        assert stored_items(store) > before
        ledger.purge_expired(NOW + 70)
        assert ledger.children("p") == [] and ledger.get_key("p").held_micros == 0
        ledger.purge_expired(NOW + 200)
        assert ledger.list_keys() == [] and ledger.account_keys("a1") == []
        assert period_books(ledger) == {"1970-01-12": (50, 0)}, "an account's books outlive its keys"
        assert ledger.delete_account("a1", NOW + 200)
        assert stored_items(store) == before
    finally:
        ledger.close()


def test_a_parent_mints_among_many_finished_children_by_its_count_of_live_ones(ledger):
    ledger.create_key(record("p", budget=100_000, expires_at=NOW + 10_000))
    for n in range(20):  # each finished (expired, or revoked) before the next: never two live at once
        assert ledger.create_child(child(f"old{n}", "p", 10, expires_at=NOW + 10), 2, NOW) is None
        assert ledger.create_child(child(f"new{n}", "p", 10, expires_at=NOW + 500), 2, NOW) is None
        ledger.revoke(f"new{n}", NOW)
        ledger.purge_expired(NOW + 11)
    # The expired ones are gone from the parent's list; the revoked ones stay until they expire.
    assert sorted(c.key_id for c in ledger.children("p")) == sorted(f"new{n}" for n in range(20))
    assert ledger.create_child(child("a", "p", 10), 2, NOW + 11) is None
    assert ledger.create_child(child("b", "p", 10), 2, NOW + 11) is None
    assert ledger.create_child(child("c", "p", 10), 2, NOW + 11) is Refusal.TOO_MANY_CHILDREN


# ----- several handles, threads and processes on one store -----


# ----- child keys: budgets carved from a parent -----


def child(key_id: str, parent_id: str, budget: int, expires_at: float = NOW + 600, depth: int = 1) -> KeyRecord:
    return record(key_id, budget, expires_at, parent_id=parent_id, depth=depth)


def spend(ledger, key_id: str, amount: int) -> None:
    hold = ledger.reserve(key_id, amount, NOW)
    assert hold.refusal is None
    ledger.settle(hold.hold_id, amount)


def test_a_child_budget_is_held_on_its_parent(ledger):
    ledger.create_key(record("p", budget=1_000))
    assert ledger.create_child(child("c", "p", 300), max_children=5, now=NOW) is None
    parent, created = ledger.get_key("p"), ledger.get_key("c")
    assert (parent.held_micros, parent.remaining_micros) == (300, 700)
    assert (created.parent_id, created.depth, created.grant_micros, created.budget_micros) == ("p", 1, 300, 300)
    assert [c.key_id for c in ledger.children("p")] == ["c"] and ledger.children("c") == []


@pytest.mark.parametrize(
    ("setup", "request_budget", "max_children", "refusal"),
    [
        (lambda ledger: None, 1_001, 5, Refusal.BUDGET),
        (lambda ledger: spend(ledger, "p", 900), 101, 5, Refusal.BUDGET),
        (lambda ledger: ledger.create_child(child("c0", "p", 1), 5, NOW), 1, 1, Refusal.TOO_MANY_CHILDREN),
        (lambda ledger: ledger.revoke("p", NOW), 1, 5, Refusal.REVOKED),
    ],
    ids=["more-than-budget", "more-than-remains", "fan-out", "revoked-parent"],
)
def test_a_child_that_does_not_fit_is_refused(ledger, setup, request_budget, max_children, refusal):
    ledger.create_key(record("p", budget=1_000))
    setup(ledger)
    held_before = ledger.get_key("p").held_micros
    assert ledger.create_child(child("c", "p", request_budget), max_children, NOW) is refusal
    assert ledger.get_key("c") is None and ledger.get_key("p").held_micros == held_before


def test_children_of_an_expired_or_unknown_parent_are_refused(ledger):
    ledger.create_key(record("p", budget=1_000, expires_at=NOW + 1))
    assert ledger.create_child(child("c", "p", 1), 5, NOW + 2) is Refusal.EXPIRED
    assert ledger.create_child(child("c", "nobody", 1), 5, NOW) is Refusal.UNKNOWN


def test_revoking_a_parent_revokes_every_descendant(ledger):
    ledger.create_key(record("p"))
    ledger.create_child(child("c", "p", 500), 5, NOW)
    ledger.create_child(child("g", "c", 100, depth=2), 5, NOW)
    ledger.create_key(record("other"))
    assert ledger.revoke("p", NOW + 1) is True
    assert all(ledger.get_key(k).revoked_at == NOW + 1 for k in ("p", "c", "g"))
    assert ledger.get_key("other").revoked_at is None
    assert ledger.reserve("g", 1, NOW + 2).refusal is Refusal.REVOKED
    assert ledger.revoke("p", NOW + 3) is False


def test_a_finished_childs_unspent_budget_returns_to_its_parent(ledger):
    ledger.create_key(record("p", budget=1_000))
    ledger.create_child(child("c", "p", 400), 5, NOW)
    spend(ledger, "c", 150)
    in_flight = ledger.reserve("c", 50, NOW)
    ledger.revoke("c", NOW)
    ledger.purge_expired(NOW)
    assert ledger.get_key("p").held_micros == 400, "a grant returns only once nothing of the child is in flight"
    ledger.settle(in_flight.hold_id, 30)
    ledger.purge_expired(NOW)
    parent = ledger.get_key("p")
    assert (parent.held_micros, parent.spent_micros, parent.remaining_micros) == (0, 180, 820)
    assert ledger.get_key("c").grant_micros == 0
    ledger.purge_expired(NOW)
    assert ledger.get_key("p").spent_micros == 180, "a grant returns once"


def test_revoking_a_tree_with_nothing_in_flight_returns_its_grants_at_once(ledger):
    """An orchestrator revokes a finished sub-agent and can spend what it left at once, not after a purge."""
    ledger.create_key(record("p", budget=1_000))
    ledger.create_child(child("c", "p", 400), 5, NOW)
    ledger.create_child(child("g", "c", 100, depth=2), 5, NOW)
    spend(ledger, "g", 20)
    spend(ledger, "c", 30)
    assert ledger.revoke("c", NOW) is True
    parent = ledger.get_key("p")
    assert (parent.held_micros, parent.spent_micros, parent.remaining_micros) == (0, 50, 950)
    assert ledger.get_key("c").grant_micros == ledger.get_key("g").grant_micros == 0
    ledger.purge_expired(NOW)
    assert ledger.get_key("p").spent_micros == 50, "a grant returns once"


def test_expiry_returns_grants_up_a_whole_tree_then_purges_it(ledger):
    ledger.create_key(record("p", budget=1_000, expires_at=NOW + 100))
    ledger.create_child(child("c", "p", 500, expires_at=NOW + 50), 5, NOW)
    ledger.create_child(child("g", "c", 200, expires_at=NOW + 50, depth=2), 5, NOW)
    spend(ledger, "g", 70)
    spend(ledger, "c", 30)
    spend(ledger, "p", 10)
    assert sorted(ledger.purge_expired(NOW + 60)) == ["c", "g"]
    parent = ledger.get_key("p")
    assert (parent.held_micros, parent.spent_micros) == (0, 110), "the tree's spend ends on the root"
    assert ledger.purge_expired(NOW + 200) == ["p"]


def test_a_tree_never_spends_more_than_its_root_under_concurrency(store):
    """Children are minted and spend from many threads at once; the root's books stay within its budget."""
    setup = open_patiently(store)
    setup.create_key(record("root", budget=10_000))
    errors = []

    def worker(n: int) -> None:
        ledger = open_patiently(store)
        try:
            for i in range(5):
                if ledger.create_child(child(f"c{n}-{i}", "root", 700), 100, NOW) is None:
                    while (hold := ledger.reserve(f"c{n}-{i}", 90, NOW)).refusal is None:
                        ledger.settle(hold.hold_id, random.randint(0, 90))
                    ledger.revoke(f"c{n}-{i}", NOW)
                root = ledger.get_key("root")
                if root.spent_micros + root.held_micros > root.budget_micros:
                    errors.append(root)
                ledger.purge_expired(NOW)
        finally:
            ledger.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    setup.purge_expired(NOW)
    root = setup.get_key("root")
    children = setup.children("root")
    setup.close()
    assert errors == []
    assert root.held_micros == 0 and root.spent_micros == sum(c.spent_micros for c in children)
    assert all(c.spent_micros <= c.budget_micros for c in children)
    assert root.spent_micros <= root.budget_micros


def test_a_second_handle_on_the_same_store_sees_the_first_ones_writes(store):
    first, second = open_ledger(store), open_ledger(store)
    try:
        first.create_key(record(budget=1_000))
        first.reserve("k1", 800, NOW)
        assert balances(second) == (0, 800)
        refused = second.reserve("k1", 201, NOW)
        assert (refused.refusal, refused.remaining_micros) == (Refusal.BUDGET, 200)
        hold = second.reserve("k1", 200, NOW).hold_id
        assert first.settle(hold, 50) is True
        assert balances(second) == (50, 800)
    finally:
        first.close()
        second.close()


# ----- contexts: what a stored response or a conversation carries into a call that continues it -----

MONTH = 30 * 86_400


def test_a_context_is_known_once_learnt_until_it_expires(ledger):
    assert ledger.context_tokens("openai:response:r1", NOW) is None
    ledger.learn_context("openai:response:r1", 1_234, NOW, NOW + MONTH)
    assert ledger.context_tokens("openai:response:r1", NOW + 1) == 1_234
    assert ledger.context_tokens("openai:response:r2", NOW + 1) is None, "another response"
    assert ledger.context_tokens("openai:response:r1", NOW + MONTH) is None, "expired"


def test_a_context_only_grows(ledger):
    ledger.learn_context("openai:conversation:c1", 500, NOW, NOW + MONTH)
    ledger.learn_context("openai:conversation:c1", 300, NOW + 1, NOW + MONTH)  # a call that measured less
    assert ledger.context_tokens("openai:conversation:c1", NOW + 2) == 500
    ledger.learn_context("openai:conversation:c1", 900, NOW + 2, NOW + MONTH)
    assert ledger.context_tokens("openai:conversation:c1", NOW + 3) == 900


def test_a_forgotten_context_is_unknown_until_a_later_call_measures_it(ledger):
    ledger.learn_context("openai:conversation:c1", 500, NOW, NOW + MONTH)
    ledger.forget_context("openai:conversation:c1", NOW + 10, NOW + MONTH)
    assert ledger.context_tokens("openai:conversation:c1", NOW + 11) is None
    ledger.learn_context("openai:conversation:c1", 700, NOW + 5, NOW + MONTH)  # started before the forgetting
    assert ledger.context_tokens("openai:conversation:c1", NOW + 11) is None
    ledger.learn_context("openai:conversation:c1", 400, NOW + 12, NOW + MONTH)  # started after it
    assert ledger.context_tokens("openai:conversation:c1", NOW + 13) == 400


def test_an_expired_context_is_learnt_afresh(ledger):
    ledger.learn_context("openai:response:r1", 9_000, NOW, NOW + 10)
    ledger.learn_context("openai:response:r1", 100, NOW + 20, NOW + MONTH)
    assert ledger.context_tokens("openai:response:r1", NOW + 21) == 100


def test_contexts_are_shared_by_every_handle_on_the_store(store):
    first, second = open_ledger(store), open_ledger(store)
    try:
        first.learn_context("openai:response:r1", 42, NOW, NOW + MONTH)
        assert second.context_tokens("openai:response:r1", NOW) == 42
    finally:
        first.close()
        second.close()


# ----- exchanged tokens (replay) and the identity a key was minted for -----

GITHUB = "https://token.actions.githubusercontent.com"


def test_a_token_is_claimed_once_until_it_expires(ledger):
    assert ledger.claim_token(GITHUB, "jti-1", NOW + 300, NOW) is True
    assert ledger.claim_token(GITHUB, "jti-1", NOW + 300, NOW + 10) is False, "a replay within its lifetime"
    assert ledger.claim_token(GITHUB, "jti-2", NOW + 300, NOW) is True, "another token of the same issuer"
    assert ledger.claim_token("https://cluster.example", "jti-1", NOW + 300, NOW) is True, "another issuer's jti"
    assert ledger.claim_token(GITHUB, "jti-1", NOW + 900, NOW + 299) is False
    assert ledger.claim_token(GITHUB, "jti-1", NOW + 900, NOW + 301) is True, "forgotten once expired"


def test_a_token_id_spelled_to_look_like_another_issuers_is_its_own(ledger):
    assert ledger.claim_token("https://a", "b:c", NOW + 300, NOW) is True
    assert ledger.claim_token("https://a:b", "c", NOW + 300, NOW) is True
    assert ledger.claim_token("https://a", "b:c", NOW + 300, NOW) is False


def test_purge_forgets_expired_token_claims_and_keeps_live_ones(ledger):
    ledger.claim_token(GITHUB, "old", NOW + 10, NOW)
    ledger.claim_token(GITHUB, "live", NOW + 1000, NOW)
    ledger.purge_expired(NOW + 20)
    assert ledger.claim_token(GITHUB, "live", NOW + 1000, NOW + 20) is False
    assert ledger.claim_token(GITHUB, "old", NOW + 100, NOW + 20) is True


def test_one_token_claimed_by_many_handles_at_once_is_claimed_exactly_once(store):
    """Replicas handed the same token at the same moment: one of them mints a key, the others refuse."""
    start = threading.Barrier(8, timeout=30)  # a handle that fails to open breaks it, not hangs the others
    answers = []

    def claim() -> None:
        try:
            ledger = open_patiently(store)
        except BaseException:
            start.abort()
            raise
        try:
            start.wait()
            answers.append(ledger.claim_token(GITHUB, "raced", NOW + 300, NOW))
        finally:
            ledger.close()

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [False] * 7 + [True]


def test_a_key_keeps_the_identity_it_was_minted_for(ledger):
    identity = '{"issuer": "github", "repository": "acme/evals", "run_id": "42"}'
    ledger.create_key(record("job", identity_json=identity))
    ledger.create_child(child("sub", "job", 100), 10, NOW)
    assert ledger.get_key("job").identity_json == identity
    assert {key.key_id: key.identity_json for key in ledger.list_keys()} == {"job": identity, "sub": None}


HOLD = 7
FITS = 60  # the budget fits exactly this many holds
THREADS, ATTEMPTS = 8, 50


@pytest.mark.parametrize("settle_share", [0.0, 0.5], ids=["holds-only", "with-settles"])
@pytest.mark.parametrize("shared", [True, False], ids=["one-handle", "handle-per-thread"])
def test_concurrent_reserves_never_break_the_cap(store, settle_share, shared):
    setup = open_patiently(store)
    setup.create_key(record(budget=FITS * HOLD))
    start = threading.Barrier(THREADS)
    outcomes = []  # (hold_id or None, settled amount or None, remaining reported)
    outcomes_lock = threading.Lock()
    peak = [0]

    def worker(seed: int):
        rng = random.Random(seed)
        ledger = setup if shared else open_patiently(store)
        start.wait()
        for _ in range(ATTEMPTS):
            reservation = ledger.reserve("k1", HOLD, NOW)
            settled = None
            if reservation.hold_id is not None and rng.random() < settle_share:
                settled = rng.randint(0, HOLD)
                assert ledger.settle(reservation.hold_id, settled)
            spent, held = balances(ledger)
            with outcomes_lock:
                outcomes.append((reservation.hold_id, settled, reservation.remaining_micros))
                peak[0] = max(peak[0], spent + held)
        if not shared:
            ledger.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    budget = FITS * HOLD
    granted = [o for o in outcomes if o[0] is not None]
    settled = [o[1] for o in granted if o[1] is not None]
    open_holds = len(granted) - len(settled)
    spent, held = balances(setup)
    assert len(outcomes) == THREADS * ATTEMPTS
    assert len({o[0] for o in granted}) == len(granted)  # every hold id is distinct
    assert spent == sum(settled) and held == open_holds * HOLD
    assert spent + held <= budget and peak[0] <= budget
    assert all(o[2] < HOLD for o in outcomes if o[0] is None)  # refused only when it truly did not fit
    if settle_share == 0:
        assert len(granted) == FITS
    else:
        assert len(granted) >= FITS  # settling below the hold frees budget for more calls
    setup.close()


PROCESSES, EACH, FITS_ACROSS = 4, 100, 150  # 400 attempts against a budget for 150 holds


def reserve_many(url: str, start, results) -> None:
    """One replica (a spawned process): its own handle on the store, EACH reserves as fast as it can."""
    ledger = open_patiently(url)
    start.wait()
    reservations = [ledger.reserve("k1", HOLD, NOW) for _ in range(EACH)]
    ledger.close()
    results.put([r.hold_id for r in reservations if r.hold_id is not None])


@pytest.mark.parametrize("kind", BACKENDS)
def test_many_processes_on_one_store_never_break_the_cap(kind, request):
    with empty_store(kind, request) as url:
        setup = open_ledger(url)
        setup.create_key(record(budget=FITS_ACROSS * HOLD))
        context = multiprocessing.get_context("spawn")
        start, results = context.Barrier(PROCESSES), context.Queue()
        replicas = [context.Process(target=reserve_many, args=(url, start, results)) for _ in range(PROCESSES)]
        for replica in replicas:
            replica.start()
        granted = [hold_id for _ in replicas for hold_id in results.get(timeout=60)]
        for replica in replicas:
            replica.join(timeout=10)
            assert replica.exitcode == 0
        assert len(granted) == len(set(granted)) == FITS_ACROSS
        assert balances(setup) == (0, FITS_ACROSS * HOLD)  # spent + held == budget, to the micro-dollar
        setup.close()


# ----- property: any sequence of operations keeps the books and the cap -----

KEYS = {"a": (500, NOW + 100), "b": (300, NOW + 200), "c": (50, NOW + 10_000)}  # budget, expiry
# Keys of one account, whose budget per day is MODEL_ACCOUNT_BUDGET (a "day" operation moves to the next day).
KEYS.update({"d": (300, NOW + 4 * 86_400), "e": (300, NOW + 4 * 86_400)})
ACCOUNT_KEYS, MODEL_ACCOUNT_BUDGET = {"d", "e"}, 400

operations = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from(sorted(KEYS)), st.integers(0, 350)),
        st.tuples(st.just("settle"), st.integers(0, 40), st.integers(0, 100)),  # hold index, % of the hold
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.integers(1, 150)),  # time passes: keys expire, holds grow stale
        st.tuples(st.just("revoke"), st.sampled_from(sorted(KEYS))),
        st.tuples(st.just("purge")),
        st.tuples(st.just("sweep"), st.integers(0, 150)),  # settle holds older than this many seconds
        st.tuples(st.just("day")),  # a day passes: the account starts a new period
        st.tuples(st.just("status"), st.sampled_from(["active", "suspended"])),  # of the account
    ),
    max_size=40,
)


class Model:
    """What the ledger should hold, computed the obvious way."""

    def __init__(self):
        self.now = NOW
        self.keys = {key_id: {"spent": 0, "revoked": False} for key_id in KEYS}
        self.holds: dict[int, tuple[str, int, float]] = {}  # open holds: hold id → (key, amount, created at)
        self.hold_ids: list[int] = []  # every hold ever granted, settled or not
        self.account_active = True
        self.period_spent: dict[str, int] = defaultdict(int)  # the account's spend by day

    def day(self, when: float) -> str:
        return Calendar().period("day", when).period_id

    def period_books(self) -> dict[str, tuple[int, int]]:
        """(spent, held) by day, for every day the account held anything in."""
        held = defaultdict(int)
        for key_id, amount, created in self.holds.values():
            if key_id in ACCOUNT_KEYS:
                held[self.day(created)] += amount
        return {day: (self.period_spent[day], held[day]) for day in {*self.period_spent, *held}}

    def account_remaining(self) -> int:
        spent, held = self.period_books().get(self.day(self.now), (0, 0))
        return MODEL_ACCOUNT_BUDGET - spent - held

    def held(self, key_id):
        return sum(amount for k, amount, _ in self.holds.values() if k == key_id)

    def has_holds(self, key_id):
        return any(k == key_id for k, _, _ in self.holds.values())

    def expected_refusal(self, key_id, amount):
        if key_id not in self.keys:
            return Refusal.UNKNOWN
        if self.keys[key_id]["revoked"]:
            return Refusal.REVOKED
        if self.now >= KEYS[key_id][1]:
            return Refusal.EXPIRED
        if key_id in ACCOUNT_KEYS and not self.account_active:
            return Refusal.SUSPENDED
        if amount > KEYS[key_id][0] - self.keys[key_id]["spent"] - self.held(key_id):
            return Refusal.BUDGET
        if key_id in ACCOUNT_KEYS and amount > self.account_remaining():
            return Refusal.ACCOUNT_BUDGET
        return None

    def close(self, hold_id, amount):
        key_id, _, created = self.holds.pop(hold_id)
        if key_id in self.keys:
            self.keys[key_id]["spent"] += amount
        if key_id in ACCOUNT_KEYS:
            self.period_spent[self.day(created)] += amount  # into the day it was taken in


def apply(ledger, model: Model, op: tuple) -> None:
    name, *args = op
    if name == "reserve":
        key_id, amount = args
        reservation = ledger.reserve(key_id, amount, model.now)
        assert reservation.refusal is model.expected_refusal(key_id, amount), op
        if reservation.hold_id is not None:
            model.holds[reservation.hold_id] = (key_id, amount, model.now)
            model.hold_ids.append(reservation.hold_id)
    elif name in ("settle", "release") and model.hold_ids:
        hold_id = model.hold_ids[args[0] % len(model.hold_ids)]
        is_open = hold_id in model.holds
        amount = model.holds[hold_id][1] * args[1] // 100 if name == "settle" and is_open else 0
        assert ledger.settle(hold_id, amount) is is_open, op
        if is_open:
            model.close(hold_id, amount)
    elif name == "tick":
        model.now += args[0]
    elif name == "day":
        model.now += 86_400
    elif name == "status":
        assert ledger.update_account(account("acct", budget=MODEL_ACCOUNT_BUDGET, status=args[0]))
        model.account_active = args[0] == "active"
    elif name == "revoke":
        key_id = args[0]
        assert ledger.revoke(key_id, model.now) is (key_id in model.keys and not model.keys[key_id]["revoked"])
        if key_id in model.keys:
            model.keys[key_id]["revoked"] = True
    elif name == "purge":
        gone = {k for k in model.keys if model.now >= KEYS[k][1] and not model.has_holds(k)}
        assert set(ledger.purge_expired(model.now)) == gone
        for key_id in gone:
            del model.keys[key_id]
    elif name == "sweep":
        stale = sorted(
            (created, hold_id, key_id, amount)
            for hold_id, (key_id, amount, created) in model.holds.items()
            if created < model.now - args[0]
        )
        expected = [StaleHold(hold_id, key_id, amount, created) for created, hold_id, key_id, amount in stale]
        assert ledger.sweep_stale_holds(model.now, args[0]) == expected, op
        for hold in expected:
            model.close(hold.hold_id, hold.amount_micros)


@pytest.mark.parametrize("kind", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_any_sequence_of_operations_keeps_the_cap_and_the_books(kind, request, ops):
    with empty_store(kind, request) as url:
        ledger = open_ledger(url)
        try:
            ledger.create_account(account("acct", budget=MODEL_ACCOUNT_BUDGET))
            for key_id, (budget, expires_at) in KEYS.items():
                in_account = "acct" if key_id in ACCOUNT_KEYS else None
                ledger.create_key(record(key_id, budget=budget, expires_at=expires_at, account_id=in_account))
            model = Model()
            for op in ops:
                apply(ledger, model, op)
                for key_id in KEYS:
                    key = ledger.get_key(key_id)
                    if key_id not in model.keys:
                        assert key is None
                        continue
                    assert key.spent_micros + key.held_micros <= key.budget_micros
                    assert key.held_micros == model.held(key_id)
                    assert key.spent_micros == model.keys[key_id]["spent"]
                books = model.period_books()
                assert period_books(ledger, "acct") == books
                assert all(spent + held <= MODEL_ACCOUNT_BUDGET for spent, held in books.values())
        finally:
            ledger.close()


# ----- SQLite only: file locks -----


def test_sqlite_locked_database_makes_reserve_unavailable_after_the_busy_timeout(tmp_path):
    path = tmp_path / "locked.db"
    ledger = SqliteLedger(path, busy_timeout_seconds=0.2)
    ledger.create_key(record())
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable):
            ledger.reserve("k1", 1, NOW)
        assert 0.15 < time.monotonic() - started < 1.5
        assert ledger.get_key("k1").held_micros == 0  # readers are not blocked (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.reserve("k1", 1, NOW).refusal is None  # and the ledger recovers
    ledger.close()


def test_sqlite_handles_opening_one_new_file_together_all_open(tmp_path):
    """Workers or replicas starting together open the same new file. SQLite answers the switch to WAL
    "locked" at once while another connection makes that switch; an opener must wait its turn."""
    failures = []

    def open_and_close(path: Path) -> None:
        try:
            SqliteLedger(path, busy_timeout_seconds=30).close()
        except LedgerUnavailable as e:
            failures.append(str(e))

    for round_number in range(100):  # the race is narrow: each round is a fresh file and 8 openers
        path = tmp_path / f"new-{round_number}.db"
        openers = [threading.Thread(target=open_and_close, args=(path,)) for _ in range(8)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
    assert failures == []


def test_sqlite_ping_of_a_store_locked_past_the_busy_timeout_is_unavailable(tmp_path):
    ledger = SqliteLedger(tmp_path / "keys.db", busy_timeout_seconds=0.2)
    blocker = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerUnavailable):
            ledger.ping()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert ledger.ping() is None
    ledger.close()


def test_sqlite_nonblocking_handle_reports_a_locked_store_as_busy_at_once(tmp_path):
    ledger = SqliteLedger(tmp_path / "keys.db")
    blocker = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerBusy):
            ledger.nonblocking().reserve("any", 1, 0.0)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        ledger.close()


# ----- Redis only: TTLs and outages -----


@pytest.fixture
def redis_ledger(redis_server):
    redis_server.flushdb()
    ledger = RedisLedger(redis_server.url)
    with redis.Redis.from_url(redis_server.url) as raw:
        yield ledger, raw
    ledger.close()


def test_redis_has_no_nonblocking_handle(redis_ledger):
    ledger, _ = redis_ledger
    assert ledger.nonblocking() is None


def test_redis_forgets_a_claimed_token_by_its_ttl_at_the_token_expiry(redis_ledger):
    ledger, raw = redis_ledger
    assert ledger.claim_token(GITHUB, "jti", NOW + 300, NOW + 0.5) is True
    [name] = raw.keys("agentkeys:token:*")
    assert 299 <= raw.ttl(name) <= 300


def test_redis_key_ttl_runs_past_expiry_on_redis_clock_and_is_lifted_while_a_hold_is_open(redis_ledger):
    ledger, raw = redis_ledger
    now = ledger.now()  # Redis's TIME: what every script reads when no time is given
    ledger.create_key(record(created_at=now, expires_at=now + 3600))
    lifetime = 3600 + RETENTION_SECONDS
    assert lifetime - 2 <= raw.ttl("agentkeys:key:k1") <= lifetime

    first = ledger.reserve("k1", 10).hold_id
    second = ledger.reserve("k1", 10).hold_id
    assert raw.ttl("agentkeys:key:k1") == -1  # never dropped while its books are open
    ledger.settle(first, 10)
    assert raw.ttl("agentkeys:key:k1") == -1
    ledger.settle(second, 10)  # the last hold closed: the TTL is back
    assert lifetime - 2 <= raw.ttl("agentkeys:key:k1") <= lifetime

    ledger.create_key(record("old", created_at=now - 7200, expires_at=now - 3600))
    ledger.reserve("old", 10, now=now - 4000)  # taken before it expired; its proxy died
    ledger.sweep_stale_holds(None, 60)  # swept after expiry: kept for the retention from now
    assert RETENTION_SECONDS - 2 <= raw.ttl("agentkeys:key:old") <= RETENTION_SECONDS


def test_redis_books_a_hold_to_the_period_of_redis_clock_not_the_proxys(redis_ledger, monkeypatch):
    """The proxy's clock is 20 hours off Redis's: a hold on the store's clock (now None) is still booked to the
    day Redis says it is (the proxy hands the days around its own, and the script picks by `TIME`)."""
    ledger, raw = redis_ledger
    seconds, micros = raw.time()
    redis_now = seconds + micros / 1e6
    ledger.create_account(account(budget=1_000, created_at=redis_now))
    ledger.create_key(record("k1", created_at=redis_now, expires_at=redis_now + 3600, account_id="a1"))
    for skew in (-20 * 3600, 20 * 3600):
        monkeypatch.setattr(redis_module, "time", SimpleNamespace(time=lambda skew=skew: redis_now + skew))
        ledger.settle(ledger.reserve("k1", 10).hold_id, 10)
    today = Calendar().period("day", redis_now).period_id
    assert period_books(ledger) == {today: (20, 0)}


def test_redis_an_accounts_key_removed_by_its_ttl_leaves_its_index_when_listed(redis_ledger):
    ledger, raw = redis_ledger
    ledger.create_account(account())
    ledger.create_key(record("k1", account_id="a1"))
    ledger.create_key(record("k2", account_id="a1"))
    raw.delete("agentkeys:key:k1")  # as its TTL would
    assert [key.key_id for key in ledger.account_keys("a1")] == ["k2"]
    assert raw.smembers("agentkeys:account_keys:a1") == {b"k2"}


def test_redis_key_removed_by_its_ttl_is_gone_and_purge_cleans_its_index(redis_ledger):
    ledger, raw = redis_ledger
    ledger.create_key(record("gone", expires_at=NOW + 10))
    ledger.create_key(record("kept", expires_at=NOW + 1000))
    raw.delete("agentkeys:key:gone")  # what the TTL does, a day after expiry
    assert [key.key_id for key in ledger.list_keys()] == ["kept"]
    assert ledger.reserve("gone", 1, NOW).refusal is Refusal.UNKNOWN
    assert ledger.purge_expired(NOW + 10) == ["gone"]
    assert raw.zrange("agentkeys:keys", 0, -1) == [b"kept"]
    assert raw.zrange("agentkeys:expiry", 0, -1) == [b"kept"]


def every_operation(ledger):
    return {
        "create_key": lambda: ledger.create_key(record("new")),
        "get_key": lambda: ledger.get_key("k1"),
        "list_keys": ledger.list_keys,
        "ping": ledger.ping,
        "revoke": lambda: ledger.revoke("k1", NOW),
        "reserve": lambda: ledger.reserve("k1", 1, NOW),
        "settle": lambda: ledger.settle("k1.0123456789abcdef", 1),
        "sweep_stale_holds": lambda: ledger.sweep_stale_holds(NOW, 60),
        "purge_expired": lambda: ledger.purge_expired(NOW),
    }


@pytest.mark.parametrize("outage", ["kill", "stop"])
def test_redis_down_is_unavailable_at_once_and_the_same_ledger_recovers_when_it_is_back(outage):
    with RedisServer() as server:
        ledger = RedisLedger(server.url)
        ledger.create_key(record())
        assert ledger.reserve("k1", 1, NOW).refusal is None
        getattr(server, outage)()

        started = time.monotonic()
        for operation in every_operation(ledger).values():
            with pytest.raises(LedgerUnavailable, match=rf"store redis://127.0.0.1:{server.port}/0 unreachable"):
                operation()
        assert time.monotonic() - started < 1, "a refused port must not be waited for"

        server.start()  # same port, empty: a replacement instance
        ledger.create_key(record())
        assert ledger.reserve("k1", 1, NOW).refusal is None
        ledger.close()


def test_redis_restart_between_two_calls_goes_unnoticed():
    """The pool's idle connection died with the old server; the next call must not fail on it."""
    with RedisServer() as server:
        ledger = RedisLedger(server.url)
        ledger.create_key(record())
        server.kill()
        server.start()
        assert ledger.get_key("k1") is None  # answered (by the new, empty server), not refused
        ledger.close()


def test_redis_unavailable_message_names_the_store_but_not_its_password():
    ledger = RedisLedger(f"redis://agent:hunter2@127.0.0.1:{free_port()}/3")
    with pytest.raises(LedgerUnavailable) as refused:
        ledger.get_key("k1")
    assert "redis://127.0.0.1:" in str(refused.value) and "/3 unreachable" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_redis_that_lost_its_data_never_lets_an_old_calls_settlement_close_a_new_keys_hold():
    """Redis restarted empty while a call was in flight: its late settlement must not touch the new
    key's hold (with holds numbered by a counter in Redis, both were hold 1)."""
    with RedisServer() as server:
        ledger = RedisLedger(server.url)
        ledger.create_key(record("old", budget=1_000))
        in_flight = ledger.reserve("old", 500, NOW).hold_id
        server.kill()
        server.start()  # empty
        ledger.create_key(record("new", budget=800))
        new_hold = ledger.reserve("new", 800, NOW).hold_id
        assert ledger.settle(in_flight, 100) is False
        assert balances(ledger, "new") == (0, 800), "the new key's hold is still open, its budget still held"
        assert ledger.reserve("new", 1, NOW).refusal is Refusal.BUDGET
        assert ledger.settle(new_hold, 700) is True and balances(ledger, "new") == (700, 0)
        ledger.close()



@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
def test_redis_that_may_evict_keys_is_refused_at_start_and_by_every_operation(policy):
    """allkeys-* evicts key records, holds and indexes; volatile-* idle keys and children whose budget is
    still held on their parent. Only noeviction keeps the books."""
    with RedisServer(None, "--maxmemory-policy", policy) as server:
        with pytest.raises(StoreMisconfigured, match=rf"maxmemory-policy {policy}\).*maxmemory-policy noeviction"):
            open_ledger(server.url)
        ledger = RedisLedger(server.url)
        for name, operation in every_operation(ledger).items():
            with pytest.raises(StoreMisconfigured, match="may evict keys"):
                operation()
            assert server.key_count() == 0, f"{name} wrote to a store that may evict"
        ledger.close()


def test_redis_set_to_evict_while_running_fails_the_readiness_ping():
    with RedisServer() as server:
        ledger = open_ledger(server.url)
        assert ledger.ping() is None
        with redis.Redis(port=server.port) as raw:
            raw.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(StoreMisconfigured, match="allkeys-lru"):
            ledger.ping()
        ledger.close()


def test_redis_the_acl_the_docs_give_runs_every_operation_and_nothing_destructive():
    """docs/hardening.md's ACL line, applied as written: the proxy's work passes, FLUSHALL does not."""
    hardening = (Path(__file__).resolve().parents[2] / "docs" / "hardening.md").read_text()
    [acl] = [line.split(maxsplit=3)[3] for line in hardening.splitlines() if line.strip().startswith("ACL SETUSER")]
    with RedisServer() as server:
        with redis.Redis(port=server.port) as raw:
            raw.execute_command("ACL", "SETUSER", "agentkeys", *acl.replace("LONG-RANDOM-PASSWORD", "pw").split())
        url = f"redis://agentkeys:pw@127.0.0.1:{server.port}/0"
        ledger = open_ledger(url)
        now = ledger.now()
        ledger.create_key(record("p", budget=1_000, created_at=now, expires_at=now + 100))
        assert ledger.create_child(child("c", "p", 100, expires_at=now + 50), 5) is None
        hold = ledger.reserve("p", 10).hold_id
        ledger.renew_holds([hold])
        assert ledger.settle(hold, 5) is True
        assert ledger.cancel_hold(ledger.reserve("p", 10).hold_id) is True
        assert [key.key_id for key in ledger.children("p")] == ["c"] and len(ledger.list_keys()) == 2
        assert ledger.sweep_stale_holds(None, 0) == [] and ledger.purge_expired() == []
        assert ledger.claim_token(GITHUB, "jti", now + 10) is True and ledger.revoke("p") is True
        assert ledger.ping() is None
        ledger.close()
        with redis.Redis.from_url(url) as agentkeys_user, pytest.raises(redis.exceptions.NoPermissionError):
            agentkeys_user.flushall()


def test_a_swept_hold_is_remembered_as_swept_until_its_key_is_purged(ledger):
    ledger.create_key(record(expires_at=NOW + 10))
    swept, settled = ledger.reserve("k1", 5, NOW).hold_id, ledger.reserve("k1", 6, NOW + 5).hold_id
    assert ledger.sweep_stale_holds(NOW + 62, older_than_seconds=60) == [StaleHold(swept, "k1", 5, NOW)]
    ledger.settle(settled, 6)
    assert ledger.was_swept(swept) is True and ledger.was_swept(settled) is False
    assert ledger.purge_expired(NOW + 100) == ["k1"]
    assert ledger.was_swept(swept) is False


# ----- accounts: a budget per period over every key minted for the account -----

DAY = 86_400  # NOW falls in 1970-01-12 (UTC, a Monday); NOW + DAY in the next day
MIDNIGHT = 12 * DAY  # 1970-01-13 00:00 UTC


def account(account_id: str = "a1", budget: int = 1_000, period: str = "day", **fields) -> AccountRecord:
    return AccountRecord(
        account_id=account_id, name=f"account {account_id}", plan_name="test-plan", period=period,
        budget_micros=budget, created_at=fields.pop("created_at", NOW), **fields,
    )  # fmt: skip


def period_books(ledger, account_id: str = "a1") -> dict[str, tuple[int, int]]:
    """(spent, held) by period id."""
    return {p.period_id: (p.spent_micros, p.held_micros) for p in ledger.account_periods(account_id)}


def test_accounts_are_created_read_listed_updated_and_deleted(ledger):
    ledger.create_account(account("a1", created_at=NOW))
    ledger.create_account(account("a2", budget=5, period="month", created_at=NOW + 1))
    assert ledger.get_account("a1") == account("a1")
    assert [a.account_id for a in ledger.list_accounts()] == ["a1", "a2"]
    with pytest.raises(AccountExists):
        ledger.create_account(account("a1"))
    assert ledger.update_account(account("a2", budget=7, period="week", status="suspended"))
    assert ledger.get_account("a2") == account("a2", budget=7, period="week", status="suspended", created_at=NOW + 1)
    assert not ledger.update_account(account("nobody"))
    assert ledger.get_account("nobody") is None
    assert ledger.delete_account("a1", NOW)
    assert not ledger.delete_account("a1", NOW)
    assert [a.account_id for a in ledger.list_accounts()] == ["a2"]


def test_a_shadow_hold_of_an_account_key_is_on_its_period_and_refused_once_the_account_is_suspended(ledger):
    """Shadow mode goes past the budgets, the account's too, but its holds are in the books like any other."""
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=700, account_id="a1"))
    ledger.reserve("k1", 600, NOW)
    past = ledger.hold_regardless("k1", 900, NOW)
    assert (past.refusal, past.remaining_micros) == (None, -800)
    assert period_books(ledger) == {"1970-01-12": (0, 1_500)}
    ledger.settle(past.hold_id, 950)
    assert period_books(ledger) == {"1970-01-12": (950, 600)}
    ledger.update_account(account(budget=1_000, status="suspended"))
    refused = ledger.hold_regardless("k1", 1, NOW)
    assert (refused.hold_id, refused.refusal) == (None, Refusal.SUSPENDED)


def test_a_named_hold_of_an_account_key_is_booked_to_its_period_once_and_freed_there_by_its_name(ledger):
    """A reserve retried by its name holds nothing twice on the period; a cancel by name frees the period too,
    and a name cancelled before its reserve arrived takes nothing from the period either."""
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=900, account_id="a1"))
    first = ledger.reserve("k1", 600, NOW, hold_id="k1.0000000000000001")
    assert ledger.reserve("k1", 600, NOW, hold_id="k1.0000000000000001") == first
    assert period_books(ledger) == {"1970-01-12": (0, 600)}
    assert ledger.cancel_hold(first.hold_id) is True
    assert period_books(ledger) == {"1970-01-12": (0, 0)}
    assert ledger.cancel_hold("k1.0000000000000002") is False
    assert ledger.reserve("k1", 100, NOW, hold_id="k1.0000000000000002").refusal is Refusal.CANCELLED
    again = ledger.hold_regardless("k1", 2_000, NOW, hold_id="k1.0000000000000003")
    assert ledger.hold_regardless("k1", 2_000, NOW, hold_id="k1.0000000000000003").hold_id == again.hold_id
    assert period_books(ledger) == {"1970-01-12": (0, 2_000)}
    assert ledger.settle(again.hold_id, 1_500) and period_books(ledger) == {"1970-01-12": (1_500, 0)}


def test_a_swept_hold_of_an_account_key_charges_the_period_it_was_taken_in(ledger):
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=900, expires_at=NOW + 5 * 86_400, account_id="a1"))
    ledger.reserve("k1", 300, NOW)
    [swept] = ledger.sweep_stale_holds(NOW + 86_400, older_than_seconds=60)  # found the next day
    assert ledger.was_swept(swept.hold_id)
    assert period_books(ledger) == {"1970-01-12": (300, 0)}
    assert balances(ledger, "k1") == (300, 0)


def test_a_hold_on_a_record_moved_to_another_account_since_the_proxy_verified_it_is_refused(store, ledger):
    ledger.create_account(account("a1"))
    ledger.create_account(account("a2"))
    verified = record(budget=1_000, account_id="a1")
    ledger.create_key(verified)
    tamper(store, "k1", account_id="a2")
    for take in (ledger.reserve, ledger.hold_regardless):
        assert take("k1", 1, NOW, grant=verified).refusal is Refusal.TAMPERED
    assert period_books(ledger, "a1") == {} and period_books(ledger, "a2") == {}


def test_a_hold_must_fit_the_key_and_the_account_period(ledger):
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=700, account_id="a1"))
    ledger.create_key(record("k2", budget=700, account_id="a1"))
    assert [k.key_id for k in ledger.account_keys("a1")] == ["k1", "k2"]
    first = ledger.reserve("k1", 600, NOW)
    assert first.hold_id is not None and first.remaining_micros == 100  # the key has 100 left, the account 400
    refused = ledger.reserve("k2", 500, NOW)  # fits k2's own 700, not the account's 400
    assert (refused.hold_id, refused.refusal, refused.remaining_micros) == (None, Refusal.ACCOUNT_BUDGET, 400)
    refused = ledger.reserve("k1", 200, NOW)  # fits the account, not k1
    assert (refused.refusal, refused.remaining_micros) == (Refusal.BUDGET, 100)
    assert ledger.reserve("k2", 400, NOW).remaining_micros == 0
    assert period_books(ledger) == {"1970-01-12": (0, 1_000)}
    ledger.settle(first.hold_id, 250)
    assert period_books(ledger) == {"1970-01-12": (250, 400)}
    assert balances(ledger, "k1") == (250, 0)


def test_a_key_without_an_account_is_bound_by_its_own_budget_only(ledger):
    ledger.create_account(account(budget=10))
    ledger.create_key(record("k1", budget=1_000))
    assert ledger.reserve("k1", 900, NOW).hold_id is not None
    assert ledger.account_periods("a1") == []


def test_a_suspended_accounts_keys_are_refused_at_once_and_served_again_when_resumed(ledger):
    ledger.create_account(account())
    ledger.create_key(record("k1", account_id="a1"))
    assert ledger.reserve("k1", 10, NOW).hold_id is not None
    ledger.update_account(account(status="suspended"))
    assert ledger.reserve("k1", 10, NOW).refusal is Refusal.SUSPENDED
    assert ledger.reserve_many([("k1", 10, NOW), ("k1", 10, NOW)])[1].refusal is Refusal.SUSPENDED
    ledger.update_account(account(status="active"))
    assert ledger.reserve("k1", 10, NOW).hold_id is not None


def test_deleting_an_account_revokes_its_keys_and_their_children(ledger):
    ledger.create_account(account())
    ledger.create_key(record("k1", account_id="a1"))
    ledger.create_key(record("other"))
    assert ledger.create_child(child("c1", "k1", 100), 5, NOW) is None
    held = ledger.reserve("k1", 10, NOW)
    assert ledger.delete_account("a1", NOW)
    assert ledger.get_key("k1").revoked_at == NOW and ledger.get_key("c1").revoked_at == NOW
    assert ledger.get_key("other").revoked_at is None
    assert ledger.reserve("k1", 1, NOW).refusal is Refusal.REVOKED
    assert ledger.settle(held.hold_id, 5)  # a call in flight still settles on its key
    assert balances(ledger, "k1") == (5, 100)
    assert ledger.account_periods("a1") == []


def test_a_key_of_an_unknown_account_is_refused(ledger):
    ledger.create_key(record("k1", account_id="gone"))
    assert ledger.reserve("k1", 1, NOW).refusal is Refusal.SUSPENDED


def test_a_new_period_starts_fresh_and_holds_settle_into_the_period_they_were_taken_in(ledger):
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=10_000, expires_at=NOW + 3 * DAY, account_id="a1"))
    in_flight = ledger.reserve("k1", 900, NOW)
    assert ledger.reserve("k1", 200, NOW).refusal is Refusal.ACCOUNT_BUDGET
    tomorrow = ledger.reserve("k1", 1_000, NOW + DAY)  # the day is over: the whole budget again
    assert tomorrow.hold_id is not None
    assert ledger.settle(in_flight.hold_id, 300)  # settles after midnight, into yesterday
    assert ledger.settle(tomorrow.hold_id, 1_000)
    assert period_books(ledger) == {"1970-01-12": (300, 0), "1970-01-13": (1_000, 0)}
    assert ledger.reserve("k1", 1, NOW + DAY).refusal is Refusal.ACCOUNT_BUDGET
    assert balances(ledger) == (1_300, 0)


@pytest.mark.parametrize(
    "period, now, later, same",
    [("day", NOW, NOW + DAY, False), ("week", NOW, NOW + DAY, True), ("month", NOW, NOW + 30 * DAY, False)],
)
def test_each_kind_of_period_rolls_over_at_its_own_end(ledger, period, now, later, same):
    ledger.create_account(account(budget=100, period=period))
    ledger.create_key(record("k1", budget=10_000, expires_at=NOW + 60 * DAY, account_id="a1"))
    ledger.settle(ledger.reserve("k1", 100, now).hold_id, 100)
    refusal = ledger.reserve("k1", 1, later).refusal
    assert refusal is (Refusal.ACCOUNT_BUDGET if same else None)


def test_a_top_up_adds_to_the_current_period_only(ledger):
    ledger.create_account(account(budget=100))
    ledger.create_key(record("k1", budget=10_000, expires_at=NOW + 3 * DAY, account_id="a1"))
    topped = ledger.top_up("a1", 50, NOW)
    assert (topped.period_id, topped.top_up_micros) == ("1970-01-12", 50)
    assert ledger.reserve("k1", 150, NOW).hold_id is not None
    assert ledger.reserve("k1", 101, NOW + DAY).refusal is Refusal.ACCOUNT_BUDGET
    assert ledger.top_up("nobody", 50, NOW) is None


def test_a_batch_of_settlements_reaches_each_holds_own_period(ledger):
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=10_000, expires_at=NOW + 3 * DAY, account_id="a1"))
    ledger.create_key(record("k2", budget=10_000, expires_at=NOW + 3 * DAY, account_id="a1"))
    holds = ledger.reserve_many([("k1", 100, NOW), ("k2", 200, NOW), ("k1", 300, NOW + DAY), ("k2", 1, NOW)])
    assert ledger.settle_many([(holds[0].hold_id, 10), (holds[1].hold_id, 20), (holds[2].hold_id, 30)]) == [True] * 3
    assert period_books(ledger) == {"1970-01-12": (30, 1), "1970-01-13": (30, 0)}


def test_a_swept_hold_is_charged_in_full_to_its_period(ledger):
    ledger.create_account(account(budget=1_000))
    ledger.create_key(record("k1", budget=10_000, expires_at=NOW + 3 * DAY, account_id="a1"))
    ledger.reserve("k1", 400, NOW)
    assert [hold.amount_micros for hold in ledger.sweep_stale_holds(NOW + DAY, 60)] == [400]
    assert period_books(ledger) == {"1970-01-12": (400, 0)}


def test_periods_follow_the_ledgers_time_zone(store):
    """23:30 UTC on 1970-01-12 is already the 13th in Paris (UTC+1)."""
    ledger = open_ledger(store, Calendar("Europe/Paris"))
    ledger.create_account(account(budget=100))
    ledger.create_key(record("k1", expires_at=NOW + DAY, account_id="a1"))
    late = MIDNIGHT - 1800
    ledger.reserve("k1", 5, late)
    assert period_books(ledger) == {"1970-01-13": (0, 5)}
    ledger.close()


KEYS_OF_ACCOUNT, CALLS_PER_KEY, ACCOUNT_FITS = 20, 10, 60  # 200 holds against an account budget for 60


def test_many_keys_of_one_account_never_break_its_period_budget_across_a_rollover(store):
    """20 keys of one account, 10 threads, a clock that passes midnight (with calls in flight) once the day's
    budget is spent: at no moment does a day hold and spend more than the account's budget, every settlement
    lands in the day its hold was taken, and the books of the keys and of the days agree to the micro-dollar
    (nothing lost, nothing counted twice)."""
    setup = open_patiently(store)
    budget = ACCOUNT_FITS * HOLD
    setup.create_account(account(budget=budget))
    for index in range(KEYS_OF_ACCOUNT):
        setup.create_key(record(f"k{index}", budget=5 * HOLD, expires_at=NOW + 3 * DAY, account_id="a1"))
    clock = {"now": MIDNIGHT - 1}
    calls = [f"k{index % KEYS_OF_ACCOUNT}" for index in range(KEYS_OF_ACCOUNT * CALLS_PER_KEY)]
    lock, outcomes, peaks, start = threading.Lock(), [], defaultdict(int), threading.Barrier(10)

    def worker(seed: int):
        rng, ledger = random.Random(seed), open_patiently(store)
        start.wait()
        for key_id in calls[seed::10]:
            taken_at = clock["now"]
            reservation = ledger.reserve(key_id, HOLD, taken_at)
            for day, (spent, held) in period_books(ledger).items():
                with lock:
                    peaks[day] = max(peaks[day], spent + held)
            if reservation.refusal is Refusal.ACCOUNT_BUDGET:
                clock["now"] = MIDNIGHT  # the day is spent; midnight comes with calls in flight on other threads
            if reservation.hold_id is not None:
                charge = rng.choice([HOLD, rng.randint(0, HOLD)])
                with lock:
                    outcomes.append((taken_at, charge))
                time.sleep(rng.random() / 1000)
                assert ledger.settle(reservation.hold_id, charge)
        ledger.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    books = period_books(setup)
    assert sorted(books) == ["1970-01-12", "1970-01-13"]
    for day, in_day in (("1970-01-12", lambda t: t < MIDNIGHT), ("1970-01-13", lambda t: t >= MIDNIGHT)):
        charges = [charge for taken_at, charge in outcomes if in_day(taken_at)]
        assert books[day] == (sum(charges), 0)
        assert peaks[day] <= budget
    keys_spent = sum(setup.get_key(f"k{index}").spent_micros for index in range(KEYS_OF_ACCOUNT))
    assert keys_spent == sum(charge for _, charge in outcomes) == sum(spent for spent, _ in books.values())
    setup.close()
