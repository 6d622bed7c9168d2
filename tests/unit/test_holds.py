"""A metered call's hold plan (holds.py): which output limit it assumes, what it writes upstream, its
worst case, and the largest limit that fits a budget. Prices here are whole micro-dollars per token
(1 in, 2 out), so every worst case is input + 2 × output, exactly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.calls import Denial
from agentkeys.holds import HoldPlan, affordable_output, call_worst_case, clamp_plan, first_given, plan_hold
from agentkeys.ledger import KeyRecord
from agentkeys.policy import Policy, Scope
from agentkeys.pricing import ModelPrice, PriceTier
from agentkeys.providers.base import DenyKind, RequestFacts

PRICE = ModelPrice(input=1e-6, output=2e-6, max_output_tokens=1_000, max_input_tokens=5_000)
KEY = KeyRecord(key_id="k", key_hash="h", name="n", policy_name="p", policy_json="{}", created_at=0,
                expires_at=1, budget_micros=10**6)  # fmt: skip


def scope(**fields) -> Scope:
    policy = {"name": "p", "budget_usd": 1, "providers": ["openai"], "endpoints": ["* /**"], "models": ["*"]}
    return Scope((Policy.model_validate({**policy, **fields}),))


def facts(**fields) -> RequestFacts:
    return RequestFacts(**{"metered": True, "model": "m", "input_token_bound": 100, **fields})


@pytest.mark.parametrize(
    ("asked", "policy", "plan"),
    [
        # the request's own limit: forwarded as it is
        ({"max_output_tokens": 50}, {}, HoldPlan(facts(max_output_tokens=50), 50, 100 + 2 * 50, None)),
        # none asked, no policy default: the model's own maximum, which the provider applies itself
        ({}, {}, HoldPlan(facts(), 1_000, 100 + 2 * 1_000, None)),
        # none asked, the policy's default: written upstream, or the hold would not bound the call
        ({}, {"default_max_output_tokens": 70}, HoldPlan(facts(), 70, 100 + 2 * 70, 70)),
        # a default equal to the model's maximum needs no writing
        ({}, {"default_max_output_tokens": 1_000}, HoldPlan(facts(), 1_000, 100 + 2 * 1_000, None)),
        # the request's limit wins over the policy's default
        ({"max_output_tokens": 30}, {"default_max_output_tokens": 70},
         HoldPlan(facts(max_output_tokens=30), 30, 160, None)),
        # above the policy's ceiling: lowered to it, written upstream, and said so
        ({"max_output_tokens": 500}, {"max_output_tokens": 200},
         HoldPlan(facts(max_output_tokens=500), 200, 100 + 2 * 200, 200, lowered_by="policy")),
        ({}, {"max_output_tokens": 200}, HoldPlan(facts(), 200, 100 + 2 * 200, 200, lowered_by="policy")),
        # at the ceiling: left alone
        ({"max_output_tokens": 200}, {"max_output_tokens": 200},
         HoldPlan(facts(max_output_tokens=200), 200, 500, None)),
        # an embedding has no output at all: 0 is a limit, not a missing one
        ({"max_output_tokens": 0}, {"default_max_output_tokens": 70},
         HoldPlan(facts(max_output_tokens=0), 0, 100, None)),
        # every choice's output is held
        ({"max_output_tokens": 10, "choices": 3}, {},
         HoldPlan(facts(max_output_tokens=10, choices=3), 10, 100 + 2 * 30, None)),
        # a call that may not write a cache is held at the input price
        ({"max_output_tokens": 10, "may_write_cache": False}, {},
         HoldPlan(facts(max_output_tokens=10, may_write_cache=False), 10, 120, None)),
    ],
    ids=["request", "model", "policy-default", "default-is-models", "request-over-default", "ceiling",
         "ceiling-over-model", "at-ceiling", "no-output", "choices", "no-cache-write"],
)  # fmt: skip
def test_the_plan_of_each_kind_of_limit(asked, policy, plan):
    assert plan_hold(facts(**asked), KEY, scope(**policy), PRICE) == plan


def test_a_call_without_any_known_limit_is_refused_saying_so():
    with pytest.raises(Denial) as refused:
        plan_hold(facts(), KEY, scope(), PRICE.model_copy(update={"max_output_tokens": None}))
    assert (refused.value.kind, refused.value.key) == (DenyKind.BAD_REQUEST, KEY)  # the audit names the key
    assert str(refused.value.message) == "agentkeys: set max_tokens; the limit of m is unknown"


def test_input_only_the_provider_sees_is_held_at_the_context_window():
    plan = plan_hold(facts(max_output_tokens=10, unseen_input="previous_response_id"), KEY, scope(), PRICE)
    assert (plan.facts.input_token_bound, plan.worst_case) == (5_000, 5_000 + 2 * 10)
    assert plan_hold(facts(max_output_tokens=10, unseen_input=""), KEY, scope(), PRICE).worst_case == 100 + 20


def test_input_only_the_provider_sees_is_refused_without_a_context_window():
    price = PRICE.model_copy(update={"max_input_tokens": None})
    with pytest.raises(Denial) as refused:
        plan_hold(facts(max_output_tokens=10, unseen_input="input_file"), KEY, scope(), price)
    assert (refused.value.kind, refused.value.model, refused.value.key) == (DenyKind.FORBIDDEN, "m", KEY)
    assert "input only the provider can see (input_file)" in refused.value.message


def test_the_first_given_value_counts_zero():
    assert first_given(None, 0, 5) == 0
    assert first_given(None, None, 5) == 5
    assert first_given(None, None) is None


def test_the_worst_case_is_every_choice_at_the_dearest_band():
    tiered = PRICE.model_copy(update={"tiers": [PriceTier(above_tokens=50, input=3e-6, output=4e-6)]})
    assert call_worst_case(tiered, facts(choices=2), 10) == 3 * 100 + 4 * 20


# ----- clamping to the budget -----


def plan_of(max_output: int, **fields) -> HoldPlan:
    return plan_hold(facts(max_output_tokens=max_output, **fields), KEY, scope(), PRICE)


@pytest.mark.parametrize(
    ("max_output", "remaining", "cap"),
    [
        (500, 100 + 2 * 40, 40),  # exactly 40 tokens fit
        (500, 100 + 2 * 40 + 1, 40),  # a micro-dollar short of 41
        (500, 100 + 2 * 499, 499),  # the most is one below what was asked
        (500, 100 + 2 * 500, 499),  # never the asked limit itself: that hold was just refused
        (500, 10**9, 499),
        (2, 100 + 2 * 1, 1),  # one token is still a call
        (500, 100 + 2 * 1, 1),
    ],
)
def test_clamping_finds_the_largest_limit_below_the_asked_one_that_fits(max_output, remaining, cap):
    clamped = clamp_plan(plan_of(max_output), PRICE, remaining)
    assert clamped == HoldPlan(facts(max_output_tokens=max_output), cap, 100 + 2 * cap, cap, lowered_by="budget")


@pytest.mark.parametrize(("max_output", "remaining"), [(500, 100 + 1), (500, 0), (1, 10**9), (0, 10**9)])
def test_clamping_gives_up_when_not_even_one_token_fits_or_none_is_below(max_output, remaining):
    assert clamp_plan(plan_of(max_output), PRICE, remaining) is None


@given(
    at_most=st.integers(0, 300),
    remaining=st.integers(0, 2_000),
    input_tokens=st.integers(0, 500),
    choices=st.integers(1, 4),
    output_micros=st.integers(1, 5),
)
@settings(max_examples=100, deadline=None)
def test_the_affordable_output_is_the_largest_that_fits(at_most, remaining, input_tokens, choices, output_micros):
    """Against a plain search: the largest n in 1..at_most whose worst case fits, with that worst case."""
    price = ModelPrice(input=1e-6, output=output_micros * 1e-6)
    call = facts(input_token_bound=input_tokens, choices=choices)
    fitting = [n for n in range(1, at_most + 1) if call_worst_case(price, call, n) <= remaining]
    expected = (fitting[-1], call_worst_case(price, call, fitting[-1])) if fitting else None
    assert affordable_output(price, call, at_most, remaining) == expected
