"""realkeys.py: which calls carry a real key, the fingerprint that names one without showing it, and
what a real key's call is recorded as costing."""

import pytest

from agentkeys.calls import CallRequest, Outcome
from agentkeys.pricing import PriceTable, Usage, cost_micros
from agentkeys.providers.base import RequestFacts
from agentkeys.realkeys import RealKeyCall, fingerprint, real_key_in, usage_and_cost

KEY = "sk-" + "proj-" + "0123456789abcdefghij" + "WXYZ"  # assembled: nothing here looks like a committed key
MINI = PriceTable.bundled().lookup("openai", "gpt-4o-mini")


def call(headers: dict[str, str], query: str = "", tunnel: str | None = None) -> CallRequest:
    return CallRequest("openai", "POST", "/v1/chat/completions", headers, b"{}", query, tunnel)


def test_a_fingerprint_names_the_provider_a_hash_prefix_and_the_last_four_characters_only():
    named = fingerprint("openai", KEY)
    provider, _, rest = named.partition(":")
    digest, _, tail = rest.partition("…")
    assert (provider, len(digest), tail) == ("openai", 12, "WXYZ")
    assert KEY[:-4] not in named and fingerprint("openai", KEY) == named
    assert fingerprint("openai", KEY[:-1] + "Q") != named


def test_a_short_credential_shows_none_of_its_characters():
    assert fingerprint("openai", "short-key").endswith("…")


@pytest.mark.parametrize(
    ("request_", "found"),
    [
        (call({"authorization": f"Bearer {KEY}"}), KEY),
        (call({"x-api-key": KEY}), KEY),
        (call({}, query=f"key={KEY}"), KEY),
        (call({}, tunnel=KEY), KEY),
        (call({"authorization": "Bearer ak_abc_def"}), None),
        (call({"authorization": f"Bearer {KEY}"}, tunnel="ak_abc_def"), None),
        (call({}), None),
    ],
    ids=["bearer", "x-api-key", "query", "proxy-user", "agent-key", "agent-key-beside-a-real-one", "none"],
)
def test_a_real_key_is_a_credential_of_a_call_that_carries_no_agent_key(request_, found):
    assert real_key_in(request_) == found


def test_the_cost_is_worked_out_from_the_usage_at_the_proxys_price():
    observed = RealKeyCall("openai:x…", "api.openai.com", RequestFacts(metered=True, model="gpt-4o-mini"), MINI)
    usage = Usage(input_tokens=100, output_tokens=20)
    answered = Outcome(reached_provider=True, complete=True, status=200, usage=usage)
    assert usage_and_cost(observed, answered) == (usage, cost_micros(MINI, usage), "")
    failed = Outcome(reached_provider=True, complete=True, status=429)
    assert usage_and_cost(observed, failed) == (None, 0, "the provider answered 429")
    unpriced = RealKeyCall("openai:x…", "api.openai.com", None, None)
    assert usage_and_cost(unpriced, answered) == (usage, 0, "no price is known for this model")
