"""The pipeline of one call, as plain async code over plain data (no mitmproxy here).

    identify → authorize → read the request → price the worst case → reserve → (forward) → settle

`admit` returns an Admission (forward it, with this hold) or a Denial (answer with this error).
After the provider answers, exactly one of `settle_usage`, `settle_stream` or `release` turns the
hold into spend. An embedded store is asked on the event loop (it answers in microseconds) and
waits only on a worker thread; a network store is always asked from worker threads. Holds and
settlements asked for in one turn of the loop are written together on the next (`NextTurnBatch`).
"""

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agentkeys import credentials, tokens
from agentkeys.ledger import KeyRecord, Ledger, LedgerBusy, LedgerUnavailable, Refusal, Reservation, StaleHold
from agentkeys.money import format_usd
from agentkeys.policy import Policy, ProxyConfig
from agentkeys.pricing import ModelPrice, PriceTable, Usage, cost_micros, worst_case_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.base import (
    DenyKind,
    MalformedRequest,
    RequestFacts,
    StreamResult,
    Unmeterable,
    WireFormat,
)

log = logging.getLogger(__name__)

KNOWN_KEYS_LIMIT = 10_000
NETWORK_STORE_WORKERS = 8
# Bodies above this are read (and tokenized) on a worker thread, so a huge prompt delays only itself.
LARGE_BODY_BYTES = 32 * 1024


@dataclass(frozen=True)
class CallRequest:
    """One request as the agent sent it, with the path in the provider's own terms."""

    provider: str
    method: str
    path: str
    headers: dict[str, str]  # the credential headers it carries (lower-cased names; see CREDENTIAL_HEADERS)
    body: bytes
    query: str = ""
    tunnel_credential: str | None = None


@dataclass(frozen=True)
class Denial:
    kind: DenyKind
    message: str
    key: KeyRecord | None = None
    model: str | None = None
    presented_key_id: str | None = None  # the id in a key the store does not know (forged, or purged)


@dataclass
class Admission:
    key: KeyRecord
    policy: Policy
    wire: WireFormat
    facts: RequestFacts
    real_key: str
    upstream_body: bytes | None = None  # None: forward the body as the agent sent it
    price: ModelPrice | None = None
    hold_id: int | None = None
    hold_micros: int = 0
    remaining_micros: int = 0  # the key's budget left once this call's hold was taken
    unmetered: bool = False  # an endpoint the proxy cannot meter, allowed by the policy's unmetered_endpoints
    clamped_to: int | None = None  # the output limit the budget lowered this call to (clamp_max_tokens)
    settled: bool = field(default=False, init=False)


@dataclass(frozen=True)
class Settlement:
    cost_micros: int
    metering: str  # "usage" | "estimated" | "held" (charged the full hold) | "none" | "free" | "unmetered"
    usage: Usage | None = None


class Gate:
    def __init__(self, config: ProxyConfig, ledger: Ledger, prices: PriceTable, clock=time.time):
        self.config = config
        self.ledger = ledger
        self.prices = prices
        self.clock = clock
        self.real_keys = {name: spec.real_key() for name, spec in config.providers.items()}
        self._real_key_values = frozenset(key for key in self.real_keys.values() if key)
        self._ledger_now = ledger.nonblocking()
        # An embedded store needs one thread for the rare wait on a lock; a network store gets several, so
        # one slow round trip does not queue every other call behind it.
        workers = 1 if self._ledger_now is not None else NETWORK_STORE_WORKERS
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentkeys-ledger")
        # Key records by id, for the parts that never change (hash, policy, name). Whether a key is
        # still usable is decided by the store itself, in `reserve` (or a fresh read for free calls).
        self._known_keys: dict[str, KeyRecord] = {}
        self._open_holds: set[int] = set()  # of calls in flight: while there are any, writes are batched
        self._take_hold = NextTurnBatch(
            functools.partial(self.in_ledger, "reserve_many"), self._open_holds, undo_many=self._release_unclaimed
        )
        self._close_hold = NextTurnBatch(functools.partial(self.in_ledger, "settle_many"), self._open_holds)

    async def in_ledger(self, operation: str, *args):
        """Run a ledger operation without stalling the event loop.

        An embedded store answers in microseconds, far less than a hop to a worker thread costs, so
        it is asked on the loop first with no waiting; only when another writer holds the lock (or
        the store is remote) does the call wait, on the worker thread.
        """
        if self._ledger_now is not None:
            try:
                return getattr(self._ledger_now, operation)(*args)
            except LedgerBusy:
                pass
        return await asyncio.get_running_loop().run_in_executor(self._worker, getattr(self.ledger, operation), *args)

    # ----- admit -----

    async def admit(self, call: CallRequest) -> Admission | Denial:
        try:
            return await self._admit(call)
        except LedgerUnavailable as e:
            log.error("refusing call: %s", e)
            return Denial(DenyKind.UNAVAILABLE, "agentkeys: the key store is unavailable; try again shortly")

    async def _admit(self, call: CallRequest) -> Admission | Denial:
        key_or_denial = self.identify(call)
        if isinstance(key_or_denial, Denial):
            return key_or_denial
        record = await self.key_record(credentials.key_id_of(key_or_denial))
        denial = self.authenticate(key_or_denial, record)
        if denial:
            return denial
        policy = parse_policy(record.policy_json)
        wire = FORMATS[self.config.providers[call.provider].format]
        denial = self.authorize_endpoint(call, record, policy, wire)
        if denial:
            return denial
        real_key = self.real_keys.get(call.provider)
        if not real_key:
            env = self.config.providers[call.provider].key_env
            return Denial(
                DenyKind.UNAVAILABLE, f"agentkeys: the proxy has no key for {call.provider} (set {env})", record
            )
        try:
            facts = self.as_served(call.provider, await self.read_request(wire, call))
        except MalformedRequest as e:
            return Denial(DenyKind.BAD_REQUEST, f"agentkeys: {e}", record)
        except Unmeterable as e:
            return Denial(DenyKind.FORBIDDEN, f"agentkeys: {e}", record)
        if not facts.metered:
            # No reserve will look at the key in the store, so read it afresh: it may have been revoked.
            record = await self.in_ledger("get_key", record.key_id)
            unmetered = wire.endpoint_kind(call.method, call.path) is None
            return self.authenticate(key_or_denial, record) or Admission(
                record, policy, wire, facts, real_key, remaining_micros=record.remaining_micros, unmetered=unmetered
            )
        admission = Admission(key=record, policy=policy, wire=wire, facts=facts, real_key=real_key)
        outcome = await self.price_and_reserve(call, admission)
        too_dear = isinstance(outcome, Denial) and outcome.kind is DenyKind.BUDGET
        if too_dear and len(call.body) > tokens.EXACT_COUNT_CHARS:
            # A long text was bounded by its bytes; count it exactly before refusing the call.
            admission.facts = self.as_served(call.provider, await self.read_request(wire, call, exact=True))
            outcome = await self.price_and_reserve(call, admission)
        return outcome

    async def key_record(self, key_id: str) -> KeyRecord | None:
        record = self._known_keys.get(key_id)
        if record is None:
            record = await self.in_ledger("get_key", key_id)
            if record is not None:
                if len(self._known_keys) >= KNOWN_KEYS_LIMIT:
                    self._known_keys.pop(next(iter(self._known_keys)))
                self._known_keys[key_id] = record
        return record

    def identify(self, call: CallRequest) -> str | Denial:
        """The one scoped key the request carries; a real provider key or none at all is refused."""
        found = credentials.credentials_in(call.headers) + credentials.credentials_in_query(call.query)
        if call.tunnel_credential:
            found.append(call.tunnel_credential)
        if any(credential in self._real_key_values for credential in found):
            return Denial(DenyKind.UNAUTHENTICATED, "agentkeys: a real provider key was sent; use a scoped ak_ key")
        scoped = {credential for credential in found if credentials.key_id_of(credential)}
        if not scoped:
            return Denial(
                DenyKind.UNAUTHENTICATED,
                "agentkeys: no agent key; send your ak_… key as the API key or as the HTTPS_PROXY user",
            )
        if len(scoped) > 1:
            return Denial(DenyKind.UNAUTHENTICATED, "agentkeys: the request carries two different agent keys")
        return scoped.pop()

    def authenticate(self, key: str, record: KeyRecord | None) -> Denial | None:
        if record is None or not credentials.matches(key, record.key_hash):
            return Denial(
                DenyKind.UNAUTHENTICATED, "agentkeys: unknown agent key", presented_key_id=credentials.key_id_of(key)
            )
        status = record.status(self.clock())
        if status != "active":
            return Denial(DenyKind.UNAUTHENTICATED, f"agentkeys: agent key {record.key_id} is {status}", record)
        return None

    def authorize_endpoint(self, call: CallRequest, record: KeyRecord, policy: Policy, wire: WireFormat):
        if call.provider not in policy.providers:
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: provider {call.provider} is not allowed by policy {policy.name}"
                f" (allowed: {', '.join(policy.providers)})",
                record,
            )
        kind = wire.endpoint_kind(call.method, call.path)
        if kind is None and policy.allows_unmetered(call.method, call.path):
            return None  # the policy takes the provider's charge for it on trust; the audit says "unmetered"
        if not policy.allows_endpoint(call.method, call.path):
            allowed = ", ".join(str(rule) for rule in policy.endpoints)
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: endpoint {call.method} {call.path} is not allowed by policy {policy.name}"
                f" (allowed: {allowed})",
                record,
            )
        if kind is None:
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: {call.method} {call.path} cannot be metered by this proxy, so it is refused"
                " (a policy may allow it, unmetered, under unmetered_endpoints)",
                record,
            )
        return None

    async def read_request(self, wire: WireFormat, call: CallRequest, exact: bool = False) -> RequestFacts:
        """The request's facts; a large body, or an exact count of its texts, is worked out off the loop."""
        read = functools.partial(wire.request_facts, call.method, call.path, call.body, call.query)
        if exact:
            read = functools.partial(tokens.with_exact_counts, read)
        if len(call.body) > LARGE_BODY_BYTES or exact:
            return await asyncio.get_running_loop().run_in_executor(None, read)
        return read()

    def price_of(self, provider: str, wire: WireFormat, model: str) -> ModelPrice | None:
        """An OpenAI-compatible host serving OpenAI's models falls back to its wire format's prices."""
        match = self.prices.find(model, provider, wire.name)
        return match.price if match else None

    def as_served(self, provider: str, facts: RequestFacts) -> RequestFacts:
        """An Azure deployment is billed as the model it runs: price it and match the policy by that model."""
        served = self.config.providers[provider].deployments.get(facts.model or "")
        return dataclasses.replace(facts, model=served) if served else facts

    async def price_and_reserve(self, call: CallRequest, admission: Admission) -> Admission | Denial:
        facts, policy, record = admission.facts, admission.policy, admission.key
        if not policy.allows_model(facts.model):
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: model {facts.model} is not allowed by policy {policy.name}"
                f" (allowed: {', '.join(policy.models)})",
                record,
                facts.model,
            )
        price = self.price_of(call.provider, admission.wire, facts.model)
        if price is None:
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: no price is known for model {facts.model}, so the call cannot be metered",
                record,
                facts.model,
            )
        max_output = first_given(facts.max_output_tokens, policy.default_max_output_tokens, price.max_output_tokens)
        if max_output is None:
            return Denial(
                DenyKind.BAD_REQUEST, f"agentkeys: set max_tokens; the limit of {facts.model} is unknown", record
            )
        if facts.unseen_input:
            if price.max_input_tokens is None:
                return Denial(
                    DenyKind.FORBIDDEN,
                    f"agentkeys: the call uses input only the provider can see ({facts.unseen_input}) and the"
                    f" context window of {facts.model} is unknown, so its cost cannot be bounded",
                    record,
                    facts.model,
                )
            # Whatever the provider adds, the whole input must fit the model's context window.
            facts = admission.facts = dataclasses.replace(facts, input_token_bound=price.max_input_tokens)
        # A default the provider does not know about must be sent, or the hold would not bound the call.
        cap = max_output if facts.max_output_tokens is None and max_output != price.max_output_tokens else None
        worst_case = call_worst_case(price, facts, max_output)
        reservation = await self._take_hold((record.key_id, worst_case, self.clock()))
        if reservation.refusal is Refusal.BUDGET and policy.clamp_max_tokens and max_output > 1:
            clamped = affordable_output(price, facts, max_output - 1, reservation.remaining_micros)
            if clamped:
                cap, worst_case = clamped
                admission.clamped_to = cap
                reservation = await self._take_hold((record.key_id, worst_case, self.clock()))
        if reservation.refusal is Refusal.BUDGET:
            return Denial(
                DenyKind.BUDGET,
                f"agentkeys: budget exhausted: this call could cost up to {format_usd(worst_case)},"
                f" {format_usd(reservation.remaining_micros)} remains",
                record,
                facts.model,
            )
        if reservation.refusal is not None:
            return Denial(
                DenyKind.UNAUTHENTICATED, f"agentkeys: agent key {record.key_id} is {reservation.refusal.value}", record
            )
        admission.price = price
        admission.hold_id = reservation.hold_id
        self._open_holds.add(reservation.hold_id)
        admission.hold_micros = worst_case
        admission.remaining_micros = reservation.remaining_micros
        admission.upstream_body = admission.wire.upstream_body(facts, call.body, cap)
        return admission

    # ----- settle -----

    async def settle_usage(self, admission: Admission, usage: Usage | None) -> Settlement:
        """A finished response: charge its usage, or the full hold if it reported none."""
        if usage is None:
            log.warning("key %s: a metered response carried no usage; charging the full hold", admission.key.key_id)
            return await self._settle(admission, self.charge(admission, None), "held")
        return await self._settle(admission, self.charge(admission, usage), "usage", usage)

    @staticmethod
    def charge(admission: Admission, usage: Usage | None) -> int:
        """What a finished response costs: its usage at the model's price, or the full hold if it reported none."""
        return admission.hold_micros if usage is None else cost_micros(admission.price, usage)

    async def settle_stream(self, admission: Admission, result: StreamResult) -> Settlement:
        """A stream that ended, completely or not: the provider's usage, else an estimate from what was sent."""
        if result.complete or result.usage is not None:
            return await self.settle_usage(admission, result.usage)
        model = admission.facts.model or ""
        output = await asyncio.get_running_loop().run_in_executor(
            None, tokens.count_tokens, result.streamed_text, model
        )
        input_tokens = result.input_tokens_seen or admission.facts.input_token_bound
        usage = Usage(input_tokens=input_tokens, output_tokens=output)
        cost = min(cost_micros(admission.price, usage), admission.hold_micros)
        return await self._settle(admission, cost, "estimated", usage)

    async def release(self, admission: Admission) -> Settlement:
        """The provider did not bill (an error status, or no answer at all)."""
        return await self._settle(admission, 0, "none")

    async def _settle(self, admission: Admission, cost: int, metering: str, usage: Usage | None = None) -> Settlement:
        if admission.settled or admission.hold_id is None:
            return Settlement(0, "none")
        if cost > admission.hold_micros:
            log.warning("key %s: cost %s exceeded its hold %s", admission.key.key_id, cost, admission.hold_micros)
        self._open_holds.discard(admission.hold_id)
        settled = await self._close_hold((admission.hold_id, cost))
        admission.settled = True  # only now: a settlement that failed can be tried again
        if not settled:  # a sweep took this call for dead and already charged its full hold
            return Settlement(admission.hold_micros, "held", usage)
        return Settlement(cost, metering, usage)

    async def _release_unclaimed(self, reservations: list[Reservation]) -> None:
        """Holds taken for calls cancelled while they waited for them: those calls never reach the provider."""
        holds = [(reservation.hold_id, 0) for reservation in reservations if reservation.hold_id is not None]
        if holds:
            await self.in_ledger("settle_many", holds)

    async def sweep_stale_holds(self) -> list[StaleHold]:
        swept = await self.in_ledger("sweep_stale_holds", self.clock(), self.config.stale_hold_after)
        # A call whose flow never came back (a hook that never ran) no longer counts as one in flight.
        self._open_holds.difference_update(hold.hold_id for hold in swept)
        return swept

    async def purge_expired(self) -> list[str]:
        return await self.in_ledger("purge_expired", self.clock())


class NextTurnBatch:
    """One ledger operation, asked for by many calls in one turn of the event loop, done for all of
    them at once on the next turn: one commit (or one round trip) instead of one per call.

    Under load, calls arrive and finish in bunches (at 16 at once, a probe saw bunches of 3 to 15),
    so this cuts the store's work per call to a fraction. A call with no
    other in flight (`others`, the open holds) has nobody to share a write with, and is written at
    once. `write_many` takes the list of arguments and returns one answer for each, in order; if it
    fails, each call fails as it would have alone. Answers that no call is waiting for any more (it
    was cancelled meanwhile) go to `undo_many`, if given.
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


def first_given(*values: int | None) -> int | None:
    """The first value that is not None (0 counts: an embedding has no output at all)."""
    return next((value for value in values if value is not None), None)


def call_worst_case(price: ModelPrice, facts: RequestFacts, max_output: int) -> int:
    """The most this call can cost with at most `max_output` tokens in each choice."""
    return worst_case_micros(price, facts.input_token_bound, max_output * facts.choices, facts.may_write_cache)


def affordable_output(price: ModelPrice, facts: RequestFacts, at_most: int, remaining: int) -> tuple[int, int] | None:
    """(the largest output limit, its worst case) whose worst case fits `remaining`; None if not even one token.

    Cost grows with output, so a binary search over 1..`at_most` finds it in a few dozen steps.
    """
    low, high = 0, at_most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if call_worst_case(price, facts, middle) <= remaining else (low, middle - 1)
    return (low, call_worst_case(price, facts, low)) if low else None


@functools.lru_cache(maxsize=1024)
def parse_policy(policy_json: str) -> Policy:
    """Policies are stored as JSON beside each key; parse each distinct one once."""
    return Policy.model_validate_json(policy_json)
