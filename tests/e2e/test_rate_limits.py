"""Rate limits and the loop breaker, as an agent meets them through the official SDKs and a real proxy:
a 429 in the provider's own shape, `retry-after` the SDK waits out, a loop refused for good (the SDK does
not retry it), calls at twice the rpm passing at the rpm, every refusal audited and counted."""

import asyncio
import time

import anthropic
import openai
import pytest
from redis_server import RedisServer

from conftest import assert_ledger_matches_audit, httpx, start_proxy, stop_proxy, write_policy

PROMPT = [{"role": "user", "content": "Say hello"}]


def openai_client(proxy, key: dict, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=max_retries)


def issue(proxy, tmp_path, name: str, **policy_fields) -> dict:
    return proxy.issue(write_policy(tmp_path, name, **policy_fields))


def refusals_metric(proxy, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10).text
    prefix = "agentkeys_refusals_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and f'reason="{reason}"' in line
    )


def test_a_call_over_the_rpm_is_a_429_in_openai_s_shape_with_when_to_retry(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path, "rpm", rate_limits={"requests_per_minute": 3})
    client = openai_client(proxy, key)
    refused_before = refusals_metric(proxy, "rate_limited")
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    refused = caught.value
    assert refused.status_code == 429 and refused.code == "rate_limit_exceeded"
    assert refused.response.headers["x-should-retry"] == "true"
    assert refused.response.headers["retry-after"] == "20"  # 60 s / 3
    assert 19_000 < int(refused.response.headers["retry-after-ms"]) <= 20_000
    assert "may make 3 requests a minute (requests_per_minute of policy rpm)" in refused.message
    assert len(mock.received) == 3
    records = proxy.records_for(key["id"], 4)
    assert [r["decision"] for r in records] == ["allow"] * 3 + ["deny"]
    assert records[-1]["deny_kind"] == "rate_limited" and "requests_per_minute" in records[-1]["reason"]
    assert refusals_metric(proxy, "rate_limited") == refused_before + 1
    assert_ledger_matches_audit(proxy, key["id"])


def test_the_sdk_waits_out_retry_after_and_the_call_then_passes(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path, "retry", rate_limits={"requests_per_minute": 20})
    client = openai_client(proxy, key, max_retries=2)
    started = time.monotonic()
    for _ in range(21):  # a minute's allowance at once; the 21st is told to wait about 3 s, and does
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert time.monotonic() - started >= 2
    records = proxy.records_for(key["id"], 22)
    assert [r["decision"] for r in records].count("deny") == 1 and len(mock.received) == 21
    assert_ledger_matches_audit(proxy, key["id"])


def test_calls_at_twice_the_rpm_pass_at_the_rpm(proxy, mock, tmp_path):
    """rpm 60: after the minute's allowance, calls every half second (twice the rate) pass one a second.
    Tolerance: one call either way over the 6 seconds, for the timing of the calls themselves."""
    key = issue(proxy, tmp_path, "twice", rate_limits={"requests_per_minute": 60})
    url = f"{proxy.gateway_url}/openai/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 5}
    headers = {"authorization": f"Bearer {key['key']}"}
    with httpx.Client(timeout=10) as client:
        started, allowance = time.monotonic(), 0
        while client.post(url, json=body, headers=headers).status_code == 200 and allowance <= 100:
            allowance += 1
        assert 60 <= allowance <= 60 + (time.monotonic() - started) + 1  # what refilled while the burst ran
        passed, started = 0, time.monotonic()
        for n in range(12):
            time.sleep(max(0.0, started + n * 0.5 - time.monotonic()))
            passed += client.post(url, json=body, headers=headers).status_code == 200
    assert 5 <= passed <= 7, passed
    assert_ledger_matches_audit(proxy, key["id"])


def test_a_loop_is_refused_for_good_and_anthropic_s_sdk_does_not_retry_it(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path, "loop", max_identical_calls="2 per 1h")
    client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic")  # retries: 2
    for _ in range(2):
        client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=PROMPT)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=PROMPT)
    refused = caught.value
    assert refused.status_code == 429 and refused.body["error"]["type"] == "rate_limit_error"
    assert refused.response.headers["x-should-retry"] == "false" and "retry-after" not in refused.response.headers
    assert "loop broken" in refused.message and "this same request 2 times within 1h" in refused.message
    assert len(mock.received) == 2  # the SDK took the refusal as final
    client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "Other"}])
    records = proxy.records_for(key["id"], 4)
    assert [r.get("deny_kind") for r in records if r["decision"] == "deny"] == ["loop"]
    assert "max_identical_calls: 2 per 1h of policy loop" in records[2]["reason"]
    assert_ledger_matches_audit(proxy, key["id"])


def test_concurrent_calls_beyond_the_limit_wait_their_turn(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path, "concurrent", rate_limits={"concurrent_calls": 1})
    mock.delay_next(1.0)  # the first call is still in flight when the second comes

    async def calls():
        async with openai.AsyncOpenAI(
            api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0
        ) as client:

            async def one(delay: float):
                await asyncio.sleep(delay)
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
                    return "ok"
                except openai.RateLimitError as refused:
                    assert "calls in flight at once" in refused.message
                    return "refused"

            return await asyncio.gather(one(0), one(0.3))

    assert asyncio.run(calls()) == ["ok", "refused"]
    again = openai_client(proxy, key).chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert again.choices  # every slot was given back at settlement
    assert_ledger_matches_audit(proxy, key["id"])


def test_two_proxies_on_one_redis_share_a_keys_rpm(mock, tmp_path):
    """Replicas count against one bucket: a burst spread over two proxies passes the key's rpm once, not
    once per proxy (give or take what refills while the burst runs: one call a second at rpm 60)."""
    with RedisServer() as redis_server:
        proxies = [start_proxy(tmp_path / f"proxy{i}", mock, store=redis_server.url) for i in range(2)]
        try:
            key = proxies[0].issue(write_policy(tmp_path, "shared", rate_limits={"requests_per_minute": 60}))
            body = {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 5}
            headers = {"authorization": f"Bearer {key['key']}"}
            started, statuses = time.monotonic(), []
            with httpx.Client(timeout=10) as client:
                for n in range(100):
                    url = f"{proxies[n % 2].gateway_url}/openai/v1/chat/completions"
                    statuses.append(client.post(url, json=body, headers=headers).status_code)
            elapsed = time.monotonic() - started
            assert 60 <= statuses.count(200) <= 60 + elapsed + 1, (statuses.count(200), elapsed)
            assert set(statuses) == {200, 429}
            deadline, audit = time.monotonic() + 10, []
            while len(audit) < len(statuses) and time.monotonic() < deadline:  # settlements land just after
                audit = [r for proxy in proxies for r in proxy.records_for(key["id"], 0)]
                time.sleep(0.05)
            assert len(audit) == len(statuses)
            assert_ledger_matches_audit(proxies[0], key["id"], audit)
        finally:
            for proxy in proxies:
                stop_proxy(proxy)
