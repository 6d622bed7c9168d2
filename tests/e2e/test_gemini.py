"""Google Gemini, Azure OpenAI and an OpenAI-compatible host added by configuration alone, end to end.

Gemini and Azure's v1 paths are driven with raw HTTP (the httpx the SDKs use), Azure deployments with
the openai SDK's own `AzureOpenAI` client, Groq with the plain openai SDK; each in gateway mode (path
prefix) and proxy mode (host). Ledger, audit record and headers are checked against the mock's usage.
"""

import json
import ssl

import openai
import pytest

from agentkeys.pricing import ConfigPrice, PriceTable, Usage, cost_micros
from conftest import (
    OTHER_REAL_KEYS,
    assert_books_balance,
    assert_ledger_matches_audit,
    httpx,
    start_proxy,
    stop_proxy,
    write_policy,
)
from prices import expected_cost

PRICES = PriceTable.bundled()
GEMINI_KEY, AZURE_KEY, GROQ_KEY = (
    OTHER_REAL_KEYS[name] for name in ("GEMINI_API_KEY", "AZURE_OPENAI_API_KEY", "GROQ_API_KEY")
)
AZURE_HOST, GEMINI_HOST = "myres.openai.azure.com", "generativelanguage.googleapis.com"
LLAMA = "llama-3.3-70b-versatile"
LLAMA_PRICE = {"input_per_mtok": 0.59, "output_per_mtok": 0.79, "max_output_tokens": 32768}  # as configured for Groq
FLASH = "/v1beta/models/gemini-2.5-flash"
TIMEOUT = 30  # seconds; httpx's default of 5 is too short on a busy test machine


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    running = start_proxy(
        tmp_path_factory.mktemp("proxy"),
        mock,
        providers={
            "openai": {"upstream": mock.url},
            "anthropic": {"upstream": mock.url},
            "gemini": {"upstream": mock.url},
            "azure": {
                "format": "azure",
                "upstream": mock.url,
                "hosts": [AZURE_HOST],
                "key_env": "AZURE_OPENAI_API_KEY",
                "deployments": {"prod-mini": "gpt-4o-mini"},
            },
            # Groq serves its OpenAI-compatible API under /openai: that path belongs in the upstream URL.
            "groq": {
                "format": "openai",
                "upstream": f"{mock.url}/openai",
                "hosts": ["api.groq.com"],
                "key_env": "GROQ_API_KEY",
            },
        },  # fmt: skip
        prices={"groq": {LLAMA: LLAMA_PRICE}},
    )
    yield running
    assert_books_balance(running)
    stop_proxy(running)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(
        tmp_path_factory.mktemp("policies"),
        "more",
        providers=["gemini", "azure", "groq"],
        endpoints=[
            "POST /v1beta/models/*:generateContent",
            "POST /v1beta/models/*:streamGenerateContent",
            "POST /v1beta/models/*:countTokens",
            "POST /openai/deployments/*/chat/completions",
            "POST /openai/deployments/*/embeddings",
            "POST /openai/v1/responses",
            "POST /v1/chat/completions",
        ],
        models=["gemini-2.5-flash", "gpt-4o-mini*", "text-embedding-3-small", LLAMA],
    )


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy, "--budget", "1")


def billed(mock) -> Usage:
    reported = mock.reported[-1]
    return Usage(
        input_tokens=reported["input_tokens"],
        output_tokens=reported["output_tokens"],
        cached_tokens=reported["cached_tokens"],
        reasoning_tokens=reported["reasoning_tokens"],
    )


def settled(proxy, key) -> dict:
    [record] = proxy.records_for(key["id"])
    assert_ledger_matches_audit(proxy, key["id"])
    return record


def assert_metered(record: dict, usage: Usage, cost: int, metering: str = "usage") -> None:
    assert record["decision"] == "allow" and record["metering"] == metering, record
    assert (record["input_tokens"], record["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert (record["cached_tokens"], record["reasoning_tokens"]) == (usage.cached_tokens, usage.reasoning_tokens)
    assert record["cost_micros"] == cost <= record["hold_micros"], "the hold must cover what the provider bills"


def assert_no_agent_key_upstream(mock, key) -> None:
    seen = mock.received[-1]
    assert key["key"] not in json.dumps(seen.headers) + seen.query + seen.body.decode()


def post(url: str, **kwargs):
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def stream(method: str, url: str, **kwargs):
    return httpx.stream(method, url, timeout=TIMEOUT, **kwargs)


def generate(text: str = "Say hello", **config) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "generationConfig": config}


# ----- Gemini -----


def test_gemini_generate_content_swaps_the_key_and_meters_usage(proxy, mock, key):
    response = post(
        f"{proxy.gateway_url}/gemini{FLASH}:generateContent",
        json=generate(maxOutputTokens=5),
        headers={"x-goog-api-key": key["key"]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"] == "hello hello hello hello hello"
    assert mock.received[-1].headers["x-goog-api-key"] == GEMINI_KEY
    assert_no_agent_key_upstream(mock, key)
    usage = billed(mock)
    record = settled(proxy, key)
    assert record["model"] == "gemini-2.5-flash"
    assert_metered(record, usage, cost_micros(PRICES.lookup("gemini", "gemini-2.5-flash"), usage))
    assert response.headers["x-agentkeys-cost"] == f"{record['cost_micros'] / 1e6:.6f}"
    assert response.headers["x-agentkeys-budget-remaining"] == f"{(1e6 - record['cost_micros']) / 1e6:.6f}"


@pytest.mark.parametrize("mode", ["gateway", "proxy"])
def test_a_key_in_the_query_is_a_credential_and_never_forwarded(proxy, mock, key, mode):
    if mode == "gateway":
        answer = post(f"{proxy.gateway_url}/gemini{FLASH}:generateContent?key={key['key']}", json=generate())
    else:
        with httpx.Client(
            proxy=proxy.proxy_url, verify=ssl.create_default_context(cafile=proxy.ca_bundle), timeout=TIMEOUT
        ) as client:
            answer = client.post(f"https://{GEMINI_HOST}{FLASH}:generateContent?key={key['key']}", json=generate())
    assert answer.status_code == 200, answer.text
    seen = mock.received[-1]
    assert seen.query == "" and seen.headers["x-goog-api-key"] == GEMINI_KEY
    assert_no_agent_key_upstream(mock, key)
    assert settled(proxy, key)["metering"] == "usage"


def test_a_real_key_in_the_query_is_refused(proxy, mock):
    answer = post(f"{proxy.gateway_url}/gemini{FLASH}:generateContent?key={GEMINI_KEY}", json=generate())
    assert answer.status_code == 401 and answer.json()["error"]["status"] == "UNAUTHENTICATED"
    assert mock.received == []


def sse_chunks(response) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]


def test_gemini_stream_bills_thinking_as_output(proxy, mock, key):
    body = generate(maxOutputTokens=8, thinkingConfig={"thinkingBudget": 100})
    with stream(
        "POST", f"{proxy.gateway_url}/gemini{FLASH}:streamGenerateContent?alt=sse", json=body,
        headers={"x-goog-api-key": key["key"]},
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        remaining = response.headers["x-agentkeys-budget-remaining"]
        chunks = sse_chunks(response)
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == "hello hello hello hello"  # eight tokens: four thought, four said
    usage = billed(mock)
    assert usage.reasoning_tokens == 4 and usage.output_tokens == 8
    record = settled(proxy, key)
    assert_metered(record, usage, cost_micros(PRICES.lookup("gemini", "gemini-2.5-flash"), usage))
    assert remaining == f"{(1e6 - record['hold_micros']) / 1e6:.6f}"


def test_a_gemini_stream_cut_short_is_charged_its_full_hold(proxy, mock, key):
    mock.cut_next_stream(after_chunks=3)
    with pytest.raises(httpx.HTTPError):
        with stream(
            "POST", f"{proxy.gateway_url}/gemini{FLASH}:streamGenerateContent?alt=sse", json=generate(),
            headers={"x-goog-api-key": key["key"]},
        ) as response:  # fmt: skip
            list(response.iter_lines())
    record = settled(proxy, key)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0


def test_a_json_array_stream_is_refused_as_unmeterable_on_the_fly(proxy, mock, key):
    answer = post(
        f"{proxy.gateway_url}/gemini{FLASH}:streamGenerateContent", json=generate(),
        headers={"x-goog-api-key": key["key"]},
    )  # fmt: skip
    assert answer.status_code == 400 and "alt=sse" in answer.json()["error"]["message"]
    assert mock.received == []


def test_cached_content_is_held_at_the_context_window(proxy, mock, key):
    """A `cachedContent` brings in tokens the proxy cannot see: the hold assumes the whole window."""
    answer = post(
        f"{proxy.gateway_url}/gemini{FLASH}:generateContent",
        json={**generate(maxOutputTokens=3), "cachedContent": "cachedContents/abc"},
        headers={"x-goog-api-key": key["key"]},
    )
    assert answer.status_code == 200, answer.text
    usage = billed(mock)
    assert usage.cached_tokens == 1000
    record = settled(proxy, key)
    price = PRICES.lookup("gemini", "gemini-2.5-flash")
    assert record["hold_micros"] == cost_micros(price, Usage(price.max_input_tokens, 3))
    assert_metered(record, usage, cost_micros(price, usage))


def test_gemini_count_tokens_is_free_and_hosted_tools_are_refused(proxy, mock, key):
    headers = {"x-goog-api-key": key["key"]}
    counted = post(f"{proxy.gateway_url}/gemini{FLASH}:countTokens", json=generate(), headers=headers)
    assert counted.status_code == 200 and counted.json()["totalTokens"] > 0
    assert settled(proxy, key)["metering"] == "free"
    refused = post(
        f"{proxy.gateway_url}/gemini{FLASH}:generateContent",
        json={**generate(), "tools": [{"googleSearch": {}}]},
        headers=headers,
    )
    assert refused.status_code == 403 and refused.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "googleSearch" in refused.json()["error"]["message"]
    assert len(mock.received) == 1


# ----- Azure OpenAI -----


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


# ----- an OpenAI-compatible host by configuration alone -----


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
