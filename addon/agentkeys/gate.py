"""The pipeline of one call, as plain async code over plain data (no mitmproxy here).

    identify → authorize → read the request → price the worst case → reserve → (forward) → settle

`admit` runs the steps in order and returns a frozen Admission (forward the call, with this hold),
or raises a Denial from whichever step refused it. The hold is planned in holds.py. After the call,
`settle` turns the hold into spend from the Outcome's plain facts, by the rules in settlement.py; each
is unit-tested without mitmproxy.
"""

import asyncio
import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from agentkeys import continuations, tokens
from agentkeys.auth import Authenticator
from agentkeys.calls import CallRequest, Denial, Outcome
from agentkeys.holds import HoldPlan, clamp_plan, plan_hold
from agentkeys.ledger import KeyRecord, LedgerUnavailable, LimitTicket, Refusal, Reservation
from agentkeys.limits import Limiter, account_levels, used_tokens
from agentkeys.money import format_usd, remaining_phrase
from agentkeys.plans import PlanFile
from agentkeys.policy import PolicyFile, ProxyConfig, Scope, scope_of
from agentkeys.pricing import ModelPrice, PriceTable
from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, MalformedRequest, RequestFacts, Unmeterable, WireFormat
from agentkeys.seal import altered_message
from agentkeys.settlement import Settlement, charge_for
from agentkeys.shadow import Rule, Rulings
from agentkeys.store import Closed, Store

log = logging.getLogger(__name__)

# Bodies above this are read (and tokenized) on a worker thread, so a huge prompt delays only itself.
LARGE_BODY_BYTES = 32 * 1024


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
    hold_id: str | None = None
    hold_micros: int = 0
    upstream_body: bytes | None = None  # None: forward the body as the agent sent it
    clamped_to: int | None = None  # the output limit the proxy lowered this call to, if it did
    clamped_by: str | None = None  # what lowered it: "policy" (its max_output_tokens) or "budget" (clamp_max_tokens)
    would_deny: tuple[Denial, ...] = ()  # in shadow mode: the policy rules the call broke (see shadow.py)
    limits: LimitTicket | None = None  # what it took of rate limits and the loop breaker, given back when it ends
    provider: str = ""
    admitted_at: float = 0.0  # the store's clock when the call was admitted (see Gate.remember_context)

    @property
    def unmetered(self) -> bool:
        """An endpoint the proxy cannot meter, allowed by the policy's unmetered_endpoints."""
        return self.metering == "unmetered"


@dataclass(frozen=True)
class Hold:
    """A hold taken, and the plan it was taken for."""

    hold_id: str
    remaining_micros: int  # the key's budget left once it was taken
    plan: HoldPlan


class Gate:
    def __init__(
        self,
        config: ProxyConfig,
        store: Store,
        prices: PriceTable,
        policies: dict[str, PolicyFile] | None = None,
        plans: dict[str, PlanFile] | None = None,
    ):
        self.config = config
        self.store = store
        self.prices = prices
        self.policies = policies or {}  # the policy files as they are now, by name
        self.clock = store.clock
        self.real_keys = {name: spec.real_key() for name, spec in config.providers.items()}
        real_key_values = frozenset(key for key in self.real_keys.values() if key)
        self.auth = Authenticator(store, real_key_values, store.clock)
        self.limiter = Limiter(store, self.policies, config.stale_hold_after, account_levels(store, plans or {}))

    # ----- admit -----

    async def admit(self, call: CallRequest) -> Admission:
        """The admission to forward `call` with; Denial if any step refuses it."""
        try:
            return await self._admit(call)
        except LedgerUnavailable as e:
            log.error("refusing call: %s", e)
            raise Denial(DenyKind.UNAVAILABLE, "agentkeys: the key store is unavailable; try again shortly") from None

    async def _admit(self, call: CallRequest) -> Admission:
        key, lapsed = await self.identify(call)
        policy = scope_of(key.policy_json, self.policies)
        rulings = Rulings(self.shadowed(policy))
        try:
            if lapsed:
                rulings.note(lapsed)
            return await self._admit_key(call, key, policy, rulings)
        except Denial as denial:
            if denial.kind not in (DenyKind.UNAUTHENTICATED, DenyKind.UNAVAILABLE):
                # The cached record does not show a revocation: a dead key hears that, not what else is wrong
                # (an expired one too, unless shadow mode let it through: then the refusal is this one).
                _, lapsed = await self.identify(call, fresh=True)
                if lapsed and not rulings.shadow:
                    raise lapsed from None
            raise

    async def _admit_key(self, call: CallRequest, key: KeyRecord, policy: Scope, rulings: Rulings) -> Admission:
        """The pipeline. A step that enforces a policy rule runs under `rulings`, which waives it in shadow."""
        wire = FORMATS[self.config.providers[call.provider].format]
        rulings.check(authorize_provider, call, key, policy)
        endpoint = endpoint_kind(call, policy, wire)
        rulings.check(authorize_endpoint, call, key, policy, endpoint)
        require_meterable(call, key, endpoint)
        check_body_size(call, self.config, key)
        real_key = self.real_key_for(call.provider, key)
        facts = await self.read_request(call, wire, key)
        if not facts.metered:
            return await self.admit_unbilled(call, policy, wire, facts, real_key, endpoint, rulings)
        rulings.check(authorize_model, facts, key, policy, self.models_shown(call.provider, wire, policy))
        price = self.price_for(call.provider, wire, facts, key)
        plan = plan_hold(facts, key, policy, price)
        upstream_body = body_for_provider(wire, plan, call, key)  # bad input is refused before any hold
        limits = await self.limiter.take(call, key, policy, plan_tokens(plan))
        async with self.limiter.given_back_on_failure(limits):
            hold = await self.reserve(call, wire, key, policy, price, plan, rulings)
            if hold.plan.cap != plan.cap:
                upstream_body = await self.rewrite_body_under_hold(hold, wire, call, key)
        return Admission(
            key=key, policy=policy, wire=wire, facts=hold.plan.facts, real_key=real_key, metering="metered",
            remaining_micros=hold.remaining_micros, price=price, hold_id=hold.hold_id,
            hold_micros=hold.plan.worst_case, upstream_body=upstream_body,
            clamped_to=hold.plan.cap if hold.plan.lowered_by else None, clamped_by=hold.plan.lowered_by,
            would_deny=tuple(rulings.broken),
            limits=limits,
            provider=call.provider, admitted_at=self.clock(),
        )  # fmt: skip

    async def identify(self, call: CallRequest, fresh: bool = False) -> tuple[KeyRecord, Denial | None]:
        """The key the call carries, and the refusal of its lifetime if it has expired (which shadow
        mode may waive: the key is still in the store until it is purged); any other refusal is raised."""
        try:
            return await self.auth.caller(call, fresh), None
        except Denial as denial:
            if denial.rule is not Rule.EXPIRED:
                raise
            return denial.key, denial

    def shadowed(self, policy: Scope) -> bool:
        """Whether the key's policy (else the proxy config) says `enforcement: shadow`."""
        return (policy.enforcement or self.config.enforcement) == "shadow"

    def purge_cutoff(self, keys: list[KeyRecord], now: float) -> float:
        """The time before which expired keys may be purged: a key in shadow mode is kept past its expiry,
        so its calls go on being forwarded (audited would_deny: expired) rather than refused as unknown."""
        shadowed = [
            key.expires_at for key in keys
            if key.expires_at <= now and key.revoked_at is None
            and self.shadowed(scope_of(key.policy_json, self.policies))
        ]  # fmt: skip
        # The store purges keys expired at or before the cutoff: just before the first in shadow keeps it.
        return math.nextafter(min(shadowed), -math.inf) if shadowed else now

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
        self,
        call: CallRequest,
        policy: Scope,
        wire: WireFormat,
        facts: RequestFacts,
        real_key: str,
        endpoint: str,
        rulings: Rulings,
    ) -> Admission:
        """A call the provider does not bill (or one the policy lets through unmetered): no hold, so the
        key is read afresh here, since no reservation will ask the store whether it is still active."""
        key, lapsed = await self.identify(call, fresh=True)
        if lapsed:
            rulings.note(lapsed)
        if key.account_id is not None:
            account = await self.store.account(key.account_id)
            if account is None or not account.active:
                raise account_suspended(key)
        await continuations.forget_additions(self.store, call.provider, facts)
        limits = await self.limiter.take(call, key, policy, tokens=0)
        metering = "unmetered" if endpoint == "unmetered" else "free"
        return Admission(
            key, policy, wire, facts, real_key, metering, remaining_micros=key.remaining_micros,
            would_deny=tuple(rulings.broken), limits=limits, provider=call.provider, admitted_at=self.clock(),
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
        self,
        call: CallRequest,
        wire: WireFormat,
        key: KeyRecord,
        policy: Scope,
        price: ModelPrice,
        plan: HoldPlan,
        rulings: Rulings,
    ) -> Hold:
        """Hold the worst case against the budget. When it does not fit, try a tighter plan before
        refusing: an exact count of a long input bounded by its bytes, then (with `clamp_max_tokens`)
        the largest output limit that fits what remains. In shadow, a hold the budget or the key's
        lifetime refuses is taken regardless: the call is forwarded, so its worst case is held while
        it runs (a sweep charges it in full if this proxy dies) and its real cost is charged."""
        reservation = await self.store.take_hold(key, plan.worst_case)
        if refused_for_budget(reservation) and len(call.body) > tokens.EXACT_COUNT_CHARS:
            exact = await self.read_request(call, wire, key, exact=True)
            plan = plan_hold(exact, key, policy, price)
            reservation = await self.store.take_hold(key, plan.worst_case)
        if refused_for_budget(reservation) and policy.clamp_max_tokens:
            clamped = clamp_plan(plan, price, reservation.remaining_micros)
            if clamped:
                plan = clamped
                reservation = await self.store.take_hold(key, plan.worst_case)
        if rulings.shadow and reservation.refusal in (Refusal.BUDGET, Refusal.ACCOUNT_BUDGET, Refusal.EXPIRED):
            reservation = await self.store.take_hold_regardless(key, plan.worst_case)
            rulings.check(check_budget, reservation.remaining_micros + plan.worst_case, plan, key)
        check_reservation(reservation, plan, key)
        return Hold(reservation.hold_id, reservation.remaining_micros, plan)

    async def rewrite_body_under_hold(self, hold: Hold, wire: WireFormat, call: CallRequest, key: KeyRecord):
        """The body for a plan tightened while holding; if that fails the call is not forwarded, so its
        hold is freed at once rather than left for the sweeper to charge in full."""
        try:
            return body_for_provider(wire, hold.plan, call, key)
        except BaseException:
            self.store.cancel_hold(hold.hold_id)
            raise

    # ----- settle -----

    async def settle(self, admission: Admission, outcome: Outcome) -> Settlement:
        """Turn the call's hold into its charge, once; the store takes it whenever it can (`Store.close_hold`
        tries until then). A hold a sweep took first was charged in full, and audited, by that sweep. Whatever
        happens, the call's rate-limit slot is freed and its tokens corrected to what it used."""
        charge = charge_for(admission, outcome)
        try:
            return await self.settle_hold(admission, charge)
        finally:
            await self.limiter.give_back(admission.limits, tokens_used(admission, charge))

    async def settle_hold(self, admission: Admission, charge: Settlement) -> Settlement:
        if admission.hold_id is None:
            return charge
        if charge.metering == "overrun":
            log.warning(
                "key %s: cost %s exceeded its hold %s", admission.key.key_id, charge.cost_micros, admission.hold_micros
            )
        closed = await self.store.close_hold(admission.hold_id, charge.cost_micros)
        if closed is None:
            return Settlement(0, "none", why="already settled")
        if closed is Closed.SWEPT:
            why = (f"a sweep took this call for dead and charged its full hold first (hold {admission.hold_id}):"
                   " that charge has its own record")  # fmt: skip
            return Settlement(0, "swept", charge.usage, why)
        if closed is Closed.LOST:
            lost = f"the store lost hold {admission.hold_id} (its data was lost): only this record has the charge"
            return dataclasses.replace(charge, why="; ".join(reason for reason in (charge.why, lost) if reason))
        return charge

    async def release(self, admission: Admission) -> None:
        """Free the hold (in the background, until the store takes it), and give back the rate limits, of a
        call that was never forwarded."""
        try:
            if admission.hold_id is not None:
                self.store.cancel_hold(admission.hold_id)
        finally:
            await self.limiter.give_back(admission.limits, None)


# ----- the steps, as plain functions -----


def authorize_provider(call: CallRequest, key: KeyRecord, policy: Scope) -> None:
    if call.provider not in policy.providers:
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: provider {call.provider} is not allowed by policy {policy.name}"
            f" (allowed: {', '.join(policy.providers)})",
            key,
            rule=Rule.PROVIDER,
        )


def endpoint_kind(call: CallRequest, policy: Scope, wire: WireFormat) -> str | None:
    """`metered` or `free` (the wire format's kind of endpoint), `unmetered` (an endpoint the proxy cannot
    meter that the policy allows on trust), or None (one it cannot meter)."""
    kind = wire.endpoint_kind(call.method, call.path)
    if kind is None and policy.allows_unmetered(call.method, call.path):
        return "unmetered"  # the policy takes the provider's charge for it on trust; the audit says so
    return kind


def authorize_endpoint(call: CallRequest, key: KeyRecord, policy: Scope, kind: str | None) -> None:
    if kind != "unmetered" and not policy.allows_endpoint(call.method, call.path):
        allowed = ", ".join(str(rule) for rule in policy.endpoints)
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: endpoint {call.method} {call.path} is not allowed by policy {policy.name}"
            f" (allowed: {allowed})",
            key,
            rule=Rule.ENDPOINT,
        )


def require_meterable(call: CallRequest, key: KeyRecord, kind: str | None) -> None:
    """An endpoint the proxy cannot meter is refused, in shadow too: forwarded, it would go unmetered."""
    if kind is None:
        raise Denial(
            DenyKind.FORBIDDEN,
            f"agentkeys: {call.method} {call.path} cannot be metered by this proxy, so it is refused"
            " (a policy may allow it, unmetered, under unmetered_endpoints)",
            key,
        )


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
            rule=Rule.MODEL,
        )


def body_for_provider(wire: WireFormat, plan: HoldPlan, call: CallRequest, key: KeyRecord) -> bytes | None:
    """The body to forward (None: the agent's own), with the plan's output cap written in."""
    try:
        return wire.upstream_body(plan.facts, call.body, plan.cap)
    except MalformedRequest as e:
        raise Denial(DenyKind.BAD_REQUEST, f"agentkeys: {e}", key, plan.facts.model) from None


def refused_for_budget(reservation: Reservation) -> bool:
    """Refused for money, the key's or its account's period's: a tighter plan may still fit what remains."""
    return reservation.refusal in (Refusal.BUDGET, Refusal.ACCOUNT_BUDGET)


def check_reservation(reservation: Reservation, plan: HoldPlan, key: KeyRecord) -> None:
    if refused_for_budget(reservation):
        whose = (
            f"account {key.account_id}'s budget for this period"
            if reservation.refusal is Refusal.ACCOUNT_BUDGET
            else "budget"
        )
        raise budget_exhausted(reservation.remaining_micros, plan, key, whose)
    if reservation.refusal is Refusal.TAMPERED:
        log.error("key %s: its record in the store no longer matches the one this proxy verified", key.key_id)
        raise Denial(DenyKind.UNAUTHENTICATED, altered_message(key.key_id), key)
    if reservation.refusal is Refusal.SUSPENDED:
        raise account_suspended(key)
    if reservation.refusal is not None:
        raise Denial(DenyKind.UNAUTHENTICATED, f"agentkeys: agent key {key.key_id} is {reservation.refusal.value}", key)


def account_suspended(key: KeyRecord) -> Denial:
    return Denial(
        DenyKind.FORBIDDEN,
        f"agentkeys: account {key.account_id} is suspended (or no longer exists): its keys are refused",
        key,
    )


def check_budget(remaining_micros: int, plan: HoldPlan, key: KeyRecord) -> None:
    """The worst case must fit what the key had left (for a hold shadow mode took regardless)."""
    if plan.worst_case > remaining_micros:
        raise budget_exhausted(remaining_micros, plan, key)


def budget_exhausted(remaining_micros: int, plan: HoldPlan, key: KeyRecord, whose: str = "budget") -> Denial:
    return Denial(
        DenyKind.BUDGET,
        f"agentkeys: {whose} exhausted: this call could cost up to {format_usd(plan.worst_case)},"
        f" {remaining_phrase(remaining_micros)}",
        key,
        plan.facts.model,
        remaining_micros=remaining_micros,
        rule=Rule.BUDGET,
    )




def model_named_in(body: bytes) -> str | None:
    """The model a request names, if it can be read at all: for the audit of a request refused as unreadable."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def plan_tokens(plan: HoldPlan) -> int:
    """The most tokens a call can use (its input bound and every choice's output limit): what it counts
    against a tokens-per-minute limit until it settles."""
    return plan.facts.input_token_bound + plan.max_output * plan.facts.choices


def tokens_used(admission: Admission, charge: Settlement) -> int:
    usage = charge.usage
    counted = admission.limits.request.tokens if admission.limits else 0
    return used_tokens(counted, usage.input_tokens + usage.output_tokens if usage else None, charge.cost_micros > 0)
