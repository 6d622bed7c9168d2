"""The pipeline of one call, as plain async code over plain data (no mitmproxy here).

    identify → authorize → read the request → price the worst case → reserve → (forward) → settle

`admit` runs the steps in order and returns a frozen Admission (forward the call, with this hold),
or raises a Denial from whichever step refused it. After the call, `settle` turns the hold into
spend from the Outcome's plain facts: every settlement rule lives here, so each is unit-tested
without mitmproxy.
"""

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agentkeys import continuations, tokens
from agentkeys.auth import Authenticator
from agentkeys.calls import CallRequest, Denial, Outcome
from agentkeys.ledger import KeyRecord, LedgerUnavailable, Refusal, Reservation
from agentkeys.money import format_usd, remaining_phrase
from agentkeys.policy import PolicyFile, ProxyConfig, Scope, scope_of
from agentkeys.pricing import ModelPrice, PriceTable, Usage, cost_micros, worst_case_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, MalformedRequest, RequestFacts, Unmeterable, WireFormat
from agentkeys.store import Store

log = logging.getLogger(__name__)

# Bodies above this are read (and tokenized) on a worker thread, so a huge prompt delays only itself.
LARGE_BODY_BYTES = 32 * 1024
SETTLE_ATTEMPTS = (0.0, 0.2, 1.0)  # seconds to wait before each attempt to write a settlement


@dataclass(frozen=True)
class Admission:
    """A call let through: what was decided about it, and the hold that covers it while it runs."""

    key: KeyRecord
    policy: Scope
    wire: WireFormat
    facts: RequestFacts
    real_key: str
    metering: str  # "metered" (a hold covers it), "free" (the provider does not bill it), or "unmetered"
    remaining_micros: int  # the key's budget left once this call's hold was taken
    price: ModelPrice | None = None
    hold_id: int | None = None
    hold_micros: int = 0
    upstream_body: bytes | None = None  # None: forward the body as the agent sent it
    clamped_to: int | None = None  # the output limit the proxy lowered this call to, if it did
    clamped_by: str | None = None  # what lowered it: "policy" (its max_output_tokens) or "budget" (clamp_max_tokens)
    provider: str = ""
    admitted_at: float = 0.0  # the store's clock when the call was admitted (see Gate.remember_context)

    @property
    def unmetered(self) -> bool:
        """An endpoint the proxy cannot meter, allowed by the policy's unmetered_endpoints."""
        return self.metering == "unmetered"


@dataclass(frozen=True)
class Settlement:
    """What a call costs, how that was decided (the audit's `metering`), and why, when it is not the usage."""

    cost_micros: int
    metering: str  # "usage" | "overrun" | "held" (the full hold) | "none" | "free" | "unmetered"
    usage: Usage | None = None
    why: str = ""


@dataclass(frozen=True)
class HoldPlan:
    """The most a call may cost, and the output limit to send so the provider keeps to it."""

    facts: RequestFacts
    max_output: int
    worst_case: int
    cap: int | None  # an output limit to write into the request; None: forward the agent's own
    lowered_by: str | None = None  # what lowered the output limit the agent asked for: "policy" or "budget"


@dataclass(frozen=True)
class Hold:
    """A hold taken, and the plan it was taken for."""

    hold_id: int
    remaining_micros: int  # the key's budget left once it was taken
    plan: HoldPlan


class Gate:
    def __init__(
        self, config: ProxyConfig, store: Store, prices: PriceTable, policies: dict[str, PolicyFile] | None = None
    ):
        self.config = config
        self.store = store
        self.prices = prices
        self.policies = policies or {}  # the policy files as they are now, by name
        self.clock = store.clock
        self.real_keys = {name: spec.real_key() for name, spec in config.providers.items()}
        real_key_values = frozenset(key for key in self.real_keys.values() if key)
        self.auth = Authenticator(store, real_key_values, store.clock)

    # ----- admit -----

    async def admit(self, call: CallRequest) -> Admission:
        """The admission to forward `call` with; Denial if any step refuses it."""
        try:
            return await self._admit(call)
        except LedgerUnavailable as e:
            log.error("refusing call: %s", e)
            raise Denial(DenyKind.UNAVAILABLE, "agentkeys: the key store is unavailable; try again shortly") from None

    async def _admit(self, call: CallRequest) -> Admission:
        key = await self.auth.caller(call)
        try:
            return await self._admit_key(call, key)
        except Denial as denial:
            if denial.kind not in (DenyKind.UNAUTHENTICATED, DenyKind.UNAVAILABLE):
                # The cached record does not show a revocation: a dead key hears that, not what else is wrong.
                await self.auth.caller(call, fresh=True)
            raise

    async def _admit_key(self, call: CallRequest, key: KeyRecord) -> Admission:
        policy = scope_of(key.policy_json, self.policies)
        wire = FORMATS[self.config.providers[call.provider].format]
        authorize_provider(call, key, policy)
        endpoint = authorize_endpoint(call, key, policy, wire)
        check_body_size(call, self.config, key)
        real_key = self.real_key_for(call.provider, key)
        facts = await self.read_request(call, wire, key)
        if not facts.metered:
            return await self.admit_unbilled(call, policy, wire, facts, real_key, endpoint)
        authorize_model(facts, key, policy, self.models_shown(call.provider, wire, policy))
        price = self.price_for(call.provider, wire, facts, key)
        plan = plan_hold(facts, key, policy, price)
        upstream_body = body_for_provider(wire, plan, call, key)  # bad input is refused before any hold
        hold = await self.reserve(call, wire, key, policy, price, plan)
        if hold.plan.cap != plan.cap:
            upstream_body = await self.rewrite_body_under_hold(hold, wire, call, key)
        return Admission(
            key=key, policy=policy, wire=wire, facts=hold.plan.facts, real_key=real_key, metering="metered",
            remaining_micros=hold.remaining_micros, price=price, hold_id=hold.hold_id,
            hold_micros=hold.plan.worst_case, upstream_body=upstream_body,
            clamped_to=hold.plan.cap if hold.plan.lowered_by else None, clamped_by=hold.plan.lowered_by,
            provider=call.provider, admitted_at=self.clock(),
        )  # fmt: skip

    def models_shown(self, provider: str, wire: WireFormat, policy: Scope) -> Callable[[], list[str]]:
        """The policy's model globs that name a model this provider serves (its own or its format's prices),
        worked out only for a refusal's message: an Anthropic route is not told of OpenAI's models."""
        return lambda: [glob for glob in policy.models if self.prices.prices_any(glob, provider, wire.name)]

    def real_key_for(self, provider: str, key: KeyRecord) -> str:
        real_key = self.real_keys.get(provider)
        if not real_key:
            env = self.config.providers[provider].key_env
            raise Denial(
                DenyKind.NOT_CONFIGURED,
                f"agentkeys: the proxy has no real key for {provider}: its operator must set {env} in the"
                " proxy's environment and restart it",
                key,
            )
        return real_key

    async def read_request(
        self, call: CallRequest, wire: WireFormat, key: KeyRecord, exact: bool = False
    ) -> RequestFacts:
        """The request's facts, with what a continuation brings in; a large body, or an exact count of its
        texts, is worked out off the loop."""
        read = functools.partial(wire.request_facts, call.method, call.path, call.body, call.query, exact)
        try:
            if len(call.body) > LARGE_BODY_BYTES or exact:
                facts = await asyncio.get_running_loop().run_in_executor(None, read)
            else:
                facts = read()
        except MalformedRequest as e:
            raise Denial(DenyKind.BAD_REQUEST, f"agentkeys: {e}", key, model_named_in(call.body)) from None
        except Unmeterable as e:
            raise Denial(DenyKind.FORBIDDEN, f"agentkeys: {e}", key, model_named_in(call.body)) from None
        return await continuations.bounded(self.store, call.provider, self.as_served(call.provider, facts))

    def as_served(self, provider: str, facts: RequestFacts) -> RequestFacts:
        """An Azure deployment is billed as the model it runs: price it and match the policy by that model."""
        served = self.config.providers[provider].deployments.get(facts.model or "")
        return dataclasses.replace(facts, model=served) if served else facts

    async def admit_unbilled(
        self, call: CallRequest, policy: Scope, wire: WireFormat, facts: RequestFacts, real_key: str, endpoint: str
    ) -> Admission:
        """A call the provider does not bill (or one the policy lets through unmetered): no hold, so the
        key is read afresh here, since no reservation will ask the store whether it is still active."""
        key = await self.auth.caller(call, fresh=True)
        await continuations.forget_additions(self.store, call.provider, facts)
        metering = "unmetered" if endpoint == "unmetered" else "free"
        return Admission(
            key, policy, wire, facts, real_key, metering, remaining_micros=key.remaining_micros,
            provider=call.provider, admitted_at=self.clock(),
        )  # fmt: skip

    async def remember_context(self, admission: Admission, outcome: Outcome) -> None:
        """After a call: what its stored response will bring into a call continuing it (continuations.py)."""
        await continuations.remember(self.store, admission.provider, admission.facts, admission.admitted_at, outcome)

    def price_for(self, provider: str, wire: WireFormat, facts: RequestFacts, key: KeyRecord) -> ModelPrice:
        """The model's price; an OpenAI-compatible host serving OpenAI's models falls back to its format's."""
        match = self.prices.find(facts.model, provider, wire.name)
        if match is None:
            raise Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: no price is known for model {facts.model}, so the call cannot be metered",
                key,
                facts.model,
            )
        if match.price.unmeterable:
            raise Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: model {facts.model} cannot be metered by this proxy: {match.price.unmeterable}",
                key,
                facts.model,
            )
        return match.price

    async def reserve(
        self, call: CallRequest, wire: WireFormat, key: KeyRecord, policy: Scope, price: ModelPrice, plan: HoldPlan
    ) -> Hold:
        """Hold the worst case against the budget. When it does not fit, try a tighter plan before
        refusing: an exact count of a long input bounded by its bytes, then (with `clamp_max_tokens`)
        the largest output limit that fits what remains."""
        reservation = await self.store.take_hold(key.key_id, plan.worst_case)
        if refused_for_budget(reservation) and len(call.body) > tokens.EXACT_COUNT_CHARS:
            exact = await self.read_request(call, wire, key, exact=True)
            plan = plan_hold(exact, key, policy, price)
            reservation = await self.store.take_hold(key.key_id, plan.worst_case)
        if refused_for_budget(reservation) and policy.clamp_max_tokens:
            clamped = clamp_plan(plan, price, reservation.remaining_micros)
            if clamped:
                plan = clamped
                reservation = await self.store.take_hold(key.key_id, plan.worst_case)
        check_reservation(reservation, plan, key)
        return Hold(reservation.hold_id, reservation.remaining_micros, plan)

    async def rewrite_body_under_hold(self, hold: Hold, wire: WireFormat, call: CallRequest, key: KeyRecord):
        """The body for a plan tightened while holding; if that fails the call is not forwarded, so its
        hold is freed at once rather than left for the sweeper to charge in full."""
        try:
            return body_for_provider(wire, hold.plan, call, key)
        except BaseException:
            await self.store.close_hold(hold.hold_id, 0)
            raise

    # ----- settle -----

    async def settle(self, admission: Admission, outcome: Outcome) -> Settlement:
        """Turn the call's hold into its charge, once; a hold a sweep took first was charged in full."""
        charge = charge_for(admission, outcome)
        if admission.hold_id is None:
            return charge
        if charge.metering == "overrun":
            log.warning(
                "key %s: cost %s exceeded its hold %s", admission.key.key_id, charge.cost_micros, admission.hold_micros
            )
        closed = await self.close_hold(admission, charge.cost_micros)
        if closed is None:
            return Settlement(0, "none", why="already settled")
        if closed is False:
            why = "a sweep took this call for dead and charged its full hold first"
            return Settlement(admission.hold_micros, "held", charge.usage, why)
        return charge

    async def close_hold(self, admission: Admission, cost: int) -> bool | None:
        """Write the settlement, trying again when the store fails: the real charge is never replaced."""
        for attempt, delay in enumerate(SETTLE_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                return await self.store.close_hold(admission.hold_id, cost)
            except Exception:
                if attempt == len(SETTLE_ATTEMPTS) - 1:
                    raise
                log.warning("key %s: writing a settlement failed; trying again", admission.key.key_id, exc_info=True)
        raise AssertionError("unreachable")

    async def release(self, admission: Admission) -> None:
        """Free the hold of a call that was never forwarded."""
        if admission.hold_id is not None:
            await self.store.close_hold(admission.hold_id, 0)


# ----- the steps, as plain functions -----


def authorize_provider(call: CallRequest, key: KeyRecord, policy: Scope) -> None:
    if call.provider not in policy.providers:
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: provider {call.provider} is not allowed by policy {policy.name}"
            f" (allowed: {', '.join(policy.providers)})",
            key,
        )


def authorize_endpoint(call: CallRequest, key: KeyRecord, policy: Scope, wire: WireFormat) -> str:
    """`metered` or `free` (the wire format's kind of endpoint), or `unmetered` (allowed on trust)."""
    kind = wire.endpoint_kind(call.method, call.path)
    if kind is None and policy.allows_unmetered(call.method, call.path):
        return "unmetered"  # the policy takes the provider's charge for it on trust; the audit says so
    if not policy.allows_endpoint(call.method, call.path):
        allowed = ", ".join(str(rule) for rule in policy.endpoints)
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: endpoint {call.method} {call.path} is not allowed by policy {policy.name}"
            f" (allowed: {allowed})",
            key,
        )
    if kind is None:
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: {call.method} {call.path} cannot be metered by this proxy, so it is refused"
            " (a policy may allow it, unmetered, under unmetered_endpoints)",
            key,
        )
    return kind


def check_body_size(call: CallRequest, config: ProxyConfig, key: KeyRecord) -> None:
    """A body over `max_request_bytes` is refused before it is parsed or counted: reading it is the
    work an attacker would make the proxy do."""
    if len(call.body) > config.max_request_bytes:
        raise Denial(
            DenyKind.TOO_LARGE,
            f"agentkeys: the request body is {len(call.body):,} bytes, over this proxy's limit of"
            f" {config.max_request_bytes:,} (max_request_bytes)",
            key,
        )


def authorize_model(facts: RequestFacts, key: KeyRecord, policy: Scope, shown: Callable[[], list[str]]) -> None:
    """The policy must allow the model; a refusal lists the model globs that apply to this provider."""
    if not policy.allows_model(facts.model):
        allowed = ", ".join(shown()) or "none for this provider"
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: model {facts.model} is not allowed by policy {policy.name} (allowed: {allowed})",
            key,
            facts.model,
        )


def plan_hold(facts: RequestFacts, key: KeyRecord, policy: Scope, price: ModelPrice) -> HoldPlan:
    """The worst case of the call as asked: its output limit (the request's, else the policy's default,
    else the model's), with input the provider holds bounded by the model's context window."""
    facts = bound_unseen_input(facts, key, price)
    if not facts.takes_output_limit:  # nothing to send or lower: the model's own limit is the bound
        if price.max_output_tokens is None:
            raise Denial(
                DenyKind.FORBIDDEN,
                f"agentkeys: this endpoint takes no output limit and that of {facts.model} is unknown,"
                " so its cost cannot be bounded",
                key,
                facts.model,
            )
        return HoldPlan(facts, price.max_output_tokens, call_worst_case(price, facts, price.max_output_tokens), None)
    max_output = first_given(facts.max_output_tokens, policy.default_max_output_tokens, price.max_output_tokens)
    if max_output is None:
        raise Denial(DenyKind.BAD_REQUEST, f"agentkeys: set max_tokens; the limit of {facts.model} is unknown", key)
    ceiling = policy.max_output_tokens
    if ceiling is not None and max_output > ceiling:  # a framework's generous default, lowered to the policy's
        return HoldPlan(facts, ceiling, call_worst_case(price, facts, ceiling), ceiling, lowered_by="policy")
    # A default the provider does not know about must be sent, or the hold would not bound the call.
    cap = max_output if facts.max_output_tokens is None and max_output != price.max_output_tokens else None
    return HoldPlan(facts, max_output, call_worst_case(price, facts, max_output), cap)


def bound_unseen_input(facts: RequestFacts, key: KeyRecord, price: ModelPrice) -> RequestFacts:
    """Input only the provider can see (a previous response, a file) is bounded by the context window."""
    if not facts.unseen_input:
        return facts
    if price.max_input_tokens is None:
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: the call uses input only the provider can see ({facts.unseen_input}) and the"
            f" context window of {facts.model} is unknown, so its cost cannot be bounded",
            key,
            facts.model,
        )
    return dataclasses.replace(facts, input_token_bound=price.max_input_tokens)


def clamp_plan(plan: HoldPlan, price: ModelPrice, remaining: int) -> HoldPlan | None:
    """The plan with the largest output limit below the asked one whose worst case fits `remaining`."""
    if plan.max_output <= 1 or not plan.facts.takes_output_limit:
        return None
    fitting = affordable_output(price, plan.facts, plan.max_output - 1, remaining)
    if fitting is None:
        return None
    cap, worst_case = fitting
    return HoldPlan(plan.facts, cap, worst_case, cap, lowered_by="budget")


def body_for_provider(wire: WireFormat, plan: HoldPlan, call: CallRequest, key: KeyRecord) -> bytes | None:
    """The body to forward (None: the agent's own), with the plan's output cap written in."""
    try:
        return wire.upstream_body(plan.facts, call.body, plan.cap)
    except MalformedRequest as e:
        raise Denial(DenyKind.BAD_REQUEST, f"agentkeys: {e}", key, plan.facts.model) from None


def refused_for_budget(reservation: Reservation) -> bool:
    return reservation.refusal is Refusal.BUDGET


def check_reservation(reservation: Reservation, plan: HoldPlan, key: KeyRecord) -> None:
    if refused_for_budget(reservation):
        raise Denial(
            DenyKind.BUDGET,
            f"agentkeys: budget exhausted: this call could cost up to {format_usd(plan.worst_case)},"
            f" {remaining_phrase(reservation.remaining_micros)}",
            key,
            plan.facts.model,
        )
    if reservation.refusal is not None:
        raise Denial(DenyKind.UNAUTHENTICATED, f"agentkeys: agent key {key.key_id} is {reservation.refusal.value}", key)


def charge_for(admission: Admission, outcome: Outcome) -> Settlement:
    """The settlement rules, in order. The provider bills a call once it has it, whether or not the
    agent waits for the answer; so once a call reached the provider, it is charged its usage if the
    provider reported it in full, and its whole hold (the most it could cost) otherwise."""
    if admission.metering != "metered":
        return Settlement(0, admission.metering)
    if not outcome.reached_provider:
        return Settlement(0, "none", why="the call never reached the provider")
    if outcome.status is not None and outcome.status >= 400:
        return Settlement(0, "none", why=f"the provider answered {outcome.status}")
    if outcome.meter_broken:
        return Settlement(admission.hold_micros, "held", why="the stream could not be metered; charged its full hold")
    usage = outcome.stream.usage if outcome.stream else outcome.usage
    if usage is None:
        return Settlement(admission.hold_micros, "held", why=missing_usage_reason(outcome))
    cost = cost_micros(admission.price, usage)
    if cost > admission.hold_micros:
        return Settlement(cost, "overrun", usage, f"the provider billed {format_usd(cost - admission.hold_micros)} more"
                      " than the call's hold (it did not keep to the output limit)")  # fmt: skip
    return Settlement(cost, "usage", usage)


def missing_usage_reason(outcome: Outcome) -> str:
    rejected = outcome.usage_rejected or (outcome.stream.usage_rejected if outcome.stream else None)
    if rejected:
        return f"usage not believed: {rejected}; charged the full hold"
    if not outcome.complete:
        return "the call broke off before the provider's usage arrived; charged the full hold"
    return "the response carried no usage the proxy could read; charged the full hold"


def model_named_in(body: bytes) -> str | None:
    """The model a request names, if it can be read at all: for the audit of a request refused as unreadable."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


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
