"""The settlement rules (settlement.py): what a forwarded call costs from the plain facts of its Outcome,
and why, as the audit says it. The gate's tests (test_gate.py) check that settle writes these charges."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.calls import Outcome
from agentkeys.gate import Admission
from agentkeys.money import format_usd
from agentkeys.pricing import PriceTable, Usage, cost_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.base import StreamResult
from agentkeys.settlement import Settlement, charge_for

MINI = PriceTable.bundled().lookup("openai", "gpt-4o-mini")
NEVER_SENT = Outcome(reached_provider=False, complete=False)


def answered(usage: Usage | None = None, stream: StreamResult | None = None) -> Outcome:
    """A call the provider answered in full, with this usage (or stream)."""
    return Outcome(reached_provider=True, complete=True, status=200, usage=usage, stream=stream)


def metered_admission(hold_micros: int = 1_000) -> Admission:
    return Admission(
        key=None, policy=None, wire=FORMATS["openai"], facts=None, real_key="sk", metering="metered",
        remaining_micros=0, price=MINI, hold_id=1, hold_micros=hold_micros,
    )  # fmt: skip


SMALL = Usage(input_tokens=100, output_tokens=50)


def cut_stream(result: StreamResult) -> Outcome:
    return Outcome(reached_provider=True, complete=False, status=200, stream=result)


@pytest.mark.parametrize(
    ("outcome", "cost", "metering"),
    [
        (NEVER_SENT, 0, "none"),
        (Outcome(reached_provider=True, complete=True, status=429), 0, "none"),
        (Outcome(reached_provider=True, complete=False, status=500), 0, "none"),
        (answered(SMALL), cost_micros(MINI, SMALL), "usage"),
        (answered(), 1_000, "held"),
        (Outcome(reached_provider=True, complete=False), 1_000, "held"),
        (Outcome(reached_provider=True, complete=False, status=200), 1_000, "held"),
        (cut_stream(StreamResult(None)), 1_000, "held"),
        (cut_stream(StreamResult(SMALL)), cost_micros(MINI, SMALL), "usage"),
        (Outcome(True, True, 200, stream=StreamResult(SMALL), meter_broken=True), 1_000, "held"),
    ],
    ids=["never-sent", "429", "cut-500", "usage", "no-usage", "cut-before-headers", "cut-after-headers", "stream-cut",
         "stream-cut-after-usage", "meter-broken"],
)  # fmt: skip
def test_each_settlement_rule(outcome, cost, metering):
    charge = charge_for(metered_admission(), outcome)
    assert (charge.cost_micros, charge.metering) == (cost, metering)


def test_usage_above_the_hold_is_charged_in_full_as_an_overrun():
    """The provider spent it (it ignored the output limit), so the budget pays it; the audit says so."""
    big = Usage(input_tokens=10_000, output_tokens=10_000)
    charge = charge_for(metered_admission(hold_micros=10), answered(big))
    assert (charge.cost_micros, charge.metering) == (cost_micros(MINI, big), "overrun")
    assert charge.cost_micros > 10 and "more than the call's hold" in charge.why


@pytest.mark.parametrize("metering", ["free", "unmetered"])
def test_calls_without_a_hold_are_charged_nothing(metering):
    admission = dataclasses.replace(metered_admission(), metering=metering, hold_id=None, hold_micros=0)
    assert charge_for(admission, answered(SMALL)) == Settlement(0, metering)


@given(
    reached=st.booleans(),
    complete=st.booleans(),
    status=st.sampled_from([None, 200, 400, 429, 500]),
    reported=st.sampled_from(["body", "stream", "none"]),
    meter_broken=st.booleans(),
    input_tokens=st.integers(0, 2_000),
    output_tokens=st.integers(0, 500),
)
@settings(max_examples=300, deadline=None)
def test_the_charge_is_never_below_what_the_provider_bills(
    reached, complete, status, reported, meter_broken, input_tokens, output_tokens
):
    """Whatever the client did and however far the response got, the proxy charges at least the bill.

    The provider bills a call it received and did not refuse; the proxy sees the usage only if the
    provider reported it (in the body of a complete response, or in a stream's usage event)."""
    true_usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    hold = cost_micros(MINI, Usage(input_tokens=2_000, output_tokens=500))
    billed = cost_micros(MINI, true_usage) if reached and (status is None or status < 400) else 0
    seen = true_usage if reported != "none" and (complete or reported == "stream") else None
    outcome = Outcome(
        reached_provider=reached, complete=complete, status=status, meter_broken=meter_broken,
        usage=seen if reported == "body" else None,
        stream=StreamResult(seen) if reported == "stream" else None,
    )  # fmt: skip
    charge = charge_for(metered_admission(hold_micros=hold), outcome)
    assert charge.cost_micros >= billed
    assert charge.cost_micros <= hold  # and never more than the hold, while the provider keeps to it


BROKE_OFF = "the call broke off before the provider's usage arrived; charged the full hold"
NO_USAGE = "the response carried no usage the proxy could read; charged the full hold"


@pytest.mark.parametrize(
    ("outcome", "why"),
    [
        (NEVER_SENT, "the call never reached the provider"),
        (Outcome(True, True, 429), "the provider answered 429"),
        (Outcome(True, True, 400), "the provider answered 400"),
        (Outcome(True, True, 200, meter_broken=True), "the stream could not be metered; charged its full hold"),
        (Outcome(True, True, 200, usage_rejected="prompt_tokens=-3"),
         "usage not believed: prompt_tokens=-3; charged the full hold"),
        (cut_stream(StreamResult(None, usage_rejected="output_tokens=1.5")),
         "usage not believed: output_tokens=1.5; charged the full hold"),
        (Outcome(True, False, 200), BROKE_OFF),
        (cut_stream(StreamResult(None)), BROKE_OFF),
        (answered(), NO_USAGE),
        (answered(stream=StreamResult(None)), NO_USAGE),
        (answered(SMALL), ""),
    ],
    ids=["never-sent", "429", "400", "meter-broken", "rejected", "stream-rejected", "cut", "stream-cut", "no-usage",
         "stream-without-usage", "usage"],
)  # fmt: skip
def test_the_audit_says_why_a_call_is_not_charged_its_usage(outcome, why):
    assert charge_for(metered_admission(), outcome).why == why


def test_a_status_below_400_is_the_providers_answer():
    charge = charge_for(metered_admission(), Outcome(True, True, 399, usage=SMALL))
    assert charge == Settlement(cost_micros(MINI, SMALL), "usage", SMALL)


def test_usage_exactly_at_the_hold_is_not_an_overrun():
    hold = cost_micros(MINI, SMALL)
    assert charge_for(metered_admission(hold_micros=hold), answered(SMALL)) == Settlement(hold, "usage", SMALL)
    over = charge_for(metered_admission(hold_micros=hold - 1), answered(SMALL))
    assert over == Settlement(hold, "overrun", SMALL, f"the provider billed {format_usd(1)} more than the call's"
                              " hold (it did not keep to the output limit)")  # fmt: skip


def test_a_streams_usage_is_preferred_to_none_in_the_body():
    assert charge_for(metered_admission(), answered(stream=StreamResult(SMALL))).usage == SMALL
