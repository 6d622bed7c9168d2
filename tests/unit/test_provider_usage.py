"""The provider's usage is outside data: each format believes only sane counts, in whole responses and streams.

Usage that is not a whole number from 0 to MAX_USAGE_TOKENS is rejected (UsageRejected from
`usage_from_response`, `usage_rejected` in a stream's result), and the gate then charges the full hold.
"""

import copy
import json

import pytest

from agentkeys.calls import Outcome
from agentkeys.gate import Admission, charge_for
from agentkeys.ledger import KeyRecord
from agentkeys.policy import Policy
from agentkeys.pricing import ModelPrice, Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import MAX_USAGE_TOKENS, RequestFacts, SseSplitter, StreamResult, UsageRejected

INSANE = [-1, -5000, 1.5, 2.0, 1.5e293, True, "12", None.__class__.__name__, [1], MAX_USAGE_TOKENS + 1]

# format -> (a whole response, the path to its usage, the count fields in it, the endpoint its facts name)
RESPONSES = {
    "openai-chat": (
        "openai",
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                  "prompt_tokens_details": {"cached_tokens": 2},
                                  "completion_tokens_details": {"reasoning_tokens": 1}}},
        [("usage", "prompt_tokens"), ("usage", "completion_tokens"),
         ("usage", "prompt_tokens_details", "cached_tokens"),
         ("usage", "completion_tokens_details", "reasoning_tokens")],
    ),
    "openai-responses": (
        "openai",
        {"output": [], "usage": {"input_tokens": 10, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                                 "output_tokens_details": {"reasoning_tokens": 0}}},
        [("usage", "input_tokens"), ("usage", "output_tokens"), ("usage", "input_tokens_details", "cached_tokens"),
         ("usage", "output_tokens_details", "reasoning_tokens")],
    ),
    "anthropic": (
        "anthropic",
        {"content": [], "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 1,
                                  "cache_creation_input_tokens": 2,
                                  "cache_creation": {"ephemeral_1h_input_tokens": 2}}},
        [("usage", "input_tokens"), ("usage", "output_tokens"), ("usage", "cache_read_input_tokens"),
         ("usage", "cache_creation_input_tokens"), ("usage", "cache_creation", "ephemeral_1h_input_tokens")],
    ),
    "gemini": (
        "gemini",
        {"candidates": [], "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 1,
                                             "cachedContentTokenCount": 0, "toolUsePromptTokenCount": 0}},
        [("usageMetadata", name) for name in ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
                                             "cachedContentTokenCount", "toolUsePromptTokenCount")],
    ),
    "azure": (
        "azure",
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}},
        [("usage", "prompt_tokens"), ("usage", "completion_tokens")],
    ),
}  # fmt: skip


def with_value(document: dict, path: tuple[str, ...], value) -> dict:
    changed = copy.deepcopy(document)
    target = changed
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = value
    return changed


CASES = [(shape, path, value) for shape, (_, _, paths) in RESPONSES.items() for path in paths for value in INSANE]


@pytest.mark.parametrize("shape", sorted(RESPONSES))
def test_sane_usage_is_read(shape):
    format_name, document, _ = RESPONSES[shape]
    usage = FORMATS[format_name].usage_from_response(json.dumps(document).encode())
    assert usage is not None and usage.input_tokens >= 10 and usage.output_tokens >= 5


@pytest.mark.parametrize(("shape", "path", "value"), CASES)
def test_a_whole_response_with_insane_usage_is_rejected(shape, path, value):
    format_name, document, _ = RESPONSES[shape]
    with pytest.raises(UsageRejected, match=path[-1]):
        FORMATS[format_name].usage_from_response(json.dumps(with_value(document, path, value)).encode())


@pytest.mark.parametrize("format_name", ["openai", "anthropic"])
def test_usage_details_that_are_not_objects_are_rejected(format_name):
    field = {"openai": "prompt_tokens_details", "anthropic": "cache_creation"}[format_name]
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "input_tokens": 1, "output_tokens": 1, field: 5}
    with pytest.raises(UsageRejected, match=field):
        FORMATS[format_name].usage_from_response(json.dumps({"usage": usage}).encode())


# ----- streams -----


def sse(data: dict, event: str | None = None) -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n"


def stream_events(shape: str, usage: dict) -> list[bytes]:
    """A complete stream of one format, its usage as given."""
    if shape == "openai-chat":
        return [
            sse({"choices": [{"delta": {"content": "hi"}}]}),
            sse({"choices": [], "usage": usage}),
            b"data: [DONE]\n\n",
        ]
    if shape == "openai-responses":
        return [sse({"type": "response.output_text.delta", "delta": "hi"}),
                sse({"type": "response.completed", "response": {"usage": usage}})]  # fmt: skip
    if shape == "anthropic":
        start = {k: v for k, v in usage.items() if k != "output_tokens"}
        return [sse({"type": "message_start", "message": {"usage": {**start, "output_tokens": 1}}}),
                sse({"type": "content_block_delta", "delta": {"text": "hi"}}),
                sse({"type": "message_delta", "usage": {"output_tokens": usage["output_tokens"]}}),
                sse({"type": "message_stop"})]  # fmt: skip
    return [
        sse({"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}], "usageMetadata": usage})
    ]


def meter_result(shape: str, usage: dict) -> StreamResult:
    format_name = RESPONSES[shape][0]
    endpoint = "/v1/responses" if shape == "openai-responses" else "/v1/chat/completions"
    meter = FORMATS[format_name].stream_meter(RequestFacts(metered=True, endpoint=endpoint, stream=True))
    for event in SseSplitter().feed(b"".join(stream_events(shape, usage))):
        meter.feed(event)
    return meter.result()


STREAM_SHAPES = ["openai-chat", "openai-responses", "anthropic", "gemini"]


@pytest.mark.parametrize("shape", STREAM_SHAPES)
def test_a_stream_with_sane_usage_is_complete(shape):
    result = meter_result(shape, RESPONSES[shape][1][RESPONSES[shape][2][0][0]])
    assert result.complete and result.usage is not None and result.usage_rejected is None


@pytest.mark.parametrize("shape", STREAM_SHAPES)
@pytest.mark.parametrize("value", [-1, 1.5, 1e300, True, "7", MAX_USAGE_TOKENS + 1])
def test_a_stream_with_insane_usage_reports_why_and_no_usage(shape, value):
    _, document, paths = RESPONSES[shape]
    for path in paths[:2]:  # the input and the output count
        usage = with_value(document, path, value)[paths[0][0]]
        result = meter_result(shape, usage)
        assert result.usage is None and not result.complete, (path, result)
        assert path[-1] in result.usage_rejected and repr(value) in result.usage_rejected


# ----- the gate: rejected usage is charged the full hold, with the reason -----


def admission() -> Admission:
    key = KeyRecord(key_id="k", key_hash="h", name="n", policy_name="p", policy_json="{}", created_at=0,
                    expires_at=1, budget_micros=10**6)  # fmt: skip
    policy = Policy.model_validate({"name": "p", "budget_usd": 1, "providers": ["openai"],
                                    "endpoints": ["POST /v1/chat/completions"], "models": ["*"]})  # fmt: skip
    facts = RequestFacts(metered=True, endpoint="/v1/chat/completions", model="m", input_token_bound=100)
    price = ModelPrice(input=1e-6, output=1e-6)
    return Admission(key, policy, FORMATS["openai"], facts, "sk", "metered", 0, price=price, hold_id=1, hold_micros=777)


def test_a_stream_whose_usage_was_rejected_is_charged_its_hold_never_less():
    result = StreamResult(usage=None, complete=False, usage_rejected="output_tokens=-1")
    for complete in (True, False):
        charge = charge_for(admission(), Outcome(reached_provider=True, complete=complete, status=200, stream=result))
        assert (charge.cost_micros, charge.metering) == (777, "held")
        assert "usage not believed: output_tokens=-1" in charge.why


def test_a_response_whose_usage_was_rejected_is_charged_its_hold_saying_why():
    outcome = Outcome(reached_provider=True, complete=True, status=200, usage_rejected="prompt_tokens=-3")
    charge = charge_for(admission(), outcome)
    assert (charge.cost_micros, charge.metering) == (777, "held")
    assert "usage not believed: prompt_tokens=-3" in charge.why
    sane = charge_for(admission(), Outcome(True, True, 200, usage=Usage(input_tokens=3, output_tokens=2)))
    assert (sane.cost_micros, sane.metering, sane.why) == (5, "usage", "")  # 5 tokens at a micro-dollar each
