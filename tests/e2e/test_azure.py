"""An agent calls Azure OpenAI through the proxy, end to end: deployments priced as the model they
run, streams asked for usage, embeddings, the v1 Responses API.

Deployments are driven with the openai SDK's own `AzureOpenAI` client in gateway mode (path prefix)
and proxy mode (host), the v1 path with raw HTTP. Ledger and audit are checked against the mock's usage.
"""

import json

import openai
import pytest

from agentkeys.pricing import PriceTable, cost_micros
from conftest import (
    OTHER_REAL_KEYS,
    assert_metered,
    billed,
    httpx,
    running_proxy,
    settled,
    write_policy,
)

PRICES = PriceTable.bundled()
AZURE_KEY = OTHER_REAL_KEYS["AZURE_OPENAI_API_KEY"]
AZURE_HOST = "myres.openai.azure.com"
TIMEOUT = 30  # seconds; httpx's default of 5 is too short on a busy test machine


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    azure = {
        "format": "azure",
        "upstream": mock.url,
        "hosts": [AZURE_HOST],
        "key_env": "AZURE_OPENAI_API_KEY",
        "deployments": {"prod-mini": "gpt-4o-mini"},
    }
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, providers={"azure": azure}) as running:
        yield running


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(
        tmp_path_factory.mktemp("policies"),
        "azure",
        providers=["azure"],
        endpoints=[
            "POST /openai/deployments/*/chat/completions",
            "POST /openai/deployments/*/embeddings",
            "POST /openai/v1/responses",
        ],
        models=["gpt-4o-mini*", "text-embedding-3-small"],
    )


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy, "--budget", "1")


def post(url: str, **kwargs):
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def assert_no_agent_key_upstream(mock, key) -> None:
    seen = mock.received[-1]
    assert key["key"] not in json.dumps(seen.headers) + seen.query + seen.body.decode()


def azure_client(proxy, key, mode, monkeypatch) -> openai.AzureOpenAI:
    if mode == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", proxy.proxy_url)
        monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
        endpoint = f"https://{AZURE_HOST}"
    else:
        monkeypatch.delenv("HTTPS_PROXY", raising=False)
        endpoint = f"{proxy.gateway_url}/azure"
    return openai.AzureOpenAI(api_key=key["key"], api_version="2024-10-21", azure_endpoint=endpoint, max_retries=0)


@pytest.mark.parametrize("mode", ["gateway", "proxy"])
def test_an_azure_deployment_is_priced_as_the_model_it_serves(proxy, mock, key, mode, monkeypatch):
    """`prod-mini` runs gpt-4o-mini (the config says so): the body's `model` cannot make it cheaper."""
    reply = azure_client(proxy, key, mode, monkeypatch).chat.completions.create(
        model="prod-mini", max_tokens=4, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert reply.choices[0].message.content == "hello hello hello hello"
    seen = mock.received[-1]
    assert seen.path == "/openai/deployments/prod-mini/chat/completions" and "api-version=2024-10-21" in seen.query
    assert seen.headers["api-key"] == AZURE_KEY and "authorization" not in seen.headers
    assert_no_agent_key_upstream(mock, key)
    usage = billed(mock)
    record = settled(proxy, key)
    assert record["model"] == "gpt-4o-mini"
    assert_metered(record, usage, cost_micros(PRICES.lookup("azure", "gpt-4o-mini"), usage))


def test_an_azure_stream_is_asked_for_usage_and_metered(proxy, mock, key, monkeypatch):
    chunks = list(
        azure_client(proxy, key, "gateway", monkeypatch).chat.completions.create(
            model="prod-mini", max_tokens=3, stream=True, messages=[{"role": "user", "content": "Say hello"}]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello hello hello"
    assert mock.received[-1].json["stream_options"] == {"include_usage": True}
    usage = billed(mock)
    assert_metered(settled(proxy, key), usage, cost_micros(PRICES.lookup("azure", "gpt-4o-mini"), usage))


def test_azure_embeddings_on_a_deployment_named_after_its_model(proxy, mock, key, monkeypatch):
    result = azure_client(proxy, key, "gateway", monkeypatch).embeddings.create(
        model="text-embedding-3-small", input="hello world"
    )
    assert len(result.data) == 1
    usage = billed(mock)
    assert_metered(settled(proxy, key), usage, cost_micros(PRICES.lookup("azure", "text-embedding-3-small"), usage))


def test_azure_v1_responses_take_the_model_from_the_body(proxy, mock, key):
    answer = post(
        f"{proxy.gateway_url}/azure/openai/v1/responses",
        json={"model": "gpt-4o-mini", "input": "Say hello", "max_output_tokens": 2},
        headers={"api-key": key["key"]},
    )
    assert answer.status_code == 200, answer.text
    assert mock.received[-1].headers["api-key"] == AZURE_KEY
    usage = billed(mock)
    assert_metered(settled(proxy, key), usage, cost_micros(PRICES.lookup("azure", "gpt-4o-mini"), usage))


def test_an_azure_deployment_the_policy_does_not_allow_is_refused(proxy, mock, key, monkeypatch):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        azure_client(proxy, key, "gateway", monkeypatch).chat.completions.create(
            model="gpt-4o", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert "model gpt-4o is not allowed" in refused.value.message
    assert mock.received == []
