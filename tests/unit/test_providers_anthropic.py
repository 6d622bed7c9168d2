"""Anthropic's messages format (providers/anthropic.py): request facts, the stream meter, usage with cache writes."""

import json

from agentkeys.pricing import PriceTable, Usage, cost_micros
from agentkeys.providers import FORMATS
from prices import expected_cost
from sse_events import feed_all, sse

ANTHROPIC = FORMATS["anthropic"]
PRICES = PriceTable.bundled()


def test_client_tools_are_counted_not_refused():
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}, {"type": "bash_20250124", "name": "bash"}]
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools,
    }
    assert ANTHROPIC.request_facts("POST", "/v1/messages", json.dumps(body).encode()).input_token_bound > 1000


# ----- stream meter -----


def anthropic_event(kind, **data) -> bytes:
    return sse({"type": kind, **data}, event=kind)


def anthropic_stream(stop=True, delta=True) -> list[bytes]:
    start_usage = {
        "input_tokens": 20,
        "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 50,
        "output_tokens": 1,
    }
    events = [
        anthropic_event("message_start", message={"id": "m", "usage": start_usage}),
        anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        anthropic_event("ping"),
        anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi "}),
        anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "there"}),
        anthropic_event("content_block_stop", index=0),
    ]
    if delta:
        events.append(anthropic_event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 9}))
    if stop:
        events.append(anthropic_event("message_stop"))
    return events


def test_anthropic_meter_reads_input_from_message_start_and_output_from_message_delta():
    meter = ANTHROPIC.stream_meter(None)
    assert all(feed_all(meter, anthropic_stream()))  # nothing is hidden from the client
    result = meter.result()
    assert result.usage == Usage(input_tokens=20 + 300 + 50, output_tokens=9, cached_tokens=300, cache_write_tokens=50)
    assert result.complete
    assert result.input_tokens_seen == 370


def test_anthropic_meter_cut_before_message_delta_reports_input_seen_only():
    meter = ANTHROPIC.stream_meter(None)
    feed_all(meter, anthropic_stream(stop=False, delta=False))
    result = meter.result()
    assert (result.usage, result.complete) == (None, False)
    assert result.input_tokens_seen == 370


# ----- usage from a whole response -----


def test_anthropic_usage_from_response_counts_cache_tokens_as_input():
    usage = {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 40}
    body = json.dumps({"type": "message", "usage": usage}).encode()
    assert ANTHROPIC.usage_from_response(body) == Usage(145, 7, cached_tokens=100, cache_write_tokens=40)


def test_anthropic_one_hour_cache_writes_are_told_apart():
    usage = {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 0,
             "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}}  # fmt: skip
    parsed = ANTHROPIC.usage_from_response(json.dumps({"usage": usage}).encode())
    assert parsed == Usage(305, 1, cache_write_tokens=300, cache_write_1h_tokens=200)
    haiku = PRICES.lookup("anthropic", "claude-haiku-4-5")
    expected = expected_cost("claude-haiku-4-5", input=5, cache_write=100, cache_write_1h=200, output=1)
    assert cost_micros(haiku, parsed) == expected
