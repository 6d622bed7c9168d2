"""Gemini's generateContent format (providers/gemini.py): request facts, the cap, the stream meter."""

import json

import pytest

from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import MalformedRequest, Unmeterable
from agentkeys.providers.gemini import (
    IMAGE_TOKEN_ALLOWANCE,
    REQUEST_OVERHEAD_TOKENS,
    TOKENS_PER_CONTENT,
    TOOLS_OVERHEAD_TOKENS,
    input_bound,
    part_tokens,
)
from sse_events import feed_all, sse

GEMINI = FORMATS["gemini"]


def test_gemini_reads_snake_case_and_writes_the_cap_where_the_client_put_it():
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"candidate_count": 2}})
    facts = GEMINI.request_facts("POST", "/v1beta/models/gemini-2.5-flash:generateContent", body.encode())
    assert (facts.model, facts.choices, facts.max_output_tokens, facts.stream) == ("gemini-2.5-flash", 2, None, False)
    sent = json.loads(GEMINI.upstream_body(facts, body.encode(), 77))
    assert sent["generation_config"] == {"candidate_count": 2, "max_output_tokens": 77}
    assert "generationConfig" not in sent


def test_a_gemini_stream_must_be_server_sent_events():
    body = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert GEMINI.request_facts("POST", path, body, "alt=sse&key=x").stream
    with pytest.raises(Exception, match="alt=sse"):
        GEMINI.request_facts("POST", path, body, "")


# ----- stream meter -----


def gemini_chunk(text: str, finish: str | None = None, **usage) -> bytes:
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return sse({"candidates": [candidate], "usageMetadata": {"promptTokenCount": 7, **usage}})


def test_the_gemini_meter_bills_thoughts_as_output_and_waits_for_the_finish():
    meter = GEMINI.stream_meter(None)
    feed_all(meter, [gemini_chunk("Hi"), gemini_chunk(" there")])
    cut = meter.result()
    assert (cut.usage, cut.complete, cut.input_tokens_seen) == (None, False, 7)
    feed_all(meter, [gemini_chunk("", "STOP", candidatesTokenCount=2, thoughtsTokenCount=5, cachedContentTokenCount=4)])
    assert meter.result().usage == Usage(7, 7, cached_tokens=4, reasoning_tokens=5)


EMPTY_SYSTEM = TOKENS_PER_CONTENT  # the system instruction's content, counted even when absent


def bound(data: dict) -> tuple[int, set[str]]:
    unseen = set()
    return input_bound(data, unseen), unseen


def test_text_parts_are_their_bytes_and_one():
    data = {"contents": [{"parts": [{"text": "hello"}, {"text": "é"}]}]}
    assert bound(data) == (REQUEST_OVERHEAD_TOKENS + TOKENS_PER_CONTENT + 6 + 3 + EMPTY_SYSTEM, set())


@pytest.mark.parametrize("name", ["systemInstruction", "system_instruction"])
def test_the_system_instruction_counts_like_a_content(name):
    data = {"contents": [{"parts": [{"text": "a"}]}], name: {"parts": [{"text": "be brief"}]}}
    assert bound(data)[0] == REQUEST_OVERHEAD_TOKENS + TOKENS_PER_CONTENT + 2 + TOKENS_PER_CONTENT + 9


@pytest.mark.parametrize("inline", ["inlineData", "inline_data"])
@pytest.mark.parametrize("mime", ["mimeType", "mime_type"])
def test_an_image_is_held_at_the_image_allowance(inline, mime):
    assert part_tokens({inline: {mime: "image/png", "data": "x" * 10_000}}, set()) == IMAGE_TOKEN_ALLOWANCE


@pytest.mark.parametrize(
    "part",
    [
        {"inlineData": {"mimeType": "audio/mp3", "data": "x"}},
        {"inline_data": {"mimeType": "video/mp4", "data": "x"}},
        {"inlineData": {"data": "x"}},
        {"fileData": {"fileUri": "gs://x"}},
        {"file_data": {"file_uri": "gs://x"}},
    ],
)
def test_media_only_google_can_measure_is_unseen_input(part):
    unseen = set()
    assert part_tokens(part, unseen) == 0
    assert unseen == {"media"}


def test_any_other_part_is_its_bytes():
    part = {"functionCall": {"name": "f", "args": {"q": "ü"}}}
    assert part_tokens(part, set()) == len(json.dumps(part, ensure_ascii=False).encode())


def test_a_cached_context_is_unseen_input():
    data = {"contents": [{"parts": [{"text": "a"}]}], "cachedContent": "cachedContents/x"}
    assert bound(data)[1] == {"cachedContent"}
    assert bound({**data, "cachedContent": ""})[1] == set()


def test_function_declarations_are_counted_with_their_overhead():
    tools = [{"functionDeclarations": [{"name": "f"}]}]
    with_tools = bound({"contents": [{"parts": [{"text": "a"}]}], "tools": tools})[0]
    without = bound({"contents": [{"parts": [{"text": "a"}]}]})[0]
    assert with_tools - without == TOOLS_OVERHEAD_TOKENS + len(json.dumps(tools).encode())
    snake = [{"function_declarations": [{"name": "f"}]}]
    assert bound({"contents": [{"parts": [{"text": "a"}]}], "tools": snake})[0] > without


@pytest.mark.parametrize("tool", [{"googleSearch": {}}, {"code_execution": {}}, {"urlContext": {}}, "search"])
def test_google_s_own_tools_cannot_be_metered(tool):
    with pytest.raises(Unmeterable):
        bound({"contents": [{"parts": [{"text": "a"}]}], "tools": [tool]})


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({}, "'contents'"),
        ({"contents": []}, "'contents'"),
        ({"contents": "hi"}, "'contents'"),
        ({"contents": ["hi"]}, "each content"),
        ({"contents": [{"parts": "hi"}]}, "'parts'"),
        ({"contents": [{"parts": ["hi"]}]}, "each part"),
        ({"contents": [{"parts": []}], "tools": {"functionDeclarations": []}}, "'tools'"),
    ],
)
def test_a_malformed_request_says_what_is_wrong(data, complaint):
    with pytest.raises(MalformedRequest, match=complaint):
        bound(data)
