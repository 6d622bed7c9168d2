"""The settlement rules: what a forwarded call costs, from the plain facts of its Outcome.

The provider bills a call once it has it, whether or not the agent waits for the answer; so a call
that reached the provider is charged its usage if the provider reported it in full, and its whole
hold (the most it could cost) otherwise. `Gate.settle` writes the charge these rules decide.
"""

from dataclasses import dataclass
from typing import Protocol

from agentkeys.calls import Outcome
from agentkeys.money import format_usd
from agentkeys.pricing import ModelPrice, Usage, cost_micros


class Admitted(Protocol):
    """What settlement reads of a call's admission (gate.Admission is one)."""

    @property
    def metering(self) -> str: ...  # "metered" (a hold covers it), "free" or "unmetered"
    @property
    def price(self) -> ModelPrice | None: ...
    @property
    def hold_micros(self) -> int: ...


@dataclass(frozen=True)
class Settlement:
    """What a call costs, how that was decided (the audit's `metering`), and why, when it is not the usage."""

    cost_micros: int
    metering: str  # "usage" | "overrun" | "held" (the full hold) | "none" | "free" | "unmetered"
    usage: Usage | None = None
    why: str = ""


def charge_for(admission: Admitted, outcome: Outcome) -> Settlement:
    """The settlement rules, in order: nothing for a call without a hold or one the provider never had
    or refused; else its reported usage (all of it, even above the hold), or its full hold."""
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
    """Why a call is charged its full hold, for the audit."""
    rejected = outcome.usage_rejected or (outcome.stream.usage_rejected if outcome.stream else None)
    if rejected:
        return f"usage not believed: {rejected}; charged the full hold"
    if not outcome.complete:
        return "the call broke off before the provider's usage arrived; charged the full hold"
    return "the response carried no usage the proxy could read; charged the full hold"
