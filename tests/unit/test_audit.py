"""The audit log writer: the chain, checkpoints, rotation, writer slots, sinks, and writes after close."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agentkeys.audit import AuditLog, AuditSettings, CallRecord, read_records
from agentkeys.auditchain import GENESIS, PUBLIC_KEY_NAME, SIGNING_KEY_NAME, line_hash, signing_key
from agentkeys.auditverify import verify


def call(key_id: str = "k1", cost_micros: int = 7, ts: float = 0.0, **fields) -> CallRecord:
    return CallRecord(
        key_id=key_id, key_name="bot", policy="chat", provider="openai", method="POST", path="/v1/chat/completions",
        model="gpt-4o-mini", decision="allow", reason="ok", cost_micros=cost_micros, ts=ts, **fields,
    )  # fmt: skip


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def signer(tmp_path):
    return signing_key(tmp_path / "certs")


def test_each_record_names_its_writer_and_the_hash_of_the_line_before(tmp_path, signer):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    for cost in (1, 2, 3):
        log.write(call(cost_micros=cost))
    log.close()
    raw = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    records = [json.loads(line) for line in raw]
    assert [r["kind"] for r in records] == ["start", "call", "call", "call", "checkpoint"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert {r["writer"] for r in records} == {log.writer}
    assert records[0]["prev"] == GENESIS
    assert [r["prev"] for r in records[1:]] == [line_hash(line) for line in raw[:-1]]
    assert records[-1]["closing"] == "stop" and records[-1]["signer"] == signer.fingerprint
    assert [r["cost_micros"] for r in read_records(tmp_path / "audit.jsonl")] == [1, 2, 3]


def test_the_signing_key_is_made_once_private_and_its_public_key_exported(tmp_path):
    first, again = signing_key(tmp_path / "certs"), signing_key(tmp_path / "certs")
    assert first.fingerprint == again.fingerprint
    assert os.stat(tmp_path / "certs" / SIGNING_KEY_NAME).st_mode & 0o777 == 0o600
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "certs" / PUBLIC_KEY_NAME).read_bytes()


def test_checkpoints_come_at_the_interval_on_the_loop_and_only_after_new_records(tmp_path, signer):
    async def scenario():
        log = AuditLog(AuditSettings(tmp_path / "audit.jsonl", checkpoint_seconds=0.05), signer)
        log.start_checkpoints(asyncio.get_running_loop())
        log.write(call())
        await asyncio.sleep(0.3)  # several intervals: one checkpoint, since nothing new came after it
        log.write(call())
        await asyncio.sleep(0.3)
        log.close()

    asyncio.run(scenario())
    kinds = [(r["kind"], r.get("closing")) for r in lines_of(tmp_path / "audit.jsonl")]
    checkpoint = ("checkpoint", None)
    assert kinds == [("start", None), ("call", None), checkpoint, ("call", None), checkpoint, ("checkpoint", "stop")]


def test_rotation_by_size_continues_the_chain_across_files_and_never_splits_a_record(tmp_path, signer):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl", rotate_bytes=2000), signer)
    for cost in range(30):
        log.write(call(cost_micros=cost))
    log.close()
    files = sorted(tmp_path.glob("audit*.jsonl"))
    assert len(files) > 4
    for path in files:
        records = lines_of(path)  # every line a whole record
        assert records[0]["kind"] == "start"
        assert records[-1]["kind"] == "checkpoint" and records[-1]["closing"] in ("rotate", "stop")
    second = lines_of(tmp_path / "audit.2.jsonl")[0]
    assert second["previous_file"] == "audit.1.jsonl"
    assert second["prev"] == line_hash((tmp_path / "audit.1.jsonl").read_bytes().splitlines()[-1])
    assert [r["cost_micros"] for r in read_records(tmp_path / "audit.jsonl")] == list(range(30))
    assert verify(files).problem is None


def test_rotation_by_time_starts_a_new_file_once_the_interval_has_passed(tmp_path, signer):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl", rotate_seconds=0.2), signer)
    log.write(call(cost_micros=1))
    time.sleep(0.3)
    log.write(call(cost_micros=2))
    log.close()
    assert [r["cost_micros"] for r in read_records(tmp_path / "audit.1.jsonl")] == [1]
    assert [r["cost_micros"] for r in read_records(tmp_path / "audit.jsonl")] == [1, 2]  # the whole log
    assert verify(sorted(tmp_path.glob("audit*.jsonl"))).problem is None


def test_two_writers_in_one_folder_each_keep_their_own_file_and_chain(tmp_path, signer):
    one = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    two = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    for cost in range(5):
        one.write(call("a", cost))
        two.write(call("b", cost))
    one.close()
    two.close()
    assert one.path.name == "audit.jsonl" and two.path.name == "audit.w2.jsonl"
    assert one.writer != two.writer
    for path in (one.path, two.path):
        assert verify([path]).problem is None
    assert verify([one.path, two.path]).writers == 2
    assert sorted(r["key_id"] for r in read_records(tmp_path / "audit.jsonl")) == ["a"] * 5 + ["b"] * 5


def test_a_restarted_writer_continues_its_slots_chain(tmp_path, signer):
    first = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    first.write(call(cost_micros=1))
    first.close()
    second = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    second.write(call(cost_micros=2))
    second.close()
    records = lines_of(tmp_path / "audit.jsonl")
    assert second.writer == first.writer and second.path == first.path
    restart = next(r for r in records[1:] if r["kind"] == "start")
    assert restart["started"] == "restart" and restart["seq"] == 4
    verdict = verify([tmp_path / "audit.jsonl"])
    assert verdict.problem is None and verdict.calls == 2


def test_a_writer_killed_without_closing_is_continued_by_the_next_and_its_unsigned_records_are_named(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from agentkeys.audit import AuditLog, AuditSettings, CallRecord
        from agentkeys.auditchain import signing_key
        log = AuditLog(AuditSettings(Path({str(tmp_path / "audit.jsonl")!r})), signing_key(Path({str(tmp_path)!r})))
        for _ in range(3):
            log.write(CallRecord("k", None, None, None, "POST", "/v1/x", None, "allow", "ok"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script])
    assert killed.returncode == -signal.SIGKILL
    after = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signing_key(tmp_path))
    after.write(call())
    after.close()
    verdict = verify([tmp_path / "audit.jsonl"])
    assert verdict.problem is None and verdict.calls == 4
    assert any("4 records before" in note and "never signed" in note for note in verdict.notes), verdict.notes


def test_a_line_cut_short_stays_its_own_line_and_verify_names_it(tmp_path, signer):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    log.write(call())
    log.close()
    with open(tmp_path / "audit.jsonl", "ab") as file:
        file.write(b'{"kind":"call","key_id":"k1","key_na')  # a write cut off by a power loss
    after = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    after.write(call())
    after.close()
    assert len(read_records(tmp_path / "audit.jsonl")) == 2
    problem = verify([tmp_path / "audit.jsonl"]).problem
    assert problem.kind == "truncated" and problem.where.endswith(":4")


def test_a_record_written_after_close_is_logged_whole_as_an_error_not_raised(tmp_path, signer, caplog):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    log.close()
    log.close()  # twice is harmless: mitmproxy's done and a reconfigure may both close
    log.write(call("late-key", cost_micros=4321))
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "after the audit log closed" in error.getMessage()
    assert '"key_id":"late-key"' in error.getMessage() and '"cost_micros":4321' in error.getMessage()
    assert verify([tmp_path / "audit.jsonl"]).problem is None


def test_the_stdout_sink_gets_the_same_lines_as_the_file(tmp_path, signer, capsys):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl", stdout=True), signer)
    log.write(call())
    log.close()
    assert capsys.readouterr().out.encode() == (tmp_path / "audit.jsonl").read_bytes()


def test_stdout_alone_is_a_chain_of_its_own(signer, capsys, tmp_path):
    log = AuditLog(AuditSettings(None, stdout=True), signer)
    log.write(call())
    log.close()
    collected = tmp_path / "collected.jsonl"
    collected.write_text(capsys.readouterr().out)
    verdict = verify([collected])
    assert verdict.problem is None and verdict.calls == 1


def test_no_sink_writes_nothing(tmp_path):
    log = AuditLog(AuditSettings(None), None)
    log.write(call())
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_logs_the_record_and_the_next_starts_on_a_line_of_its_own(tmp_path, signer, caplog, monkeypatch):
    log = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    real_write = os.write

    def disk_full_half_way(descriptor, data):
        monkeypatch.setattr("agentkeys.audit.os.write", real_write)  # only this once
        real_write(descriptor, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agentkeys.audit.os.write", disk_full_half_way)
    log.write(call("lost", cost_micros=99))
    log.write(call("kept"))
    log.close()
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "No space left" in error.getMessage() and '"key_id":"lost"' in error.getMessage()
    assert [r["key_id"] for r in read_records(tmp_path / "audit.jsonl")] == ["kept"]
    problem = verify([tmp_path / "audit.jsonl"]).problem
    assert problem.kind == "truncated" and problem.where.endswith(":2"), "the half-written line, named"
