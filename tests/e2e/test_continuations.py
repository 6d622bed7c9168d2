"""Continuations (`previous_response_id`, `conversation`) are held at what this proxy measured of the
response or conversation they continue, kept in the store (so a replica knows it too); only what the
proxy never saw is held at the model's context window. Official OpenAI SDK, real proxies, the mock."""

import openai
import pytest

from agentkeys.pricing import Usage, cost_micros
from conftest import assert_ledger_matches_audit, assert_metered, billed, settled, start_proxy, stop_proxy, write_policy
from prices import price_of

ENDPOINTS = ["POST /v1/responses", "POST /v1/conversations", "POST /v1/conversations/*/items"]
PRICE = price_of("gpt-4o-mini", "openai")
CONTEXT_WINDOW_HOLD = cost_micros(PRICE, Usage(PRICE.max_input_tokens, 0))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "agents", endpoints=ENDPOINTS, budget_usd=0.5)


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy)


def client_of(proxy, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)


def ask(client, stream: bool = False, **fields):
    if not stream:
        return client.responses.create(model="gpt-4o-mini", input="And then?", max_output_tokens=20, **fields)
    with client.responses.stream(model="gpt-4o-mini", input="And then?", max_output_tokens=20, **fields) as events:
        return events.get_final_response()


def assert_held_by_what_was_measured(record: dict, usage: Usage) -> None:
    assert_metered(record, usage, cost_micros(PRICE, usage))
    assert record["hold_micros"] < CONTEXT_WINDOW_HOLD / 20, "held at the measured context, not the window"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_continued_response_is_held_at_what_it_measured(proxy, mock, key, stream):
    client = client_of(proxy, key)
    first = ask(client, stream)
    second = ask(client, stream, previous_response_id=first.id)
    usage = billed(mock)
    assert usage.input_tokens > billed(mock, -2).input_tokens + billed(mock, -2).output_tokens, "it brought it in"
    records = proxy.records_for(key["id"], 2)
    assert_held_by_what_was_measured(records[-1], usage)
    ask(client, stream, previous_response_id=second.id)  # a chain: each turn measured in its turn
    assert_held_by_what_was_measured(settled(proxy, key, 3), billed(mock))


def test_a_response_the_proxy_never_saw_is_held_at_the_context_window(proxy, mock, key):
    ask(client_of(proxy, key), previous_response_id="resp_made_elsewhere")
    record = settled(proxy, key)
    assert record["hold_micros"] >= CONTEXT_WINDOW_HOLD
    assert_metered(record, billed(mock), cost_micros(PRICE, billed(mock)))


def test_a_conversation_is_held_at_its_measured_size_until_items_are_added_out_of_band(proxy, mock, key):
    client = client_of(proxy, key)
    conversation = client.conversations.create(items=[{"role": "user", "content": "Remember: blue."}])
    ask(client, conversation=conversation.id)  # made with items the proxy did not measure
    assert proxy.records_for(key["id"], 2)[-1]["hold_micros"] >= CONTEXT_WINDOW_HOLD
    ask(client, conversation=conversation.id)
    assert_held_by_what_was_measured(proxy.records_for(key["id"], 3)[-1], billed(mock))
    client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "And green."}])
    ask(client, conversation=conversation.id)
    assert proxy.records_for(key["id"], 5)[-1]["hold_micros"] >= CONTEXT_WINDOW_HOLD, "measured again"
    ask(client, conversation=conversation.id)
    assert_held_by_what_was_measured(settled(proxy, key, 6), billed(mock))


def test_a_small_key_runs_an_agents_turns(proxy, mock, policy):
    """The issue's case: held at the context window, each turn of an agent needs a window's worth of budget."""
    key = proxy.issue(policy, "--budget", "0.015")  # less than gpt-4o-mini's context window costs
    client = client_of(proxy, key)
    response = ask(client)
    for _ in range(5):
        response = ask(client, previous_response_id=response.id)
    records = proxy.records_for(key["id"], 6)
    assert [record["decision"] for record in records] == ["allow"] * 6
    assert mock.reported[-1]["input_tokens"] > 5 * mock.output_tokens, "each turn brought in the ones before"
    assert_ledger_matches_audit(proxy, key["id"])


def test_a_replica_on_the_same_store_knows_what_another_measured(proxy, mock, policy, tmp_path):
    key = proxy.issue(policy, "--ttl", "45s")  # gone from the module's final books check: two proxies' audits
    store = f"sqlite:///{proxy.config_path.parent / 'agentkeys.db'}"
    replica = start_proxy(tmp_path / "replica", mock, store=store)
    try:
        first = ask(client_of(proxy, key))
        ask(client_of(replica, key), previous_response_id=first.id)
        [record] = replica.records_for(key["id"])
        assert_held_by_what_was_measured(record, billed(mock))
        assert_ledger_matches_audit(proxy, key["id"], audit=proxy.audit() + replica.audit())
    finally:
        stop_proxy(replica)
