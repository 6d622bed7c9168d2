"""The hard cap under load: 200 concurrent calls against a budget that pays for about 20.

Each call asks for exactly as many output tokens as the mock then bills (the mock always uses the
whole `max_tokens`), so a call's worst case and its actual cost are nearly equal and the budget
pays for a known number of calls, whatever the interleaving.
"""

import asyncio
import contextlib
import re
import time

import openai
import pytest
from redis_server import RedisServer

from agentkeys.money import usd_to_micros
from conftest import (
    ANTHROPIC_REAL_KEY,
    OPENAI_REAL_KEY,
    assert_ledger_matches_audit,
    start_proxy,
    stop_proxy,
    write_policy,
)
from mock_provider import MockProvider

CALLS = 200
MAX_TOKENS = 100
PROMPT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def mock():
    """A mock that always writes the whole max_tokens, so the worst case is what gets billed."""
    provider = MockProvider(openai_key=OPENAI_REAL_KEY, anthropic_key=ANTHROPIC_REAL_KEY, output_tokens=10**9).start()
    yield provider
    provider.stop()


async def fire(base_urls: list[str], key: str) -> list[str]:
    """Send CALLS chat calls at once, spread over the given proxies; return each outcome."""
    clients = [openai.AsyncOpenAI(api_key=key, base_url=url, max_retries=0, timeout=60) for url in base_urls]

    async def one(i: int) -> str:
        try:
            await clients[i % len(clients)].chat.completions.create(
                model="gpt-4o-mini", max_tokens=MAX_TOKENS, messages=PROMPT
            )
            return "ok"
        except openai.RateLimitError as refused:
            assert "budget exhausted" in refused.message
            return "refused"

    try:
        return await asyncio.gather(*(one(i) for i in range(CALLS)))
    finally:
        for client in clients:
            await client.close()


def audit_of_every_call(proxies, key_id: str, timeout: float = 15) -> list[dict]:
    """The key's audit records from all proxies, once every call has one (settlements land just after answers)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for proxy in proxies for r in proxy.records_for(key_id, 0)]
        if len(records) >= CALLS or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def assert_hard_cap(proxies, mock, key, outcomes):
    """Spend within budget; forwarded calls = what the budget paid for; ledger = audit, to the micro-dollar."""
    audit = audit_of_every_call(proxies, key["id"])
    record = assert_ledger_matches_audit(proxies[0], key["id"], audit)
    allowed = [r for r in audit if r["decision"] == "allow"]
    refused = [r for r in audit if r["decision"] == "deny"]
    assert len(audit) == CALLS
    assert outcomes.count("ok") == len(allowed) == len(mock.reported)
    assert outcomes.count("refused") == len(refused) and all(r["status"] == 429 for r in refused)
    assert record.spent_micros <= record.budget_micros
    hold = max(r["hold_micros"] for r in allowed)
    assert len(allowed) >= record.budget_micros // hold, "the budget paid for fewer calls than fit at once"
    for refusal in refused:  # and every refusal was justified when it was made
        could_cost, remains = re.search(r"could cost up to \$([\d.]+), \$([\d.]+) remains", refusal["reason"]).groups()
        assert usd_to_micros(remains) < usd_to_micros(could_cost)


def test_200_concurrent_calls_through_one_proxy_never_overspend(mock, tmp_path):
    proxy = start_proxy(tmp_path / "proxy", mock)
    try:
        key = proxy.issue(write_policy(tmp_path, "load"), "--budget", "0.00125")  # ~20 calls of ~62 µ$
        outcomes = asyncio.run(fire([f"{proxy.gateway_url}/openai/v1"], key["key"]))
        assert_hard_cap([proxy], mock, key, outcomes)
    finally:
        stop_proxy(proxy)


def test_200_concurrent_calls_through_three_proxies_sharing_redis_never_overspend(mock, tmp_path):
    with RedisServer() as redis_server:
        proxies = [start_proxy(tmp_path / f"proxy{i}", mock, store=redis_server.url) for i in range(3)]
        try:
            key = proxies[0].issue(write_policy(tmp_path, "load"), "--budget", "0.00125")
            urls = [f"{proxy.gateway_url}/openai/v1" for proxy in proxies]
            outcomes = asyncio.run(fire(urls, key["key"]))
            assert_hard_cap(proxies, mock, key, outcomes)
            assert all(proxy.records_for(key["id"], 1) for proxy in proxies), "every replica took part"
        finally:
            for proxy in proxies:
                stop_proxy(proxy)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_200_concurrent_calls_through_two_workers_never_overspend(mock, tmp_path, store):
    with contextlib.ExitStack() as stack:
        fields = {"store": stack.enter_context(RedisServer()).url} if store == "redis" else {}
        proxy = start_proxy(tmp_path / "proxy", mock, workers=2, **fields)
        stack.callback(stop_proxy, proxy)
        key = proxy.issue(write_policy(tmp_path, "load"), "--budget", "0.00125")
        outcomes = asyncio.run(fire([f"{proxy.gateway_url}/openai/v1"], key["key"]))
        assert_hard_cap([proxy], mock, key, outcomes)
        writers = {record["writer"] for record in proxy.records_for(key["id"], 0)}
        assert len(writers) == 2, "both workers took calls"
