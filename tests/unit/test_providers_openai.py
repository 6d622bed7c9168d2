"""OpenAI's wire formats (providers/openai.py): request facts, chat and Responses stream meters, usage."""

import base64
import json

import pytest
from documents import blank_pdf

from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import MalformedRequest, StreamResult, Unmeterable
from agentkeys.providers.documents import PDF_PAGE_TEXT_TOKENS
from agentkeys.providers.openai import (
    IMAGE_TOKEN_ALLOWANCE,
    TOKENS_PER_MESSAGE,
    content_part_tokens,
    content_tokens,
    instructions_tokens,
    prompt_tokens,
    response_item_tokens,
)
from agentkeys.tokens import EXACT_COUNT_CHARS, count_tokens, text_bound
from sse_events import feed_all, sse

OPENAI = FORMATS["openai"]


def chat_request(**fields) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


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


# ----- chat completions stream meter -----


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
    assert result.usage == Usage(input_tokens=11, output_tokens=3, cached_tokens=4, reasoning_tokens=1)


def test_openai_meter_stream_cut_before_its_usage_chunk_has_no_usage():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    feed_all(meter, OPENAI_STREAM[:3])
    result = meter.result()
    assert (result.usage, result.usage_rejected) == (None, None)


@pytest.mark.parametrize(
    "usage_chunk",
    [
        '{"choices": [], "usage": USAGE}',
        '{"choices":[],"usage":USAGE}',
        '{"choices": [], "usage" :\t USAGE}',
        '{"choices": [{"index": 0, "delta": {}, "usage": null}], "usage": USAGE}',  # a null inside, the usage after
        '{"usage": USAGE, "choices": [], "extra": {"usage": null}}',
    ],
    ids=["spaced", "compact", "pretty", "null-inside-first", "null-inside-after"],
)
def test_the_chat_meter_finds_the_usage_however_the_chunk_is_written(usage_chunk):
    """Only chunks with a usage other than null are parsed: spacing and a null usage elsewhere must not hide it."""
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    chunk = usage_chunk.replace("USAGE", json.dumps(OPENAI_USAGE))
    feed_all(meter, [chat_chunk("Hi", usage=None), sse(chunk), sse("[DONE]")])
    assert meter.result().usage == Usage(input_tokens=11, output_tokens=3, cached_tokens=4, reasoning_tokens=1)


def test_the_chat_meter_does_not_take_text_chunks_with_a_null_usage_for_the_usage():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    null_usage = sse('{"choices": [{"index": 0, "delta": {"content": "x"}}], "usage" : null}')
    assert feed_all(meter, [null_usage, null_usage, sse("[DONE]")]) == [True, True, True]
    ended = meter.result()
    assert (ended.usage, ended.usage_rejected) == (None, None), "ended, but with no usage: the full hold"


def test_the_openai_meter_passes_on_a_chunk_with_choices_and_usage_and_one_whose_usage_it_rejects():
    hiding = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    both = chat_chunk("Hi", usage=OPENAI_USAGE)  # a host that sends usage with the last choice
    insane = chat_chunk(usage={**OPENAI_USAGE, "completion_tokens": -1}, choices=False)
    assert feed_all(hiding, [both, b"data: not json\n\n", insane, b"data: [DONE]\n\n"]) == [True] * 4
    assert hiding.result().usage is None and "completion_tokens=-1" in hiding.result().usage_rejected


# ----- usage from a whole response -----


def test_openai_usage_from_response():
    body = json.dumps({"choices": [], "usage": OPENAI_USAGE}).encode()
    assert OPENAI.usage_from_response(body) == Usage(11, 3, cached_tokens=4, reasoning_tokens=1)


def test_responses_usage_reads_cached_and_reasoning_tokens():
    usage = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 64}, "output_tokens": 30,
             "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 130}  # fmt: skip
    body = json.dumps({"object": "response", "usage": usage}).encode()
    assert OPENAI.usage_from_response(body) == Usage(100, 30, cached_tokens=64, reasoning_tokens=20)


# ----- Responses API stream meter -----


def responses_events(end: str | None = "response.completed") -> list[bytes]:
    usage = {"input_tokens": 9, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}}
    events = [
        sse({"type": "response.created", "response": {"usage": None}}, "response.created"),
        sse({"type": "response.output_text.delta", "delta": "Hel"}, "response.output_text.delta"),
        sse({"type": "response.function_call_arguments.delta", "delta": '{"a":'}, "x"),
        sse({"type": "response.audio.delta", "delta": "AAAAAAAA"}, "response.audio.delta"),
    ]
    if end:
        events.append(sse({"type": end, "response": {"usage": usage}}, end))
    return events


@pytest.mark.parametrize("end", ["response.completed", "response.incomplete"])
def test_the_responses_meter_takes_usage_from_the_final_event(end):
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/responses", b'{"model": "o4-mini", "input": "x"}'))
    assert all(feed_all(meter, [b"data: not json\n\n", *responses_events(end)])), "every event is passed on"
    result = meter.result()
    assert result.usage == Usage(9, 3, reasoning_tokens=1)


def test_the_responses_meter_reads_a_final_event_with_no_event_line_too():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/responses", b'{"model": "o4-mini", "input": "x"}'))
    usage = {"input_tokens": 9, "output_tokens": 3}
    feed_all(
        meter,
        [
            sse({"type": "response.output_text.delta", "delta": "Hi"}),
            sse({"type": "response.completed", "response": {"usage": usage}}),
        ],
    )
    assert meter.result().usage == Usage(9, 3)


def test_a_responses_stream_cut_short_has_no_usage():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/responses", b'{"model": "o4-mini", "input": "x"}'))
    feed_all(meter, responses_events(end=None))
    assert meter.result() == StreamResult(usage=None)


def count(text: str) -> int:
    return len(text)


@pytest.mark.parametrize("kind", ["image_url", "input_image", "image"])
def test_an_image_part_is_held_at_the_image_allowance(kind):
    assert content_part_tokens(count, {"type": kind, "image_url": {"url": "x" * 500}}, set()) == IMAGE_TOKEN_ALLOWANCE


@pytest.mark.parametrize(
    "part",
    [
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "input_file", "file_id": "file-1"},
        {"type": "input_file", "file_url": "https://example.com/paper.pdf"},
        {"type": "input_file", "file_data": "data:application/vnd.ms-excel;base64,AAAA"},
        {"type": "input_file", "file_data": "data:application/pdf;base64,bm90IGEgcGRm"},  # "not a pdf"
    ],
)
def test_a_document_only_the_provider_can_read_is_unseen_input(part):
    unseen = set()
    content_part_tokens(count, part, unseen)
    assert unseen == {part["type"]}


@pytest.mark.parametrize("kind", ["file", "input_file"])
def test_an_inline_pdf_is_held_by_its_pages(kind):
    pdf = "data:application/pdf;base64," + base64.b64encode(blank_pdf(3)).decode()
    part = {"type": kind, "file": {"filename": "a.pdf", "file_data": pdf}} if kind == "file" else {
        "type": kind, "filename": "a.pdf", "file_data": pdf}  # fmt: skip
    unseen = set()
    assert content_part_tokens(count, part, unseen) >= 3 * (IMAGE_TOKEN_ALLOWANCE + PDF_PAGE_TEXT_TOKENS)
    assert content_part_tokens(count, part, unseen) < 4 * (IMAGE_TOKEN_ALLOWANCE + PDF_PAGE_TEXT_TOKENS)
    assert unseen == set()


def test_a_text_part_is_its_text_and_one():
    assert content_part_tokens(count, {"type": "text", "text": "hello"}, set()) == 6
    assert content_part_tokens(count, {"type": "input_text", "text": ""}, set()) == 1


@pytest.mark.parametrize("part", [{"type": "text", "text": 5}, {"type": "other", "data": "abc"}, "plain", 7])
def test_any_other_part_is_its_json(part):
    assert content_part_tokens(count, part, set()) == len(json.dumps(part))


def test_content_is_text_parts_or_json():
    assert content_tokens(count, "abc", set()) == 3
    assert content_tokens(count, [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}], set()) == 3 + 2
    assert content_tokens(count, {"a": 1}, set()) == len(json.dumps({"a": 1}))
    assert content_tokens(count, None, set()) == 0
    assert content_tokens(count, 12, set()) == 0


def test_an_item_reference_is_unseen_input():
    unseen = set()
    assert response_item_tokens(count, {"type": "item_reference", "id": "x" * 100}, unseen) == TOKENS_PER_MESSAGE
    assert unseen == {"item_reference"}


def test_reasoning_is_held_at_its_bytes():
    item = {"type": "reasoning", "encrypted_content": "é" * 10}
    unseen = set()
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + len(
        json.dumps(item, ensure_ascii=False).encode()
    )
    assert unseen == set()


def test_a_message_item_is_its_parts_and_its_other_fields():
    item = {"role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    unseen = set()
    expected = TOKENS_PER_MESSAGE + 6 + len(json.dumps({"role": "user"}))
    assert response_item_tokens(count, item, unseen) == expected
    assert response_item_tokens(count, {"type": "message", **item}, set()) == expected + len(', "type": "message"')
    assert unseen == set()


def test_a_message_item_with_a_file_has_unseen_input_and_the_rest_counted():
    item = {"role": "user", "content": [{"type": "input_file", "file_id": "f"}, {"type": "input_text", "text": "hi"}]}
    unseen = set()
    rest = TOKENS_PER_MESSAGE + len(json.dumps(item["content"][0]))  # its fields, beside what only OpenAI sees
    expected = TOKENS_PER_MESSAGE + rest + 3 + len(json.dumps({"role": "user"}))
    assert response_item_tokens(count, item, unseen) == expected
    assert unseen == {"input_file"}


def test_any_other_item_is_every_field_counted():
    item = {"type": "function_call_output", "call_id": "c1", "output": "result"}
    unseen = set()
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + len("function_call_output") + 2 + 6
    assert unseen == set()
    with_text_content = {"type": "message", "role": "assistant", "content": "hi"}
    assert response_item_tokens(count, with_text_content, set()) == TOKENS_PER_MESSAGE + 7 + 9 + 2


def test_an_item_that_is_not_an_object_is_malformed():
    with pytest.raises(MalformedRequest, match="^each input item must be an object$"):
        response_item_tokens(count, "text", set())


# ----- the input bound of each endpoint, exactly -----


def facts_of(path: str, **body):
    return OPENAI.request_facts("POST", path, json.dumps({"model": "gpt-4o-mini", **body}).encode())


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", (1, 5 + 1)),
        (["ab", "cde"], (2, (2 + 1) + (3 + 1))),
        ([1, 2, 3], (1, 3)),
        ([[1, 2], [3]], (2, 3)),
    ],
    ids=["text", "texts", "token-array", "token-arrays"],
)
def test_a_prompt_is_its_texts_and_one_each_or_its_tokens(prompt, expected):
    assert prompt_tokens(count, prompt, "prompt") == expected


@pytest.mark.parametrize("prompt", [None, [], ["a", 1], [1, "a"], [[1], "a"], 5, {"text": "a"}])
def test_a_prompt_of_any_other_shape_is_malformed(prompt):
    with pytest.raises(MalformedRequest, match="^'prompt' must be a string, a list of strings, or token arrays$"):
        prompt_tokens(count, prompt, "prompt")


@pytest.mark.parametrize("prompt", [None, [], ["a", 1]])
def test_a_completion_whose_prompt_has_another_shape_is_refused_naming_the_prompt(prompt):
    with pytest.raises(MalformedRequest, match="^'prompt' must be a string, a list of strings, or token arrays$"):
        facts_of("/v1/completions", prompt=prompt)


def test_instructions_are_a_message_when_they_are_text():
    assert instructions_tokens(count, {"instructions": "Be brief"}) == TOKENS_PER_MESSAGE + 8
    assert instructions_tokens(count, {"instructions": ["not", "text"]}) == 0
    assert instructions_tokens(count, {}) == 0


MINI_COUNT = text_bound("gpt-4o-mini")


@pytest.mark.parametrize(
    ("body", "bound", "choices", "max_output"),
    [
        ({"prompt": "Say hi"}, MINI_COUNT("Say hi") + 1, 1, 16),
        ({"prompt": ["a", "bb"], "max_tokens": 5, "n": 3}, (MINI_COUNT("a") + 1) + (MINI_COUNT("bb") + 1), 2 * 3, 5),
        ({"prompt": "x", "suffix": "tail", "best_of": 4, "n": 2}, MINI_COUNT("x") + 1 + MINI_COUNT("tail"), 4, 16),
        ({"prompt": ["a", "b"], "suffix": "tail"}, 2 * (MINI_COUNT("a") + 1) + 2 * MINI_COUNT("tail"), 2, 16),
        (
            {"prompt": ["a", "b", "c"], "suffix": "the tail end"},
            3 * (MINI_COUNT("a") + 1) + 3 * MINI_COUNT("the tail end"), 3, 16,
        ),
        ({"prompt": [1, 2, 3], "suffix": 7, "n": 5, "best_of": 2}, 3, 5, 16),
    ],
    ids=["default-limit", "n-per-prompt", "best-of", "suffix-per-prompt", "long-suffix-per-prompt", "token-array"],
)
def test_a_completion_is_held_for_every_prompt_and_every_generated_choice(body, bound, choices, max_output):
    facts = facts_of("/v1/completions", **body)
    assert (facts.input_token_bound, facts.choices, facts.max_output_tokens) == (bound, choices, max_output)
    assert (facts.endpoint, facts.model, facts.stream, facts.client_wants_stream_usage) == (
        "/v1/completions", "gpt-4o-mini", False, False,
    )  # fmt: skip


def test_a_completion_stream_notes_whether_the_client_asked_for_usage():
    asked = facts_of("/v1/completions", prompt="x", stream=True, stream_options={"include_usage": True})
    assert (asked.stream, asked.client_wants_stream_usage) == (True, True)
    assert facts_of("/v1/completions", prompt="x", stream=True).client_wants_stream_usage is False


def test_an_embedding_is_counted_exactly_when_asked_and_its_input_named_when_malformed():
    long_text = "word " * (EXACT_COUNT_CHARS // 5 + 100)
    body = json.dumps({"model": "gpt-4o-mini", "input": long_text}).encode()
    cheap = OPENAI.request_facts("POST", "/v1/embeddings", body).input_token_bound
    exact = OPENAI.request_facts("POST", "/v1/embeddings", body, exact=True).input_token_bound
    assert (cheap, exact) == (len(long_text.encode()) + 1 + 1, count_tokens(long_text, "gpt-4o-mini") + 1)
    with pytest.raises(MalformedRequest, match="^'input' must be a string, a list of strings, or token arrays$"):
        facts_of("/v1/embeddings", input=5)


def test_an_embedding_has_no_output_and_its_inputs_bound():
    facts = facts_of("/v1/embeddings", input=["ab", "c"])
    assert (facts.input_token_bound, facts.max_output_tokens, facts.endpoint) == (
        (MINI_COUNT("ab") + 1) + (MINI_COUNT("c") + 1), 0, "/v1/embeddings",
    )  # fmt: skip


TOOL = {"type": "function", "name": "f", "parameters": {}}
SCHEMA = {"type": "json_schema", "name": "s", "schema": {"type": "object"}}


@pytest.mark.parametrize(
    ("body", "bound"),
    [
        ({"input": "hello"}, 3 + 4 + MINI_COUNT("hello")),
        ({"input": "hello", "instructions": "Be brief"}, 3 + (4 + MINI_COUNT("Be brief")) + 4 + MINI_COUNT("hello")),
        ({"input": "hi", "tools": [TOOL]}, 3 + 1_000 + MINI_COUNT(json.dumps([TOOL])) + 4 + MINI_COUNT("hi")),
        ({"input": "hi", "text": {"format": SCHEMA}}, 3 + 1000 + MINI_COUNT(json.dumps(SCHEMA)) + 4 + MINI_COUNT("hi")),
        ({"input": "hi", "text": {"format": {"type": "text"}}}, 3 + 4 + MINI_COUNT("hi")),
        (
            {"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "r"}]},
            3 + (4 + MINI_COUNT("user") + MINI_COUNT("hi")) + 4,
        ),
        ({"input": []}, 3),
    ],
    ids=["text", "instructions", "tools", "schema", "text-format", "items", "no-items"],
)
def test_a_response_is_held_at_its_instructions_tools_schema_and_input(body, bound):
    facts = facts_of("/v1/responses", **body)
    assert (facts.input_token_bound, facts.endpoint, facts.model) == (bound, "/v1/responses", "gpt-4o-mini")


@pytest.mark.parametrize(
    ("body", "unseen", "continues"),
    [
        ({"input": "hi"}, None, None),
        ({"previous_response_id": "resp_1"}, None, ("previous_response_id", "resp_1")),
        ({"input": "hi", "conversation": "conv_1"}, None, ("conversation", "conv_1")),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", None),
        (
            {"input": [{"type": "item_reference", "id": "r"}], "previous_response_id": "p"},
            "item_reference", ("previous_response_id", "p"),
        ),
    ],
)  # fmt: skip
def test_input_only_openai_can_see_is_named_and_a_continuation_is_kept_apart(body, unseen, continues):
    """A stored response or conversation is bounded by what this proxy measured of it (continuations.py);
    other input only the provider holds is named, to be bounded by the context window."""
    facts = facts_of("/v1/responses", **body)
    assert (facts.unseen_input, facts.continues) == (unseen, continues)


def test_an_empty_previous_response_id_is_refused():
    with pytest.raises(MalformedRequest, match="'previous_response_id' must be a response id"):
        facts_of("/v1/responses", input="hi", previous_response_id="")


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        ({}, "the request has no 'input'"),
        ({"input": 5}, "'input' must be a string or a list of items"),
        ({"input": "hi", "background": True},
         "a background response is billed after the call returns, so this proxy cannot meter it"),
        ({"input": "hi", "service_tier": "priority"},
         "service tier 'priority' is billed above the standard prices, so this proxy cannot meter it"),
    ],
)  # fmt: skip
def test_a_response_that_cannot_be_bounded_is_refused(body, refusal):
    with pytest.raises((MalformedRequest, Unmeterable)) as refused:
        facts_of("/v1/responses", **body)
    assert str(refused.value) == refusal


def test_a_long_response_input_is_counted_exactly_when_asked():
    long_text = "word " * (EXACT_COUNT_CHARS // 5 + 100)
    body = json.dumps({"model": "gpt-4o-mini", "input": long_text}).encode()
    cheap = OPENAI.request_facts("POST", "/v1/responses", body).input_token_bound
    exact = OPENAI.request_facts("POST", "/v1/responses", body, exact=True).input_token_bound
    assert (cheap, exact) == (3 + 4 + len(long_text.encode()) + 1, 3 + 4 + count_tokens(long_text, "gpt-4o-mini"))


def test_a_response_stream_and_its_output_limit_are_read():
    facts = facts_of("/v1/responses", input="hi", stream=True, max_output_tokens=40)
    assert (facts.stream, facts.max_output_tokens) == (True, 40)
    assert facts_of("/v1/responses", input="hi", stream="yes").stream is False


# ----- the body sent upstream: the output cap the hold assumed, and a stream's usage -----


def upstream(path: str, cap: int | None, **body) -> dict | None:
    raw = json.dumps({"model": "gpt-4o-mini", **body}).encode()
    sent = OPENAI.upstream_body(OPENAI.request_facts("POST", path, raw), raw, cap)
    return None if sent is None else json.loads(sent)


def test_the_body_is_forwarded_as_sent_when_nothing_is_capped_or_asked():
    assert upstream("/v1/chat/completions", None, messages=[{"role": "user", "content": "x"}]) is None
    assert upstream("/v1/responses", None, input="x", stream=True) is None  # its usage comes with the final event
    assert upstream("/v1/chat/completions", None, messages=[{"role": "user", "content": "x"}], stream=True,
                    stream_options={"include_usage": True}) is None  # fmt: skip


def test_a_cap_is_written_where_each_endpoint_reads_it():
    messages = [{"role": "user", "content": "x"}]
    assert upstream("/v1/chat/completions", 7, messages=messages, max_tokens=100) == {
        "model": "gpt-4o-mini", "messages": messages, "max_tokens": 7,
    }  # fmt: skip
    assert upstream("/v1/chat/completions", 7, messages=messages)["max_completion_tokens"] == 7
    assert upstream("/v1/responses", 9, input="x", max_output_tokens=50)["max_output_tokens"] == 9


def test_legacy_completions_always_carry_the_limit_the_hold_assumed():
    assert upstream("/v1/completions", None, prompt="x") == {"model": "gpt-4o-mini", "prompt": "x", "max_tokens": 16}
    assert upstream("/v1/completions", None, prompt="x", max_tokens=3)["max_tokens"] == 3
    assert upstream("/v1/completions", 2, prompt="x", max_tokens=3)["max_tokens"] == 2


def test_a_stream_whose_client_did_not_ask_for_usage_asks_for_it_keeping_its_options():
    messages = [{"role": "user", "content": "x"}]
    sent = upstream("/v1/chat/completions", None, messages=messages, stream=True)
    assert sent["stream_options"] == {"include_usage": True}
    kept = upstream("/v1/chat/completions", 4, messages=messages, stream=True,
                    stream_options={"include_obfuscation": False})  # fmt: skip
    assert kept["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert kept["max_completion_tokens"] == 4
# ----- tools: which the client runs (tokens only) and which are billed per use -----


def responses_with_tools(*tools) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "input": "hi", "tools": list(tools)}).encode()


FUNCTION_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}}


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "shell"},
        {"type": "shell", "environment": {"type": "local"}},
        {"type": "computer"},
        {"type": "local_shell"},
        {"type": "namespace", "name": "n", "tools": [FUNCTION_TOOL, {"type": "custom", "name": "c"}]},
    ],
)
def test_tools_the_client_runs_are_read_as_tokens(tool):
    facts = FORMATS["openai"].request_facts("POST", "/v1/responses", responses_with_tools(tool))
    plain = FORMATS["openai"].request_facts("POST", "/v1/responses", responses_with_tools())
    assert facts.input_token_bound > plain.input_token_bound


@pytest.mark.parametrize(
    ("tool", "complaint"),
    [
        ({"type": "shell", "environment": {"type": "container_auto"}}, "'container_auto' environment"),
        ({"type": "web_search_preview"}, "billed per use"),
        ({"type": "image_generation"}, "billed per use"),
        ({"type": "namespace", "name": "n", "tools": [{"type": "mcp", "server_label": "x"}]}, "'mcp'"),
        ({"type": "new_hosted_thing"}, "not one this proxy knows"),
    ],
)
def test_tools_billed_per_use_or_unknown_are_unmeterable(tool, complaint):
    with pytest.raises(Unmeterable, match=complaint):
        FORMATS["openai"].request_facts("POST", "/v1/responses", responses_with_tools(tool))


@pytest.mark.parametrize(
    "tool", [{"type": "namespace", "name": "n"}, {"type": "shell", "environment": "local"}, "function"]
)
def test_malformed_tools_are_bad_requests(tool):
    with pytest.raises(MalformedRequest):
        FORMATS["openai"].request_facts("POST", "/v1/responses", responses_with_tools(tool))


def test_compaction_is_metered_and_takes_no_output_limit():
    body = json.dumps({"model": "gpt-4o-mini", "input": "a long chat", "max_output_tokens": 5}).encode()
    facts = FORMATS["openai"].request_facts("POST", "/v1/responses/compact", body)
    assert facts.metered and facts.max_output_tokens is None and not facts.takes_output_limit


def test_side_traffic_is_free():
    for method, path in [("POST", "/v1/traces/ingest"), ("GET", "/v1/conversations/conv_1/items")]:
        assert FORMATS["openai"].endpoint_kind(method, path) == "free"


@pytest.mark.parametrize(
    ("path", "fields", "overhead"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "LONG"}]}, 3 + 4 + 1),  # role "user": 1
        ("/v1/completions", {"prompt": "LONG"}, 1),
    ],
)
def test_a_long_prompt_is_counted_exactly_when_asked(path, fields, overhead):
    long_text = "word " * (EXACT_COUNT_CHARS // 5 + 100)
    body = json.dumps({"model": "gpt-4o-mini", **fields}).replace("LONG", long_text).encode()
    cheap = OPENAI.request_facts("POST", path, body).input_token_bound
    exact = OPENAI.request_facts("POST", path, body, exact=True).input_token_bound
    assert (cheap, exact) == (
        overhead + len(long_text.encode()) + 1, overhead + count_tokens(long_text, "gpt-4o-mini"),
    )  # fmt: skip


CHAT_TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}
UNTYPED_TOOL = {"function": {"name": "g"}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
HI = [{"role": "user", "content": "hi"}]
HI_BOUND = 3 + 4 + MINI_COUNT("user") + MINI_COUNT("hi")


@pytest.mark.parametrize(
    ("fields", "bound"),
    [
        ({}, HI_BOUND),
        ({"tools": [CHAT_TOOL]}, HI_BOUND + 1_000 + MINI_COUNT(json.dumps([CHAT_TOOL]))),
        ({"tools": [UNTYPED_TOOL]}, HI_BOUND + 1_000 + MINI_COUNT(json.dumps([UNTYPED_TOOL]))),  # a function
        ({"functions": [{"name": "f"}]}, HI_BOUND + 1_000 + MINI_COUNT(json.dumps([{"name": "f"}]))),
        ({"response_format": JSON_SCHEMA}, HI_BOUND + 1_000 + MINI_COUNT(json.dumps(JSON_SCHEMA))),
        ({"response_format": {"type": "text"}}, HI_BOUND),
        ({"response_format": {}}, HI_BOUND),  # no type: text
        ({"tools": [CHAT_TOOL], "response_format": JSON_SCHEMA},
         HI_BOUND + 2_000 + MINI_COUNT(json.dumps([CHAT_TOOL])) + MINI_COUNT(json.dumps(JSON_SCHEMA))),
    ],
    ids=["plain", "tools", "untyped-tool", "functions", "schema", "text-format", "untyped-format", "both"],
)  # fmt: skip
def test_a_chat_is_held_at_its_messages_tools_and_schema(fields, bound):
    assert facts_of("/v1/chat/completions", messages=HI, **fields).input_token_bound == bound


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"messages": ["hi"]}, MalformedRequest, "each message must be an object"),
        ({"messages": []}, MalformedRequest, "'messages' must be a non-empty list"),
        ({"messages": HI, "tools": {"a": 1}}, MalformedRequest, "'tools' must be a list"),
        ({"messages": HI, "tools": ["f"]}, MalformedRequest, "each tool must be an object"),
        ({"messages": HI, "web_search_options": {}}, Unmeterable,
         "web search is billed per search, beyond tokens, so this proxy cannot meter it"),
        ({"messages": HI, "prediction": {"type": "content"}}, Unmeterable,
         "a prediction's rejected tokens are billed as output beyond max_tokens, so this proxy cannot bound it"),
        ({"messages": HI, "modalities": ["text", "audio"]}, Unmeterable,
         "audio tokens are priced apart from text, so this proxy cannot meter them yet"),
        ({"messages": HI, "stream_options": 1}, MalformedRequest, "'stream_options' must be an object"),
        ({"messages": HI, "max_tokens": 0}, MalformedRequest, None),
        ({"model": 5, "messages": HI}, MalformedRequest, "the request names no 'model'"),
        ({"model": "", "messages": HI}, MalformedRequest, "the request names no 'model'"),
    ],
)  # fmt: skip
def test_a_chat_that_cannot_be_bounded_says_why(fields, error, message):
    with pytest.raises(error) as refused:
        OPENAI.request_facts("POST", "/v1/chat/completions", json.dumps({"model": "gpt-4o-mini", **fields}).encode())
    assert message is None or str(refused.value) == message


def test_the_smallest_limits_and_largest_integers_are_read():
    assert facts_of("/v1/chat/completions", messages=HI, max_tokens=1).max_output_tokens == 1
    digits20 = json.dumps({"model": "gpt-4o-mini", "messages": HI, "seed": 12345678901234567890}).encode()
    assert OPENAI.request_facts("POST", "/v1/chat/completions", digits20).model == "gpt-4o-mini"
