"""Shadow mode, as a security team rolls enforcement out: calls a policy would refuse reach the provider,
metered and charged as usual, audited `would_deny` with each rule they broke and counted by rule;
what cannot be forwarded safely is refused as ever; switching to enforce (and back) is a reload."""

import json
import re
import signal
import time

import anthropic
import openai
import pytest
import yaml

from conftest import (
    assert_ledger_matches_audit,
    billed,
    httpx,
    running_proxy,
    settled,
    write_policy,
)
from prices import expected_cost

ROLLOUT = {
    "providers": ["openai"],
    "endpoints": ["POST /v1/chat/completions", "POST /v1/messages"],
    "models": ["gpt-4o-mini*", "claude-haiku-4-5*", "text-embedding-3-small"],
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "rollout", enforcement="shadow", **ROLLOUT)


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory, policy):
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, policies=[str(policy)]) as running:
        yield running
    assert not re.search(r'File ".*/agentkeys/', running.log_path.read_text()), "the addon raised"


def openai_client(proxy, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)


def chat(proxy, key, model="gpt-4o-mini", **kwargs):
    messages = [{"role": "user", "content": "Say hello"}]
    return openai_client(proxy, key).chat.completions.create(model=model, messages=messages, **kwargs)


def would_deny_count(proxy, rule: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10).text
    pattern = rf'agentkeys_would_deny_total\{{policy="rollout",provider="\w+",reason="{rule}"\}} (\S+)'
    return sum(float(value) for value in re.findall(pattern, text))


def assert_would_deny(proxy, mock, key, rules: list[str], model: str, provider: str = "openai") -> dict:
    """The call reached the provider, was charged what it billed, and was audited as a would-be refusal."""
    assert len(mock.received) == 1, "the call was forwarded"
    record = settled(proxy, key)
    assert record["decision"] == "would_deny" and record["would_deny"] == rules, record
    assert record["status"] == 200 and record["metering"] == "usage"
    usage = billed(mock)
    assert record["cost_micros"] == expected_cost(model, provider, input=usage.input_tokens, output=usage.output_tokens)
    assert record["cost_micros"] > 0 and record["reason"].startswith("would deny: ")
    return record


@pytest.mark.parametrize(
    ("rule", "call"),
    [
        ("model", lambda proxy, key: chat(proxy, key, model="gpt-4o", max_tokens=5)),
        ("endpoint", lambda proxy, key: openai_client(proxy, key).embeddings.create(
            model="text-embedding-3-small", input="hello")),
    ],
)  # fmt: skip
def test_a_call_a_rule_would_refuse_reaches_the_provider_and_is_audited_would_deny(proxy, mock, policy, rule, call):
    key = proxy.issue(policy)
    before = would_deny_count(proxy, rule)
    call(proxy, key)
    model = mock.reported[-1]["model"]
    record = assert_would_deny(proxy, mock, key, [rule], model)
    assert "not allowed by policy rollout" in record["reason"]
    assert would_deny_count(proxy, rule) == before + 1


def test_a_streamed_call_a_rule_would_refuse_is_relayed_metered_and_charged(proxy, mock, policy):
    key = proxy.issue(policy)
    stream = chat(proxy, key, model="gpt-4o", max_tokens=5, stream=True)
    assert [chunk for chunk in stream]
    record = assert_would_deny(proxy, mock, key, ["model"], "gpt-4o")
    assert record["output_tokens"] == billed(mock).output_tokens > 0


def test_a_provider_the_policy_does_not_list_is_shadowed(proxy, mock, policy):
    key = proxy.issue(policy)
    client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)
    client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    record = assert_would_deny(proxy, mock, key, ["provider"], "claude-haiku-4-5", "anthropic")
    assert "provider anthropic is not allowed" in record["reason"]


def test_an_exhausted_budget_is_shadowed_and_the_overspend_charged_and_reported(proxy, mock, policy):
    key = proxy.issue(policy, "--budget", "0.000002")  # less than a call costs
    chat(proxy, key, max_tokens=1000)
    first = assert_would_deny(proxy, mock, key, ["budget"], "gpt-4o-mini")
    assert "budget exhausted" in first["reason"] and first["hold_micros"] > 10  # the worst case was held anyway
    mock.reset()
    chat(proxy, key, max_tokens=1000)
    records = proxy.records_for(key["id"], 2)
    assert [r["would_deny"] for r in records] == [["budget"], ["budget"]]
    assert "overspent by" in records[-1]["reason"]
    stored = assert_ledger_matches_audit(proxy, key["id"])
    assert stored.spent_micros == sum(r["cost_micros"] for r in records) > stored.budget_micros


@pytest.mark.parametrize("kept_in_step", [True, False], ids=["policy-file-in-config", "issued-copy-only"])
def test_an_expired_key_is_shadowed_and_not_purged(proxy, mock, policy, tmp_path, kept_in_step):
    """Whether the proxy keeps the policy's file in step (config `policies:`) or knows only the key's copy."""
    key = proxy.issue(policy if kept_in_step else write_policy(tmp_path, "adhoc", enforcement="shadow"), "--ttl", "1s")
    time.sleep(2.5)  # past its expiry, and past a purge (purge_interval 1s), which keeps a key in shadow
    chat(proxy, key, max_tokens=5)
    record = assert_would_deny(proxy, mock, key, ["expired"], "gpt-4o-mini")
    assert f"agent key {key['id']} is expired" in record["reason"]


def test_one_call_breaking_several_rules_names_each(proxy, mock, policy):
    key = proxy.issue(policy, "--budget", "0.00001")
    chat(proxy, key, model="gpt-4o", max_tokens=1000)
    assert_would_deny(proxy, mock, key, ["model", "budget"], "gpt-4o")


@pytest.mark.parametrize(
    ("what", "send", "status"),
    [
        ("an unknown key", lambda proxy, key: chat_raw(proxy, "ak_0123456789ab_forged", b'{"model":"gpt-4o-mini"}'),
         401),
        ("a revoked key", lambda proxy, key: revoke_then_chat(proxy, key), 401),
        ("a body that is not JSON", lambda proxy, key: chat_raw(proxy, key["key"], b"{not json"), 400),
        ("an endpoint that cannot be metered", lambda proxy, key: httpx.post(
            f"{proxy.gateway_url}/openai/v1/images/generations", headers={"authorization": f"Bearer {key['key']}"},
            json={"prompt": "a cat"}, timeout=10), 403),
        ("a model without a price", lambda proxy, key: chat_raw(
            proxy, key["key"], chat_body("gpt-4o-mini-unpriced")), 403),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)  # fmt: skip
def test_what_cannot_be_forwarded_safely_is_refused_in_shadow_too(proxy, mock, policy, what, send, status):
    key = proxy.issue(policy)
    answer = send(proxy, key)
    assert answer.status_code == status, answer.text
    assert mock.received == [], f"{what} was forwarded"
    denials = [r for r in proxy.audit() if r["decision"] == "deny" and r["ts"] > time.time() - 10]
    assert denials and denials[-1]["would_deny"] is None


def chat_raw(proxy, key: str, body: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return httpx.post(f"{proxy.gateway_url}/openai/v1/chat/completions", headers=headers, content=body, timeout=10)


def revoke_then_chat(proxy, key) -> httpx.Response:
    assert proxy.cli("keys", "revoke", key["id"]) == 0
    return chat_raw(proxy, key["key"], chat_body("gpt-4o-mini"))


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()


def reload(proxy, edit) -> None:
    """Edit a file, send SIGHUP, and wait for the proxy to say it reloaded: the same process goes on."""
    already = proxy.log_path.read_text().count("reloaded the config")
    edit()
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log_path.read_text().count("reloaded the config") == already:
        assert time.monotonic() < deadline, proxy.log_path.read_text()
        time.sleep(0.1)
    assert proxy.process.poll() is None


def test_switching_from_shadow_to_enforce_and_back_is_a_reload(proxy, mock, policy):
    key = proxy.issue(policy)  # issued in shadow: its copy of the policy says so
    original, config = policy.read_text(), proxy.config_path.read_text()
    pid = proxy.process.pid
    try:
        reload(proxy, lambda: write_policy(policy.parent, "rollout", enforcement="enforce", **ROLLOUT))
        with pytest.raises(openai.PermissionDeniedError, match="model gpt-4o is not allowed"):
            chat(proxy, key, model="gpt-4o", max_tokens=5)
        assert mock.received == []
        assert proxy.records_for(key["id"])[-1]["decision"] == "deny"

        # The policy leaves it to the config, which says shadow: every key of every policy is shadowed.
        def config_says_shadow():
            write_policy(policy.parent, "rollout", **ROLLOUT)
            proxy.config_path.write_text(yaml.safe_dump({**yaml.safe_load(config), "enforcement": "shadow"}))

        reload(proxy, config_says_shadow)
        chat(proxy, key, model="gpt-4o", max_tokens=5)
        assert len(mock.received) == 1
        records = proxy.records_for(key["id"], 2)
        assert [r["decision"] for r in records] == ["deny", "would_deny"]
        assert proxy.process.pid == pid
    finally:
        policy.write_text(original)
        proxy.config_path.write_text(config)
        reload(proxy, lambda: None)
    assert_ledger_matches_audit(proxy, key["id"])
