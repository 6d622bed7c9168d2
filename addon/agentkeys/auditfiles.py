"""Which files make one audit log, and which of them a writer owns.

`audit_log: audit.jsonl` names the live file of slot 1. A second process writing to the same
folder (another worker, another proxy) takes slot 2, `audit.w2.jsonl`, and so on: a writer holds
a lock on its slot for as long as it runs, so no two processes ever append to one file, and
rotation needs no coordination between them. A restarted process takes a free slot again and
continues that slot's chain. Files rotated out of a slot are numbered, higher is newer:
`audit.1.jsonl`, `audit.2.jsonl`, `audit.w2.1.jsonl`.
"""

import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

TAIL_CHUNK = 65536
CALL_PREFIXES = (b'{"kind":"call"', b'{"key_id"')  # a call record, as written now and before the chain


@dataclass(frozen=True)
class AuditFile:
    path: Path
    slot: int
    number: int | None  # None: the slot's live file

    @property
    def order(self) -> tuple:
        """Oldest first within a slot: rotated files by number, then the live file."""
        return (self.slot, self.number is None, self.number or 0)


def _stem_and_suffix(base: Path) -> tuple[str, str]:
    return base.stem if base.suffix else base.name, base.suffix


def slot_path(base: Path, slot: int) -> Path:
    stem, suffix = _stem_and_suffix(base)
    return base if slot == 1 else base.with_name(f"{stem}.w{slot}{suffix}")


def rotated_path(base: Path, slot: int, number: int) -> Path:
    stem, suffix = _stem_and_suffix(base)
    middle = "" if slot == 1 else f".w{slot}"
    return base.with_name(f"{stem}{middle}.{number}{suffix}")


def audit_files(base: Path) -> list[AuditFile]:
    """Every file of the log `base` names, each slot's oldest first."""
    stem, suffix = _stem_and_suffix(base)
    pattern = re.compile(rf"{re.escape(stem)}(?:\.w(\d+))?(?:\.(\d+))?{re.escape(suffix)}")
    if not base.parent.is_dir():
        return []
    found = []
    for path in base.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            slot, number = match.groups()
            found.append(AuditFile(path, int(slot or 1), int(number) if number else None))
    return sorted(found, key=lambda file: file.order)


def slot_files(base: Path, slot: int) -> list[AuditFile]:
    return [file for file in audit_files(base) if file.slot == slot]


def claim_slot(base: Path) -> tuple[int, int]:
    """The first slot no running process holds, and the descriptor whose lock holds it for us."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for slot in count(1):
        lock = os.open(f"{slot_path(base, slot)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            continue
        return slot, lock
    raise AssertionError("unreachable")


def last_chain_record(path: Path) -> tuple[bytes, dict] | None:
    """The last complete record line of a file with its fields; None if it has none."""
    for line in lines_backwards(path):
        record = parse_chained(line)
        if record is not None:
            return line, record
    return None


def lines_backwards(path: Path, chunk: int = TAIL_CHUNK) -> Iterator[bytes]:
    """A file's complete lines, last first, read from its end a chunk at a time."""
    with open(path, "rb") as file:
        position = file.seek(0, os.SEEK_END)
        pending, seen_newline = b"", False
        while position > 0:
            step = min(chunk, position)
            position -= step
            file.seek(position)
            lines = (file.read(step) + pending).split(b"\n")
            pending, later = lines[0], lines[1:]  # the first piece may go on in the chunk before
            if not seen_newline:  # what follows the file's last newline is no complete line
                pending, later, seen_newline = (pending, later[:-1], True) if later else (b"", [], False)
            yield from (line for line in reversed(later) if line)
        if seen_newline and pending:
            yield pending


def parse_chained(line: bytes) -> dict | None:
    """A line's fields if it is a chained record, else None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not {"writer", "seq", "prev"} <= record.keys():
        return None
    return record


def call_records(paths: list[Path], since: float | None = None) -> Iterator[dict]:
    """The call records in `paths` written at or after `since`, skipping any file last written before it.

    Start records and checkpoints are the chain's own, not calls. A line that is not a whole record
    (cut short by a crash) is left out here; `audit verify` names it.
    """
    for path in paths:
        if since is not None and os.stat(path).st_mtime < since:
            continue
        with open(path, "rb") as file:
            for line in file:
                if line.startswith(CALL_PREFIXES) and line.endswith(b"\n"):
                    record = _parse_whole(line)
                    if record is not None and (since is None or record.get("ts", 0) >= since):
                        yield record


def _parse_whole(line: bytes) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return True
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"
