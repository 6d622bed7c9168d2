"""Keys, budgets and holds: one interface, one backend per store.

Every money-moving step is one atomic operation in the store, so the hard cap holds across
threads, processes and proxy replicas: `reserve` checks the key and its remaining budget and takes
a hold in the same statement or transaction (SQLite) or script (Redis); `settle` turns a hold into
spend (or releases it) exactly once; `sweep_stale_holds` settles, at their full amount, holds whose proxy died.
"""

from agentkeys.ledger.base import (
    AccountExists,
    AccountRecord,
    KeyExists,
    KeyRecord,
    Ledger,
    LedgerBusy,
    LedgerUnavailable,
    PeriodSpend,
    Refusal,
    Reservation,
    StaleHold,
    StoreMisconfigured,
)
from agentkeys.ledger.limits import LimitAnswer, LimitRefusal, LimitRequest, LimitTicket
from agentkeys.ledger.periods import Calendar
from agentkeys.ledger.redis import RedisLedger
from agentkeys.ledger.sqlite import SqliteLedger


def open_ledger(store_url: str, calendar: Calendar | None = None) -> Ledger:
    """The ledger behind `store_url`: sqlite:///PATH, or redis://HOST:PORT/DB (rediss:// for TLS).

    A config's store is opened with `open_ledger(config.store_url, config.calendar)`, where PATH is
    absolute; `calendar` says which day, week and month an account's hold falls in (UTC by default).
    A Redis that answers and may evict keys is refused here (StoreMisconfigured), so a proxy does not start on it.
    """
    if store_url.startswith("sqlite:///"):
        return SqliteLedger(store_url.removeprefix("sqlite:///"), calendar=calendar)
    if store_url.startswith(("redis://", "rediss://")):
        ledger = RedisLedger(store_url, calendar=calendar)
        ledger.refuse_if_evicting()
        return ledger
    raise ValueError(f"unsupported store {store_url!r}")


__all__ = [
    "AccountExists",
    "AccountRecord",
    "Calendar",
    "PeriodSpend",
    "KeyExists",
    "KeyRecord",
    "Ledger",
    "LedgerBusy",
    "LedgerUnavailable",
    "LimitAnswer",
    "LimitRefusal",
    "LimitRequest",
    "LimitTicket",
    "RedisLedger",
    "Refusal",
    "Reservation",
    "SqliteLedger",
    "StaleHold",
    "StoreMisconfigured",
    "open_ledger",
]
