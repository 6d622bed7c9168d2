"""A careless user at the CLI: bad values and files are refused in one line naming file, line and field;
the CLI says which config and store it uses and never creates a store beside the user; a reader that
goes away ends it quietly (issue 12)."""

import subprocess
import sys
from pathlib import Path

import pytest

from agentkeys.cli import main as agentkeys_main
from agentkeys.keys import issue_key
from agentkeys.ledger.sqlite import SqliteLedger
from agentkeys.policy import load_policy
from agentkeys.seal import RecordSeal
from conftest import write_policy

AGENTKEYS = Path(sys.executable).with_name("agentkeys")


@pytest.fixture()
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"))


@pytest.fixture()
def store_config(tmp_path):
    """A config whose store exists, as after the proxy has run once."""
    config = tmp_path / "agentkeys.yaml"
    config.write_text("store: sqlite:///agentkeys.db\n")
    SqliteLedger(tmp_path / "agentkeys.db")
    return config


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if not line.startswith("agentkeys: using ")]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.mark.parametrize(
    "option, message",
    [
        (["--ttl", "0s"], "--ttl: a duration must be positive"),
        (["--ttl", "99999999999999999999d"], "--ttl: '99999999999999999999d' is longer than"),
        (["--budget", "inf"], "--budget: 'inf': Input should be a finite number"),
        (["--budget", "nan"], "--budget: 'nan': Input should be a finite number"),
        (["--budget", "1e30"], "--budget: '1e30': Input should be less than or equal to 1000000000"),
        (["--budget", "-1"], "--budget: '-1': Input should be greater than 0"),
    ],
)
def test_keys_issue_refuses_a_bad_value_in_one_line(store_config, policy, capsys, option, message):
    assert agentkeys_main(["--config", str(store_config), "keys", "issue", str(policy), *option]) == 2
    assert one_line_error(capsys).startswith(f"error: {message}")


@pytest.mark.parametrize(
    "fields, line, message",
    [
        ("budget_usd: .inf\n", 2, "budget_usd: Input should be a finite number"),
        ("budget_usd: 1e30\n", 2, "budget_usd: Input should be less than or equal to 1000000000"),
        ("budget_usd: 1\nttl: 99999999999999999999d\n", 3, "ttl: '99999999999999999999d' is longer than"),
        ("budget_usd: 1\nttl: .inf\n", 3, "ttl: inf is not a duration"),
        ("budget_usd: 1\ndescription: caf\xe9\n", 3, "description: not UTF-8 text (byte 0xe9)"),
        ("budget_usd: 1\nbudget_usd: 1000\n", 3, "budget_usd: duplicate key (first given on line 2)"),
        ("budget_usd: 1\ndescription: bell\x07\n", 3, "invalid YAML: character U+0007 is not allowed"),
    ],
)
def test_a_bad_policy_file_is_one_line_with_file_line_and_field(store_config, tmp_path, capsys, fields, line, message):
    policy = tmp_path / "bad.policy.yaml"
    rules = "providers: [openai]\nendpoints: ['POST /v1/chat/completions']\nmodels: ['gpt-4o-mini']\n"
    policy.write_bytes(b"name: bad\n" + fields.encode("latin-1") + rules.encode())
    assert agentkeys_main(["--config", str(store_config), "keys", "issue", str(policy)]) == 2
    error = one_line_error(capsys)
    assert error.startswith(f"error: {policy}:{line}: ") and message in error, error
    assert agentkeys_main(["policy", "check", str(policy)]) == 1  # `policy check` exits 1 for an invalid file
    assert message in capsys.readouterr().err


def test_a_config_that_is_not_utf8_or_repeats_a_key_is_refused_with_its_line(tmp_path, capsys):
    config = tmp_path / "agentkeys.yaml"
    config.write_bytes(b"proxy_port: 8080\nstore: sqlite:///k\xe9ys.db\n")
    assert agentkeys_main(["--config", str(config), "keys", "list"]) == 2
    assert one_line_error(capsys) == f"error: {config}:2: store: not UTF-8 text (byte 0xe9)"
    config.write_text("proxy_port: 8080\nproviders:\n  openai:\n    upstream: http://a\n    upstream: http://b\n")
    assert agentkeys_main(["--config", str(config), "keys", "list"]) == 2
    error = one_line_error(capsys)
    assert error == f"error: {config}:5: providers.openai.upstream: duplicate key (first given on line 4)"


def test_the_cli_says_which_config_and_store_and_never_creates_a_store_silently(tmp_path, policy, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside any config's folder, no --config
    monkeypatch.delenv("AGENTKEYS_CONFIG", raising=False)
    for command in (["keys", "issue", str(policy)], ["keys", "list"], ["keys", "show", "x"], ["keys", "revoke", "x"]):
        assert agentkeys_main(command) == 2
        err = capsys.readouterr().err
        assert f"agentkeys: using the default config (no agentkeys.yaml in {tmp_path}), store sqlite:///" in err
        assert f"error: no key store at {tmp_path / 'agentkeys.db'}" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == [], "nothing was created"
    assert agentkeys_main(["keys", "issue", str(policy), "--create-store"]) == 0
    assert (tmp_path / "agentkeys.db").exists()


def test_a_reader_that_goes_away_ends_the_listing_quietly(tmp_path, policy):
    config = tmp_path / "agentkeys.yaml"
    config.write_text("store: sqlite:///agentkeys.db\n")
    ledger, rules = SqliteLedger(tmp_path / "agentkeys.db"), load_policy(policy)
    for _ in range(3000):  # more than a pipe holds, so the writer meets the closed pipe
        issue_key(ledger, rules, seal=RecordSeal(b"test"))
    for command in (["keys", "list"], ["prices", "show", "gpt-4o"]):
        listing = subprocess.Popen(
            [str(AGENTKEYS), "--config", str(config), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert listing.stdout.readline()  # `| head -1`
        listing.stdout.close()
        stderr = listing.stderr.read().decode()
        assert listing.wait(timeout=60) == 0
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
