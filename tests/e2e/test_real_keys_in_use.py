"""Real keys in use (`real_keys: audit`): a call carrying a real provider key is passed on untouched,
recorded with the key's fingerprint (never the key) and its tokens and cost, and `audit report
--real-keys` lists what to migrate. Scoped keys are governed as ever beside them."""

import contextlib
import io
import json
import re

import anthropic
import openai
import pytest

from conftest import (
    ANTHROPIC_REAL_KEY,
    OPENAI_REAL_KEY,
    OTHER_REAL_KEYS,
    billed,
    running_proxy,
    settled,
    write_policy,
)
from prices import expected_cost

TEAM_KEY = OTHER_REAL_KEYS["GROQ_API_KEY"]  # a real key the proxy does not hold, which the mock accepts
REAL_KEYS = (OPENAI_REAL_KEY, ANTHROPIC_REAL_KEY, TEAM_KEY)


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, real_keys="audit") as running:
        yield running
    assert not re.search(r'File ".*/agentkeys/', running.log_path.read_text()), "the addon raised"
    for real_key in REAL_KEYS:
        assert real_key not in running.log_path.read_text(), "a real key reached the proxy's log"
        for written in running.dir.glob("audit*.jsonl"):
            assert real_key not in written.read_text(), "a real key reached the audit log"
        assert real_key.encode() not in (running.dir / "agentkeys.db").read_bytes(), "a real key reached the store"


def real_key_records(proxy, count: int) -> list[dict]:
    records = [r for r in proxy.audit() if r.get("real_key")]
    assert len(records) >= count, records
    return records


def fingerprint_shape(record: dict, provider: str, key: str) -> None:
    prefix, _, tail = record["real_key"].partition("…")
    assert prefix.startswith(f"{provider}:") and len(prefix) == len(provider) + 13
    assert tail == key[-4:]


def test_a_real_openai_key_is_passed_on_untouched_and_fingerprinted_with_its_usage(proxy, mock):
    client = openai.OpenAI(api_key=TEAM_KEY, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=7, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert reply.choices[0].message.content
    [received] = mock.received
    assert received.headers["authorization"] == f"Bearer {TEAM_KEY}", "the agent's own key reached the provider"
    assert received.json["max_tokens"] == 7 and "stream_options" not in received.json, "the body went as sent"
    [record] = real_key_records(proxy, 1)
    fingerprint_shape(record, "openai", TEAM_KEY)
    usage = billed(mock)
    assert (record["decision"], record["status"], record["metering"]) == ("pass", 200, "real_key")
    assert (record["model"], record["path"], record["method"]) == ("gpt-4o-mini", "/v1/chat/completions", "POST")
    assert (record["input_tokens"], record["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert record["cost_micros"] == expected_cost("gpt-4o-mini", input=usage.input_tokens, output=usage.output_tokens)
    assert record["client"].startswith("127.0.0.1:") and record["host"] == "127.0.0.1"
    assert record["request_bytes"] == len(received.body) and record["response_bytes"] > 0
    assert record["key_id"] is None


def test_through_https_proxy_the_host_is_the_providers_the_client_dialled(proxy, mock, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.proxy_url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
    client = openai.OpenAI(api_key=TEAM_KEY, max_retries=0)  # no base URL: api.openai.com, through the proxy
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert mock.received[-1].headers["authorization"] == f"Bearer {TEAM_KEY}"
    record = real_key_records(proxy, 2)[-1]
    assert (record["host"], record["decision"], record["path"]) == ("api.openai.com", "pass", "/v1/chat/completions")
    assert record["output_tokens"] == billed(mock).output_tokens


def test_a_streamed_call_and_an_anthropic_key_are_metered_from_their_usage(proxy, mock):
    openai_client = openai.OpenAI(api_key=OPENAI_REAL_KEY, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello"}],
    )  # fmt: skip
    assert [chunk for chunk in stream]
    streamed = billed(mock)
    client = anthropic.Anthropic(api_key=ANTHROPIC_REAL_KEY, base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)
    client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    sent = mock.received[-1].headers  # the SDK's own choice of header, as it sent it
    assert ANTHROPIC_REAL_KEY in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))
    records = real_key_records(proxy, 4)[-2:]
    records.sort(key=lambda r: r["provider"], reverse=True)  # openai, anthropic
    assert [r["provider"] for r in records] == ["openai", "anthropic"]
    assert (records[0]["output_tokens"], records[0]["response_bytes"]) == (streamed.output_tokens, None)
    fingerprint_shape(records[1], "anthropic", ANTHROPIC_REAL_KEY)
    usage = billed(mock)
    cost = expected_cost("claude-haiku-4-5", input=usage.input_tokens, output=usage.output_tokens)
    assert records[1]["cost_micros"] == cost > 0


def test_a_scoped_key_is_governed_as_ever_beside_real_keys(proxy, mock, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "scoped"))
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}", "the proxy's key went up"
    assert settled(proxy, key)["real_key"] is None
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def test_report_real_keys_lists_each_fingerprint_from_where_how_often_and_at_what_cost(proxy, mock):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert proxy.cli("audit", "report", "--real-keys", "--json") == 0
    listed = json.loads(out.getvalue())
    records = real_key_records(proxy, 4)
    assert set(listed) == {r["real_key"] for r in records} and len(listed) == 3
    team = next(use for fingerprint, use in listed.items() if fingerprint.endswith(TEAM_KEY[-4:]))
    mine = [r for r in records if r["real_key"].endswith(TEAM_KEY[-4:])]
    assert team["calls"] == len(mine) and team["clients"] == {"127.0.0.1": len(mine)}
    assert team["provider"] == "openai" and team["input_tokens"] == sum(r["input_tokens"] for r in mine)
    assert team["cost_usd"] * 1_000_000 == pytest.approx(sum(r["cost_micros"] for r in mine))
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert proxy.cli("audit", "report", "--real-keys") == 0
    assert table.getvalue().startswith("real_key") and all(key not in table.getvalue() for key in REAL_KEYS)
