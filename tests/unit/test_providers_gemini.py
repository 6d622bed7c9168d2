"""Gemini's generateContent format (providers/gemini.py): request facts, the cap, the stream meter."""

import json

import pytest

from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
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
    assert (cut.usage, cut.complete, cut.streamed_text, cut.input_tokens_seen) == (None, False, "Hi there", 7)
    feed_all(meter, [gemini_chunk("", "STOP", candidatesTokenCount=2, thoughtsTokenCount=5, cachedContentTokenCount=4)])
    assert meter.result().usage == Usage(7, 7, cached_tokens=4, reasoning_tokens=5)
