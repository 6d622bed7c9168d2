"""The `agentkeys` command as a user runs it: serve, keys, policy check, ca."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from agentkeys.cli import main as agentkeys_main
from agentkeys.keys import new_key_record
from agentkeys.ledger import open_ledger
from agentkeys.policy import load_config, load_policy
from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY, REPO, free_port, wait_for_port, write_policy

AGENTKEYS = Path(sys.executable).with_name("agentkeys")


def run(*args, cwd=None):
    return subprocess.run([str(AGENTKEYS), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.fixture()
def config(tmp_path, mock):
    path = tmp_path / "agentkeys.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "proxy_port": free_port(),
                "gateway_port": free_port(),
                "metrics_port": 0,
                "store": "sqlite:///var/keys.db",
                "providers": {"openai": {"upstream": mock.url}, "anthropic": {"upstream": mock.url}},
            }
        )
    )
    return path


@contextlib.contextmanager
def serving(config: Path, tmp_path: Path):
    """`agentkeys serve` on `config` for the block: its settings, and an OpenAI client on its gateway with a
    fresh key. Its output is in tmp_path/serve.log once the block ends."""
    settings = yaml.safe_load(config.read_text())
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_REAL_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_REAL_KEY}
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [str(AGENTKEYS), "serve", "--config", str(config)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_for_port(settings["gateway_port"], server, log)
        wait_for_port(settings["proxy_port"], server, log)
        key = json.loads(run("--config", str(config), "keys", "issue", str(write_policy(tmp_path)), "--json").stdout)
        with openai.OpenAI(
            api_key=key["key"], base_url=f"http://127.0.0.1:{settings['gateway_port']}/openai/v1", max_retries=0
        ) as client:
            yield settings, client
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=15)


def small_chat(client: openai.OpenAI):
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )


def test_serve_runs_both_listeners_and_enforces(config, mock, tmp_path):
    with serving(config, tmp_path) as (settings, client):
        assert small_chat(client).choices[0].message.content == "hello hello"
        assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
        assert (tmp_path / "var" / "keys.db").exists() and (tmp_path / "audit.jsonl").exists()
    printed = (tmp_path / "serve.log").read_text()
    assert f"export HTTPS_PROXY=http://127.0.0.1:{settings['proxy_port']}" in printed
    assert f"http://127.0.0.1:{settings['gateway_port']}/openai/v1" in printed
    assert OPENAI_REAL_KEY not in printed


def test_serve_on_a_busy_port_says_so_and_exits(config, tmp_path):
    settings = yaml.safe_load(config.read_text())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings["proxy_port"]))
        taken.listen()
        server = run("--config", str(config), "serve")
    assert server.returncode == 1
    assert f"failed to listen on 127.0.0.1:{settings['proxy_port']}" in server.stdout + server.stderr


def with_mitmproxy_options(config: Path, **options) -> None:
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "mitmproxy": options}))


@pytest.mark.parametrize(
    "verbosity, shown, hidden", [("warn", "", "listening at"), ("debug", "closing transports", "")]
)
def test_serve_passes_the_configs_mitmproxy_options_on(config, tmp_path, verbosity, shown, hidden):
    with_mitmproxy_options(config, termlog_verbosity=verbosity)
    with serving(config, tmp_path) as (_, client):
        small_chat(client)
    printed = (tmp_path / "serve.log").read_text()
    assert "gateway mode on" in printed  # agentkeys' own banner, whatever mitmproxy's verbosity
    assert shown in printed and (not hidden or hidden not in printed), printed


@pytest.mark.parametrize(
    "options, message",
    [
        ({"no_such_option": 1}, "no such mitmproxy option in agentkeys serve: no_such_option"),
        ({"ssl_insecure": "maybe"}, "Expected <class 'bool'> for ssl_insecure"),
    ],
)
def test_serve_refuses_a_bad_mitmproxy_option(config, options, message):
    with_mitmproxy_options(config, **options)
    server = run("--config", str(config), "serve")
    assert server.returncode == 2
    assert message in server.stderr


def test_keys_issue_list_show_revoke(config, tmp_path):
    policy = write_policy(tmp_path, "ci", budget_usd=2.5)
    issued = run(
        "--config", str(config), "keys", "issue", str(policy), "--ttl", "30m", "--name", "job-42", "--create-store"
    )
    key = issued.stdout.strip()
    assert issued.returncode == 0 and key.startswith("ak_")
    assert "shown only once" in issued.stderr and "$2.500000" in issued.stderr
    key_id = key.split("_")[1]
    db = (tmp_path / "var" / "keys.db").read_bytes()
    assert key.encode() not in db, "only the key's hash may be stored"

    ledger = open_ledger(load_config(config).store_url)
    ledger.settle(ledger.reserve(key_id, 9, time.time()).hold_id, 9)  # a call that cost $0.000009
    listing = run("--config", str(config), "keys", "list")
    assert "job-42" in listing.stdout and key_id in listing.stdout and "active" in listing.stdout
    assert listing.stdout.splitlines()[1].split()[-4:] == ["2.500000", "0.000009", "0.000000", "2.499991"]
    assert key not in listing.stdout
    shown = json.loads(run("--config", str(config), "keys", "show", key_id, "--json").stdout)
    assert shown["budget_usd"] == 2.5 and shown["remaining_usd"] == 2.499991 and shown["policy"] == "ci"

    assert run("--config", str(config), "keys", "revoke", key_id).returncode == 0
    assert json.loads(run("--config", str(config), "keys", "list", "--json").stdout)[0]["status"] == "revoked"
    assert run("--config", str(config), "keys", "revoke", key_id).returncode == 1
    assert run("--config", str(config), "keys", "show", "nope").returncode == 1


def test_keys_list_pages_and_filters_without_reading_past_the_page(config, tmp_path, cli, monkeypatch):
    policy, other = write_policy(tmp_path, "ci"), write_policy(tmp_path, "other")
    ids = [json.loads(cli("--config", str(config), "keys", "issue", str(policy if i % 2 else other), "--json",
                          "--create-store").stdout)["id"] for i in range(7)]  # fmt: skip

    def listed(*args: str) -> list[str]:
        return [key["id"] for key in json.loads(cli("--config", str(config), "keys", "list", "--json", *args).stdout)]

    assert listed() == ids
    assert listed("--limit", "3") == ids[:3]
    page = cli("--config", str(config), "keys", "list", "--limit", "3", "--offset", "3")
    assert "the next ones: --offset 6" in page.stderr
    assert listed("--limit", "3", "--offset", "6") == ids[6:]
    assert listed("--policy", "ci", "--limit", "2", "--offset", "1") == ids[1::2][1:3]
    monkeypatch.setattr("agentkeys.cli.LIST_PAGE", 2)  # a filtered listing reads the store a page at a time
    assert listed("--policy", "other") == ids[0::2]
    with pytest.raises(SystemExit) as refused:
        cli("--config", str(config), "keys", "list", "--offset", "-1")
    assert refused.value.code == 2


def test_policy_check_accepts_the_shipped_policies():
    checked = run("policy", "check", *map(str, sorted((REPO / "policies").glob("*.policy.yaml"))), cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count("ok: ") == len(list((REPO / "policies").glob("*.policy.yaml")))


def test_policy_check_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.policy.yaml"
    bad.write_text("name: bad\nbudget_usd: -1\nproviders: [openai, nosuch]\nendpoints:\n  - chat\nmodels: ['*']\n")
    checked = run("policy", "check", str(bad), str(write_policy(tmp_path)), cwd=tmp_path)
    assert checked.returncode == 1
    assert f"{bad}:2: budget_usd: Input should be greater than 0" in checked.stderr
    assert f"{bad}:5: endpoints.0:" in checked.stderr
    assert "ok: " in checked.stdout, "the valid file is still reported valid"


def test_policy_check_refuses_unknown_providers(tmp_path):
    checked = run("policy", "check", str(write_policy(tmp_path, providers=["nosuch"])), cwd=tmp_path)
    assert checked.returncode == 1 and "unknown provider(s) nosuch" in checked.stderr


def test_a_bad_config_names_file_line_and_field(tmp_path):
    config = tmp_path / "agentkeys.yaml"
    config.write_text("proxy_port: 8080\negress: sometimes\n")
    result = run("--config", str(config), "keys", "list")
    assert result.returncode == 2 and f"{config}:2: egress:" in result.stderr


def test_ca_prints_the_bundle_and_environment(config, tmp_path):
    shown = run("--config", str(config), "ca")
    assert shown.returncode == 0
    bundle = tmp_path / "certs" / "agentkeys-ca-bundle.pem"
    ca = (tmp_path / "certs" / "mitmproxy-ca-cert.pem").read_text()
    assert f"export SSL_CERT_FILE={bundle}" in shown.stdout and f"export REQUESTS_CA_BUNDLE={bundle}" in shown.stdout
    assert "export NODE_EXTRA_CA_CERTS=" in shown.stdout
    assert ca in bundle.read_text() and bundle.read_text().count("BEGIN CERTIFICATE") > 10


@pytest.fixture()
def cli(capsys):
    """The `agentkeys` command in this process (no interpreter to start): `run`'s answer, faster."""

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        status = agentkeys_main(list(args))
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, printed.out, printed.err)

    return call


def test_version_names_agentkeys_mitmproxy_and_python():
    shown = run("--version")
    assert shown.returncode == 0
    assert re.fullmatch(r"agentkeys \d+\.\d+\.\d+ \(mitmproxy \d+\.\S+, Python 3\.\d+\.\S+\)\n", shown.stdout)


@pytest.mark.parametrize("command", [["serve"], ["ca"], ["probe"], ["keys", "list"]])
def test_each_commands_help_lists_its_options(command):
    helped = run(*command, "--help")
    assert helped.returncode == 0 and "options:" in helped.stdout
    assert "--config FILE" in helped.stdout or command == ["keys", "list"]
    if command == ["keys", "list"]:
        assert all(option in helped.stdout for option in ("--status", "--policy", "--parent", "--json"))


def test_keys_show_takes_the_key_itself_but_not_another_secret_with_its_id(config, tmp_path, cli):
    issued = json.loads(
        cli("--config", str(config), "keys", "issue", "--create-store", str(write_policy(tmp_path)), "--json").stdout
    )
    shown = cli("--config", str(config), "keys", "show", issued["key"], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == issued["id"]
    prefix, key_id, secret = issued["key"].split("_", 2)
    forged = f"{prefix}_{key_id}_{secret[::-1]}"
    refused = cli("--config", str(config), "keys", "show", forged)
    assert refused.returncode == 1 and f"no key {key_id}" in refused.stderr and forged not in refused.stderr


def issue_child(config: Path, parent_id: str, policy: Path) -> str:
    ledger = open_ledger(load_config(config).store_url)
    parent = ledger.get_key(parent_id)
    child = new_key_record(load_policy(policy), 600, 0.25, "child", time.time(), parent)
    assert ledger.create_child(child.record, 10, time.time()) is None
    return child.record.key_id


def test_keys_list_filters_by_status_policy_and_parent_and_shows_parent_ids(config, tmp_path, cli):
    agents, ci = write_policy(tmp_path, "agents", max_child_depth=1), write_policy(tmp_path, "ci")
    parent = json.loads(cli("--config", str(config), "keys", "issue", "--create-store", str(agents), "--json").stdout)[
        "id"
    ]
    child = issue_child(config, parent, agents)
    other = json.loads(cli("--config", str(config), "keys", "issue", str(ci), "--json").stdout)["id"]
    assert cli("--config", str(config), "keys", "revoke", other).returncode == 0

    def listed(*filters: str) -> list[dict]:
        shown = cli("--config", str(config), "keys", "list", "--json", *filters)
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)

    assert {k["id"]: k["parent_id"] for k in listed()} == {parent: None, child: parent, other: None}
    assert [k["id"] for k in listed("--parent", parent)] == [child]
    assert [k["id"] for k in listed("--status", "revoked")] == [other]
    assert sorted(k["id"] for k in listed("--status", "active", "--policy", "agents")) == sorted([parent, child])
    assert listed("--policy", "nosuch") == []
    assert json.loads(cli("--config", str(config), "keys", "show", child, "--json").stdout)["parent_id"] == parent
    plain = cli("--config", str(config), "keys", "list").stdout.splitlines()
    assert plain[0].split()[:5] == ["id", "name", "policy", "parent_id", "status"]
    [child_row] = [row for row in plain if row.startswith(child)]
    assert child_row.split()[3] == parent


def test_a_revoked_or_expired_key_shows_nothing_remaining(config, tmp_path, cli):
    policy = write_policy(tmp_path, budget_usd=3)
    revoked = json.loads(cli("--config", str(config), "keys", "issue", "--create-store", str(policy), "--json").stdout)[
        "id"
    ]
    expired = json.loads(cli("--config", str(config), "keys", "issue", str(policy), "--ttl", "1s", "--json").stdout)
    assert cli("--config", str(config), "keys", "revoke", revoked).returncode == 0
    time.sleep(1.1)
    for key_id in (revoked, expired["id"]):
        shown = json.loads(cli("--config", str(config), "keys", "show", key_id, "--json").stdout)
        assert shown["status"] in ("revoked", "expired") and shown["remaining_usd"] == 0 and shown["budget_usd"] == 3
    rows = cli("--config", str(config), "keys", "list").stdout.splitlines()[1:]
    assert all(row.split()[-1] == "0.000000" for row in rows), rows


def test_money_is_written_with_six_decimals_never_in_exponent_notation(config, tmp_path, cli):
    issued = cli(
        "--config",
        str(config),
        "keys",
        "issue",
        "--create-store",
        str(write_policy(tmp_path)),
        "--budget",
        "0.00001",
        "--json",
    )
    assert '"budget_usd": 0.000010' in issued.stdout
    key_id = json.loads(issued.stdout)["id"]
    ledger = open_ledger(load_config(config).store_url)
    ledger.settle(ledger.reserve(key_id, 5, time.time()).hold_id, 5)  # a call that cost $0.000005
    outputs = [
        cli("--config", str(config), "keys", "list", "--json").stdout,
        cli("--config", str(config), "keys", "show", key_id, "--json").stdout,
        cli("--config", str(config), "keys", "show", key_id).stdout,
        cli("--config", str(config), "keys", "list").stdout,
    ]
    for output in outputs:
        assert "0.000005" in output and not re.search(r"\de-\d", output), output
    assert json.loads(outputs[1])["spent_usd"] == 0.000005


def test_ca_prints_curl_bundle_and_how_node_reaches_the_proxy(config, tmp_path):
    settings = yaml.safe_load(config.read_text())
    shown = run("--config", str(config), "ca").stdout
    assert f"export CURL_CA_BUNDLE={tmp_path / 'certs' / 'agentkeys-ca-bundle.pem'}" in shown
    gateway = f"http://127.0.0.1:{settings['gateway_port']}"
    assert "Node" in shown and "HTTPS_PROXY" in shown
    assert f"OPENAI_BASE_URL={gateway}/openai/v1" in shown and f"ANTHROPIC_BASE_URL={gateway}/anthropic" in shown


def test_prices_show_lists_the_configured_providers_first(tmp_path):
    """gpt-4o-mini is priced for openai (configured by default) and for azure (not configured here)."""
    shown = run("prices", "show", "gpt-4o-mini", cwd=tmp_path)
    headings = [line.split("'s price")[0] for line in shown.stdout.splitlines() if "'s price" in line]
    assert headings[0] == "gpt-4o-mini: openai" and "gpt-4o-mini: azure" in headings[1:]
