"""The pipeline of one call, as plain async code over plain data (no mitmproxy here).

    identify → authorize → read the request → price the worst case → reserve → (forward) → settle

`admit` returns an Admission (forward it, with this hold) or a Denial (answer with this error).
After the provider answers, exactly one of `settle_usage`, `settle_stream` or `release` turns the
hold into spend. Ledger calls run on one worker thread so a slow disk never stalls the proxy's loop.
"""

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agentkeys import credentials
from agentkeys.ledger import KeyRecord, Ledger, LedgerBusy, LedgerUnavailable, Refusal
from agentkeys.money import format_usd
from agentkeys.policy import Policy, ProxyConfig
from agentkeys.pricing import ModelPrice, PriceTable, Usage, cost_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, MalformedRequest, RequestFacts, StreamResult, WireFormat
from agentkeys.tokens import count_tokens

log = logging.getLogger(__name__)

KNOWN_KEYS_LIMIT = 10_000
# Bodies above this are read (and tokenized) on a worker thread, so a huge prompt delays only itself.
LARGE_BODY_BYTES = 32 * 1024


@dataclass(frozen=True)
class CallRequest:
    """One request as the agent sent it, with the path in the provider's own terms."""

    provider: str
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    query: str = ""
    tunnel_credential: str | None = None


@dataclass(frozen=True)
class Denial:
    kind: DenyKind
    message: str
    key: KeyRecord | None = None
    model: str | None = None


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
    remaining_micros: int = 0
    settled: bool = field(default=False, init=False)


@dataclass(frozen=True)
class Settlement:
    cost_micros: int
    metering: str  # "usage" | "estimated" | "held" (charged the full hold) | "none"
    usage: Usage | None = None


class Gate:
    def __init__(self, config: ProxyConfig, ledger: Ledger, prices: PriceTable, clock=time.time):
        self.config = config
        self.ledger = ledger
        self.prices = prices
        self.clock = clock
        self.real_keys = {name: spec.real_key() for name, spec in config.providers.items()}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentkeys-ledger")
        self._ledger_now = ledger.nonblocking()
        # Key records by id, for the parts that never change (hash, policy, name). Whether a key is
        # still usable is decided by the store itself, in `reserve` (or a fresh read for free calls).
        self._known_keys: dict[str, KeyRecord] = {}

    async def _ledger(self, operation: str, *args):
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
            facts = await self.read_request(wire, call)
        except MalformedRequest as e:
            return Denial(DenyKind.BAD_REQUEST, f"agentkeys: {e}", record)
        if not facts.metered:
            # No reserve will look at the key in the store, so read it afresh: it may have been revoked.
            record = await self._ledger("get_key", record.key_id)
            return self.authenticate(key_or_denial, record) or Admission(record, policy, wire, facts, real_key)
        admission = Admission(key=record, policy=policy, wire=wire, facts=facts, real_key=real_key)
        return await self.price_and_reserve(call, admission)

    async def key_record(self, key_id: str) -> KeyRecord | None:
        record = self._known_keys.get(key_id)
        if record is None:
            record = await self._ledger("get_key", key_id)
            if record is not None:
                if len(self._known_keys) >= KNOWN_KEYS_LIMIT:
                    self._known_keys.pop(next(iter(self._known_keys)))
                self._known_keys[key_id] = record
        return record

    def identify(self, call: CallRequest) -> str | Denial:
        """The one scoped key the request carries; a real provider key or none at all is refused."""
        found = credentials.credentials_in(call.headers)
        if call.tunnel_credential:
            found.append(call.tunnel_credential)
        real = {key for key in self.real_keys.values() if key}
        if any(credential in real for credential in found):
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
            return Denial(DenyKind.UNAUTHENTICATED, "agentkeys: unknown agent key")
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
        if not policy.allows_endpoint(call.method, call.path):
            allowed = ", ".join(str(rule) for rule in policy.endpoints)
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: endpoint {call.method} {call.path} is not allowed by policy {policy.name}"
                f" (allowed: {allowed})",
                record,
            )
        if wire.endpoint_kind(call.method, call.path) is None:
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: {call.method} {call.path} cannot be metered by this proxy, so it is refused",
                record,
            )
        return None

    async def read_request(self, wire: WireFormat, call: CallRequest) -> RequestFacts:
        if len(call.body) > LARGE_BODY_BYTES:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, wire.request_facts, call.method, call.path, call.body)
        return wire.request_facts(call.method, call.path, call.body)

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
        # An OpenAI-compatible host serving OpenAI's models falls back to its wire format's prices.
        price = self.prices.lookup(call.provider, facts.model) or self.prices.lookup(admission.wire.name, facts.model)
        if price is None:
            return Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: no price is known for model {facts.model}, so the call cannot be metered",
                record,
                facts.model,
            )
        max_output = facts.max_output_tokens or policy.default_max_output_tokens or price.max_output_tokens
        if max_output is None:
            return Denial(
                DenyKind.BAD_REQUEST, f"agentkeys: set max_tokens; the limit of {facts.model} is unknown", record
            )
        # A default the provider does not know about must be sent, or the hold would not bound the call.
        cap = max_output if facts.max_output_tokens is None and max_output != price.max_output_tokens else None
        worst_output = max_output * facts.choices
        worst_case = cost_micros(price, Usage(input_tokens=facts.input_token_bound, output_tokens=worst_output))
        reservation = await self._ledger("reserve", record.key_id, worst_case, self.clock())
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
        admission.hold_micros = worst_case
        admission.remaining_micros = reservation.remaining_micros
        admission.upstream_body = admission.wire.upstream_body(facts, call.body, cap)
        return admission

    # ----- settle -----

    async def settle_usage(self, admission: Admission, usage: Usage | None) -> Settlement:
        """A finished response: charge its usage, or the full hold if it reported none."""
        if usage is None:
            log.warning("key %s: a metered response carried no usage; charging the full hold", admission.key.key_id)
            return await self._settle(admission, admission.hold_micros, "held")
        return await self._settle(admission, cost_micros(admission.price, usage), "usage", usage)

    async def settle_stream(self, admission: Admission, result: StreamResult) -> Settlement:
        """A stream that ended, completely or not: the provider's usage, else an estimate from what was sent."""
        if result.complete or result.usage is not None:
            return await self.settle_usage(admission, result.usage)
        model = admission.facts.model or ""
        output = await asyncio.get_running_loop().run_in_executor(None, count_tokens, result.streamed_text, model)
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
        await self._ledger("settle", admission.hold_id, cost)
        admission.settled = True  # only now: a settlement that failed can be tried again
        return Settlement(cost, metering, usage)

    async def purge_expired(self) -> list[str]:
        return await self._ledger("purge_expired", self.clock())


@functools.lru_cache(maxsize=1024)
def parse_policy(policy_json: str) -> Policy:
    """Policies are stored as JSON beside each key; parse each distinct one once."""
    return Policy.model_validate_json(policy_json)
