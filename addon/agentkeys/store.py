"""The one asynchronous door to the ledger, for the gate and the control API alike.

Every method is typed and awaitable; none stalls the event loop. An embedded store (SQLite) is
asked on the loop first, with no waiting, and only when another writer holds its lock does the
call wait on a worker thread; a network store (Redis) is always asked from worker threads.

Holds and settlements asked for in one turn of the loop are written together on the next
(`NextTurnBatch`): one commit or round trip for many calls. The door also keeps the set of holds
still open on this proxy (the one place that says whether a call's hold is settled) and a cache
of key records' parts that never change.

The door names every hold it takes (`new_hold_id`), so a hold whose answer was lost can be found and
cancelled, and it never gives up on a write that moves money: a settlement or a cancellation the
store cannot take now is tried again, with its real amount, until the store takes it.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import TypeVar

from agentkeys.ledger import (
    AccountRecord,
    KeyRecord,
    Ledger,
    LedgerBusy,
    LedgerUnavailable,
    LimitAnswer,
    LimitRequest,
    LimitTicket,
    PeriodSpend,
    Refusal,
    Reservation,
    StaleHold,
)
from agentkeys.ledger.base import PURGE_BATCH, new_hold_id
from agentkeys.seal import RecordSeal

log = logging.getLogger(__name__)

T = TypeVar("T")

KNOWN_KEYS_LIMIT = 10_000
# How long a measured context is kept: OpenAI keeps a stored response for 30 days.
CONTEXT_LIFETIME_SECONDS = 30 * 86_400
NETWORK_STORE_WORKERS = 8
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds between attempts at a write that must be made; then the last


class Store:
    def __init__(self, ledger: Ledger, clock: Callable[[], float] | None = None, seal: RecordSeal | None = None):
        """`clock`: None (a proxy) for the store's own clock, in every decision the store makes and in
        `self.clock`; the gate's unit tests give a fake one, which the store's decisions then use too.
        `seal`: the proxies' seal on key records (seal.py): records are sealed when created here, and a
        record whose seal fails is not trusted; None (unit tests of other things) checks nothing."""
        self.ledger = ledger
        self.seal = seal
        self._clock_offset = 0.0  # the store's clock minus this machine's (`sync_clock`)
        self.clock = clock or self._store_clock
        self._ledger_now = ledger.nonblocking()
        # An embedded store needs one thread for the rare wait on a lock; a network store gets several, so
        # one slow round trip does not queue every other call behind it.
        workers = 1 if self._ledger_now is not None else NETWORK_STORE_WORKERS
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentkeys-ledger")
        # Key records by id, for the parts that never change (hash, policy, name). Whether a key is
        # still usable is decided by the store itself, when a hold is taken (or by a fresh read).
        self._known_keys: dict[str, KeyRecord] = {}
        self.open_holds: set[str] = set()  # of calls in flight here: while there are any, writes are batched
        self._closing: set[str] = set()  # holds whose settlement or cancellation is being written
        self._take_hold = NextTurnBatch(self._reserve_many, self.open_holds, undo_many=self._release_unclaimed)
        self._close_hold = NextTurnBatch(self._settle_many, self.open_holds)
        self._background: set[asyncio.Task] = set()  # cancellations being written
        self._giving_back: set[asyncio.Task] = set()  # limits taken for calls cancelled meanwhile

    def _store_clock(self) -> float:
        """The store's clock, read on this machine's: replicas whose clocks disagree agree on this one."""
        return time.time() + self._clock_offset

    def _now(self) -> float | None:
        """The time to hand the ledger: None (the store reads its own clock), or the tests' clock (given, or
        set on `self.clock` since)."""
        return None if self.clock == self._store_clock else self.clock()

    async def sync_clock(self) -> None:
        """Learn how far this machine's clock is from the store's (to a round trip), for `self.clock`:
        what the proxy decides without the store (a key's status, the times of a key it mints)."""
        before = time.time()
        store_now = await self._ask(lambda ledger: ledger.now())
        self._clock_offset = store_now - (before + time.time()) / 2

    async def _ask(self, operation: Callable[[Ledger], T]) -> T:
        """Run one ledger operation without stalling the event loop."""
        if self._ledger_now is not None:
            try:
                return operation(self._ledger_now)
            except LedgerBusy:
                pass
        return await asyncio.get_running_loop().run_in_executor(self._worker, operation, self.ledger)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self._ledger_now is not None:
            self._ledger_now.close()
        self.ledger.close()

    # ----- keys -----

    async def key(self, key_id: str) -> KeyRecord | None:
        """A key's record as the store has it now (revocation, spend and all)."""
        return await self._ask(lambda ledger: ledger.get_key(key_id))

    async def known_key(self, key_id: str) -> KeyRecord | None:
        """A key's record, from the cache when it was read before: only its unchanging parts may be trusted."""
        record = self._known_keys.get(key_id)
        if record is None:
            record = await self.key(key_id)
            if record is not None:
                if len(self._known_keys) >= KNOWN_KEYS_LIMIT:
                    self._known_keys.pop(next(iter(self._known_keys)))
                self._known_keys[key_id] = record
        return record

    def trusts(self, record: KeyRecord) -> bool:
        """Whether the record is one a proxy made (its seal matches), as far as this door checks seals."""
        return self.seal is None or self.seal.intact(record)

    def forget(self, key_id: str) -> None:
        """Drop a key's cached record: the store's no longer matches it (it was altered there)."""
        self._known_keys.pop(key_id, None)

    async def create_key(self, record: KeyRecord) -> None:
        record = self.seal.sealed(record) if self.seal else record
        await self._ask(lambda ledger: ledger.create_key(record))

    async def create_child(self, record: KeyRecord, max_children: int) -> Refusal | None:
        now, record = self._now(), self.seal.sealed(record) if self.seal else record
        return await self._ask(lambda ledger: ledger.create_child(record, max_children, now))

    async def children(self, key_id: str) -> list[KeyRecord]:
        return await self._ask(lambda ledger: ledger.children(key_id))

    async def revoke(self, key_id: str) -> bool:
        now = self._now()
        return await self._ask(lambda ledger: ledger.revoke(key_id, now))

    async def account(self, account_id: str) -> AccountRecord | None:
        """An account as the store has it now: its plan and status (a held call learns the status from the
        hold itself, in the same atomic step)."""
        return await self._ask(lambda ledger: ledger.get_account(account_id))

    async def period_books(self, account_id: str, period_id: str) -> PeriodSpend | None:
        """An account's books for one period, if it has any."""
        periods = await self._ask(lambda ledger: ledger.account_periods(account_id))
        return next((books for books in periods if books.period_id == period_id), None)

    async def claim_token(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Remember an exchanged OIDC token until `expires_at`; False if it was exchanged already."""
        now = self._now()
        return await self._ask(lambda ledger: ledger.claim_token(issuer, jti, expires_at, now))

    # ----- contexts: what a stored response or a conversation carries into a call continuing it -----

    async def context_tokens(self, ref: str) -> int | None:
        now = self.clock()
        return await self._ask(lambda ledger: ledger.context_tokens(ref, now))

    async def learn_context(self, ref: str, tokens: int, started_at: float) -> None:
        expires_at = self.clock() + CONTEXT_LIFETIME_SECONDS
        await self._ask(lambda ledger: ledger.learn_context(ref, tokens, started_at, expires_at))

    async def forget_context(self, ref: str) -> None:
        now = self.clock()
        await self._ask(lambda ledger: ledger.forget_context(ref, now, now + CONTEXT_LIFETIME_SECONDS))

    # ----- holds -----

    async def take_hold(self, key: KeyRecord, amount_micros: int) -> Reservation:
        """Hold `amount_micros` of the key's budget, if the key is active and has that much left, and its
        record in the store still grants what `key` (verified when read) does.

        If the store fails, the hold may have been taken all the same (its answer lost): it is cancelled
        by its name, in the background until the store takes that, so a call refused here costs nothing.
        """
        hold_id, grant = new_hold_id(key.key_id), key if self.seal else None
        try:
            reservation = await self._take_hold((key.key_id, amount_micros, self._now(), hold_id, grant))
        except LedgerUnavailable:
            self.cancel_hold(hold_id)
            raise
        if reservation.hold_id is not None:
            self.open_holds.add(reservation.hold_id)
        elif reservation.refusal is Refusal.TAMPERED:
            self.forget(key.key_id)
        return reservation

    async def take_hold_regardless(self, key: KeyRecord, amount_micros: int) -> Reservation:
        """Shadow mode's hold, past the budget or the key's lifetime; refused only to a revoked or unknown key
        (or one whose account is suspended, or whose record was altered). Named, and cancelled by its name if
        the store fails, as `take_hold`'s; rare (a call that enforcement would refuse), so not batched."""
        hold_id, grant, now = new_hold_id(key.key_id), key if self.seal else None, self._now()
        try:
            reservation = await self._ask(
                lambda ledger: ledger.hold_regardless(key.key_id, amount_micros, now, hold_id, grant)
            )
        except LedgerUnavailable:
            self.cancel_hold(hold_id)
            raise
        if reservation.hold_id is not None:
            self.open_holds.add(reservation.hold_id)
        elif reservation.refusal is Refusal.TAMPERED:
            self.forget(key.key_id)
        return reservation

    async def close_hold(self, hold_id: str, cost_micros: int) -> "Closed | None":
        """Turn an open hold into `cost_micros` of spend (0 releases it), trying until the store takes it.

        None if this proxy already closed it (so a call is never settled twice); else how it ended.
        """
        if hold_id not in self.open_holds:
            return None
        self.open_holds.discard(hold_id)
        self._closing.add(hold_id)
        attempts = 0

        async def settle() -> Closed:
            nonlocal attempts
            attempts += 1
            if await self._close_hold((hold_id, cost_micros)):
                return Closed.WRITTEN
            if await self._ask(lambda ledger: ledger.was_swept(hold_id)):
                return Closed.SWEPT
            # Not open, and no sweep took it: an earlier attempt whose answer was lost wrote it, or else
            # the store no longer has it (it lost its data).
            return Closed.WRITTEN if attempts > 1 else Closed.LOST

        try:
            return await self._until_written(settle, f"settling {hold_id}")
        finally:
            self._closing.discard(hold_id)

    def cancel_hold(self, hold_id: str) -> None:
        """Free the hold of a call that is not forwarded, whether or not the store took it; written in the
        background, tried until the store takes it."""
        self.open_holds.discard(hold_id)
        self._closing.add(hold_id)

        async def cancel():
            try:
                await self._until_written(lambda: self._ask(lambda ledger: ledger.cancel_hold(hold_id)),
                                          f"cancelling {hold_id}")  # fmt: skip
            finally:
                self._closing.discard(hold_id)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _until_written(self, write, what: str):
        """`write()`, again after each failure of the store (never of anything else), until it succeeds."""
        for attempt in itertools.count():
            try:
                return await write()
            except LedgerUnavailable as e:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                log.warning("%s: the store failed (%s); trying again in %.1fs", what, e, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def is_open(self, hold_id: str | None) -> bool:
        return hold_id in self.open_holds

    async def _reserve_many(self, requests: list[tuple]) -> list[Reservation]:
        return await self._ask(lambda ledger: ledger.reserve_many(requests))

    async def _settle_many(self, settlements: list[tuple[str, int]]) -> list[bool]:
        return await self._ask(lambda ledger: ledger.settle_many(settlements))

    async def _release_unclaimed(self, reservations: list[Reservation]) -> None:
        """Holds taken for calls cancelled while they waited for them: those calls never reach the provider."""
        for reservation in reservations:
            if reservation.hold_id is not None:
                self.cancel_hold(reservation.hold_id)

    # ----- rate limits and the loop breaker -----

    async def take_limits(self, request: LimitRequest) -> LimitAnswer:
        """Take a call's limits. If the call is cancelled while a worker thread asks the store (its agent went
        away), what the store took is given back once the answer comes, rather than left to go stale."""
        now = self.clock()
        if self._ledger_now is not None:
            try:
                return self._ledger_now.take_limits(request, now)
            except LedgerBusy:
                pass
        loop = asyncio.get_running_loop()
        asking = self._worker.submit(lambda: self.ledger.take_limits(request, now))
        try:
            return await asyncio.wrap_future(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(lambda done: loop.call_soon_threadsafe(self._give_back_unclaimed, done))
            raise

    def _give_back_unclaimed(self, answered) -> None:
        if answered.cancelled() or answered.exception() is not None or answered.result().ticket is None:
            return
        task = asyncio.get_running_loop().create_task(self.return_limits(answered.result().ticket, None))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def return_limits(self, ticket: LimitTicket, used_tokens: int | None) -> None:
        now = self.clock()
        await self._ask(lambda ledger: ledger.return_limits(ticket, used_tokens, now))

    # ----- books -----

    async def renew_holds(self) -> None:
        """Tell the store that this proxy's holds still have live calls (or writes under way), so no sweep
        takes them for dead."""
        alive, now = [*self.open_holds, *self._closing], self._now()
        await self._ask(lambda ledger: ledger.renew_holds(alive, now))

    async def sweep_stale_holds(self, older_than_seconds: float) -> list[StaleHold]:
        now = self._now()
        swept = await self._ask(lambda ledger: ledger.sweep_stale_holds(now, older_than_seconds))
        # A call whose flow never came back (a hook that never ran) no longer counts as one in flight.
        self.open_holds.difference_update(hold.hold_id for hold in swept)
        return swept

    async def purge_expired(self, before: float | None = None) -> int:
        """Delete keys expired before `before` (default: now, on the store's clock) a batch at a time, each on
        the worker thread, letting calls go between batches: a million keys expiring together never stall a
        call for long. Finished children's budgets are returned first. Returns how many keys went."""
        now, purged, loop = self._now() if before is None else before, 0, asyncio.get_running_loop()
        while True:
            batch = await loop.run_in_executor(self._worker, lambda: self.ledger.purge_expired(now, PURGE_BATCH))
            purged += len(batch)
            if len(batch) < PURGE_BATCH:
                return purged


class Closed(Enum):
    """How a settlement ended."""

    WRITTEN = "written"  # the hold became the call's charge
    SWEPT = "swept"  # a sweep took the hold for dead first, and charged it in full
    LOST = "lost"  # the store no longer has the hold (it lost its data): the charge is in the audit only


class NextTurnBatch:
    """One ledger operation, asked for by many calls in one turn of the event loop, done for all of
    them at once on the next turn: one commit (or one round trip) instead of one per call.

    Under load calls arrive and finish in bunches, so this cuts the store's work per call to a
    fraction. A call with no other in flight (`others`, the open holds) has nobody to share a write
    with, and is written at once. `write_many` takes the list of arguments and returns one answer
    for each, in order; if it fails, each call fails as it would have alone. Answers that no call is
    waiting for any more (it was cancelled meanwhile) go to `undo_many`, if given.
    """

    def __init__(self, write_many, others: Collection, undo_many=None):
        self.write_many = write_many
        self.others = others
        self.undo_many = undo_many
        self._waiting: list[tuple[tuple, asyncio.Future]] = []
        self._writing: set[asyncio.Task] = set()  # the loop keeps only a weak reference to a task

    async def __call__(self, arguments: tuple):
        if not self._waiting and not self.others:
            (answer,) = await self.write_many([arguments])
            return answer
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._write)
        answer = loop.create_future()
        self._waiting.append((arguments, answer))
        return await answer

    def _write(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._write_batch(batch))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write_batch(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            results = await self.write_many([arguments for arguments, _ in batch])
        except Exception as e:
            results = [e] * len(batch)
        unclaimed = []
        for (_, answer), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                if not answer.cancelled():
                    answer.set_exception(result)
            elif answer.cancelled():
                unclaimed.append(result)
            else:
                answer.set_result(result)
        if unclaimed and self.undo_many:
            try:
                await self.undo_many(unclaimed)
            except Exception:
                log.exception("undoing the writes of %d cancelled calls failed", len(unclaimed))
