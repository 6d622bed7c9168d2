"""store.py: the door retries writes that move money until the store takes them, and never mistakes its
own lost answer for a sweep; its book-keeping purges expired keys a batch at a time, off the event loop."""

import asyncio
import threading

from agentkeys import store as store_module
from agentkeys.ledger import KeyRecord, LedgerUnavailable, SqliteLedger, open_ledger
from agentkeys.store import Closed, Store

NOW = 1_000_000.0


class AnswerLostOnce:
    """A ledger whose first settlement is written but its answer lost (a timeout after Redis ran it)."""

    def __init__(self, ledger: SqliteLedger):
        self.ledger = ledger
        self.lost = 0

    def __getattr__(self, name):
        return getattr(self.ledger, name)

    def nonblocking(self):
        return None

    def settle_many(self, settlements):
        answers = self.ledger.settle_many(settlements)
        if not self.lost:
            self.lost += 1
            raise LedgerUnavailable("store unreachable: timeout reading from socket")
        return answers


def key() -> KeyRecord:
    return KeyRecord("k1", "h", "n", "p", "{}", NOW, NOW + 3600, budget_micros=1_000)


def test_a_settlement_whose_answer_was_lost_is_written_once_and_reported_as_this_calls(tmp_path):
    ledger = SqliteLedger(tmp_path / "keys.db")
    ledger.create_key(key())
    store = Store(AnswerLostOnce(ledger), clock=lambda: NOW)

    async def call():
        hold = await store.take_hold(key(), 600)
        return await store.close_hold(hold.hold_id, 250)

    assert asyncio.run(call()) is Closed.WRITTEN, "not taken for a sweep's"
    record = ledger.get_key("k1")
    assert (record.spent_micros, record.held_micros) == (250, 0)
    store.close()


def test_a_settlement_retried_after_a_sweep_took_the_hold_is_reported_as_swept(tmp_path):
    ledger = SqliteLedger(tmp_path / "keys.db")
    ledger.create_key(key())
    flaky = AnswerLostOnce(ledger)
    flaky.lost = 1  # answers from the start
    store = Store(flaky, clock=lambda: NOW)

    async def call():
        hold = await store.take_hold(key(), 600)
        ledger.sweep_stale_holds(NOW + 1, older_than_seconds=0)
        return await store.close_hold(hold.hold_id, 250)

    assert asyncio.run(call()) is Closed.SWEPT
    assert ledger.get_key("k1").spent_micros == 600
    store.close()


def test_a_hold_the_store_no_longer_has_is_reported_lost_not_swept(tmp_path):
    """The store lost its data while the call ran: its charge is kept in the audit record alone."""
    ledger = SqliteLedger(tmp_path / "keys.db")
    ledger.create_key(key())
    store = Store(ledger, clock=lambda: NOW)

    async def call():
        hold = await store.take_hold(key(), 600)
        ledger.settle(hold.hold_id, 0)  # gone from the store by other means than a sweep
        return await store.close_hold(hold.hold_id, 250)

    assert asyncio.run(call()) is Closed.LOST
    store.close()


def record(key_id: str, expires_at: float) -> KeyRecord:
    return KeyRecord(key_id, f"hash-of-{key_id}", key_id, "test", "{}", NOW, expires_at, budget_micros=1_000)


def test_expired_keys_are_purged_in_batches_on_the_worker_thread_until_none_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PURGE_BATCH", 3)
    ledger = open_ledger(f"sqlite:///{tmp_path / 'keys.db'}")
    for i in range(8):
        ledger.create_key(record(f"k{i}", expires_at=NOW + i))
    ledger.create_key(record("live", expires_at=NOW + 10_000))
    threads, purge = set(), ledger.purge_expired

    def purge_and_note(now, limit):
        threads.add(threading.current_thread().name)
        assert limit == 3
        return purge(now, limit)

    monkeypatch.setattr(ledger, "purge_expired", purge_and_note)
    books = Store(ledger, clock=lambda: NOW + 100)
    try:
        assert asyncio.run(books.purge_expired()) == 8
        assert [key.key_id for key in ledger.list_keys()] == ["live"]
        assert threads and all(name.startswith("agentkeys-ledger") for name in threads), "never on the loop"
    finally:
        books.close()
