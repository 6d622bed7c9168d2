"""No answer carries a key: an upstream that echoes the request in its error shows the agent neither
the real key nor its own."""

import pytest

from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY, httpx, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "secrets")


@pytest.mark.parametrize(
    ("path", "body", "credential_header", "real_key"),
    [
        ("/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
         "authorization", OPENAI_REAL_KEY),
        ("/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
                                    "messages": [{"role": "user", "content": "hi"}]}, "x-api-key", ANTHROPIC_REAL_KEY),
    ],
    ids=["openai", "anthropic"],
)  # fmt: skip
def test_an_echoing_upstream_error_is_redacted(proxy, mock, policy, path, body, credential_header, real_key):
    key = proxy.issue(policy)["key"]
    value = f"Bearer {key}" if credential_header == "authorization" else key
    mock.echo_next_error(400)
    answer = httpx.post(f"{proxy.gateway_url}{path}", json=body, headers={credential_header: value}, timeout=10)
    assert answer.status_code == 400
    assert mock.received and real_key in str(mock.received[-1].headers), "the upstream did see the real key"
    shown = answer.text + str(answer.headers)
    assert real_key not in shown and key not in shown
    assert "[redacted by agentkeys]" in answer.text
