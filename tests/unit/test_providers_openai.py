"""OpenAI's wire formats (providers/openai.py): request facts, chat and Responses stream meters, usage."""

import json

import pytest

from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import MalformedRequest
from agentkeys.providers.openai import (
    IMAGE_TOKEN_ALLOWANCE,
    TOKENS_PER_MESSAGE,
    content_part_tokens,
    content_tokens,
    response_item_tokens,
)
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
    assert result.complete


def test_openai_meter_incomplete_stream_has_no_usage():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    feed_all(meter, OPENAI_STREAM[:3])
    result = meter.result()
    assert (result.usage, result.complete) == (None, False)


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
    assert meter.result().complete


def test_the_chat_meter_does_not_take_text_chunks_with_a_null_usage_for_the_usage():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/chat/completions", chat_request(stream=True)))
    null_usage = sse('{"choices": [{"index": 0, "delta": {"content": "x"}}], "usage" : null}')
    assert feed_all(meter, [null_usage, null_usage, sse("[DONE]")]) == [True, True, True]
    assert (meter.result().usage, meter.result().complete) == (None, False), "ended, but with no usage: the full hold"


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
    feed_all(meter, responses_events(end))
    result = meter.result()
    assert result.complete and result.usage == Usage(9, 3, reasoning_tokens=1)


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
    assert (meter.result().usage, meter.result().complete) == (None, False)


def count(text: str) -> int:
    return len(text)


@pytest.mark.parametrize("kind", ["image_url", "input_image", "image"])
def test_an_image_part_is_held_at_the_image_allowance(kind):
    assert content_part_tokens(count, {"type": kind, "image_url": {"url": "x" * 500}}) == IMAGE_TOKEN_ALLOWANCE


@pytest.mark.parametrize("kind", ["file", "input_file"])
def test_a_file_part_cannot_be_bounded(kind):
    with pytest.raises(MalformedRequest, match="file parts"):
        content_part_tokens(count, {"type": kind, "file_id": "f"})


def test_a_text_part_is_its_text_and_one():
    assert content_part_tokens(count, {"type": "text", "text": "hello"}) == 6
    assert content_part_tokens(count, {"type": "input_text", "text": ""}) == 1


@pytest.mark.parametrize("part", [{"type": "text", "text": 5}, {"type": "other", "data": "abc"}, "plain", 7])
def test_any_other_part_is_its_json(part):
    assert content_part_tokens(count, part) == len(json.dumps(part))


def test_content_is_text_parts_or_json():
    assert content_tokens(count, "abc") == 3
    assert content_tokens(count, [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]) == 3 + 2
    assert content_tokens(count, {"a": 1}) == len(json.dumps({"a": 1}))
    assert content_tokens(count, None) == 0
    assert content_tokens(count, 12) == 0


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
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + 3 + len(json.dumps({"role": "user"}))
    assert unseen == {"input_file"}


def test_any_other_item_is_every_field_counted():
    item = {"type": "function_call_output", "call_id": "c1", "output": "result"}
    unseen = set()
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + len("function_call_output") + 2 + 6
    assert unseen == set()
    with_text_content = {"type": "message", "role": "assistant", "content": "hi"}
    assert response_item_tokens(count, with_text_content, set()) == TOKENS_PER_MESSAGE + 7 + 9 + 2


def test_an_item_that_is_not_an_object_is_malformed():
    with pytest.raises(MalformedRequest, match="input item"):
        response_item_tokens(count, "text", set())
