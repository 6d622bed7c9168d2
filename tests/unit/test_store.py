"""store.py's book-keeping: expired keys purged a batch at a time, off the event loop."""

import asyncio
import threading

from agentkeys import store as store_module
from agentkeys.ledger import KeyRecord, open_ledger
from agentkeys.store import Store

NOW = 1_000_000.0


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
