"""The ledger's data and interface, shared by every backend."""

import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from agentkeys.ledger.limits import LimitAnswer, LimitRequest, LimitTicket

PURGE_BATCH = 250  # keys deleted by one purge_expired: the store is locked that long, calls wait at most that


class LedgerUnavailable(Exception):
    """The store could not be reached or was locked too long; callers refuse the call (fail closed)."""


class LedgerBusy(LedgerUnavailable):
    """The store is locked by another writer right now; waiting a little may help."""


class StoreMisconfigured(LedgerUnavailable):
    """The store is set up so that it could lose the books (Redis that may evict keys): the proxy refuses
    to start on it, and refuses calls (503) if it becomes so while running. The message says what to set."""


class KeyExists(ValueError):
    """`create_key` was given a key id the store already has."""


class AccountExists(ValueError):
    """`create_account` was given an account id the store already has."""


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
    held_micros: int = 0  # open holds, and the budgets of live child keys carved out of this one
    revoked_at: float | None = None
    parent_id: str | None = None
    depth: int = 0  # 0 for a key issued by a person or an issuer; a child is one deeper than its parent
    grant_micros: int = 0  # this key's budget still held on its parent: its budget while it lives, then 0
    identity_json: str | None = None  # who the key was minted for, from a verified OIDC token (see identity.py)
    account_id: str | None = None  # the account whose period budget also bounds this key (see AccountRecord)
    seal: str | None = None  # an HMAC of the fields above that never change, under the proxies' secret (seal.py)

    @property
    def remaining_micros(self) -> int:
        return self.budget_micros - self.spent_micros - self.held_micros

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"


@dataclass(frozen=True)
class AccountRecord:
    """A user or tenant of the operator's product: every key minted for it is bound by its plan's
    budget per period as well as by its own. `period` and `budget_micros` are copied from the plan
    when the account is created or its plan set, so the store's hold needs nothing but the store."""

    account_id: str
    name: str
    plan_name: str
    period: str  # day, week or month (ledger.periods)
    budget_micros: int  # per period
    created_at: float
    status: str = "active"  # or "suspended": its keys are refused at once

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class PeriodSpend:
    """One account's books for one period: kept after the period ends."""

    account_id: str
    period_id: str
    spent_micros: int = 0
    held_micros: int = 0
    top_up_micros: int = 0  # added to the plan's budget for this period only


class Refusal(Enum):
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    BUDGET = "budget"
    TOO_MANY_CHILDREN = "too_many_children"
    TAMPERED = "tampered"  # the store's record differs from the one the proxy verified (seal.py)
    CANCELLED = "cancelled"  # the hold's name was cancelled before this reserve reached the store (see `cancel_hold`)
    SUSPENDED = "suspended"  # the key's account is suspended (or was deleted)
    ACCOUNT_BUDGET = "account_budget"  # the key's account has not that much left in this period


@dataclass(frozen=True)
class Reservation:
    """The outcome of `reserve`: a hold id, or why not (with what remained at that moment)."""

    hold_id: str | None
    refusal: Refusal | None = None
    remaining_micros: int = 0


@dataclass(frozen=True)
class StaleHold:
    """A hold that outlived its call (its proxy died) and was settled at its full amount by a sweep."""

    hold_id: str
    key_id: str
    amount_micros: int
    created_at: float


def new_hold_id(key_id: str) -> str:
    """A name for a hold that no other hold of any store ever had: its key's id, a dot, 64 random bits.

    The proxy names its holds (rather than a counter in the store), so a store that lost its data
    cannot hand an old call's name to a new hold, and a reserve whose answer was lost can be found
    and cancelled by the name its proxy gave it. The key's id in the name is what a settlement proves.
    """
    return f"{key_id}.{secrets.token_hex(8)}"


def key_of_hold(hold_id: str) -> str:
    """The id of the key a hold's name says it was taken on."""
    return hold_id.partition(".")[0]


def named_hold(key_id: str, hold_id: str | None) -> str:
    """The hold's name for a reserve: the one given, which must name its key, or a new one."""
    if hold_id is None:
        return new_hold_id(key_id)
    if key_of_hold(hold_id) != key_id or "." not in hold_id:
        raise ValueError(f"hold {hold_id} is not named for key {key_id}")
    return hold_id


class Ledger(Protocol):
    """Blocking calls; the gate runs them off the event loop.

    Each operation is atomic in the store. Any of them raises LedgerUnavailable when the store cannot
    be reached; the operation then happened in full or not at all, and the caller cannot tell which
    (a reserve whose answer was lost is found by its name and cancelled: `cancel_hold`).

    Time is the store's: every `now` left out (as the proxy leaves it) is read from the store's own
    clock inside the operation (Redis's `TIME`; for SQLite, the clock of the one machine its file is
    on), so replicas whose clocks disagree still agree on expiry and on a hold's age. Only the
    contract suite passes `now`, to move time.
    """

    def now(self) -> float:
        """The store's clock, in seconds since the epoch."""
        ...

    def create_key(self, record: KeyRecord) -> None:
        """Store a new key; KeyExists if its id is taken."""
        ...

    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self, offset: int = 0, limit: int | None = None) -> list[KeyRecord]:
        """Keys oldest first: all of them, or `limit` of them after the first `offset` (a page)."""
        ...

    def reserve(
        self,
        key_id: str,
        amount_micros: int,
        now: float | None = None,
        hold_id: str | None = None,
        grant: KeyRecord | None = None,
    ) -> Reservation:
        """Hold `amount_micros` of the key's budget under the name `hold_id` (`new_hold_id`; made up if None).

        Idempotent: a hold of that name taken already is answered again (not taken twice); a name
        cancelled already takes nothing (Refusal.CANCELLED). `grant`: the key's record as the proxy
        verified it (seal.py); if the store's budget, expiry or policy differ, nothing is taken
        (Refusal.TAMPERED), so a record edited in the store is refused by every replica at once.

        For a key of an account, the account must be active and the hold must fit the account's current
        period (the ledger's `calendar`, on the store's clock) too, all in the same atomic step; the hold
        records that period and is charged to it whenever it settles (or is swept). `remaining_micros`
        is the least of what remains at each level (after the hold, or when refused).
        """
        ...

    def reserve_many(self, requests: list[tuple]) -> list[Reservation]:
        """`reserve` for each (key id, amount, now[, hold id[, grant]]), in order, with one commit (or round trip)."""
        ...

    def settle(self, hold_id: str, amount_micros: int) -> bool:
        """Turn a hold into `amount_micros` of spend (0 releases it). False if already settled or swept.

        Only the hold of that name on the key its name gives is closed: nothing else can be.
        """
        ...

    def settle_many(self, settlements: list[tuple[str, int]]) -> list[bool]:
        """`settle` for each (hold id, amount), with one commit (or round trip) for them all."""
        ...

    def was_swept(self, hold_id: str) -> bool:
        """Whether a sweep settled this hold (remembered while its key lives): a settlement that finds its
        hold closed, after an attempt whose answer was lost, learns from this whether that attempt wrote it."""
        ...

    def cancel_hold(self, hold_id: str) -> bool:
        """Free the hold of a call that was not forwarded, whether or not its reserve reached the store.

        True if an open hold was released; otherwise its name is remembered (for the life of its key),
        so a reserve of that name that reaches the store later takes nothing.
        """
        ...

    def renew_holds(self, hold_ids: list[str], now: float | None = None) -> None:
        """Mark these holds as still in use (their calls are alive), so no sweep takes them for dead."""
        ...

    def sweep_stale_holds(self, now: float | None, older_than_seconds: float) -> list[StaleHold]:
        """Settle every hold neither taken nor renewed in the last `older_than_seconds` at its full amount,
        oldest first.

        Crash recovery: a proxy killed mid-call never settles its holds. The provider may have billed
        such a call in full, so the whole hold becomes spend and no budget is freed that could have been
        spent. A live proxy renews its holds (`renew_holds`) well within `older_than_seconds`, so only
        the holds of a proxy that died, or lost the store for that long, are taken.
        """
        ...

    def create_child(self, record: KeyRecord, max_children: int, now: float | None = None) -> Refusal | None:
        """Store a child of `record.parent_id`, moving its budget out of the parent's remaining budget.

        One atomic step: the parent must be active, have fewer than `max_children` live children and
        at least the child's budget remaining. The budget is held on the parent (so the parent cannot
        spend it twice) until the child ends; then `purge_expired` returns what the child left.
        Counting live children reads a counter on the parent, not its history of children.
        """
        ...

    def children(self, key_id: str) -> list[KeyRecord]:
        """The direct children of a key, oldest first."""
        ...

    def revoke(self, key_id: str, now: float | None = None) -> bool:
        """Revoke a key and every descendant at once; False if the key was not active.

        The grants of the revoked children with nothing in flight go back to their parents at once (as
        in `purge_expired`); a child with a call in flight gives its grant back at the next purge.
        """
        ...

    def purge_expired(self, now: float | None = None, limit: int = PURGE_BATCH) -> list[str]:
        """Return finished children's grants to their parents, then delete expired keys with nothing open.

        A child is finished when it is revoked or expired and has nothing in flight: its parent's hold
        of the child's budget becomes the child's spend, and the rest is free again. Audit records stay.
        Token ids remembered by `claim_token`, and contexts, are forgotten once past their expiry. Nothing a
        purged key left in the store (its place in indexes, its children's list, cancelled hold names) stays.

        At most `limit` keys are deleted (those that expired first), so that one call is a short step
        however many keys expired together: while it returns `limit` ids, there may be more.
        """
        ...

    def claim_token(self, issuer: str, jti: str, expires_at: float, now: float | None = None) -> bool:
        """Remember that the token `jti` of `issuer` was exchanged, until `expires_at`; False if it already was.

        One atomic step, so two replicas handed the same token cannot both mint a key for it.
        A claim past its `expires_at` is forgotten: the token can no longer verify by then anyway.
        """
        ...

    # ----- accounts -----

    def create_account(self, record: AccountRecord) -> None:
        """Store a new account; AccountExists if its id is taken."""
        ...

    def get_account(self, account_id: str) -> AccountRecord | None: ...
    def list_accounts(self) -> list[AccountRecord]:
        """Oldest first."""
        ...

    def update_account(self, record: AccountRecord) -> bool:
        """Replace an account's name, plan, period, budget and status (not its id or creation); False if unknown.

        A new budget or status applies to the very next hold, in the current period too."""
        ...

    def delete_account(self, account_id: str, now: float) -> bool:
        """Revoke every key of the account and forget it and its periods; False if unknown."""
        ...

    def account_keys(self, account_id: str) -> list[KeyRecord]:
        """The keys minted for an account that the store still has, oldest first."""
        ...

    def top_up(self, account_id: str, amount_micros: int, now: float) -> PeriodSpend | None:
        """Add to the account's budget for its current period only; None if the account is unknown."""
        ...

    def account_periods(self, account_id: str) -> list[PeriodSpend]:
        """Every period the account has books for, oldest first."""
        ...

    # ----- rate limits and the loop breaker -----

    def take_limits(self, request: LimitRequest, now: float) -> LimitAnswer:
        """Take every rate limit and loop-breaker count `request` asks, in one atomic step, or none of
        them and say which limit refused (see `ledger.limits`)."""
        ...

    def return_limits(self, ticket: LimitTicket, used_tokens: int | None, now: float) -> None:
        """A call's end: its concurrency slots freed, its tokens corrected to `used_tokens`; None: it was
        never forwarded, so every count it took is given back."""
        ...

    # ----- continuations -----

    def learn_context(self, ref: str, tokens: int, started_at: float, expires_at: float) -> None:
        """Remember that `ref` (a stored response, a conversation) carries at most `tokens` of input into a
        call that continues it, as a call started at `started_at` found; until `expires_at`.

        A larger figure already known stays (the context only grows); a `forget_context` at or after
        `started_at` stays too (that call could not see what was added since).
        """
        ...

    def forget_context(self, ref: str, now: float, expires_at: float) -> None:
        """Mark `ref`'s context unknown (something was added to it that no call has measured yet)."""
        ...

    def context_tokens(self, ref: str, now: float) -> int | None:
        """What `learn_context` knows of `ref` now; None if nothing, or if it was forgotten or expired."""
        ...

    def ping(self) -> None:
        """Ask the store for nothing, to learn that it answers (a readiness probe); LedgerUnavailable if not."""
        ...

    def close(self) -> None: ...

    def nonblocking(self) -> "Ledger | None":
        """A second handle that answers at once or raises LedgerBusy, for use on the event loop; None if the
        store cannot answer without waiting (a network store)."""
        ...
