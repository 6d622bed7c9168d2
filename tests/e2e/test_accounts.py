"""Accounts on plans, through real proxies: the admin API mints keys for an account, and every one of
them is bound by the account's budget for the period, whatever the concurrency and however many proxies
share the store; a suspended account's keys are refused at once.

As in test_hard_cap, the mock writes the whole `max_tokens`, so a call's worst case is what it costs
and the account's budget pays for a known number of calls.
"""

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests
from redis_server import RedisServer

from agentkeys.ledger import Calendar
from conftest import (
    ANTHROPIC_REAL_KEY,
    OPENAI_REAL_KEY,
    assert_ledger_matches_audit,
    free_port,
    start_proxy,
    stop_proxy,
    write_policy,
)
from mock_provider import MockProvider

TOKEN_ENV = "AGENTKEYS_TEST_ADMIN_TOKEN"
TOKEN = "test-admin-token-0123456789"
KEYS, CALLS = 20, 200
ACCOUNT_BUDGET_USD = 0.00125  # pays for about 20 calls of ~62 µ$
MAX_TOKENS = 100
PROMPT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def mock():
    provider = MockProvider(openai_key=OPENAI_REAL_KEY, anthropic_key=ANTHROPIC_REAL_KEY, output_tokens=10**9).start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module", autouse=True)
def admin_token():
    os.environ[TOKEN_ENV] = TOKEN  # the proxies started here inherit it
    yield
    os.environ.pop(TOKEN_ENV, None)


def plan_files(directory) -> list[str]:
    write_policy(directory, "agent", budget_usd=1.0)
    (directory / "tiny.plan.yaml").write_text(
        f"name: tiny\nbudget_usd: {ACCOUNT_BUDGET_USD}\nperiod: day\npolicies: [agent.policy.yaml]\n"
    )
    return ["*.plan.yaml"]  # relative to the config's folder


def proxy_with_plans(directory, mock, admin: bool = True, **config):
    directory.mkdir(parents=True, exist_ok=True)
    admin_config = {"admin_port": free_port(), "admin_token_env": TOKEN_ENV} if admin else {}
    proxy = start_proxy(
        directory, mock, plans=plan_files(directory), time_zone="Europe/Paris", **admin_config, **config
    )
    proxy.admin_url = f"http://127.0.0.1:{admin_config['admin_port']}" if admin else None
    return proxy


def admin(proxy, method: str, path: str, status: int = 200, **kwargs):
    """One admin API request, retried while its listener is still starting."""
    deadline = time.monotonic() + 15
    while True:
        try:
            answer = requests.request(
                method, proxy.admin_url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10, **kwargs
            )
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the admin API did not start"
            time.sleep(0.05)
    assert answer.status_code == status, answer.text
    return answer.json() if answer.content else None


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    running = proxy_with_plans(tmp_path_factory.mktemp("accounts"), mock)
    yield running
    stop_proxy(running)


async def fire(base_urls: list[str], keys: list[str]) -> list[str]:
    """CALLS chat calls at once, round-robin over the keys and the proxies; each call's outcome."""
    clients = [
        [openai.AsyncOpenAI(api_key=key, base_url=url, max_retries=0, timeout=60) for url in base_urls] for key in keys
    ]

    async def one(i: int) -> str:
        by_key = clients[i % len(keys)]
        try:
            await by_key[i % len(by_key)].chat.completions.create(
                model="gpt-4o-mini", max_tokens=MAX_TOKENS, messages=PROMPT
            )
            return "ok"
        except openai.RateLimitError as refused:
            assert "account load's budget for this period exhausted" in refused.message, refused.message
            return "refused"

    try:
        return await asyncio.gather(*(one(i) for i in range(CALLS)))
    finally:
        for by_key in clients:
            for client in by_key:
                await client.close()


def audit_of_every_call(proxies, key_ids: set[str], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = [r for proxy in proxies for r in proxy.audit() if r["key_id"] in key_ids]
        if len(records) >= CALLS or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def assert_account_cap(proxies, mock, keys: list[dict], outcomes: list[str]) -> None:
    """The account's period never spent more than its budget; every call audited once; for each key and for
    the account, the store's spend equals the audit's to the micro-dollar, nothing left held."""
    key_ids = {key["id"] for key in keys}
    audit = audit_of_every_call(proxies, key_ids)
    allowed = [r for r in audit if r["decision"] == "allow"]
    assert len(audit) == CALLS
    assert outcomes.count("ok") == len(allowed) == len(mock.reported)
    assert all(r["status"] == 429 for r in audit if r["decision"] == "deny")
    for key in keys:
        assert_ledger_matches_audit(proxies[0], key["id"], audit)
    usage = admin(proxies[0], "GET", "/accounts/load/usage")
    (period,) = usage["periods"]
    assert period["id"] == Calendar("Europe/Paris").period("day", time.time()).period_id
    spent = round(period["spent_usd"] * 1_000_000)
    assert spent == sum(r["cost_micros"] for r in allowed) and period["held_usd"] == 0
    assert spent <= round(ACCOUNT_BUDGET_USD * 1_000_000)
    hold = max(r["hold_micros"] for r in allowed)
    assert len(allowed) >= round(ACCOUNT_BUDGET_USD * 1_000_000) // hold, "the budget paid for fewer calls than fit"
    assert len({r["key_id"] for r in allowed}) > 1, "the account's budget was shared by its keys"


def account_with_keys(proxy) -> list[dict]:
    admin(proxy, "POST", "/accounts", 201, json={"account_id": "load", "plan": "tiny"})
    return [admin(proxy, "POST", "/accounts/load/keys", 201, json={"budget_usd": 1, "ttl": "1h"}) for _ in range(KEYS)]


def test_200_concurrent_calls_across_20_keys_of_one_account_never_exceed_its_period_budget(proxy, mock):
    keys = account_with_keys(proxy)
    outcomes = asyncio.run(fire([f"{proxy.gateway_url}/openai/v1"], [key["key"] for key in keys]))
    assert_account_cap([proxy], mock, keys, outcomes)


def test_the_same_through_three_proxies_sharing_redis(mock, tmp_path):
    with RedisServer() as redis_server:
        proxies = [
            proxy_with_plans(tmp_path / f"proxy{i}", mock, admin=i == 0, store=redis_server.url) for i in range(3)
        ]
        try:
            keys = account_with_keys(proxies[0])
            urls = [f"{proxy.gateway_url}/openai/v1" for proxy in proxies]
            outcomes = asyncio.run(fire(urls, [key["key"] for key in keys]))
            assert_account_cap(proxies, mock, keys, outcomes)
            assert all(proxy.audit() for proxy in proxies), "every replica took part"
        finally:
            for running in proxies:
                stop_proxy(running)


def test_a_suspended_accounts_keys_are_refused_at_once_and_audited(proxy, mock):
    admin(proxy, "POST", "/accounts", 201, json={"account_id": "suspended-soon", "plan": "tiny"})
    key = admin(proxy, "POST", "/accounts/suspended-soon/keys", 201, json={})
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=PROMPT)
    admin(proxy, "POST", "/accounts/suspended-soon/suspend")
    for listing in (False, True):  # a metered call, and one the provider does not bill
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.models.list() if listing else client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, messages=PROMPT
            )
        assert "account suspended-soon is suspended" in refused.value.message
    records = proxy.records_for(key["id"], 3)
    assert [(r["decision"], r["status"]) for r in records] == [("allow", 200), ("deny", 403), ("deny", 403)]
    assert "suspended" in records[-1]["reason"] and {r["account_id"] for r in records} == {"suspended-soon"}
    admin(proxy, "POST", "/accounts/suspended-soon/resume")
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=PROMPT)
    assert_ledger_matches_audit(proxy, key["id"])


def test_the_admin_api_is_not_served_on_the_agents_listeners(proxy):
    answer = requests.get(f"{proxy.gateway_url}/accounts", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert answer.status_code != 200 and "plan" not in answer.text
    assert requests.get(proxy.admin_url + "/accounts", timeout=10).status_code == 401


def test_the_saas_backend_example_signs_a_user_up_runs_agents_and_shows_their_spend(proxy, mock):
    example = Path(__file__).resolve().parents[2] / "examples" / "saas_backend.py"
    env = {**os.environ, "AGENTKEYS_ADMIN_URL": proxy.admin_url, "AGENTKEYS_ADMIN_TOKEN": TOKEN,
           "AGENTKEYS_URL": proxy.gateway_url}  # fmt: skip
    env.pop("HTTPS_PROXY", None)
    tasks = ["Say hello.", "Say goodbye."]
    ran = subprocess.run([sys.executable, str(example), "ada", "tiny", *tasks], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == f"user ada: plan tiny, ${ACCOUNT_BUDGET_USD:.6f} per day"
    assert all(line.startswith("run: ") and "refused" not in line for line in lines[1:3])
    keys = admin(proxy, "GET", "/accounts/ada/keys")
    assert len(keys) == 2 and all(key["status"] == "revoked" for key in keys)  # one key per run, revoked after
    for key in keys:
        assert_ledger_matches_audit(proxy, key["id"])
    spent = sum(key["spent_usd"] for key in keys)
    assert lines[3].startswith(f"user ada: spent ${spent:.6f} of ${ACCOUNT_BUDGET_USD:.6f} in period ")


def cli_json(proxy, *args: str) -> dict | list:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert proxy.cli("accounts", *args, "--json") == 0
    return json.loads(out.getvalue())


def test_the_accounts_cli_does_what_the_admin_api_does(proxy, mock, capsys):
    assert cli_json(proxy, "create", "cli-user", "--plan", "tiny", "--name", "Cli")["plan"] == "tiny"
    assert proxy.cli("accounts", "create", "cli-user", "--plan", "tiny") == 1
    assert proxy.cli("accounts", "create", "other", "--plan", "gold") == 1
    assert "no plan 'gold' (plans: " in capsys.readouterr().err
    key = cli_json(proxy, "mint", "cli-user", "--ttl", "10m", "--budget", "0.5")
    assert (key["account_id"], key["budget_usd"]) == ("cli-user", 0.5)
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=PROMPT)
    assert cli_json(proxy, "top-up", "cli-user", "0.001")["top_up_usd"] == 0.001
    assert cli_json(proxy, "suspend", "cli-user")["status"] == "suspended"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=PROMPT)
    assert cli_json(proxy, "resume", "cli-user")["status"] == "active"
    assert_ledger_matches_audit(proxy, key["id"])
    (period,) = cli_json(proxy, "usage", "cli-user")["periods"]
    assert round(period["spent_usd"] * 1_000_000) == proxy.ledger().get_key(key["id"]).spent_micros > 0
    assert period["budget_usd"] == 0.00225  # the plan's $0.00125 and the top-up
    assert [k["id"] for k in cli_json(proxy, "keys", "cli-user")] == [key["id"]]
    assert proxy.cli("accounts", "delete", "cli-user") == 0
    assert proxy.ledger().get_key(key["id"]).revoked_at is not None
    assert proxy.cli("accounts", "show", "cli-user") == 1


def test_a_reload_brings_a_new_plan_to_the_admin_api(proxy):
    admin(proxy, "POST", "/accounts", 400, json={"account_id": "later", "plan": "bigger"})
    (proxy.dir / "bigger.plan.yaml").write_text(
        "name: bigger\nbudget_usd: 3\nperiod: week\npolicies: [agent.policy.yaml]\n"
    )
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while (
        requests.post(
            proxy.admin_url + "/accounts", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
            json={"account_id": "later", "plan": "bigger"},
        ).status_code
        != 201
    ):  # fmt: skip
        assert time.monotonic() < deadline, "the reload did not bring the new plan"
        time.sleep(0.1)
    account = admin(proxy, "GET", "/accounts/later")
    assert (account["plan"], account["period"], account["budget_usd"]) == ("bigger", "week", 3)
