"""Keys, budgets and holds: one interface, one backend per store.

Every money-moving step is one atomic operation in the store, so the hard cap holds across
threads and processes: `reserve` checks the key and its remaining budget and takes a hold in the
same transaction; `settle` turns a hold into spend (or releases it) exactly once.
"""

from agentkeys.ledger.base import KeyRecord, Ledger, LedgerBusy, LedgerUnavailable, Refusal, Reservation
from agentkeys.ledger.sqlite import SqliteLedger


def open_ledger(store_url: str, sqlite_path=None) -> Ledger:
    if store_url.startswith("sqlite:///"):
        return SqliteLedger(sqlite_path or store_url.removeprefix("sqlite:///"))
    raise ValueError(f"unsupported store {store_url!r}")


__all__ = [
    "KeyRecord",
    "Ledger",
    "LedgerBusy",
    "LedgerUnavailable",
    "Refusal",
    "Reservation",
    "SqliteLedger",
    "open_ledger",
]
