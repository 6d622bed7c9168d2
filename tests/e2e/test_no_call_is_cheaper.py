"""A property, through the real proxy: whatever the request, whatever the agent does (waits for the
answer, leaves part-way by RST_STREAM, GOAWAY or a TCP reset), and whatever the provider reports
(usage within the limit, or beyond it), the charge is never below what the provider billed, and a
key's settled spend never exceeds its budget unless an overrun is recorded.

What the cap assumes: a provider that ignores the output limit is charged in full when it reports
it (an overrun); when the agent leaves before that report, the proxy cannot see it and charges the
full hold, the most the call could cost if the provider kept to the limit. So overruns are drawn
here only for calls the agent waits for."""

import time

import h2.errors
import h2.events
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agentkeys.pricing import PriceTable, Usage, cost_micros
from conftest import assert_ledger_matches_audit, write_policy
from h2_agent import H2Agent

PRICES = PriceTable.bundled()
PROVIDERS = {
    "openai": ("api.openai.com", "/v1/chat/completions", "authorization", "gpt-4o-mini"),
    "anthropic": ("api.anthropic.com", "/v1/messages", "x-api-key", "claude-haiku-4-5"),
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "property", budget_usd=0.003)


def body(provider: str, max_tokens: int, stream: bool, words: int) -> dict:
    model = PROVIDERS[provider][3]
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hello " * words}]}  # fmt: skip


def leave(agent: H2Agent, stream_id: int, how: str) -> None:
    if how == "reset":
        agent.conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        agent.flush()
    elif how == "goaway":
        agent.conn.close_connection()
        agent.flush()
    elif how == "tcp-reset":
        agent.tcp_reset()
        return
    time.sleep(0.3)
    agent.close()


def billed_micros(provider: str, reported: dict) -> int:
    """What the mock billed, at the price of the model the test asked for."""
    usage = Usage(
        input_tokens=reported["input_tokens"], output_tokens=reported["output_tokens"],
        cached_tokens=reported["cached_tokens"], cache_write_tokens=reported["cache_write_tokens"],
    )  # fmt: skip
    return cost_micros(PRICES.lookup(provider, PROVIDERS[provider][3]), usage)


@given(
    provider=st.sampled_from(sorted(PROVIDERS)),
    max_tokens=st.integers(1, 200),
    stream=st.booleans(),
    words=st.integers(1, 50),
    behaviour=st.sampled_from(["complete", "reset", "goaway", "tcp-reset"]),
    overrun=st.one_of(st.none(), st.integers(300, 3_000)),
)
@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_charge_is_never_below_the_bill(
    proxy, mock, policy, provider, max_tokens, stream, words, behaviour, overrun
):
    assume(overrun is None or behaviour == "complete")
    mock.reset()
    key = proxy.issue(policy)
    host, path, key_header, _ = PROVIDERS[provider]
    if overrun is not None:
        mock.overrun_next(output_tokens=overrun)
    if behaviour != "complete":
        (mock.stall_next_stream if stream else mock.delay_next)(1.0)
    agent = H2Agent(proxy, key["key"], host=host, key_header=key_header)
    stream_id = agent.post(body(provider, max_tokens, stream, words), path=path)
    if behaviour == "complete":
        agent.read_until(lambda event: isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id)
        agent.close()
    else:
        deadline = time.monotonic() + 10
        while not mock.received and time.monotonic() < deadline:
            time.sleep(0.02)
        if stream:
            agent.read_until(lambda event: isinstance(event, h2.events.DataReceived))
        leave(agent, stream_id, behaviour)
        time.sleep(1.2)  # the mock finishes the abandoned call (and bills it) before it is looked at

    [record] = proxy.records_for(key["id"])
    state = assert_ledger_matches_audit(proxy, key["id"])
    if record["decision"] == "deny":
        assert not mock.received and record["cost_micros"] == 0
        return
    billed = sum(billed_micros(provider, reported) for reported in mock.reported)
    assert record["cost_micros"] >= billed
    if not mock.reported:  # the provider had the call but the bill never came back: the most it can be
        assert record["cost_micros"] == record["hold_micros"]
    if state.spent_micros > state.budget_micros:
        assert record["metering"] == "overrun"
