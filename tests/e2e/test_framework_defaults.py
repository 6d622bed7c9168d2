"""Framework defaults on an ordinary key: LangChain, LiteLLM and the AI SDK send max_tokens 64000 for
Claude; with the policy's output ceiling, a $0.50 key runs the call instead of refusing it."""

import anthropic
import pytest

from conftest import httpx, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "frameworks", budget_usd=0.5, max_output_tokens=4096)


def test_a_framework_default_above_the_ceiling_is_lowered_and_said(proxy, mock, policy):
    key = proxy.issue(policy)
    client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)
    answer = client.messages.with_raw_response.create(  # so large a limit must stream, the SDK says
        model="claude-haiku-4-5", max_tokens=64_000, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert answer.headers["x-agentkeys-max-tokens-clamped"] == "4096"
    assert [event.type for event in answer.parse()][-1] == "message_stop"
    assert mock.received[-1].json["max_tokens"] == 4096
    [record] = proxy.records_for(key["id"])
    assert record["metering"] == "usage"
    assert "lowered to 4096 tokens (the policy's max_output_tokens)" in record["reason"]


def test_without_a_ceiling_the_same_call_is_refused_on_a_small_key(proxy, mock, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "no-ceiling", budget_usd=0.1))
    client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=64_000, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert refused.value.status_code == 402 and not mock.received


def test_a_base_url_without_the_version_works_as_the_ai_sdk_uses_it(proxy, mock, policy):
    """@ai-sdk/anthropic reads ANTHROPIC_BASE_URL=…/anthropic and posts to …/anthropic/messages."""
    key = proxy.issue(policy)
    answer = httpx.post(
        f"{proxy.gateway_url}/anthropic/messages",
        json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": key["key"], "anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert mock.received[-1].path == "/v1/messages"
    unknown = httpx.post(f"{proxy.gateway_url}/anthropic/nothing-here", json={}, headers={"x-api-key": key["key"]})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
