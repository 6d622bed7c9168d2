"""OpenAI's wire formats (providers/openai.py): request facts, chat and Responses stream meters, usage."""

import json

import pytest

from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
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
    assert result.streamed_text == 'Hel{"a":', "text deltas only: audio is not text"


def test_a_responses_stream_cut_short_has_only_its_text():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/responses", b'{"model": "o4-mini", "input": "x"}'))
    feed_all(meter, responses_events(end=None))
    assert (meter.result().usage, meter.result().complete) == (None, False)
