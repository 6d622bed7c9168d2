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


STALE_AFTER = 2  # seconds: a hold unrenewed this long is taken for dead (calls here last longer than that)


@pytest.fixture(scope="module")
def redis_proxy(mock, redis_server, tmp_path_factory):
    running = start_proxy(
        tmp_path_factory.mktemp("redis-proxy"), mock, store=redis_server.url, stale_hold_after=f"{STALE_AFTER}s"
    )
    yield running
    stop_proxy(running)


@pytest.fixture(scope="module")
def sqlite_proxy(mock, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("sqlite-proxy"), mock, stale_hold_after=f"{STALE_AFTER}s")
    yield running
    stop_proxy(running)


def wait_for_the_provider(mock, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not mock.received:
        assert time.monotonic() < deadline, "the call never reached the provider"
        time.sleep(0.02)


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


def test_a_call_refused_because_redis_answered_too_late_holds_and_costs_nothing(
    redis_proxy, redis_server, mock, tmp_path
):
    """Redis busy past the proxy's timeout (DEBUG SLEEP) takes the hold after the proxy gave up on it:
    the agent was told 503 and nothing was forwarded, so the hold is cancelled by its name."""
    key = redis_proxy.issue(write_policy(tmp_path))
    ask(redis_proxy, key)  # the key's record is read and kept: the next call's first write is its hold
    mock.reset()
    busy = threading.Thread(target=redis_server.busy, args=(2,))
    busy.start()
    time.sleep(0.2)
    try:
        assert_store_unavailable(redis_proxy, key)
    finally:
        busy.join()
    assert mock.received == []
    record = assert_ledger_matches_audit(redis_proxy, key["id"])  # nothing held once the cancellation lands
    time.sleep(STALE_AFTER + 1.5)  # a sweep finds nothing of it to charge
    assert any(r["deny_kind"] == "unavailable" and r["cost_micros"] == 0 for r in redis_proxy.audit())
    assert assert_ledger_matches_audit(redis_proxy, key["id"]).spent_micros == record.spent_micros
    assert len(redis_proxy.records_for(key["id"])) == 1, "the first call's record, none from a sweep"


def test_a_settlement_redis_cannot_take_is_written_with_its_usage_once_redis_is_back(
    redis_proxy, redis_server, mock, tmp_path
):
    """Redis unreachable (SIGSTOP) from the moment the call reached the provider until after its answer:
    the settlement waits and is written with the usage the provider reported, and audited once."""
    key = redis_proxy.issue(write_policy(tmp_path))
    mock.delay_next(1)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(ask(redis_proxy, key)))
    caller.start()
    wait_for_the_provider(mock)
    redis_server.pause()
    try:
        caller.join(timeout=10)
        assert answers, "the agent gets its answer while the store is away"
        time.sleep(4)  # settlement attempts fail meanwhile
    finally:
        redis_server.resume()
    [record] = redis_proxy.records_for(key["id"])
    assert record["metering"] == "usage" and 0 < record["cost_micros"] <= record["hold_micros"]
    assert assert_ledger_matches_audit(redis_proxy, key["id"]).spent_micros == record["cost_micros"]
    time.sleep(STALE_AFTER + 1.5)
    assert len(redis_proxy.records_for(key["id"])) == 1, "no sweep took the call's hold for dead"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_call_that_outlives_stale_hold_after_is_charged_its_usage_and_audited_once(
    store, request, mock, tmp_path
):
    """Its proxy renews the hold while the call lives, so no sweep takes it for dead."""
    proxy = request.getfixturevalue(f"{store}_proxy")
    key = proxy.issue(write_policy(tmp_path))
    mock.delay_next(STALE_AFTER * 2)
    ask(proxy, key, timeout=30)
    [record] = proxy.records_for(key["id"])
    assert record["metering"] == "usage" and 0 < record["cost_micros"] <= record["hold_micros"]
    assert_ledger_matches_audit(proxy, key["id"])
    time.sleep(1.5)
    assert len(proxy.records_for(key["id"])) == 1


def test_serve_refuses_to_start_on_a_redis_that_may_evict_keys(mock, tmp_path):
    with RedisServer(None, "--maxmemory-policy", "allkeys-lru") as evicting:
        with pytest.raises(RuntimeError, match=r"(?s)exited with 2.*may evict keys.*maxmemory-policy noeviction"):
            start_proxy(tmp_path / "proxy", mock, store=evicting.url)


def test_a_call_in_flight_when_redis_loses_its_data_is_audited_at_its_cost_and_touches_no_new_hold(
    redis_proxy, redis_server, mock, tmp_path
):
    key = redis_proxy.issue(write_policy(tmp_path))
    mock.delay_next(2)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(ask(redis_proxy, key, timeout=30)))
    caller.start()
    wait_for_the_provider(mock)
    redis_server.kill()
    redis_server.start()  # empty: every key, hold and counter gone
    fresh = redis_proxy.issue(write_policy(tmp_path))
    held = redis_proxy.ledger()
    first = held.reserve(fresh["id"], 100)  # a new key's hold, taken while the old call is still out
    caller.join(timeout=15)
    assert answers
    [record] = redis_proxy.records_for(key["id"])
    assert record["metering"] == "usage" and record["cost_micros"] > 0 and "lost hold" in record["reason"]
    assert held.get_key(fresh["id"]).held_micros == 100, "the old call's settlement closed nothing of the new key"
    assert held.settle(first.hold_id, 0) is True
    held.close()
