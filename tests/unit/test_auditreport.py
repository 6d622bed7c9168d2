"""`audit report` and `audit tail`: grouping, time windows, output formats, filters, following through rotation."""

import csv
import io
import json
import os
import time

import pytest

from agentkeys.audit import AuditLog, AuditSettings, CallRecord
from agentkeys.auditchain import signing_key
from agentkeys.auditfiles import call_records
from agentkeys.auditreport import Follower, RecordFilter, last_records, real_key_report, real_key_rows, report
from agentkeys.cli import main


def record(key_id="k1", policy="chat", model="gpt-4o-mini", decision="allow", **fields) -> CallRecord:
    return CallRecord(
        key_id=key_id, key_name=f"{key_id}-name", policy=policy, provider=fields.pop("provider", "openai"),
        method="POST", path="/v1/chat/completions", model=model, decision=decision, reason=fields.pop("reason", "ok"),
        **fields,
    )  # fmt: skip


@pytest.fixture
def audit(tmp_path):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signing_key(tmp_path / "certs"))
    yield log
    log.close()


def write_calls(log: AuditLog) -> None:
    log.write(record("k1", input_tokens=10, output_tokens=5, cost_micros=100))
    log.write(record("k1", input_tokens=20, output_tokens=7, cost_micros=200, model="gpt-4o"))
    log.write(record("k2", policy="ci", decision="deny", deny_kind="budget", status=402))
    log.write(record("k2", policy="ci", decision="deny", deny_kind="forbidden", status=403))
    log.write(record("k2", policy="ci", decision="deny", deny_kind="forbidden", status=403))
    log.write(record("k3", policy="ci", cost_micros=50, input_tokens=1))


def test_a_report_by_key_sums_calls_tokens_cost_and_counts_refusals_by_reason(audit):
    write_calls(audit)
    groups = report(call_records([audit.path]), "key")
    assert list(groups) == ["k1", "k3", "k2"], "largest cost first"
    k1, k2 = groups["k1"].as_dict(), groups["k2"].as_dict()
    assert (k1["calls"], k1["input_tokens"], k1["output_tokens"], k1["cost_usd"]) == (2, 30, 12, 0.0003)
    assert (k2["calls"], k2["allowed"], k2["refused"]) == (3, 0, 3)
    assert k2["refusals"] == {"forbidden": 2, "budget": 1}


@pytest.mark.parametrize(
    "by, expected",
    [("policy", {"chat": 2, "ci": 4}), ("model", {"gpt-4o-mini": 5, "gpt-4o": 1}),
     ("provider", {"openai": 6}), ("decision", {"allow": 3, "deny": 3}), ("host", {"(none)": 6})],
)  # fmt: skip
def test_a_report_groups_by_any_of_its_fields(audit, by, expected):
    write_calls(audit)
    assert {name: group.calls for name, group in report(call_records([audit.path]), by).items()} == expected


def test_fields_from_newer_proxies_are_grouped_and_would_deny_is_a_refusal_apart(audit):
    """Shadow mode and the host catalogue add fields; the report reads them without knowing them."""
    audit.write(record("k1", decision="would_deny", deny_kind="budget"))
    line = json.dumps({**vars(record("k1")), "kind": "call", "host": "api.groq.com", "ts": time.time()})
    with open(audit.path, "a") as file:  # a record from a proxy that knows hosts (outside the chain: report only)
        file.write(line + "\n")
    by_host = report(call_records([audit.path]), "host")
    assert by_host["api.groq.com"].calls == 1
    by_decision = report(call_records([audit.path]), "decision")
    assert by_decision["would_deny"].refused == 0
    assert by_decision["would_deny"].refusals == {"budget (would_deny)": 1}


def test_a_would_deny_record_counts_each_rule_it_broke(audit):
    audit.write(record("k1", decision="would_deny", deny_kind="forbidden", would_deny=["model", "budget"]))
    audit.write(record("k1", decision="would_deny", deny_kind="budget", would_deny=["budget"]))
    [group] = report(call_records([audit.path]), "key").values()
    assert (group.calls, group.allowed, group.refused) == (2, 0, 0)
    assert group.refusals == {"budget (would_deny)": 2, "model (would_deny)": 1}


def test_since_leaves_out_older_records_and_whole_files_last_written_before_it(tmp_path, audit):
    audit.write(record("old", ts=time.time() - 7200))
    audit.write(record("new"))
    stale = tmp_path / "audit.1.jsonl"
    stale.write_text(json.dumps({**vars(record("stale")), "ts": time.time() - 90000}) + "\n")
    os.utime(stale, (time.time() - 90000, time.time() - 90000))
    since = time.time() - 3600
    assert [r["key_id"] for r in call_records([stale, audit.path], since)] == ["new"]
    assert [r["key_id"] for r in call_records([stale, audit.path])] == ["stale", "old", "new"]


def test_the_report_command_prints_a_table_json_and_csv(tmp_path, audit, capsys):
    write_calls(audit)
    audit.close()
    log = str(audit.path)
    assert main(["audit", "report", log, "--by", "policy"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["policy", "calls", "allowed", "refused", "input_tokens", "output_tokens", "cost_usd",
                                "refusals"]  # fmt: skip
    assert table[2].split()[:4] == ["ci", "4", "1", "3"] and "forbidden 2, budget 1" in table[2]
    assert main(["audit", "report", log, "--by", "policy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chat"]["cost_usd"] == 0.0003
    assert main(["audit", "report", log, "--by", "key", "--csv", "--since", "1h"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["key"] for row in rows] == ["k1", "k3", "k2"] and rows[0]["cost_usd"] == "0.000300"


def test_tail_filters_by_key_policy_decision_and_host(audit):
    write_calls(audit)
    keys = lambda wanted: [r["key_id"] for r in last_records(audit.path, 10, wanted)]  # noqa: E731
    assert keys(RecordFilter(key="k2")) == ["k2"] * 3
    assert keys(RecordFilter(key="k3-name")) == ["k3"], "a key by its name too"
    assert keys(RecordFilter(policy="ci", decision="allow")) == ["k3"]
    assert keys(RecordFilter(host="api.openai.com")) == []
    assert len(last_records(audit.path, 2, RecordFilter())) == 2


def test_following_sees_new_records_of_every_writer_through_rotation(tmp_path):
    signer = signing_key(tmp_path / "certs")
    one = AuditLog(AuditSettings(tmp_path / "audit.jsonl", rotate_bytes=1500), signer)
    one.write(record("before"))
    follower = Follower(tmp_path / "audit.jsonl", RecordFilter(decision="allow"))
    two = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    seen = []
    for i in range(12):
        one.write(record(f"one-{i}"))
        two.write(record(f"two-{i}", decision="deny"))
        if i % 5 == 0:
            seen += follower.poll()
    one.close()
    two.close()
    seen += follower.poll()
    assert len(list(tmp_path.glob("audit.*.jsonl"))) > 2, "the first writer's file rotated"
    assert [r["key_id"] for r in seen] == [f"one-{i}" for i in range(12)]


def test_tail_prints_one_line_per_call(audit, capsys):
    write_calls(audit)
    assert main(["audit", "tail", str(audit.path), "-n", "2", "--key", "k2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("k2 (k2-name)" in line and "deny 403" in line for line in lines)
    assert main(["audit", "tail", str(audit.path), "-n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] == "k3"


def test_the_real_keys_report_lists_each_fingerprint_by_client_host_and_cost(audit):
    now = time.time()
    for client, cost, ts in (("10.0.0.5:4431", 30, now - 60), ("10.0.0.5:4432", 12, now), ("10.0.0.9:80", 5, now - 30)):
        audit.write(record(None, decision="pass", provider="openai", real_key="openai:aa…WXYZ", client=client,
                           host="api.openai.com", cost_micros=cost, input_tokens=10, ts=ts))  # fmt: skip
    audit.write(record(None, decision="pass", provider="anthropic", real_key="anthropic:bb…ABCD", ts=now - 3600))
    audit.write(record("k1"))
    uses = real_key_report(call_records([audit.path]))
    assert list(uses) == ["openai:aa…WXYZ", "anthropic:bb…ABCD"]  # the most recently used first
    used = uses["openai:aa…WXYZ"].as_dict()
    assert (used["calls"], used["clients"], used["hosts"]) == (3, {"10.0.0.5": 2, "10.0.0.9": 1}, {"api.openai.com": 3})
    assert (used["input_tokens"], used["cost_usd"]) == (30, 47 / 1_000_000)
    [row, _] = real_key_rows(uses)
    assert row[:4] == ["openai:aa…WXYZ", "openai", "3", "10.0.0.5 (2), 10.0.0.9 (1)"]
