"""Wire formats (SSE splitting, stream meters, usage, error shapes), pricing and money: plain unit tests."""

import json
import random
from decimal import Decimal

import pytest

from agentkeys.money import format_usd, usd_to_micros
from agentkeys.pricing import ModelPrice, PriceTable, Usage, cost_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, SseSplitter, parse_event

OPENAI = FORMATS["openai"]
ANTHROPIC = FORMATS["anthropic"]


def sse(data, event=None, newline="\n") -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}{newline}" if event else ""
    return f"{head}data: {payload}{newline}{newline}".encode()


def feed_all(meter, events: list[bytes]) -> list[bool]:
    """Feed whole events through a splitter into a meter; what the meter passes on, per event."""
    splitter = SseSplitter()
    return [meter.feed(event) for event in splitter.feed(b"".join(events))]


# ----- SseSplitter -----

STREAM_EVENTS = [
    {"id": 1, "text": "hello"},
    {"id": 2, "text": "multi\nline? no: data lines are JSON"},
    {"id": 3, "text": "héllo ✓ 世界"},
    "[DONE]",
]


def stream_bytes(newline: str) -> bytes:
    return b"".join(
        sse(data, event="chunk" if i % 2 else None, newline=newline) for i, data in enumerate(STREAM_EVENTS)
    )


def chunkings(data: bytes):
    yield "whole", [data]
    yield "byte-by-byte", [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(1234)
    for n in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        yield f"random-{n}", [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_sse_splitter_yields_the_same_events_for_any_chunking(newline):
    data = stream_bytes(newline)
    expected = [json.dumps(d) if not isinstance(d, str) else d for d in STREAM_EVENTS]
    for name, chunks in chunkings(data):
        splitter = SseSplitter()
        events = [event for chunk in chunks for event in splitter.feed(chunk)]
        assert [e.data for e in events] == expected, name
        assert [e.event for e in events] == ["chunk" if i % 2 else None for i in range(len(STREAM_EVENTS))], name
        assert b"".join(e.raw for e in events) == data, name  # nothing lost or altered on the way
        assert splitter.flush() == b""


def test_sse_splitter_hands_on_each_event_as_soon_as_it_is_complete():
    splitter = SseSplitter()
    assert splitter.feed(b"data: 1\n") == []
    assert [e.data for e in splitter.feed(b"\ndata: 2")] == ["1"]
    assert [e.data for e in splitter.feed(b"\n\n")] == ["2"]


def test_sse_splitter_flush_returns_the_incomplete_remainder_once():
    splitter = SseSplitter()
    splitter.feed(b"data: 1\n\ndata: partial")
    assert splitter.flush() == b"data: partial"
    assert splitter.flush() == b""


def test_parse_event_joins_multiple_data_lines():
    event = parse_event(b"event: x\ndata: a\ndata:b\n: a comment\n\n")
    assert (event.event, event.data) == ("x", "a\nb")


# ----- OpenAI chat stream meter -----


def chat_chunk(content=None, usage=None, choices=True) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    body["choices"] = [{"index": 0, "delta": {"content": content} if content is not None else {}}] if choices else []
    if usage is not None or not choices:
        body["usage"] = usage
    return sse(body)


OPENAI_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 3,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 1},
}
OPENAI_STREAM = [
    chat_chunk(""),
    chat_chunk("Hel"),
    chat_chunk("lo"),
    chat_chunk(),
    chat_chunk(usage=OPENAI_USAGE, choices=False),
    sse("[DONE]"),
]


@pytest.mark.parametrize("hide", [True, False])
def test_openai_meter_hides_only_the_trailing_usage_chunk_when_asked(hide):
    meter = OPENAI.stream_meter(
        OPENAI.request_facts(
            "POST",
            "/v1/chat/completions",
            chat_request(stream=True, **({} if hide else {"stream_options": {"include_usage": True}})),
        )
    )
    passed = feed_all(meter, OPENAI_STREAM)
    assert passed == [True, True, True, True, not hide, True]
    result = meter.result()
    assert result.streamed_text == "Hello"
    assert result.usage == Usage(input_tokens=11, output_tokens=3, cached_tokens=4, reasoning_tokens=1)
    assert result.complete


def test_openai_meter_incomplete_stream_has_text_but_no_usage():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    feed_all(meter, OPENAI_STREAM[:3])
    result = meter.result()
    assert (result.usage, result.complete, result.streamed_text) == (None, False, "Hello")


def test_openai_meter_collects_tool_call_text():
    tool_delta = {"tool_calls": [{"index": 0, "function": {"name": "lookup", "arguments": '{"q":'}}]}
    event = sse({"choices": [{"index": 0, "delta": tool_delta}]})
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    feed_all(meter, [event])
    assert meter.result().streamed_text == 'lookup{"q":'


# ----- Anthropic messages stream meter -----


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
    assert result.streamed_text == "Hi there"
    assert result.input_tokens_seen == 370


def test_anthropic_meter_cut_before_message_delta_reports_input_seen_only():
    meter = ANTHROPIC.stream_meter(None)
    feed_all(meter, anthropic_stream(stop=False, delta=False))
    result = meter.result()
    assert (result.usage, result.complete) == (None, False)
    assert result.input_tokens_seen == 370
    assert result.streamed_text == "Hi there"


# ----- usage from a whole response -----


def test_openai_usage_from_response():
    body = json.dumps({"choices": [], "usage": OPENAI_USAGE}).encode()
    assert OPENAI.usage_from_response(body) == Usage(11, 3, cached_tokens=4, reasoning_tokens=1)


def test_anthropic_usage_from_response_counts_cache_tokens_as_input():
    usage = {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 40}
    body = json.dumps({"type": "message", "usage": usage}).encode()
    assert ANTHROPIC.usage_from_response(body) == Usage(145, 7, cached_tokens=100, cache_write_tokens=40)


@pytest.mark.parametrize("wire", [OPENAI, ANTHROPIC], ids=lambda w: w.name)
@pytest.mark.parametrize("body", [b"not json", b"[]", b"{}", b'{"usage": null}', b'{"usage": {"total": 3}}'])
def test_usage_from_response_without_usage_is_none(wire, body):
    assert wire.usage_from_response(body) is None


# ----- native error bodies -----

EXPECTED_ERRORS = {
    "openai": {
        DenyKind.UNAUTHENTICATED: (401, "invalid_request_error"),
        DenyKind.FORBIDDEN: (403, "permission_error"),
        DenyKind.BUDGET: (429, "insufficient_quota"),
        DenyKind.BAD_REQUEST: (400, "invalid_request_error"),
        DenyKind.UNAVAILABLE: (503, "server_error"),
        DenyKind.NOT_CONFIGURED: (500, "server_error"),
        DenyKind.NOT_FOUND: (404, "invalid_request_error"),
        DenyKind.INTERNAL: (500, "server_error"),
    },
    "anthropic": {
        DenyKind.UNAUTHENTICATED: (401, "authentication_error"),
        DenyKind.FORBIDDEN: (403, "permission_error"),
        DenyKind.BUDGET: (402, "billing_error"),
        DenyKind.BAD_REQUEST: (400, "invalid_request_error"),
        DenyKind.UNAVAILABLE: (503, "api_error"),
        DenyKind.NOT_CONFIGURED: (500, "api_error"),
        DenyKind.NOT_FOUND: (404, "not_found_error"),
        DenyKind.INTERNAL: (500, "api_error"),
    },
}


@pytest.mark.parametrize("kind", list(DenyKind))
def test_openai_error_shape(kind):
    status, body = OPENAI.error(kind, "nope")
    assert (status, body["error"]["type"]) == EXPECTED_ERRORS["openai"][kind]
    assert body["error"]["message"] == "nope"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if kind is DenyKind.BUDGET:
        assert body["error"]["code"] == "insufficient_quota"  # what the SDKs treat as "out of credit"


@pytest.mark.parametrize("kind", list(DenyKind))
def test_anthropic_error_shape(kind):
    status, body = ANTHROPIC.error(kind, "nope")
    assert (status, body["error"]["type"]) == EXPECTED_ERRORS["anthropic"][kind]
    assert body == {"type": "error", "error": {"type": body["error"]["type"], "message": "nope"}}


# ----- request facts and endpoints -----


def chat_request(**fields) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(
    ("wire", "method", "path", "kind"),
    [
        (OPENAI, "POST", "/v1/chat/completions", "metered"),
        (OPENAI, "GET", "/v1/models", "free"),
        (OPENAI, "GET", "/v1/models/gpt-4o-mini", "free"),
        (OPENAI, "GET", "/v1/chat/completions", None),
        (OPENAI, "POST", "/v1/embeddings", "metered"),
        (OPENAI, "POST", "/v1/responses", "metered"),
        (OPENAI, "POST", "/v1/completions", "metered"),
        (OPENAI, "GET", "/v1/responses/resp_123", "free"),
        (OPENAI, "POST", "/v1/files", None),
        (ANTHROPIC, "POST", "/v1/messages", "metered"),
        (ANTHROPIC, "POST", "/v1/messages/count_tokens", "free"),
        (ANTHROPIC, "POST", "/v1/complete", None),
    ],
)
def test_endpoint_kind(wire, method, path, kind):
    assert wire.endpoint_kind(method, path) == kind


def test_openai_facts_prefer_max_completion_tokens_and_note_stream_usage():
    facts = OPENAI.request_facts(
        "POST",
        "/v1/chat/completions",
        chat_request(max_tokens=50, max_completion_tokens=70, stream=True, stream_options={"include_usage": True}),
    )
    assert (facts.model, facts.max_output_tokens, facts.stream, facts.client_wants_stream_usage) == (
        "gpt-4o-mini",
        70,
        True,
        True,
    )
    assert facts.input_token_bound > 0


# ----- pricing and money -----

PRICES = PriceTable.bundled()


@pytest.mark.parametrize(
    ("provider", "dated", "family"),
    [
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-4o-mini-2099-01-01", "gpt-4o-mini"),
        ("openai", "gpt-4o-2099-12-31", "gpt-4o"),
        ("anthropic", "claude-haiku-4-5-20991231", "claude-haiku-4-5"),
    ],
)
def test_dated_model_names_resolve_to_their_family_price(provider, dated, family):
    family_price = PRICES.lookup(provider, family)
    assert family_price is not None
    price = PRICES.lookup(provider, dated)
    assert (price.input, price.output) == (family_price.input, family_price.output)


def test_unknown_model_has_no_price():
    assert PRICES.lookup("openai", "gpt-unknown-9") is None
    assert PRICES.lookup("nosuchprovider", "gpt-4o-mini") is None


def test_cost_prices_cache_reads_and_writes_separately():
    price = ModelPrice(input=1e-6, output=2e-6, cache_read=1e-7, cache_write=1.25e-6)
    usage = Usage(input_tokens=1000, output_tokens=10, cached_tokens=400, cache_write_tokens=100)
    # 500 plain × 1e-6 + 400 read × 1e-7 + 100 written × 1.25e-6 + 10 out × 2e-6 = $0.000685
    assert cost_micros(price, usage) == 685


def test_cache_tokens_cost_the_input_price_when_the_model_has_no_cache_price():
    price = ModelPrice(input=1e-6, output=2e-6)
    assert cost_micros(price, Usage(input_tokens=1000, cached_tokens=400, cache_write_tokens=100)) == 1000


@pytest.mark.parametrize(
    ("usage", "micros"),
    [
        (Usage(input_tokens=1), 1),  # $0.00000015 rounds up to one micro-dollar
        (Usage(input_tokens=7), 2),  # $0.00000105
        (Usage(input_tokens=20), 3),  # exactly $0.000003: no rounding
        (Usage(), 0),
    ],
)
def test_cost_rounds_up_to_the_next_micro_dollar(usage, micros):
    assert cost_micros(ModelPrice(input=1.5e-7, output=6e-7), usage) == micros


@pytest.mark.parametrize(
    ("usd", "micros"),
    [(0, 0), (1, 1_000_000), ("0.0000001", 1), (0.0000011, 2), (Decimal("1.5"), 1_500_000), (2.000001, 2_000_001)],
)
def test_usd_to_micros_rounds_up(usd, micros):
    assert usd_to_micros(usd) == micros


def test_format_usd():
    assert format_usd(12_300) == "$0.0123"
