"""Which files make one audit log: slot and rotated names, their order, claiming a slot, reading from the end."""

import os

from hypothesis import given
from hypothesis import strategies as st

from agentkeys.auditfiles import audit_files, claim_slot, lines_backwards, rotated_path, slot_path


def test_slot_and_rotated_names_keep_the_configured_name_and_suffix(tmp_path):
    base = tmp_path / "audit.jsonl"
    assert [slot_path(base, n).name for n in (1, 2)] == ["audit.jsonl", "audit.w2.jsonl"]
    assert [rotated_path(base, s, 3).name for s in (1, 2)] == ["audit.3.jsonl", "audit.w2.3.jsonl"]
    assert rotated_path(tmp_path / "calls", 2, 1).name == "calls.w2.1"


def test_a_logs_files_are_listed_oldest_first_per_slot_and_nothing_else(tmp_path):
    names = ["audit.jsonl", "audit.10.jsonl", "audit.2.jsonl", "audit.w2.jsonl", "audit.w2.1.jsonl",
             "audit.jsonl.lock", "audit.old.jsonl", "other.jsonl", "audit.jsonl.bak"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("")
    listed = [file.path.name for file in audit_files(tmp_path / "audit.jsonl")]
    assert listed == ["audit.2.jsonl", "audit.10.jsonl", "audit.jsonl", "audit.w2.1.jsonl", "audit.w2.jsonl"]
    assert audit_files(tmp_path / "missing" / "audit.jsonl") == []


def test_a_slot_is_held_until_its_lock_is_let_go(tmp_path):
    first, lock = claim_slot(tmp_path / "audit.jsonl")
    second, other = claim_slot(tmp_path / "audit.jsonl")
    assert (first, second) == (1, 2)
    os.close(lock)
    again, _ = claim_slot(tmp_path / "audit.jsonl")
    assert again == 1


@given(
    lines=st.lists(st.binary(min_size=1, max_size=20).map(lambda b: b.replace(b"\n", b"x")), max_size=8),
    tail=st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"y")),
    chunk=st.integers(1, 16),
)
def test_lines_backwards_gives_every_complete_line_last_first_whatever_the_chunk(tmp_path_factory, lines, tail, chunk):
    path = tmp_path_factory.mktemp("lines") / "audit.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines) + tail)  # `tail`: a line still being written
    assert list(lines_backwards(path, chunk)) == list(reversed(lines))
