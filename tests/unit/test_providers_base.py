"""What every wire format shares (providers/base.py and the FORMATS registry): SSE splitting, endpoint
kinds, the output cap, what cannot be metered, usage read from a response, native error bodies."""

import json
import random

import pytest

from agentkeys.providers import FORMATS
from agentkeys.providers.base import (
    MAX_JSON_DEPTH,
    MAX_TOKENS_LIMIT,
    MAX_USAGE_TOKENS,
    DenyKind,
    MalformedRequest,
    RequestFacts,
    SseSplitter,
    Unmeterable,
    UsageRejected,
    event_json,
    nesting_depth,
    optional_positive_int,
    parse_event,
    parse_json_object,
    set_output_cap,
    usage_count,
)
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


def test_an_event_that_is_not_utf8_is_read_with_replacement_characters_not_a_crash():
    assert parse_event(b"data: caf\xe9 \xff\n\n").data == "caf\ufffd \ufffd"


@pytest.mark.parametrize(("data", "read"), [('{"a": 1}', {"a": 1}), ("[1, 2]", None), ("7", None), ("not json", None)])
def test_only_a_json_object_is_an_event_a_meter_reads(data, read):
    assert event_json(parse_event(f"data: {data}\n\n".encode())) == read


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
        DenyKind.RATE_LIMITED: (429, "requests"),
        DenyKind.LOOP: (429, "requests"),
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
        DenyKind.RATE_LIMITED: (429, "rate_limit_error"),
        DenyKind.LOOP: (429, "rate_limit_error"),
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
    if kind is DenyKind.RATE_LIMITED:
        assert body["error"]["code"] == "rate_limit_exceeded"  # OpenAI's own code for a rate limit


@pytest.mark.parametrize("kind", list(DenyKind))
def test_anthropic_error_shape(kind):
    status, body = ANTHROPIC.error(kind, "nope")
    assert (status, body["error"]["type"]) == EXPECTED_ERRORS["anthropic"][kind]
    assert body == {"type": "error", "error": {"type": body["error"]["type"], "message": "nope"}}


# One metered call per format: (format, path, a valid body as JSON text with a {dup} slot inside an object).
CALLS = {
    "openai": ("/v1/chat/completions", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'),
    "anthropic": (
        "/v1/messages",
        '{"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}',
    ),
    "gemini": ("/v1beta/models/gemini-2.5-flash:generateContent", '{"contents": [{"parts": [{"text": "hi"}]}]}'),
    "azure": ("/openai/deployments/gpt-4o-mini/chat/completions", '{"messages": [{"role": "user", "content": "hi"}]}'),
}


def facts(format_name: str, body: bytes):
    path, _ = CALLS[format_name]
    return FORMATS[format_name].request_facts("POST", path, body)


@pytest.mark.parametrize("format_name", sorted(CALLS))
def test_every_format_reads_its_call(format_name):
    assert facts(format_name, CALLS[format_name][1].encode()).metered


@pytest.mark.parametrize("format_name", sorted(CALLS))
@pytest.mark.parametrize(
    ("duplicate", "key"),
    [
        ('"model": "gpt-4o", "model": "gpt-4o-mini"', "model"),
        ('"max_tokens": 1, "max_tokens": 100000', "max_tokens"),
        ('"stream": false, "stream": true', "stream"),
    ],
)
def test_a_key_twice_at_the_top_is_refused_naming_it(format_name, duplicate, key):
    body = CALLS[format_name][1].replace("{", "{" + duplicate + ", ", 1)
    with pytest.raises(MalformedRequest, match=f"'{key}' appears twice"):
        facts(format_name, body.encode())


@pytest.mark.parametrize("format_name", sorted(CALLS))
def test_a_key_twice_in_a_nested_object_is_refused_naming_it(format_name):
    body = CALLS[format_name][1].replace('"hi"', '"hi", "text": "x", "cache_control": {"type": "a", "type": "b"}', 1)
    with pytest.raises(MalformedRequest, match="'type' appears twice"):
        facts(format_name, body.encode())


def test_the_same_key_in_different_objects_is_fine():
    data = parse_json_object(b'{"a": {"x": 1}, "b": {"x": 2}, "c": [{"x": 3}, {"x": 4}]}')
    assert data["c"][1]["x"] == 4


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 100_000])
@pytest.mark.parametrize(("open_", "close"), [("[", "]"), ('{"a":', "}")])
def test_absurd_nesting_is_a_bad_request_not_a_crash(depth, open_, close):
    body = ('{"model": "m", "x": ' + open_ * depth + "1" + close * depth + "}").encode()
    with pytest.raises(MalformedRequest, match="nested deeper"):
        parse_json_object(body)


def test_nesting_up_to_the_limit_is_read():
    depth = MAX_JSON_DEPTH - 1
    assert parse_json_object(('{"x": ' + "[" * depth + "1" + "]" * depth + "}").encode())["x"]


@pytest.mark.parametrize(
    "value",
    [
        "1e29",
        "1e400",
        "100000000000000000000000000000",
        "-100000000000000000000000000000",
        "NaN",
        "Infinity",
        "-Infinity",
    ],
)
def test_absurd_numbers_are_bad_requests(value):
    """A number no API field takes: refused, saying which (`NaN` and `Infinity` are not JSON at all)."""
    with pytest.raises(MalformedRequest):
        facts(
            "openai",
            f'{{"model": "gpt-4o-mini", "max_tokens": {value}, "messages": [{{"role": "user", "content": "hi"}}]}}'
            .encode(),
        )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_non_json_constant_is_named(constant):
    with pytest.raises(MalformedRequest, match=f"{constant} is not a JSON number"):
        parse_json_object(f'{{"temperature": {constant}}}'.encode())


@pytest.mark.parametrize("format_name", sorted(CALLS))
def test_an_output_limit_above_any_model_is_refused(format_name):
    limit = {"gemini": "generationConfig"}.get(format_name)
    body = json.loads(CALLS[format_name][1])
    if limit:
        body[limit] = {"maxOutputTokens": MAX_TOKENS_LIMIT + 1}
    else:
        body["max_tokens"] = MAX_TOKENS_LIMIT + 1
    with pytest.raises(MalformedRequest, match="at most"):
        facts(format_name, json.dumps(body).encode())


def test_output_limits_up_to_the_bound_are_read():
    assert optional_positive_int({"max_tokens": MAX_TOKENS_LIMIT}, "max_tokens") == MAX_TOKENS_LIMIT


def test_choices_times_the_limit_is_bounded_too():
    RequestFacts(metered=True, max_output_tokens=MAX_TOKENS_LIMIT // 4, choices=4)
    with pytest.raises(MalformedRequest, match="output tokens in all"):
        RequestFacts(metered=True, max_output_tokens=MAX_TOKENS_LIMIT // 4, choices=5)
    with pytest.raises(MalformedRequest):
        facts(
            "openai",
            b'{"model": "gpt-4o-mini", "n": 128, "max_tokens": 100000000,'
            b' "messages": [{"role": "user", "content": "x"}]}',
        )


def test_stream_options_that_are_not_an_object_are_a_bad_request():
    body = b'{"model": "gpt-4o-mini", "stream": true, "stream_options": "x", "messages": [{"role": "user"}]}'
    with pytest.raises(MalformedRequest, match="stream_options"):
        facts("openai", body)


@pytest.mark.parametrize("value", [0, 1, 17, MAX_USAGE_TOKENS, None])
def test_sane_usage_counts_are_read(value):
    assert usage_count({"n": value}, "n") == (value or 0)
    assert usage_count({}, "n") == 0


@pytest.mark.parametrize(
    "value", [-1, -(10**6), 1.5, 1.0, 1.5e293, True, False, "12", [3], {"a": 1}, MAX_USAGE_TOKENS + 1]
)
def test_usage_that_is_not_a_count_is_rejected_naming_field_and_value(value):
    with pytest.raises(UsageRejected, match=r"output_tokens=") as rejected:
        usage_count({"output_tokens": value}, "output_tokens")
    assert repr(value) in str(rejected.value)


# ----- item 3: what decides a hold is read from the parsed body, never from its bytes -----

ESCAPED = "cache\\u005fcontrol"  # how JSON may spell cache_control


@pytest.mark.parametrize(
    "where",
    [
        lambda marker: {"system": [{"type": "text", "text": "s", marker: {"type": "ephemeral", "ttl": "1h"}}]},
        lambda marker: {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x", marker: {"type": "ephemeral"}}]}]
        },
        lambda marker: {"tools": [{"name": "t", "input_schema": {"type": "object"}, marker: {"type": "ephemeral"}}]},
        lambda marker: {marker: {"type": "ephemeral"}},  # automatic caching, at the top
    ],
)
def test_an_anthropic_cache_breakpoint_is_seen_however_it_is_spelled(where):
    base = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    plain = json.dumps({**base, **where("cache_control")})
    escaped = plain.replace('"cache_control"', f'"{ESCAPED}"')
    assert ESCAPED.encode() in escaped.encode() and b"cache_control" not in escaped.encode()
    for body in (plain, escaped):
        assert FORMATS["anthropic"].request_facts("POST", "/v1/messages", body.encode()).may_write_cache


def test_an_anthropic_call_with_no_breakpoint_writes_no_cache_even_if_its_text_says_cache_control():
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "cache_control"}]}
    assert not FORMATS["anthropic"].request_facts("POST", "/v1/messages", json.dumps(body).encode()).may_write_cache


# ----- where the real key goes, and the error shapes -----


@pytest.mark.parametrize(
    ("format_name", "header"),
    [
        ("openai", ("authorization", "Bearer sk-real")),
        ("azure", ("api-key", "sk-real")),
        ("anthropic", ("x-api-key", "sk-real")),
        ("gemini", ("x-goog-api-key", "sk-real")),
    ],
)
def test_the_real_key_goes_in_the_provider_s_own_header(format_name, header):
    assert FORMATS[format_name].real_key_header("sk-real") == header


STATUSES = {
    DenyKind.UNAUTHENTICATED: 401,
    DenyKind.FORBIDDEN: 403,
    DenyKind.BAD_REQUEST: 400,
    DenyKind.UNAVAILABLE: 503,
    DenyKind.NOT_CONFIGURED: 500,
    DenyKind.NOT_FOUND: 404,
    DenyKind.TOO_LARGE: 413,
    DenyKind.INTERNAL: 500,
    DenyKind.RATE_LIMITED: 429,  # every provider's own status for a rate limit
    DenyKind.LOOP: 429,
}
BUDGET_STATUS = {"openai": 429, "azure": 429, "anthropic": 402, "gemini": 429}


@pytest.mark.parametrize("format_name", sorted(BUDGET_STATUS))
@pytest.mark.parametrize("kind", list(DenyKind))
def test_every_refusal_has_the_provider_s_status_and_shape(format_name, kind):
    status, body = FORMATS[format_name].error(kind, "why")
    assert status == STATUSES.get(kind, BUDGET_STATUS[format_name])
    if format_name == "anthropic":
        assert body["type"] == "error" and body["error"]["message"] == "why" and body["error"]["type"]
    elif format_name == "gemini":
        assert body["error"]["code"] == status and body["error"]["message"] == "why" and body["error"]["status"]
    else:
        assert body["error"]["message"] == "why" and body["error"]["type"] and body["error"]["code"]


def test_nesting_is_measured_past_a_scalar_beside_it():
    assert nesting_depth(5) == 0
    assert nesting_depth({"a": [[1]], "b": 1}) == 3
    assert nesting_depth([1, {"deep": [[[]]]}, "x"]) == 5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"max_tokens": 100000000000000000000000}',
         "the request body has an integer of 24 digits; no API field takes one"),
        (b'{"model": "a", "stream": true, "stream": false}',
         "the key 'stream' appears twice in one object of the request body"),
        (b"", "the request body must be a JSON object"),
        (b"[1]", "the request body must be a JSON object"),
    ],
)  # fmt: skip
def test_an_unreadable_body_is_refused_saying_why(body, message):
    with pytest.raises(MalformedRequest) as refused:
        parse_json_object(body)
    assert str(refused.value) == message


def test_a_call_may_ask_for_the_whole_output_limit_in_choices_without_a_length():
    RequestFacts(metered=True, choices=MAX_TOKENS_LIMIT)
    with pytest.raises(MalformedRequest):
        RequestFacts(metered=True, choices=MAX_TOKENS_LIMIT + 1)
