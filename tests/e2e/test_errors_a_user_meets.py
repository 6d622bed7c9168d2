"""The errors an agent or an operator meets are clear, in the provider's shape, and retried only when
retrying can help."""

import anthropic
import openai
import pytest

from conftest import httpx, running_proxy, start_proxy, stop_proxy, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "errors")


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    """A proxy whose anthropic provider reads its real key from a variable nobody set."""
    providers = {"openai": {"upstream": mock.url}, "anthropic": {"upstream": mock.url, "key_env": "UNSET_KEY_FOR_TEST"}}
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, providers=providers) as running:
        yield running


def test_a_provider_without_a_real_key_is_an_operator_error_not_retried(proxy, mock, policy):
    key = proxy.issue(policy)
    client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=2)
    with pytest.raises(anthropic.InternalServerError, match="must set UNSET_KEY_FOR_TEST") as failed:
        client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(proxy.records_for(key["id"])) == 1, "the SDK did not retry"
    assert "UNSET_KEY_FOR_TEST" in proxy.log_path.read_text(), "the operator is told at start-up"
    assert not mock.received


def test_a_revoked_key_with_a_bad_body_hears_that_it_is_revoked(proxy, mock, policy):
    key = proxy.issue(policy)
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert proxy.cli("keys", "revoke", key["id"]) == 0
    answer = httpx.post(
        f"{proxy.gateway_url}/openai/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {key['key']}", "content-type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 401 and "revoked" in answer.json()["error"]["message"]


def test_an_unknown_gateway_prefix_is_a_404_that_says_so(proxy, mock):
    answer = httpx.post(f"{proxy.gateway_url}/nosuch/v1/chat/completions", json={}, timeout=10)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "not_found" and "/openai" in error["message"]


def test_an_unreachable_provider_is_a_json_502_that_names_no_address(mock, tmp_path, policy):
    unreachable = {"openai": {"upstream": "http://127.0.0.1:1"}, "anthropic": {"upstream": mock.url}}
    proxy = start_proxy(tmp_path / "unreachable", mock, providers=unreachable)
    try:
        key = proxy.issue(policy)
        answer = httpx.post(
            f"{proxy.gateway_url}/openai/v1/chat/completions",
            json={"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key['key']}"},
            timeout=10,
        )
        assert answer.status_code == 502 and answer.headers["x-should-retry"] == "true"
        assert answer.headers["content-type"] == "application/json"
        assert "could not be reached" in answer.json()["error"]["message"]
        assert "127.0.0.1" not in answer.text and "<html" not in answer.text
        [record] = proxy.records_for(key["id"])
        assert record["cost_micros"] == 0 and record["metering"] == "none"
    finally:
        stop_proxy(proxy)
