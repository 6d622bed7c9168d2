"""A security team's journey: a real proxy's audit log, rotated small, on file and stdout, proved untouched."""

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from agentkeys.auditchain import PUBLIC_KEY_NAME
from conftest import Proxy, start_proxy, stop_proxy, write_policy

CALLS = 12
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Journey:
    proxy: Proxy
    key: dict
    records: list[dict]
    live_verify: tuple[int, str]

    @property
    def public_key(self) -> Path:
        return self.proxy.dir / "certs" / PUBLIC_KEY_NAME


def cli_output(proxy: Proxy, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = proxy.cli(*args)
    return status, out.getvalue()


def audit_files(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.glob("audit*.jsonl"))


@pytest.fixture(scope="module")
def journey(mock, tmp_path_factory):
    """Calls through a proxy that rotates small files and also writes to stdout: verified while it runs,
    then stopped with SIGTERM (as Kubernetes stops it), which seals the log."""
    folder = tmp_path_factory.mktemp("trail")
    proxy = start_proxy(
        folder / "proxy", mock,
        audit_sinks=["file", "stdout"], audit_rotate_bytes=2500, audit_checkpoint_interval="1s",
    )  # fmt: skip
    try:
        key = proxy.issue(write_policy(folder, budget_usd=5.0))
        agent = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
        for _ in range(CALLS):
            agent.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3)
        with pytest.raises(openai.PermissionDeniedError):  # a refusal is audited too
            agent.chat.completions.create(model="gpt-4o", messages=HELLO)
        records = proxy.records_for(key["id"], count=CALLS + 1)
        live_verify = cli_output(proxy, "audit", "verify", "--live", *audit_files(proxy.dir))
    finally:
        stop_proxy(proxy)
    return Journey(proxy, key, records, live_verify)


def test_the_log_rotated_and_verified_while_the_proxy_ran(journey):
    assert len(audit_files(journey.proxy.dir)) >= 3, "small files: the log rotated"
    status, out = journey.live_verify
    assert status == 0 and out.startswith("OK: "), out


def test_the_stopped_proxys_log_verifies_against_its_exported_public_key(journey):
    proxy, files = journey.proxy, audit_files(journey.proxy.dir)
    status, out = cli_output(proxy, "audit", "verify", "--public-key", str(journey.public_key), *files)
    assert status == 0, out
    assert f"({CALLS + 1} calls) by 1 writer(s) in {len(files)} file(s)" in out
    status, out = cli_output(proxy, "audit", "verify", "--public-key", str(journey.public_key))  # the config's log
    assert status == 0 and out.startswith("OK: ")
    assert cli_output(proxy, "audit", "public-key") == (0, journey.public_key.read_text())


def test_the_ledger_equals_the_audit_across_rotated_files(journey):
    spent = journey.proxy.ledger().get_key(journey.key["id"]).spent_micros
    assert spent == sum(r["cost_micros"] for r in journey.records) > 0
    status, out = cli_output(journey.proxy, "audit", "report", "--by", "key", "--json")
    row = json.loads(out)[journey.key["id"]]
    assert (row["calls"], row["refused"], row["refusals"]) == (CALLS + 1, 1, {"forbidden": 1})


def test_the_stdout_sink_carried_the_same_lines_as_the_files(journey):
    written = [line for path in audit_files(journey.proxy.dir) for line in open(path).read().splitlines()]
    printed = set(journey.proxy.log_path.read_text().splitlines())
    assert sum(journey.key["id"] in line for line in written) == CALLS + 1
    assert all(line in printed for line in written), "every line, start records and checkpoints too"


def test_an_edit_to_a_rotated_file_is_found_by_file_and_line(journey, tmp_path):
    for path in audit_files(journey.proxy.dir):
        shutil.copy(path, tmp_path)
    first = audit_files(tmp_path)[0]
    lines = open(first, "rb").read().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"output_tokens":', b'"output_tokens":1')
    open(first, "wb").write(b"".join(lines))
    status, out = cli_output(journey.proxy, "audit", "verify", "--public-key", str(journey.public_key),
                             *audit_files(tmp_path))  # fmt: skip
    assert status == 1 and out.startswith(f"FAIL: {first}:3: edited: ")
