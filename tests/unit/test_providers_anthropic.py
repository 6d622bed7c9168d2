"""Anthropic's messages format (providers/anthropic.py): request facts, the stream meter, usage with cache writes."""

import base64
import json

import pytest
from documents import blank_pdf

from agentkeys.pricing import PriceTable, Usage, cost_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.anthropic import IMAGE_TOKEN_ALLOWANCE
from agentkeys.providers.base import MalformedRequest, Unmeterable
from agentkeys.providers.documents import PDF_PAGE_TEXT_TOKENS
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


def test_anthropic_meter_cut_before_message_delta_has_no_usage():
    meter = ANTHROPIC.stream_meter(None)
    feed_all(meter, anthropic_stream(stop=False, delta=False))
    result = meter.result()
    assert (result.usage, result.usage_rejected) == (None, None)


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


# ----- the input bound, exactly: 16 per request, 8 per message and per block, the text's UTF-8 bytes -----


def input_bound(**body) -> int:
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, **body}
    return ANTHROPIC.request_facts("POST", "/v1/messages", json.dumps(body).encode()).input_token_bound


def message(content) -> dict:
    return {"role": "user", "content": content}


TOOL_USE = {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": "é"}}
TOOL_RESULT = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]}
TEXT_DOCUMENT = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}


@pytest.mark.parametrize(
    ("body", "bound"),
    [
        ({"messages": [message("hi")]}, 16 + 8 + 2),
        ({"messages": [message("hé"), message("")]}, 16 + 2 * 8 + 3),
        ({"messages": [message(None)]}, 16 + 8),
        ({"messages": [message("hi")], "system": "Be brief ✓"}, 16 + 8 + 2 + 12),
        ({"messages": [message("hi")], "system": [{"type": "text", "text": "ab"}]}, 16 + 8 + 2 + 2 + 8),
        ({"messages": [message([{"type": "text", "text": "héllo"}])]}, 16 + 8 + 6 + 8),
        ({"messages": [message([{"type": "image", "source": {"type": "url", "url": "u"}}])]}, 16 + 8 + 5_000),
        ({"messages": [message(["raw", 7])]}, 16 + 8 + (3 + 8) + (1 + 8)),
        ({"messages": [message([TOOL_USE])]}, 16 + 8 + len(json.dumps(TOOL_USE, ensure_ascii=False).encode()) + 8),
        (
            {"messages": [message([TOOL_RESULT])]},
            16 + 8 + (2 + 8) + len(json.dumps({"type": "tool_result", "tool_use_id": "t1"}).encode()),
        ),
        ({"messages": [message([TEXT_DOCUMENT])]}, 16 + 8 + len(json.dumps({"type": "document"})) + 8 + len("doc")),
        ({"messages": [message({"odd": "shape"})]}, 16 + 8 + len('{"odd": "shape"}')),
        (
            {"messages": [message("hi")], "tools": [{"name": "f", "input_schema": {}}]},
            16 + 8 + 2 + 1_000 + len('[{"name": "f", "input_schema": {}}]'),
        ),
        ({"messages": [message("hi")], "tools": []}, 16 + 8 + 2),
        (
            {"messages": [message([{"type": "text", "text": "ab"}, {"type": "image", "source": {}}, TOOL_RESULT,
                                   {"type": "text", "text": "c"}, TOOL_USE, "raw"])]},
            16 + 8 + (2 + 8) + 5_000 + (2 + 8 + len(json.dumps({"type": "tool_result", "tool_use_id": "t1"})))
            + (1 + 8) + (len(json.dumps(TOOL_USE, ensure_ascii=False).encode()) + 8) + (3 + 8),
        ),
    ],
    ids=["text", "two-messages", "no-content", "system", "system-blocks", "text-block", "image", "bare-values",
         "tool-use", "tool-result", "text-document", "object-content", "tools", "no-tools", "every-block-adds-up"],
)  # fmt: skip
def test_the_input_bound_of_each_shape_is_exact(body, bound):
    assert input_bound(**body) == bound


DOCUMENTS = ("documents other than plain text (PDFs, files, URLs) cannot be bounded in tokens before the call,"
             " so they cannot be metered by this proxy yet")


@pytest.mark.parametrize(
    ("messages", "refusal"),
    [
        (["not an object"], "each message must be an object"),
        ([message([{"type": "document"}])], "a 'document' block needs a 'source' object"),
        ([], "'messages' must be a non-empty list"),
    ],
)
def test_what_cannot_be_bounded_is_refused(messages, refusal):
    with pytest.raises(MalformedRequest) as refused:
        input_bound(messages=messages)
    assert str(refused.value) == refusal


def test_mcp_servers_cannot_be_metered():
    with pytest.raises(Unmeterable) as refused:
        input_bound(messages=[message("hi")], mcp_servers=[{"type": "url", "url": "https://x"}])
    assert str(refused.value) == (
        "MCP servers are called by Anthropic and add input of their own, so this proxy cannot meter them"
    )


@pytest.mark.parametrize(
    ("body", "may_write"),
    [
        ({"messages": [message("hi")]}, False),
        ({"messages": [message([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}])]}, True),
        ({"messages": [message("hi")], "system": [{"type": "text", "text": "s", "cache_control": {}}]}, True),
    ],
)
def test_a_cache_write_is_held_only_where_a_breakpoint_is_marked(body, may_write):
    facts = ANTHROPIC.request_facts(
        "POST", "/v1/messages", json.dumps({"model": "claude-haiku-4-5", "max_tokens": 3, **body}).encode()
    )
    assert (facts.may_write_cache, facts.max_output_tokens, facts.model) == (may_write, 3, "claude-haiku-4-5")
def document_facts(source: dict):
    block = {"type": "document", "source": source, "title": "paper"}
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [block]}]}
    return FORMATS["anthropic"].request_facts("POST", "/v1/messages", json.dumps(body).encode())


def test_documents_follow_one_rule_pages_bytes_or_unseen():
    pdf = document_facts({"type": "base64", "media_type": "application/pdf", "data": b64(blank_pdf(3))})
    assert 3 * (IMAGE_TOKEN_ALLOWANCE + PDF_PAGE_TEXT_TOKENS) < pdf.input_token_bound
    assert pdf.input_token_bound < 4 * (IMAGE_TOKEN_ALLOWANCE + PDF_PAGE_TEXT_TOKENS) and pdf.unseen_input is None
    text = document_facts({"type": "text", "media_type": "text/plain", "data": "é" * 1000})
    assert 2000 < text.input_token_bound < 2200 and text.unseen_input is None
    content = document_facts({"type": "content", "content": [{"type": "text", "text": "x" * 500}]})
    assert 500 < content.input_token_bound < 700 and content.unseen_input is None
    for source in ({"type": "url", "url": "https://example.com/a.pdf"}, {"type": "file", "file_id": "file_1"}):
        assert document_facts(source).unseen_input == "document"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_anthropic_meter_passes_every_event_on_and_keeps_the_last_output_count():
    meter = ANTHROPIC.stream_meter(None)
    events = [*anthropic_stream(stop=False), b"data: not json\n\n",
              anthropic_event("message_delta", delta={"stop_reason": "end_turn"}),  # no usage: the count stands
              anthropic_event("message_stop")]  # fmt: skip
    assert all(feed_all(meter, events))
    assert meter.result().usage == Usage(370, 9, cached_tokens=300, cache_write_tokens=50)


@pytest.mark.parametrize(("stream", "read"), [(True, True), (False, False), ("yes", False), (None, False)])
def test_a_messages_call_is_metered_on_its_endpoint_and_streams_only_when_asked(stream, read):
    body = {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": [message("hi")]}
    facts = ANTHROPIC.request_facts("POST", "/v1/messages", json.dumps({**body, "stream": stream}).encode())
    assert (facts.metered, facts.endpoint, facts.stream) == (True, "/v1/messages", read)


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"),
                                              ("GET", "/v1/messages"), ("POST", "/v1/complete")])  # fmt: skip
def test_anything_but_a_posted_message_is_not_metered(method, path):
    assert ANTHROPIC.request_facts(method, path, b"{}").metered is False


def test_a_message_without_max_tokens_is_refused_saying_so():
    with pytest.raises(MalformedRequest, match="^'max_tokens' is required$"):
        ANTHROPIC.request_facts("POST", "/v1/messages", json.dumps({"model": "m", "messages": []}).encode())


def test_a_tool_that_is_not_an_object_is_refused_as_unmeterable():
    with pytest.raises(Unmeterable, match="^the server tool None is billed per use, beyond tokens"):
        input_bound(messages=[message("hi")], tools=["bash"])
