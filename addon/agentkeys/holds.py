"""The hold of a metered call: the most it may cost, and the output limit that keeps it to that.

A call's worst case is its input bound and its output limit (the request's, else the policy's
default, else the model's; never above the policy's ceiling) at the model's dearest prices. When
the budget cannot cover it, `clamp_plan` finds the largest output limit whose worst case fits.
"""

from dataclasses import dataclass, replace

from agentkeys.calls import Denial
from agentkeys.ledger import KeyRecord
from agentkeys.policy import Scope
from agentkeys.pricing import ModelPrice, worst_case_micros
from agentkeys.providers.base import DenyKind, RequestFacts


@dataclass(frozen=True)
class HoldPlan:
    """The most a call may cost, and the output limit to send so the provider keeps to it."""

    facts: RequestFacts
    max_output: int
    worst_case: int
    cap: int | None  # an output limit to write into the request; None: forward the agent's own
    lowered_by: str | None = None  # what lowered the output limit the agent asked for: "policy" or "budget"


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
    return replace(facts, input_token_bound=price.max_input_tokens)


def clamp_plan(plan: HoldPlan, price: ModelPrice, remaining: int) -> HoldPlan | None:
    """The plan with the largest output limit below the asked one whose worst case fits `remaining`."""
    if plan.max_output <= 1 or not plan.facts.takes_output_limit:
        return None
    fitting = affordable_output(price, plan.facts, plan.max_output - 1, remaining)
    if fitting is None:
        return None
    cap, worst_case = fitting
    return HoldPlan(plan.facts, cap, worst_case, cap, lowered_by="budget")


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
