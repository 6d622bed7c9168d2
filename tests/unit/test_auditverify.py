"""`audit verify`: each kind of tampering is found and named; untouched logs, rotated or not, verify."""

import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentkeys.audit import AuditLog, AuditSettings, CallRecord
from agentkeys.auditchain import PUBLIC_KEY_NAME, Signer, line_hash, signing_key
from agentkeys.auditverify import verify
from agentkeys.cli import main

CALLS = 8


def call(cost_micros: int, ts: float = 0.0) -> CallRecord:
    return CallRecord(
        key_id="k1", key_name="bot", policy="chat", provider="openai", method="POST", path="/v1/chat/completions",
        model="gpt-4o-mini", decision="allow", reason="ok", cost_micros=cost_micros, ts=ts,
    )  # fmt: skip


def write_log(path: Path, signer: Signer, calls: int = CALLS, **settings) -> list[bytes]:
    """A closed log: a start record, `calls` calls with a checkpoint halfway, a closing checkpoint."""
    log = AuditLog(AuditSettings(path, **settings), signer)
    for cost in range(calls):
        log.write(call(cost + 1))
        if cost == calls // 2:
            log.checkpoint()
    log.close()
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture(scope="module")
def signer(certs):
    return signing_key(certs)


@pytest.fixture
def log(tmp_path, signer):
    path = tmp_path / "audit.jsonl"
    return path, write_log(path, signer)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """What someone without the key can do: recompute every `prev` from line `start` on."""
    lines = list(lines)
    for i in range(max(start, 1), len(lines)):
        previous = line_hash(lines[i - 1].rstrip(b"\n"))
        lines[i] = re.sub(rb'"prev":"[0-9a-f]{64}"', f'"prev":"{previous}"'.encode(), lines[i])
    return lines


def problem_of(path: Path, **options):
    problem = verify([path], **options).problem
    assert problem is not None, "the tampering went unnoticed"
    return problem


def test_an_untouched_log_verifies_with_its_count_span_and_signer(log, signer):
    path, _ = log
    verdict = verify([path], signer.public_key)
    assert verdict.problem is None
    assert (verdict.calls, verdict.records, verdict.writers) == (CALLS, CALLS + 3, 1)
    assert verdict.first_ts <= verdict.last_ts and verdict.signers == {signer.fingerprint}


def test_an_edited_field_is_found_at_the_edited_record(log):
    path, lines = log
    lines[3] = lines[3].replace(b'"cost_micros":3', b'"cost_micros":0')
    rewrite(path, lines)
    problem = problem_of(path)
    assert (problem.kind, problem.where) == ("edited", f"{path}:4")


def test_a_deleted_record_is_named_deleted(log):
    path, lines = log
    del lines[3]
    rewrite(path, lines)
    problem = problem_of(path)
    assert problem.kind == "deleted" and "record 4" in problem.detail


def test_two_records_swapped_are_named_reordered(log):
    path, lines = log
    lines[2], lines[3] = lines[3], lines[2]
    rewrite(path, lines)
    assert problem_of(path).kind == "reordered"


@pytest.mark.parametrize("cut", ["lines", "bytes"])
def test_a_truncated_tail_is_named_truncated(log, cut):
    path, lines = log
    rewrite(path, lines[:-2] if cut == "lines" else [*lines[:-1], lines[-1][:40]])
    assert problem_of(path).kind == "truncated"


def test_a_live_log_may_end_unsigned_but_not_cut_mid_record(log):
    path, lines = log
    rewrite(path, lines[:-2])
    verdict = verify([path], live=True)
    assert verdict.problem is None and any("not signed yet" in note for note in verdict.notes)
    rewrite(path, [*lines[:-2], lines[-2][:30]])
    assert problem_of(path, live=True).kind == "truncated"


def test_a_forged_checkpoint_signature_is_a_bad_signature(log):
    path, lines = log
    forged = Signer(Ed25519PrivateKey.generate()).signed(lines[-1].decode().split(',"sig":')[0] + "}")
    rewrite(path, [*lines[:-1], forged.encode() + b"\n"])
    assert problem_of(path).kind == "bad signature"


def test_checking_against_another_public_key_is_a_bad_signature(log):
    path, _ = log
    problem = problem_of(path, trusted=Ed25519PrivateKey.generate().public_key())
    assert problem.kind == "bad signature" and "not by the given" in problem.detail


def test_a_log_rewritten_and_re_signed_with_another_key_fails_only_against_the_real_public_key(log, signer):
    """Without the proxy's key an attacker can only sign with their own: the given public key tells."""
    path, lines = log
    attacker = Signer(Ed25519PrivateKey.generate())
    start = json.loads(lines[0])
    lines[0] = lines[0].replace(start["public_key"].encode(), attacker.public_key_text.encode())
    lines[3] = lines[3].replace(b'"cost_micros":3', b'"cost_micros":0')
    lines = rechain(lines, 1)
    for i in range(len(lines)):
        if b'"kind":"checkpoint"' in lines[i]:
            unsigned = lines[i].decode().rstrip("\n").split(',"sig":')[0] + "}"
            unsigned = unsigned.replace(signer.fingerprint, attacker.fingerprint)
            lines[i] = attacker.signed(unsigned).encode() + b"\n"
            lines = rechain(lines, i + 1)
    rewrite(path, lines)
    assert verify([path]).problem is None  # self-consistent, which is why --public-key matters
    assert problem_of(path, trusted=signer.public_key).kind == "bad signature"


def test_an_edit_rechained_with_its_checkpoints_removed_is_a_missing_checkpoint(tmp_path, signer):
    """Records written over a minute with a checkpoint every 10 s; the attacker edits the first call,
    recomputes the chain and drops the checkpoints they cannot re-sign."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSettings(path, checkpoint_seconds=10), signer)
    start = json.loads(path.read_bytes().splitlines()[0])["ts"]
    for i in range(7):
        log.write(call(i + 1, ts=start + 10 * i))
        log.checkpoint()
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"cost_micros":1', b'"cost_micros":9')
    kept = [line for line in lines if b'"kind":"checkpoint"' not in line]
    kept = [re.sub(rb'"seq":\d+', f'"seq":{n}'.encode(), line) for n, line in enumerate(kept, 1)]
    rewrite(path, rechain(kept, 1))
    assert problem_of(path, live=True).kind == "missing checkpoint"


def test_an_untouched_rotated_log_verifies_and_a_missing_middle_file_is_found(tmp_path, signer):
    write_log(tmp_path / "audit.jsonl", signer, calls=30, rotate_bytes=2500)
    files = sorted(tmp_path.glob("audit*.jsonl"))
    assert len(files) >= 4
    verdict = verify(files)
    assert verdict.problem is None and verdict.calls == 30
    assert verify(list(reversed(files))).problem is None, "the order files are named in does not matter"
    problem = verify([f for f in files if f.name != "audit.2.jsonl"]).problem
    assert problem.kind == "deleted"


def test_the_live_file_alone_verifies_and_says_where_it_continues_from(tmp_path, signer):
    write_log(tmp_path / "audit.jsonl", signer, calls=30, rotate_bytes=2500)
    verdict = verify([tmp_path / "audit.jsonl"])
    assert verdict.problem is None
    assert any("continues audit." in note for note in verdict.notes), verdict.notes


def test_two_writers_each_verify_even_interleaved_in_one_collected_file(tmp_path, signer):
    one = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    two = AuditLog(AuditSettings(tmp_path / "audit.jsonl"), signer)
    for cost in range(4):
        one.write(call(cost))
        two.write(call(cost))
    one.close()
    two.close()
    first, second = one.path.read_bytes().splitlines(True), two.path.read_bytes().splitlines(True)
    collected = tmp_path / "collected.log"  # what a log collector keeps of two pods' stdout
    collected.write_bytes(b"".join(line for pair in zip(first, second, strict=True) for line in pair))
    verdict = verify([collected])
    assert verdict.problem is None and verdict.writers == 2 and verdict.calls == 8
    lines = collected.read_bytes().splitlines(True)
    del lines[5]
    rewrite(collected, lines)
    assert problem_of(collected).kind == "deleted"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, signer) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("edit") / "audit.jsonl"
    return path, b"".join(write_log(path, signer, calls=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(place=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255))
def test_any_single_byte_edit_of_any_line_is_detected(sealed, signer, place, byte):
    path, original = sealed
    at = int(place * len(original))
    if byte == original[at]:
        byte ^= 1
    path.write_bytes(original[:at] + bytes([byte]) + original[at + 1 :])
    assert verify([path], signer.public_key).problem is not None


def test_the_cli_prints_ok_or_the_first_bad_record_with_exit_status_1(log, certs, capsys):
    path, lines = log
    assert main(["audit", "verify", str(path), "--public-key", str(certs / PUBLIC_KEY_NAME)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {CALLS + 3} records ({CALLS} calls) by 1 writer(s) in 1 file(s)")
    del lines[2]
    rewrite(path, lines)
    assert main(["audit", "verify", str(path)]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL: {path}:3: deleted: ")


def test_verify_without_files_reads_the_configs_log_and_fails_when_there_is_none(tmp_path, signer, capsys):
    config = tmp_path / "agentkeys.yaml"
    config.write_text("audit_log: logs/audit.jsonl\n")
    assert main(["--config", str(config), "audit", "verify"]) == 1
    assert capsys.readouterr().out.startswith("FAIL: no audit files at ")
    write_log(tmp_path / "logs" / "audit.jsonl", signer, calls=30, rotate_bytes=2500)
    assert main(["--config", str(config), "audit", "verify"]) == 0
    assert "(30 calls)" in capsys.readouterr().out
