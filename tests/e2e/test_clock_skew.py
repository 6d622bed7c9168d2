"""Replicas whose clocks disagree, on one Redis: the store's clock decides, so none is wrong.

One replica runs under Debian's `faketime` a minute behind. Before time came from Redis, the other
swept its live calls as dead (charging them in full) and refused the children it minted as expired.
"""

import glob
import time

import openai
import pytest
from redis_server import RedisServer

from conftest import assert_ledger_matches_audit, httpx, start_proxy, stop_proxy, write_policy

FAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), None)
pytestmark = pytest.mark.skipif(FAKETIME is None, reason="faketime is not installed (apt-get install faketime)")
STALE_AFTER = 10  # seconds; the lagging replica's clock is 60 s behind


@pytest.fixture(scope="module")
def replicas(mock, tmp_path_factory):
    with RedisServer() as server:
        on_time = start_proxy(tmp_path_factory.mktemp("on-time"), mock, store=server.url, stale_hold_after="10s")
        with pytest.MonkeyPatch.context() as patch:  # what the lagging replica's process inherits
            patch.setenv("LD_PRELOAD", FAKETIME)
            patch.setenv("FAKETIME", "-1m")
            patch.setenv("DONT_FAKE_MONOTONIC", "1")
            behind = start_proxy(tmp_path_factory.mktemp("behind"), mock, store=server.url, stale_hold_after="10s")
        try:
            yield on_time, behind
        finally:
            stop_proxy(behind)
            stop_proxy(on_time)


def ask(proxy, key: str):
    client = openai.OpenAI(api_key=key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0, timeout=30)
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
    )


def test_a_call_through_a_lagging_replica_is_left_alone_by_the_others_sweeps(replicas, mock, tmp_path):
    on_time, behind = replicas
    key = on_time.issue(write_policy(tmp_path))
    mock.delay_next(3)
    ask(behind, key["key"])
    [record] = behind.records_for(key["id"])
    assert record["ts"] < time.time() - 50, "the replica's clock is a minute behind"
    assert record["metering"] == "usage"
    time.sleep(2)  # the on-time replica's books pass
    assert on_time.records_for(key["id"], timeout=0) == [], "no sweep took the live call for dead"
    assert_ledger_matches_audit(on_time, key["id"], audit=on_time.audit() + behind.audit())


def test_a_child_minted_on_a_lagging_replica_lives_its_whole_lifetime_on_the_others(replicas, mock, tmp_path):
    on_time, behind = replicas
    parent = on_time.issue(write_policy(tmp_path, "orchestrator", max_children=3, max_child_depth=1))
    minted = httpx.post(
        f"{behind.gateway_url}/_agentkeys/v1/keys",
        headers={"authorization": f"Bearer {parent['key']}"},
        json={"name": "worker", "budget_usd": 0.01, "ttl": "30s"},
    )
    assert minted.status_code == 201, minted.text
    assert ask(on_time, minted.json()["key"]).choices[0].message.content
    [record] = on_time.records_for(minted.json()["id"])
    assert record["decision"] == "allow"
