"""An agent calls an OpenAI-compatible host (Groq) that the proxy knows from its configuration alone:
a provider entry with `format: openai`, its upstream, hosts and key, and a configured price.

Driven with the plain openai SDK in gateway mode (path prefix) and proxy mode (Groq's own host).
"""

import openai
import pytest

from agentkeys.pricing import ConfigPrice
from conftest import (
    OTHER_REAL_KEYS,
    assert_metered,
    billed,
    running_proxy,
    settled,
    write_policy,
)
from prices import expected_cost

GROQ_KEY = OTHER_REAL_KEYS["GROQ_API_KEY"]
LLAMA = "llama-3.3-70b-versatile"
LLAMA_PRICE = {"input_per_mtok": 0.59, "output_per_mtok": 0.79, "max_output_tokens": 32768}  # as configured for Groq


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    with running_proxy(
        tmp_path_factory.mktemp("proxy"),
        mock,
        providers={
            # Groq serves its OpenAI-compatible API under /openai: that path belongs in the upstream URL.
            "groq": {
                "format": "openai",
                "upstream": f"{mock.url}/openai",
                "hosts": ["api.groq.com"],
                "key_env": "GROQ_API_KEY",
            },
        },
        prices={"groq": {LLAMA: LLAMA_PRICE}},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(
        tmp_path_factory.mktemp("policies"),
        "groq",
        providers=["groq"],
        endpoints=["POST /v1/chat/completions"],
        models=[LLAMA],
    )


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy, "--budget", "1")


@pytest.mark.parametrize("mode", ["gateway", "proxy"])
def test_groq_by_configuration_alone(proxy, mock, key, mode, monkeypatch):
    if mode == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", proxy.proxy_url)
        monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
        base_url = "https://api.groq.com/openai/v1"  # Groq's own, unchanged
    else:
        monkeypatch.delenv("HTTPS_PROXY", raising=False)
        base_url = f"{proxy.gateway_url}/groq/v1"
    groq = openai.OpenAI(api_key=key["key"], base_url=base_url, max_retries=0)
    reply = groq.chat.completions.create(model=LLAMA, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "hello hello hello"
    seen = mock.received[-1]
    assert seen.path == "/openai/v1/chat/completions" and seen.headers["authorization"] == f"Bearer {GROQ_KEY}"
    usage = billed(mock)
    record = settled(proxy, key)
    assert record["provider"] == "groq"
    configured = ConfigPrice(**LLAMA_PRICE).model_price("config")
    assert_metered(record, usage, expected_cost(price=configured, input=usage.input_tokens, output=usage.output_tokens))
