"""Sub-agent keys carved from a parent, agents seeing themselves, and remote issuing, end to end."""

import asyncio
import os
import subprocess
import sys
import time
from decimal import Decimal

import openai
import pytest

from conftest import REPO, httpx, start_proxy, stop_proxy, write_policy

ISSUER_TOKEN = "ci-issuer-token-for-tests"


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory, monkeypatch_module):
    folder = tmp_path_factory.mktemp("proxy")
    ci_policy = write_policy(folder, "ci", budget_usd=2.0, ttl="30m")
    monkeypatch_module.setenv("AGENTKEYS_TEST_ISSUER", ISSUER_TOKEN)
    running = start_proxy(
        folder, mock, issuers={"github": {"token_env": "AGENTKEYS_TEST_ISSUER", "policies": [str(ci_policy)]}}
    )
    yield running
    stop_proxy(running)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture()
def orchestrator(proxy, tmp_path):
    policy = write_policy(tmp_path, "orchestrator", budget_usd=0.01, max_child_depth=2, max_children=3)
    return proxy.issue(policy)


def control(proxy, method, path, key, **kwargs):
    return httpx.request(
        method, f"{proxy.gateway_url}/_agentkeys/v1{path}", headers={"authorization": f"Bearer {key}"}, **kwargs
    )


def mint(proxy, parent, **request):
    return control(proxy, "POST", "/keys", parent["key"], json={"ttl": "10m", **request})


def chat_client(proxy, key):
    return openai.OpenAI(api_key=key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)


def test_children_spend_concurrently_and_the_tree_never_overspends(proxy, mock, orchestrator):
    children = [mint(proxy, orchestrator, name=f"worker-{i}", budget_usd=0.003) for i in range(3)]
    assert [c.status_code for c in children] == [201, 201, 201]
    keys = [c.json()["key"] for c in children]
    parent = control(proxy, "GET", "/keys/self", orchestrator["key"]).json()
    assert parent["held_usd"] == pytest.approx(0.009) and parent["remaining_usd"] == pytest.approx(0.001)

    async def spend_until_refused(key):
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
        calls = 0
        try:
            while True:
                await client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=200, messages=[{"role": "user", "content": "go"}]
                )
                calls += 1
        except openai.RateLimitError:
            return calls
        finally:
            await client.close()

    async def all_children():
        return await asyncio.gather(*(spend_until_refused(key) for key in keys))

    calls = asyncio.run(all_children())
    assert all(n > 0 for n in calls)
    ledger = proxy.ledger()
    for child in children:
        record = ledger.get_key(child.json()["id"])
        assert record.spent_micros <= record.budget_micros == 3000
    root = ledger.get_key(orchestrator["id"])
    assert root.spent_micros + root.held_micros <= root.budget_micros


def test_a_child_can_only_narrow_its_parent(proxy, orchestrator):
    refusals = {
        "budget_usd": mint(proxy, orchestrator, name="greedy", budget_usd=1.0),
        "models": mint(proxy, orchestrator, name="wide", budget_usd=0.001, models=["gpt-4o"]),
        "endpoints": mint(proxy, orchestrator, name="wide", budget_usd=0.001, endpoints=["POST /v1/embeddings"]),
        "ttl": mint(proxy, orchestrator, name="long", budget_usd=0.001, ttl="2h"),
    }
    for limit, answer in refusals.items():
        assert answer.status_code == 403, (limit, answer.text)
        assert limit in answer.json()["error"]["message"]
    narrowed = mint(proxy, orchestrator, name="narrow", budget_usd=0.001, models=["gpt-4o-mini-2024-07-18"])
    assert narrowed.status_code == 201
    child_self = control(proxy, "GET", "/keys/self", narrowed.json()["key"]).json()
    assert child_self["models"] == ["gpt-4o-mini-2024-07-18"] and child_self["parent_id"] == orchestrator["id"]


def test_depth_and_fan_out_limits(proxy, orchestrator):
    child = mint(proxy, orchestrator, name="c", budget_usd=0.004).json()
    grandchild = mint(proxy, child, name="g", budget_usd=0.001, ttl="5m").json()
    too_deep = mint(proxy, grandchild, name="gg", budget_usd=0.0001, ttl="1m")
    assert too_deep.status_code == 403 and "max_child_depth" in too_deep.json()["error"]["message"]
    for i in range(2):
        assert mint(proxy, orchestrator, name=f"more-{i}", budget_usd=0.001).status_code == 201
    fourth = mint(proxy, orchestrator, name="one-too-many", budget_usd=0.001)
    assert fourth.status_code == 403 and "max_children" in fourth.json()["error"]["message"]


def test_self_shows_the_key_and_its_children_only(proxy, orchestrator, tmp_path):
    child = mint(proxy, orchestrator, name="reader", budget_usd=0.002).json()
    me = control(proxy, "GET", "/keys/self", orchestrator["key"]).json()
    assert me["id"] == orchestrator["id"] and me["budget_usd"] == 0.01
    assert me["endpoints"] == ["POST /v1/chat/completions", "POST /v1/messages", "GET /v1/models"]
    assert [c["id"] for c in me["children"]] == [child["id"]] and "key" not in me["children"][0]
    child_view = control(proxy, "GET", "/keys/self", child["key"]).json()
    assert child_view["children"] == [] and child_view["budget_usd"] == 0.002
    assert orchestrator["key"] not in str(child_view)
    assert control(proxy, "GET", "/keys/self", "ak_nope_nope").status_code == 401
    records = [r for r in proxy.audit() if r["provider"] == "agentkeys"]
    assert any(r["path"] == "/_agentkeys/v1/keys/self" for r in records), "control calls are audited"


def test_revoking_a_parent_cuts_off_every_descendant(proxy, orchestrator):
    child = mint(proxy, orchestrator, name="c", budget_usd=0.004).json()
    grandchild = mint(proxy, child, name="g", budget_usd=0.001, ttl="5m").json()
    chat_client(proxy, grandchild["key"]).chat.completions.create(
        model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert proxy.cli("keys", "revoke", orchestrator["id"]) == 0
    for key in (child, grandchild):
        with pytest.raises(openai.AuthenticationError) as refused:
            chat_client(proxy, key["key"]).chat.completions.create(
                model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        assert "revoked" in refused.value.message


def test_an_expired_childs_unspent_budget_returns_to_the_parent(proxy, orchestrator):
    child = mint(proxy, orchestrator, name="short", budget_usd=0.005, ttl="2s").json()
    chat_client(proxy, child["key"]).chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    [record] = proxy.records_for(child["id"])
    ledger = proxy.ledger()
    assert ledger.get_key(orchestrator["id"]).held_micros == 5000
    deadline = time.monotonic() + 10
    while ledger.get_key(orchestrator["id"]).held_micros and time.monotonic() < deadline:
        time.sleep(0.2)
    parent = ledger.get_key(orchestrator["id"])
    assert parent.held_micros == 0, "the child's grant was not returned"
    assert parent.spent_micros == record["cost_micros"], "what the child spent stays spent by the tree"


def test_an_issuer_token_mints_keys_from_its_policies_only(proxy, mock):
    issued = control(proxy, "POST", "/keys", ISSUER_TOKEN, json={"policy": "ci", "name": "job-7", "budget_usd": 0.5})
    assert issued.status_code == 201, issued.text
    key = issued.json()
    assert key["budget_usd"] == 0.5 and key["name"] == "job-7" and key["key"].startswith("ak_")
    chat_client(proxy, key["key"]).chat.completions.create(
        model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    other = control(proxy, "POST", "/keys", ISSUER_TOKEN, json={"policy": "orchestrator"})
    assert other.status_code == 403 and "may not issue policy orchestrator" in other.json()["error"]["message"]
    greedy = control(proxy, "POST", "/keys", ISSUER_TOKEN, json={"policy": "ci", "budget_usd": 50})
    assert greedy.status_code == 403
    assert control(proxy, "POST", "/keys", "wrong-token", json={"policy": "ci"}).status_code == 401


def test_control_routes_answer_in_proxy_mode_too(proxy, orchestrator, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_bundle))
    with httpx.Client(proxy=proxy.proxy_url) as client:
        me = client.get(
            "https://api.openai.com/_agentkeys/v1/keys/self",
            headers={"authorization": f"Bearer {orchestrator['key']}"},
        )
    assert me.status_code == 200 and me.json()["id"] == orchestrator["id"]


def test_a_key_can_revoke_itself_and_its_children_but_no_other(proxy, orchestrator, tmp_path):
    child = mint(proxy, orchestrator, name="c", budget_usd=0.002).json()
    stranger = proxy.issue(write_policy(tmp_path, "stranger"))
    assert control(proxy, "DELETE", f"/keys/{stranger['id']}", orchestrator["key"]).status_code == 404
    assert control(proxy, "DELETE", f"/keys/{child['id']}", orchestrator["key"]).json()["status"] == "revoked"
    assert control(proxy, "GET", "/keys/self", child["key"]).status_code == 401
    assert control(proxy, "DELETE", "/keys/self", orchestrator["key"]).status_code == 200
    assert control(proxy, "GET", "/keys/self", orchestrator["key"]).status_code == 401
    assert control(proxy, "GET", "/keys/self", stranger["key"]).status_code == 200


def test_the_eval_suite_example_gives_each_case_its_own_slice(proxy, mock, tmp_path):
    suite_policy = write_policy(tmp_path, "suite", budget_usd=0.003, max_child_depth=1, max_children=5)
    suite = proxy.issue(suite_policy)
    example = REPO / "examples" / "eval_suite.py"
    env = {**os.environ, "OPENAI_API_KEY": suite["key"], "AGENTKEYS_URL": proxy.gateway_url}
    env.pop("HTTPS_PROXY", None)
    ran = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "suite suite: $0.003000 for 3 cases, $0.001000 each"
    assert lines[1].startswith("case greeting: spent $0.0000") and "hello" in lines[1]
    assert "refused: agentkeys: budget exhausted" in lines[3], "the runaway case hit its own slice"
    case_spends = [Decimal(line.split("spent $")[1].split(":")[0]) for line in lines[1:4]]
    assert lines[4] == f"suite spent ${sum(case_spends):.6f} of $0.003000", "revoked cases' slices came back"
    record = proxy.ledger().get_key(suite["id"])
    assert record.held_micros == 0 and record.spent_micros == sum(case_spends) * 1_000_000


def test_the_github_action_gives_a_job_its_own_key(proxy, mock, tmp_path):
    """action.yml's script, run as a runner would: the key lands in $GITHUB_ENV, masked, and works."""
    github_env, github_output = tmp_path / "env", tmp_path / "output"
    script = REPO / "scripts" / "github_issue_key.py"
    env = {
        **os.environ,
        "AGENTKEYS_URL": proxy.gateway_url,
        "AGENTKEYS_ISSUER_TOKEN": ISSUER_TOKEN,
        "AGENTKEYS_POLICY": "ci",
        "AGENTKEYS_BUDGET": "0.25",
        "AGENTKEYS_TTL": "10m",
        "GITHUB_ENV": str(github_env),
        "GITHUB_OUTPUT": str(github_output),
        "GITHUB_JOB": "evals",
    }
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    exported = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    key = exported["OPENAI_API_KEY"]
    assert ran.stdout.startswith(f"::add-mask::{key}\n") and key == exported["ANTHROPIC_API_KEY"]
    assert github_output.read_text() == f"key-id={exported['AGENTKEYS_KEY_ID']}\n"
    client = openai.OpenAI(api_key=key, base_url=exported["OPENAI_BASE_URL"], max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    revoked = httpx.delete(
        f"{exported['AGENTKEYS_URL']}/_agentkeys/v1/keys/self", headers={"authorization": f"Bearer {key}"}
    )  # the workflow's `if: always()` step
    assert revoked.status_code == 200
    assert proxy.ledger().get_key(exported["AGENTKEYS_KEY_ID"]).revoked_at is not None
    env["AGENTKEYS_POLICY"] = "orchestrator"
    refused = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert refused.returncode == 1 and "::error::Agent Keys refused the key: 403" in refused.stdout
