"""The store and the proxy failing mid-run: never forwarded unmetered, never a budget freed that was spent."""

import os
import signal
import sqlite3
import threading
import time

import openai
import pytest
from redis_server import RedisServer

from conftest import assert_ledger_matches_audit, start_proxy, stop_proxy, wait_for_port, write_policy


def ask(proxy, key, **kwargs):
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0, **kwargs)
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
    )


def assert_store_unavailable(proxy, key):
    with pytest.raises(openai.APIStatusError) as refused:
        ask(proxy, key, timeout=30)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["x-should-retry"] == "true"
    assert "key store is unavailable" in refused.value.message


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_proxy(mock, redis_server, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("redis-proxy"), mock, store=redis_server.url)
    yield running
    stop_proxy(running)


def test_keys_and_calls_work_on_redis(redis_proxy, mock, tmp_path):
    key = redis_proxy.issue(write_policy(tmp_path))
    assert ask(redis_proxy, key).choices[0].message.content == "hello hello hello hello hello"
    [record] = redis_proxy.records_for(key["id"])
    assert assert_ledger_matches_audit(redis_proxy, key["id"]).spent_micros == record["cost_micros"] > 0


def test_redis_unreachable_refuses_with_503_and_the_same_key_works_when_it_is_back(
    redis_proxy, redis_server, mock, tmp_path
):
    key = redis_proxy.issue(write_policy(tmp_path))
    redis_server.pause()
    try:
        assert_store_unavailable(redis_proxy, key)
    finally:
        redis_server.resume()
    assert mock.received == [], "a call was forwarded while it could not be metered"
    assert ask(redis_proxy, key).choices[0].message.content, "the proxy did not recover by itself"


def test_redis_killed_refuses_then_a_new_redis_serves_without_restarting_the_proxy(
    redis_proxy, redis_server, mock, tmp_path
):
    key = redis_proxy.issue(write_policy(tmp_path))
    redis_server.kill()
    try:
        assert_store_unavailable(redis_proxy, key)
    finally:
        redis_server.start()  # a replacement instance: empty
    assert mock.received == []
    fresh = redis_proxy.issue(write_policy(tmp_path))
    assert ask(redis_proxy, fresh).choices[0].message.content


def test_a_locked_sqlite_store_waits_briefly_then_refuses(proxy, mock, tmp_path):
    key = proxy.issue(write_policy(tmp_path))
    blocker = sqlite3.connect(proxy.dir / "agentkeys.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock for too long
    try:
        assert_store_unavailable(proxy, key)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert mock.received == []
    assert ask(proxy, key).choices[0].message.content


def test_a_proxy_killed_mid_call_leaves_a_hold_that_is_charged_in_full_after_restart(mock, tmp_path):
    first = start_proxy(tmp_path / "proxy", mock, stale_hold_after="2s")
    key = first.issue(write_policy(tmp_path))
    mock.delay_next(10)
    caller = threading.Thread(target=lambda: pytest.raises(openai.APIConnectionError, ask, first, key), daemon=True)
    caller.start()
    deadline = time.monotonic() + 10
    while not mock.received and time.monotonic() < deadline:  # the call reached the provider
        time.sleep(0.02)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()
    held = first.ledger().get_key(key["id"])
    assert held.held_micros > 0 and held.spent_micros == 0

    second = start_proxy(tmp_path / "proxy", mock, stale_hold_after="2s")  # same store, same audit log
    try:
        wait_for_port(second.gateway_port, second.process, second.log_path)
        deadline = time.monotonic() + 15
        while second.ledger().get_key(key["id"]).held_micros and time.monotonic() < deadline:
            time.sleep(0.2)
        after = second.ledger().get_key(key["id"])
        assert after.held_micros == 0 and after.spent_micros == held.held_micros, "the whole hold became spend"
        [record] = second.records_for(key["id"])
        assert record["metering"] == "held" and "stopped before settling it" in record["reason"]
        assert record["cost_micros"] == held.held_micros
    finally:
        stop_proxy(second)
        caller.join(timeout=15)


def test_the_cli_manages_keys_on_redis(redis_proxy, tmp_path, capsys):
    key = redis_proxy.issue(write_policy(tmp_path))
    capsys.readouterr()
    assert redis_proxy.cli("keys", "list") == 0
    assert key["id"] in capsys.readouterr().out
    assert redis_proxy.cli("keys", "show", key["id"], "--json") == 0
    assert '"status": "active"' in capsys.readouterr().out
    assert redis_proxy.cli("keys", "revoke", key["id"]) == 0
    with pytest.raises(openai.AuthenticationError):
        ask(redis_proxy, key)
