"""The ledger's data and interface, shared by every backend."""

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class LedgerUnavailable(Exception):
    """The store could not be reached or was locked too long; callers refuse the call (fail closed)."""


class LedgerBusy(LedgerUnavailable):
    """The store is locked by another writer right now; waiting a little may help."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    key_hash: str
    name: str
    policy_name: str
    policy_json: str
    created_at: float
    expires_at: float
    budget_micros: int
    spent_micros: int = 0
    held_micros: int = 0
    revoked_at: float | None = None

    @property
    def remaining_micros(self) -> int:
        return self.budget_micros - self.spent_micros - self.held_micros

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"


class Refusal(Enum):
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    BUDGET = "budget"


@dataclass(frozen=True)
class Reservation:
    """The outcome of `reserve`: a hold id, or why not (with what remained at that moment)."""

    hold_id: int | None
    refusal: Refusal | None = None
    remaining_micros: int = 0


class Ledger(Protocol):
    """Blocking calls; the gate runs them off the event loop."""

    def create_key(self, record: KeyRecord) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self) -> list[KeyRecord]: ...
    def revoke(self, key_id: str, now: float) -> bool: ...
    def reserve(self, key_id: str, amount_micros: int, now: float) -> Reservation: ...
    def settle(self, hold_id: int, amount_micros: int) -> bool: ...
    def purge_expired(self, now: float) -> list[str]: ...
    def close(self) -> None: ...

    def nonblocking(self) -> "Ledger | None":
        """A second handle that answers at once or raises LedgerBusy, for use on the event loop; None if the
        store cannot answer without waiting (a network store)."""
        ...
