"""An agent calls Google Gemini through the proxy, end to end: `generateContent` and its SSE stream,
thinking billed as output, cached content, free token counts, the key in the query.

Driven with raw HTTP (the httpx the SDKs use), in gateway mode (path prefix) and proxy mode (host).
Ledger, audit record and headers are checked against the mock's usage.
"""

import json
import ssl

import pytest

from agentkeys.pricing import PriceTable, Usage, cost_micros
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
GEMINI_KEY = OTHER_REAL_KEYS["GEMINI_API_KEY"]
GEMINI_HOST = "generativelanguage.googleapis.com"
FLASH = "/v1beta/models/gemini-2.5-flash"
TIMEOUT = 30  # seconds; httpx's default of 5 is too short on a busy test machine


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, providers={"gemini": {"upstream": mock.url}}) as running:
        yield running


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(
        tmp_path_factory.mktemp("policies"),
        "gemini",
        providers=["gemini"],
        endpoints=[
            "POST /v1beta/models/*:generateContent",
            "POST /v1beta/models/*:streamGenerateContent",
            "POST /v1beta/models/*:countTokens",
        ],
        models=["gemini-2.5-flash"],
    )


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy, "--budget", "1")


def post(url: str, **kwargs):
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def stream(method: str, url: str, **kwargs):
    return httpx.stream(method, url, timeout=TIMEOUT, **kwargs)


def generate(text: str = "Say hello", **config) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "generationConfig": config}


def assert_no_agent_key_upstream(mock, key) -> None:
    seen = mock.received[-1]
    assert key["key"] not in json.dumps(seen.headers) + seen.query + seen.body.decode()


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
