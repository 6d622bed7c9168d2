"""The core path end to end: official SDKs → real mitmdump with the addon → mock provider.

Both listeners: proxy mode (HTTPS_PROXY + our CA; the SDK keeps its default base URL) and gateway
mode (base URL on the reverse listener, no CA). Here the addon is loaded as a plain mitmdump script
(`mitmdump -s addon.py`, every mitmdump addon beside it); the other modules run `agentkeys serve`.
"""

import time
from urllib.parse import urlsplit

import anthropic
import openai
import pytest

from agentkeys.addon import Upstream
from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY, assert_ledger_matches_audit, httpx, write_policy
from prices import expected_cost

MODES = ["proxy", "gateway"]
PROXY_LAUNCHER = "mitmdump"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"))


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy, "--budget", "1")


def openai_client(proxy, mode, api_key, monkeypatch, **kwargs):
    """An unchanged OpenAI SDK client, configured the way a user would: env vars or base URL."""
    if mode == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", proxy.proxy_url)
        monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
        return openai.OpenAI(api_key=api_key, max_retries=0, **kwargs)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    return openai.OpenAI(api_key=api_key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0, **kwargs)


def anthropic_client(proxy, mode, api_key, monkeypatch, **kwargs):
    if mode == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", proxy.proxy_url)
        monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
        return anthropic.Anthropic(api_key=api_key, max_retries=0, **kwargs)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    return anthropic.Anthropic(api_key=api_key, base_url=f"{proxy.gateway_url}/anthropic", max_retries=0, **kwargs)


def chat(client, **kwargs):
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], **kwargs
    )


def last_audit(proxy, key):
    records = proxy.records_for(key["id"])
    assert records, f"no audit record for key {key['id']}"
    return records[-1]


@pytest.mark.parametrize("mode", MODES)
def test_openai_chat_swaps_the_key_and_meters_usage(proxy, mock, key, mode, monkeypatch):
    client = openai_client(proxy, mode, key["key"], monkeypatch)
    reply = chat(client, max_tokens=5)
    assert reply.choices[0].message.content == "hello hello hello hello hello"
    seen = mock.received[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    assert key["key"] not in str(seen.headers) and key["key"] not in seen.body.decode()
    usage = mock.reported[-1]
    expected = expected_cost("gpt-4o-mini", input=usage["input_tokens"], output=usage["output_tokens"])
    record = last_audit(proxy, key)
    assert record["decision"] == "allow" and record["metering"] == "usage"
    assert (record["input_tokens"], record["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    assert record["cost_micros"] == expected
    assert assert_ledger_matches_audit(proxy, key["id"]).spent_micros == expected


@pytest.mark.parametrize("mode", MODES)
def test_openai_stream_hides_the_usage_chunk_it_asked_for(proxy, mock, key, mode, monkeypatch):
    client = openai_client(proxy, mode, key["key"], monkeypatch)
    chunks = list(chat(client, max_tokens=4, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello hello hello hello"
    assert all(c.choices for c in chunks), "the client did not ask for usage, so it must not see that chunk"
    assert mock.received[-1].json["stream_options"] == {"include_usage": True}
    record = last_audit(proxy, key)
    assert record["metering"] == "usage" and record["output_tokens"] == 4
    assert record["ttft_ms"] is not None
    assert assert_ledger_matches_audit(proxy, key["id"]).spent_micros == record["cost_micros"] > 0


def test_hidden_usage_chunk_leaves_the_stream_whole_on_a_kept_alive_connection(proxy, mock, key):
    """The stream still ends with [DONE] and a proper end of body; the next call on that connection works."""
    body = {"model": "gpt-4o-mini", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key['key']}"}
    with httpx.Client(base_url=f"{proxy.gateway_url}/openai/v1") as client:
        for _ in range(3):
            with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert not any('"choices": []' in e or '"choices":[]' in e for e in events), "usage chunk leaked"
            assert len(events) == 1 + 3 + 1 + 1  # role, three tokens, finish, [DONE]
    assert len(proxy.records_for(key["id"], 3)) == 3


def test_openai_stream_keeps_the_usage_chunk_a_client_asked_for(proxy, mock, key, monkeypatch):
    client = openai_client(proxy, "gateway", key["key"], monkeypatch)
    chunks = list(chat(client, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert last_audit(proxy, key)["output_tokens"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_messages_swap_the_key_and_meter_usage(proxy, mock, key, mode, monkeypatch):
    client = anthropic_client(proxy, mode, key["key"], monkeypatch)
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=6, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert message.content[0].text == "hello hello hello hello hello hello"
    seen = mock.received[-1]
    assert seen.headers["x-api-key"] == ANTHROPIC_REAL_KEY and "authorization" not in seen.headers
    usage = mock.reported[-1]
    record = last_audit(proxy, key)
    assert (record["input_tokens"], record["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    assert record["cost_micros"] == expected_cost(
        "claude-haiku-4-5", input=usage["input_tokens"], output=usage["output_tokens"]
    )


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_stream_is_metered(proxy, mock, key, mode, monkeypatch):
    client = anthropic_client(proxy, mode, key["key"], monkeypatch)
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=4, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == "hello hello hello hello"
    record = last_audit(proxy, key)
    assert record["metering"] == "usage" and record["output_tokens"] == 4
    assert record["input_tokens"] == mock.reported[-1]["input_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_the_provider_is_asked_by_its_own_host_name(proxy, mock, key, mode, monkeypatch):
    """A provider behind a CDN routes by the Host header: it must name the upstream, never the proxy."""
    chat(openai_client(proxy, mode, key["key"], monkeypatch), max_tokens=2)
    assert mock.received[-1].headers["host"] == urlsplit(mock.url).netloc


@pytest.mark.parametrize(
    "base_url, authority",
    [
        ("https://api.openai.com/v1", b"api.openai.com"),
        ("http://127.0.0.1:8000", b"127.0.0.1:8000"),
        ("https://[::1]:8443/v1", b"[::1]:8443"),
        ("https://bücher.example", b"xn--bcher-kva.example"),
    ],
)
def test_an_upstream_names_itself_as_a_host_header_would(base_url, authority):
    assert Upstream.parse(base_url).authority == authority


def test_key_as_x_api_key_header(proxy, mock, key):
    response = httpx.post(
        f"{proxy.gateway_url}/openai/v1/chat/completions",
        headers={"x-api-key": key["key"]},
        json={"model": "gpt-4o-mini", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    assert "x-api-key" not in mock.received[-1].headers


def test_key_as_the_https_proxy_user(proxy, mock, key, monkeypatch):
    """HTTPS_PROXY=http://KEY@host:port: the key rides on CONNECT; the SDK's own key is a placeholder."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://{key['key']}@127.0.0.1:{proxy.proxy_port}")
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
    client = openai.OpenAI(api_key="unused", max_retries=0)
    assert chat(client, max_tokens=2).choices[0].message.content == "hello hello"
    seen = mock.received[-1].headers
    assert seen["authorization"] == f"Bearer {OPENAI_REAL_KEY}" and "proxy-authorization" not in seen


@pytest.mark.parametrize("mode", MODES)
def test_real_key_or_no_key_is_refused(proxy, mock, mode, monkeypatch):
    for api_key in (OPENAI_REAL_KEY, "sk-something-else", "ak_forged_key"):
        client = openai_client(proxy, mode, api_key, monkeypatch)
        with pytest.raises(openai.AuthenticationError):
            chat(client, max_tokens=2)
    assert mock.received == []
    assert proxy.audit()[-1]["decision"] == "deny"


def test_revoked_key_is_refused_with_401(proxy, mock, key, monkeypatch):
    client = anthropic_client(proxy, "gateway", key["key"], monkeypatch)
    assert proxy.cli("keys", "revoke", key["id"]) == 0
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert "revoked" in str(refused.value)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert refused.value.response.headers["x-agentkeys-budget-remaining"] == "0.000000"
    assert mock.received == []


def test_expired_key_is_refused_then_purged(proxy, mock, policy, monkeypatch):
    key = proxy.issue(policy, "--ttl", "2s")
    client = openai_client(proxy, "gateway", key["key"], monkeypatch)
    chat(client, max_tokens=2)
    [allowed] = proxy.records_for(key["id"])
    time.sleep(max(0.0, 2.1 - (time.time() - allowed["ts"])))
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(client, max_tokens=2)
    assert "expired" in str(refused.value) or "unknown" in str(refused.value)  # purged already, or not yet
    deadline = time.monotonic() + 10
    while proxy.ledger().get_key(key["id"]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proxy.ledger().get_key(key["id"]) is None, "the proxy did not purge the expired key"
    records = proxy.records_for(key["id"], 2)
    assert [r["decision"] for r in records] == ["allow", "deny"], "audit records outlive the key"
    assert len(mock.received) == 1
