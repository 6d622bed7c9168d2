"""Whoever can write to Redis cannot grant a key more than a proxy did: records are sealed (seal.py).

Two replicas on one Redis: one has the key's record cached (it served a call), the other reads it
afresh. A record edited in Redis, or planted there, is refused by both, and each refusal audited.
"""

import json

import openai
import pytest
import redis
from redis_server import RedisServer

from agentkeys import credentials
from conftest import start_proxy, stop_proxy, write_policy


@pytest.fixture(scope="module")
def replicas(mock, tmp_path_factory):
    with RedisServer() as server:
        cached = start_proxy(tmp_path_factory.mktemp("cached"), mock, store=server.url)
        fresh = start_proxy(tmp_path_factory.mktemp("fresh"), mock, store=server.url)
        try:
            yield server, cached, fresh
        finally:
            stop_proxy(fresh)
            stop_proxy(cached)


def ask(proxy, key: str):
    client = openai.OpenAI(api_key=key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
    )


def assert_refused_as_altered(proxy, key: str, key_id: str) -> None:
    with pytest.raises(openai.AuthenticationError, match="altered outside the proxy"):
        ask(proxy, key)
    denied = [r for r in proxy.records_for(key_id) if r["decision"] == "deny"]
    assert denied and "altered outside the proxy" in denied[-1]["reason"]


@pytest.mark.parametrize(
    "edit",
    [{"budget_micros": 10**9}, {"policy_json": json.dumps({"name": "test", "models": ["*"]})}],
    ids=["budget-raised", "policy-edited"],
)
def test_a_record_edited_in_redis_is_refused_by_every_replica_cached_or_not(replicas, mock, tmp_path, edit):
    server, cached, fresh = replicas
    key = cached.issue(write_policy(tmp_path))
    ask(cached, key["key"])  # its record is now cached there
    mock.reset()
    with redis.Redis(port=server.port) as raw:
        raw.hset(f"agentkeys:key:{key['id']}", mapping=edit)
    assert_refused_as_altered(cached, key["key"], key["id"])
    assert_refused_as_altered(fresh, key["key"], key["id"])
    assert mock.received == []


def test_a_record_planted_in_redis_for_a_key_someone_holds_is_refused(replicas, mock, tmp_path):
    server, cached, fresh = replicas
    genuine = cached.issue(write_policy(tmp_path))
    minted = credentials.mint()
    with redis.Redis(port=server.port, decode_responses=True) as raw:
        record = raw.hgetall(f"agentkeys:key:{genuine['id']}")  # a real record, its seal and all, as a template
        planted = {**record, "key_id": minted.key_id, "key_hash": minted.key_hash, "budget_micros": 10**9}
        raw.hset(f"agentkeys:key:{minted.key_id}", mapping=planted)
    for proxy in (cached, fresh):
        assert_refused_as_altered(proxy, minted.key, minted.key_id)
    assert mock.received == []
