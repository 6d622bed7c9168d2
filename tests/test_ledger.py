"""The SQLite ledger: keys, holds and the hard cap, including across threads and connections."""

import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentkeys.ledger import KeyRecord, LedgerBusy, LedgerUnavailable, Refusal, SqliteLedger

NOW = 1_000_000.0


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


@pytest.fixture
def ledger(tmp_path):
    opened = SqliteLedger(tmp_path / "ledger.db")
    yield opened
    opened.close()


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


def test_duplicate_key_id_is_refused(ledger):
    ledger.create_key(record("a"))
    with pytest.raises(sqlite3.IntegrityError):
        ledger.create_key(record("a"))
    assert len(ledger.list_keys()) == 1


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
    assert ledger.settle(12345, 10) is False


def test_settle_frees_budget_for_the_next_reserve(ledger):
    ledger.create_key(record(budget=1_000))
    hold = ledger.reserve("k1", 1_000, NOW).hold_id
    assert ledger.reserve("k1", 1, NOW).refusal is Refusal.BUDGET
    ledger.settle(hold, 300)
    assert ledger.reserve("k1", 700, NOW).refusal is None


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


# ----- several connections, threads and locks -----


def test_a_second_ledger_on_the_same_file_sees_the_first_ones_writes(tmp_path):
    path = tmp_path / "shared.db"
    first, second = SqliteLedger(path), SqliteLedger(path)
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


def test_a_locked_database_makes_reserve_unavailable_after_the_busy_timeout(tmp_path):
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


HOLD = 7
FITS = 60  # the budget fits exactly this many holds
THREADS, ATTEMPTS = 8, 50


@pytest.mark.parametrize("settle_share", [0.0, 0.5], ids=["holds-only", "with-settles"])
@pytest.mark.parametrize("shared", [True, False], ids=["one-connection", "connection-per-thread"])
def test_concurrent_reserves_never_break_the_cap(tmp_path, settle_share, shared):
    path = tmp_path / "race.db"
    setup = SqliteLedger(path)
    setup.create_key(record(budget=FITS * HOLD))
    start = threading.Barrier(THREADS)
    outcomes = []  # (hold_id or None, settled amount or None, remaining reported)
    outcomes_lock = threading.Lock()
    peak = [0]

    def worker(seed: int):
        rng = random.Random(seed)
        ledger = setup if shared else SqliteLedger(path, busy_timeout_seconds=10)
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


# ----- property: any sequence of operations keeps the books and the cap -----

KEYS = {"a": (500, NOW + 100), "b": (300, NOW + 200), "c": (50, NOW + 10_000)}  # budget, expiry

operations = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from(sorted(KEYS)), st.integers(0, 350)),
        st.tuples(st.just("settle"), st.integers(0, 40), st.integers(0, 100)),  # hold index, % of the hold
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.integers(1, 150)),  # time passes: keys expire
        st.tuples(st.just("revoke"), st.sampled_from(sorted(KEYS))),
        st.tuples(
            st.just("purge"),
        ),
    ),
    max_size=40,
)


class Model:
    """What the ledger should hold, computed the obvious way."""

    def __init__(self):
        self.now = NOW
        self.keys = {key_id: {"spent": 0, "revoked": False} for key_id in KEYS}
        self.holds: dict[int, tuple[str, int]] = {}  # open holds: hold id → (key, amount)
        self.hold_ids: list[int] = []  # every hold ever granted, settled or not

    def held(self, key_id):
        return sum(amount for k, amount in self.holds.values() if k == key_id)

    def expected_refusal(self, key_id, amount):
        if key_id not in self.keys:
            return Refusal.UNKNOWN
        if self.keys[key_id]["revoked"]:
            return Refusal.REVOKED
        if self.now >= KEYS[key_id][1]:
            return Refusal.EXPIRED
        if amount > KEYS[key_id][0] - self.keys[key_id]["spent"] - self.held(key_id):
            return Refusal.BUDGET
        return None


def apply(ledger, model: Model, op: tuple) -> None:
    name, *args = op
    if name == "reserve":
        key_id, amount = args
        reservation = ledger.reserve(key_id, amount, model.now)
        assert reservation.refusal is model.expected_refusal(key_id, amount), op
        if reservation.hold_id is not None:
            model.holds[reservation.hold_id] = (key_id, amount)
            model.hold_ids.append(reservation.hold_id)
    elif name in ("settle", "release") and model.hold_ids:
        hold_id = model.hold_ids[args[0] % len(model.hold_ids)]
        is_open = hold_id in model.holds
        amount = model.holds[hold_id][1] * args[1] // 100 if name == "settle" and is_open else 0
        assert ledger.settle(hold_id, amount) is is_open, op
        if is_open:
            key_id, _ = model.holds.pop(hold_id)
            model.keys[key_id]["spent"] += amount
    elif name == "tick":
        model.now += args[0]
    elif name == "revoke":
        key_id = args[0]
        assert ledger.revoke(key_id, model.now) is (key_id in model.keys and not model.keys[key_id]["revoked"])
        if key_id in model.keys:
            model.keys[key_id]["revoked"] = True
    elif name == "purge":
        gone = {k for k in model.keys if model.now >= KEYS[k][1] and model.held(k) == 0}
        assert set(ledger.purge_expired(model.now)) == gone
        for key_id in gone:
            del model.keys[key_id]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_any_sequence_of_operations_keeps_the_cap_and_the_books(ops):
    with tempfile.TemporaryDirectory() as directory:
        ledger = SqliteLedger(Path(directory) / "prop.db")
        try:
            for key_id, (budget, expires_at) in KEYS.items():
                ledger.create_key(record(key_id, budget=budget, expires_at=expires_at))
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
        finally:
            ledger.close()


def test_the_nonblocking_handle_reports_a_locked_store_as_busy_at_once(tmp_path):
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
