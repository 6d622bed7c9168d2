"""What every wire format shares (providers/base.py and the FORMATS registry): SSE splitting, endpoint
kinds, the output cap, what cannot be metered, usage read from a response, native error bodies."""

import json
import random

import pytest

from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, SseSplitter, Unmeterable, parse_event, set_output_cap
from sse_events import sse

OPENAI, ANTHROPIC, GEMINI, AZURE = (FORMATS[name] for name in ("openai", "anthropic", "gemini", "azure"))


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


# ----- endpoints and request bodies -----


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
        (GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", "metered"),
        (GEMINI, "POST", "/v1/models/gemini-2.5-flash:streamGenerateContent", "metered"),
        (GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", "free"),
        (GEMINI, "GET", "/v1beta/models", "free"),
        (GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:embedContent", None),
        (GEMINI, "POST", "/upload/v1beta/files", None),
        (AZURE, "POST", "/openai/deployments/d1/chat/completions", "metered"),
        (AZURE, "POST", "/openai/deployments/d1/embeddings", "metered"),
        (AZURE, "POST", "/openai/v1/responses", "metered"),
        (AZURE, "GET", "/openai/v1/models", "free"),
        (AZURE, "POST", "/openai/deployments/d1/audio/transcriptions", None),
        (OPENAI, "POST", "/v1/responses/input_tokens", "free"),
        (OPENAI, "DELETE", "/v1/responses/resp_1", "free"),
        (OPENAI, "POST", "/v1/responses/resp_1/cancel", None),
    ],
)
def test_endpoint_kind(wire, method, path, kind):
    assert wire.endpoint_kind(method, path) == kind


def test_the_cap_overwrites_every_limit_the_client_set():
    data = {"max_tokens": 900, "max_completion_tokens": 800}
    set_output_cap(data, 50, ("max_completion_tokens", "max_tokens"))
    assert data == {"max_tokens": 50, "max_completion_tokens": 50}
    fresh = {}
    set_output_cap(fresh, 50, ("max_completion_tokens", "max_tokens"))
    assert fresh == {"max_completion_tokens": 50}


@pytest.mark.parametrize(
    ("wire", "path", "body", "complaint"),
    [
        (OPENAI, "/v1/chat/completions", {"web_search_options": {}}, "web search"),
        (OPENAI, "/v1/chat/completions", {"modalities": ["text", "audio"]}, "audio"),
        (OPENAI, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}]}]}, "audio"),
        (OPENAI, "/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        (OPENAI, "/v1/responses", {"tools": [{"type": "file_search"}]}, "'file_search'"),
        (OPENAI, "/v1/responses", {"tools": [{"type": "mcp", "server_url": "x"}]}, "'mcp'"),
        (ANTHROPIC, "/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "w"}]}, "web_search"),
        (ANTHROPIC, "/v1/messages", {"mcp_servers": [{"url": "x"}]}, "MCP"),
        (AZURE, "/openai/deployments/d/chat/completions", {"data_sources": [{"type": "azure_search"}]}, "On Your Data"),
        (GEMINI, "/v1beta/models/m:generateContent", {"tools": [{"code_execution": {}}]}, "codeExecution"),
    ],
    ids=["chat-web-search", "chat-audio-out", "chat-audio-in", "chat-prediction", "file-search", "mcp",
         "anthropic-web-search", "anthropic-mcp", "azure-on-your-data", "gemini-code-execution"],
)  # fmt: skip
def test_tools_billed_beyond_tokens_cannot_be_metered(wire, path, body, complaint):
    base = {
        "model": "m", "max_tokens": 10, "input": "hi", "messages": [{"role": "user", "content": "hi"}],
        "contents": [{"parts": [{"text": "hi"}]}],
    }  # fmt: skip
    with pytest.raises(Unmeterable, match=complaint):
        wire.request_facts("POST", path, json.dumps({**base, **body}).encode())


# ----- usage from a whole response -----


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
        DenyKind.TOO_LARGE: (413, "invalid_request_error"),
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
        DenyKind.TOO_LARGE: (413, "request_too_large"),
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
