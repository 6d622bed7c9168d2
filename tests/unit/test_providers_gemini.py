"""Gemini's generateContent format (providers/gemini.py): request facts, the cap, the stream meter."""

import base64
import json

import pytest
from documents import blank_pdf

from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import MalformedRequest, StreamResult, Unmeterable
from agentkeys.providers.documents import PDF_PAGE_TEXT_TOKENS
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
    assert (cut.usage, cut.usage_rejected) == (None, None), "usage before the finish reason is not final"
    feed_all(meter, [gemini_chunk("", "STOP", candidatesTokenCount=2, thoughtsTokenCount=5, cachedContentTokenCount=4)])
    assert meter.result().usage == Usage(7, 7, cached_tokens=4, reasoning_tokens=5)


def test_the_gemini_meter_passes_every_event_on_and_has_no_usage_without_metadata():
    meter = GEMINI.stream_meter(None)
    finished_without_usage = sse({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}]})
    assert feed_all(meter, [b"data: not json\n\n", sse({"candidates": []}), finished_without_usage]) == [True] * 3
    assert meter.result() == StreamResult(usage=None)


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
        ({}, "'contents' must be a non-empty list"),
        ({"contents": []}, "'contents' must be a non-empty list"),
        ({"contents": "hi"}, "'contents' must be a non-empty list"),
        ({"contents": ["hi"]}, "each content must be an object"),
        ({"contents": [{"parts": "hi"}]}, "'parts' must be a list"),
        ({"contents": [{"parts": ["hi"]}]}, "each part must be an object"),
        ({"contents": [{"parts": []}], "tools": {"functionDeclarations": []}}, "'tools' must be a list"),
    ],
)
def test_a_malformed_request_says_what_is_wrong(data, complaint):
    with pytest.raises(MalformedRequest) as refused:
        bound(data)
    assert str(refused.value) == complaint


def test_snake_case_function_declarations_are_counted_exactly_and_hosted_tools_named():
    snake = [{"function_declarations": [{"name": "f"}]}]
    without = bound({"contents": [{"parts": [{"text": "a"}]}]})[0]
    with_snake = bound({"contents": [{"parts": [{"text": "a"}]}], "tools": snake})[0]
    assert with_snake - without == TOOLS_OVERHEAD_TOKENS + len(json.dumps(snake).encode())
    assert bound({"contents": [{"parts": [{"text": "a"}]}], "tools": []})[0] == without
    with pytest.raises(Unmeterable, match=r"Google's own tools \(codeExecution, googleSearch\)"):
        bound({"contents": [{"parts": [{"text": "a"}]}],
               "tools": [{"functionDeclarations": [], "google_search": {}, "code_execution": {}}]})  # fmt: skip
    with pytest.raises(Unmeterable, match=r"Google's own tools \(None\)"):
        bound({"contents": [{"parts": [{"text": "a"}]}], "tools": ["search"]})


GENERATE_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"


def facts_of(body: dict, path: str = GENERATE_PATH, query: str = "", method: str = "POST"):
    return GEMINI.request_facts(method, path, json.dumps(body).encode(), query)


HELLO = {"contents": [{"parts": [{"text": "hello"}]}]}


@pytest.mark.parametrize(
    ("config", "max_output", "choices"),
    [
        ({}, None, 1),
        ({"generationConfig": {"maxOutputTokens": 50, "candidateCount": 3}}, 50, 3),
        ({"generation_config": {"max_output_tokens": 60, "candidate_count": 2}}, 60, 2),
        ({"generationConfig": None}, None, 1),
    ],
)
def test_the_output_limit_and_candidates_are_read_in_either_spelling(config, max_output, choices):
    facts = facts_of({**HELLO, **config})
    assert (facts.max_output_tokens, facts.choices) == (max_output, choices)
    assert (facts.metered, facts.endpoint, facts.model, facts.stream, facts.may_write_cache) == (
        True, "generateContent", "gemini-2.5-flash", False, False,
    )  # fmt: skip
    assert (facts.input_token_bound, facts.unseen_input) == (16 + (8 + 5 + 1) + 8, None)


def test_unseen_input_is_named_in_order():
    body = {"contents": [{"parts": [{"fileData": {"fileUri": "gs://x"}}]}], "cachedContent": "cachedContents/c"}
    assert facts_of(body).unseen_input == "cachedContent, media"


@pytest.mark.parametrize("query", ["alt=sse", "key=k&alt=sse", "alt=sse&key=k"])
def test_a_stream_in_server_sent_events_is_metered(query):
    facts = facts_of(HELLO, STREAM_PATH, query)
    assert (facts.stream, facts.endpoint, facts.metered) == (True, "streamGenerateContent", True)


@pytest.mark.parametrize("query", ["", "alt=json", "alt=sse&alt=json", "alt=SSE"])
def test_a_stream_in_any_other_form_is_refused(query):
    with pytest.raises(MalformedRequest) as refused:
        facts_of(HELLO, STREAM_PATH, query)
    assert str(refused.value) == (
        "streamGenerateContent is metered as server-sent events only: add ?alt=sse (the Google SDKs do)"
    )


def test_a_generation_config_that_is_not_an_object_is_refused():
    with pytest.raises(MalformedRequest, match="^'generationConfig' must be an object$"):
        facts_of({**HELLO, "generationConfig": [1]})


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", GENERATE_PATH), ("POST", "/v1beta/models/gemini-2.5-flash:countTokens"), ("GET", "/v1beta/models")],
)
def test_only_a_posted_generation_is_metered(method, path):
    assert facts_of(HELLO, path, method=method).metered is False


def test_the_cap_goes_into_the_camel_case_config_by_default():
    body = json.dumps(HELLO).encode()
    assert GEMINI.upstream_body(facts_of(HELLO), body, None) is None
    sent = json.loads(GEMINI.upstream_body(facts_of(HELLO), body, 12))
    assert sent == {**HELLO, "generationConfig": {"maxOutputTokens": 12}}
    lowered = {**HELLO, "generationConfig": {"maxOutputTokens": 500, "temperature": 0}}
    sent = json.loads(GEMINI.upstream_body(facts_of(lowered), json.dumps(lowered).encode(), 12))
    assert sent["generationConfig"] == {"maxOutputTokens": 12, "temperature": 0}
@pytest.mark.parametrize("inline", ["inlineData", "inline_data"])
def test_an_inline_pdf_is_held_by_its_pages(inline):
    pdf = base64.b64encode(blank_pdf(4)).decode()
    unseen = set()
    assert part_tokens({inline: {"mimeType": "application/pdf", "data": pdf}}, unseen) == 4 * (
        IMAGE_TOKEN_ALLOWANCE + PDF_PAGE_TEXT_TOKENS
    )
    assert unseen == set()
    part_tokens({inline: {"mimeType": "application/pdf", "data": "bm90IGEgcGRm"}}, unseen)  # "not a pdf"
    assert unseen == {"media"}


def test_the_cap_overwrites_a_camel_case_limit_inside_a_snake_case_config():
    body = {**HELLO, "generation_config": {"maxOutputTokens": 500}}
    sent = json.loads(GEMINI.upstream_body(facts_of(body), json.dumps(body).encode(), 12))
    assert sent["generation_config"] == {"maxOutputTokens": 12}


@pytest.mark.parametrize(
    ("metadata", "usage"),
    [
        ({"promptTokenCount": 7, "candidatesTokenCount": 3}, Usage(7, 3)),
        ({"promptTokenCount": 7, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 3}, Usage(12, 3)),
        ({"promptTokenCount": 7, "candidatesTokenCount": 3, "thoughtsTokenCount": 4, "cachedContentTokenCount": 2},
         Usage(7, 7, cached_tokens=2, reasoning_tokens=4)),
        ({"candidatesTokenCount": 3, "totalTokenCount": 3}, None),  # no prompt count: not a usage report
        (None, None),
    ],
)  # fmt: skip
def test_gemini_usage_counts_tool_prompts_as_input_and_thoughts_as_output(metadata, usage):
    assert GEMINI.usage_from_response(json.dumps({"usageMetadata": metadata}).encode()) == usage
