"""`agentkeys audit verify`: prove a set of audit files is what their writers wrote, or name the first bad record.

Each writer's records are followed link by link (`auditchain`): a broken link is an edited,
deleted or reordered record, told apart by the sequence numbers around it. Checkpoints must carry
a good signature, by the given public key if there is one. A writer that ran without
checkpointing for more than two intervals had its checkpoints removed. A writer's last record
must be its closing checkpoint: anything else is a log cut short (or a proxy still running: with
`live`, an unsigned tail is accepted, since it cannot yet be told from one).
"""

import json
import re
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentkeys.auditchain import GENESIS, fingerprint, line_hash, public_key_from_text, signature_holds

SLACK_SECONDS = 1  # a checkpoint may come a little after its interval: the loop may be busy


CALL_CHAIN = re.compile(rb',"writer":"([^"\\]+)","seq":(\d+),"prev":"([0-9a-f]{64})"}$')
TIMESTAMP = re.compile(rb'"ts":(-?[0-9][0-9.eE+-]*)')


@dataclass(frozen=True)
class Line:
    path: Path
    number: int
    raw: bytes
    kind: str
    writer: str
    seq: int
    prev: str
    ts: float
    record: dict | None  # the fields of a start record or a checkpoint; a call's are not needed

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


class Tampered(Exception):
    """The first bad record: where, what kind of damage, and why we say so."""

    def __init__(self, where: str, kind: str, detail: str):
        super().__init__(f"{where}: {kind}: {detail}")
        self.where, self.kind, self.detail = where, kind, detail


@dataclass
class Verdict:
    records: int = 0
    calls: int = 0
    writers: int = 0
    files: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    signers: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    problem: Tampered | None = None


@dataclass
class Chain:
    """One writer's records, walked so far."""

    writer: str
    last: Line | None = None
    own_key: Ed25519PublicKey | None = None  # from its latest start record
    interval: float | None = None
    unsigned_since: float | None = None  # when the oldest record not yet under a checkpoint was written
    unsigned: int = 0


def verify(paths: list[Path], trusted: Ed25519PublicKey | None = None, live: bool = False) -> Verdict:
    """Walk every file once, in chain order, one writer's state at a time; the first problem ends it."""
    verdict = Verdict(files=len(paths))
    ordered = _in_chain_order([Path(path) for path in paths])
    chains: dict[str, Chain] = {}
    try:
        for line in _lines(ordered):
            chain = chains.get(line.writer)
            if chain is None:
                chain = chains[line.writer] = Chain(line.writer)
                _check_first(line, verdict)
            else:
                _check_link(chain.last, line, ordered)
            _take(chain, line, trusted, verdict)
        for chain in chains.values():
            _check_end(chain, live, verdict)
    except Tampered as problem:
        verdict.problem = problem
    verdict.writers = len(chains)
    return verdict


def _in_chain_order(paths: list[Path]) -> list[Path]:
    """Files by their first record's time: a writer's rotated files in the order it wrote them."""

    def first_record(path: Path) -> tuple[float, int]:
        try:
            with open(path, "rb") as file:
                line = _parse(path, 1, file.readline().rstrip(b"\n"))
            return line.ts, line.seq
        except (OSError, Tampered):
            return 0.0, 0  # reported when it is read

    return sorted(paths, key=first_record)


def _lines(paths: list[Path]) -> Iterator[Line]:
    for path in paths:
        try:
            file = open(path, "rb")
        except OSError as e:
            raise Tampered(str(path), "unreadable", e.strerror) from None
        with file:
            for number, raw in enumerate(file, 1):
                if not raw.endswith(b"\n"):
                    raise Tampered(f"{path}:{number}", "truncated", "the file ends in the middle of a record")
                yield _parse(path, number, raw[:-1])


def _parse(path: Path, number: int, raw: bytes) -> Line:
    """A call line by its chain fields alone (the chain vouches for the rest); any other line in full."""
    if raw.startswith(b'{"kind":"call",'):
        chain, ts = CALL_CHAIN.search(raw), TIMESTAMP.search(raw)
        if chain and ts:
            with suppress(ValueError):
                writer, seq, prev = chain.groups()
                return Line(path, number, raw, "call", writer.decode(), int(seq), prev.decode(), float(ts[1]), None)
    record = _parse_whole(path, number, raw)
    kind = record.get("kind", "call")
    return Line(path, number, raw, kind, record["writer"], record["seq"], record["prev"], record.get("ts", 0), record)


def _parse_whole(path: Path, number: int, raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        cut_short = not raw.rstrip().endswith(b"}")
        kind, what = ("truncated", "a record cut short") if cut_short else ("edited", f"not JSON ({e.msg})")
        raise Tampered(f"{path}:{number}", kind, what) from None
    except ValueError:
        raise Tampered(f"{path}:{number}", "edited", "not text") from None
    if not isinstance(record, dict) or not {"writer", "seq", "prev"} <= record.keys():
        raise Tampered(f"{path}:{number}", "edited", "not a chained audit record (changed, or written before chaining)")
    if not isinstance(record["seq"], int) or not isinstance(record.get("ts", 0), (int, float)):
        raise Tampered(f"{path}:{number}", "edited", "its seq or ts is not a number")
    if not isinstance(record["writer"], str) or not isinstance(record["prev"], str):
        raise Tampered(f"{path}:{number}", "edited", "its writer or prev is not text")
    return record


def _take(chain: Chain, line: Line, trusted: Ed25519PublicKey | None, verdict: Verdict) -> None:
    """Account for one record that follows its chain: start, checkpoint or call."""
    if line.kind == "start":
        if chain.unsigned:
            verdict.notes.append(
                f"writer {chain.writer}: {chain.unsigned} records before {line.where} were never signed"
                " (the proxy stopped without closing the log, then started again)"
            )
        chain.own_key, chain.interval = _start_key(line), line.record.get("checkpoint_interval")
        chain.unsigned_since, chain.unsigned = line.ts, 1
    elif line.kind == "checkpoint":
        verdict.signers.add(_check_signature(line, trusted or chain.own_key, trusted is not None))
        chain.unsigned_since, chain.unsigned = None, 0
    else:
        verdict.calls += line.kind == "call"
        if chain.unsigned_since is None:
            chain.unsigned_since = line.ts
        chain.unsigned += 1
        _note_time(verdict, line.ts)
    late = line.ts - chain.unsigned_since if chain.unsigned_since is not None else 0
    if chain.interval and late > 2 * chain.interval + SLACK_SECONDS:
        raise Tampered(
            line.where, "missing checkpoint",
            f"written {late:.0f}s after the oldest record not yet signed, though writer {chain.writer}"
            f" signs every {chain.interval}s: checkpoints were removed (and the records around them rewritten)",
        )  # fmt: skip
    chain.last = line
    verdict.records += 1


def _check_first(first: Line, verdict: Verdict) -> None:
    writer = first.writer
    if first.kind != "start":
        raise Tampered(first.where, "deleted", f"writer {writer}'s records before this one are missing")
    if first.seq == 1:
        if first.prev != GENESIS:
            raise Tampered(first.where, "edited", "a writer's first record follows nothing")
        return
    earlier = first.record.get("previous_file") or "earlier files"
    verdict.notes.append(f"writer {writer} begins at record {first.seq}: it continues {earlier}, not given")


def _check_link(previous: Line, line: Line, paths: list[Path]) -> None:
    """Does `line` follow `previous`? If not, which was edited, deleted or moved (read on to tell)."""
    expected = previous.seq + 1
    if line.prev == line_hash(previous.raw):
        if line.seq != expected:
            raise Tampered(line.where, "edited", f"its seq is {line.seq}, but it follows record {previous.seq}")
        return
    later = _later_in_chain(paths, line)
    if line.seq > expected:
        missing = range(expected, line.seq)
        if any(other.seq in missing for other in later):
            raise Tampered(line.where, "reordered", f"record {line.seq} comes before record {expected}")
        span = f"{expected}" if len(missing) == 1 else f"{expected}–{line.seq - 1}"
        raise Tampered(line.where, "deleted", f"record {span} before it is missing")
    if line.seq < expected:
        raise Tampered(line.where, "reordered", f"record {line.seq} comes after record {previous.seq}")
    following = next(iter(later), None)
    if following is not None and following.prev != line_hash(line.raw):
        raise Tampered(line.where, "edited", "this record was changed: neither its own hash nor its prev still match")
    if following is not None:
        raise Tampered(previous.where, "edited", f"this record was changed: it no longer hashes to {line.where}'s prev")
    raise Tampered(previous.where, "edited", f"this record or the next ({line.where}) was changed")


def _later_in_chain(paths: list[Path], line: Line) -> list[Line]:
    """The records of `line`'s writer after it: read again, only once something is wrong."""
    later, reached = [], False
    with suppress(Tampered):
        for other in _lines(paths):
            if reached and other.writer == line.writer:
                later.append(other)
            reached = reached or (other.path, other.number) == (line.path, line.number)
    return later


def _start_key(line: Line) -> Ed25519PublicKey | None:
    try:
        return public_key_from_text(line.record["public_key"])
    except (KeyError, ValueError, TypeError):
        raise Tampered(line.where, "edited", "its public_key is not an Ed25519 key") from None


def _check_signature(line: Line, key: Ed25519PublicKey | None, trusted: bool) -> str:
    signer = line.record.get("signer")
    if key is None:
        raise Tampered(line.where, "bad signature", "no key to check it with")
    if trusted and signer != fingerprint(key):
        raise Tampered(line.where, "bad signature", f"signed by key {signer}, not by the given {fingerprint(key)}")
    if not signature_holds(key, line.raw):
        raise Tampered(line.where, "bad signature", f"the signature does not hold for key {fingerprint(key)}")
    return signer


def _check_end(chain: Chain, live: bool, verdict: Verdict) -> None:
    writer, last, unsigned = chain.writer, chain.last, chain.unsigned
    closing = last.record.get("closing") if last.kind == "checkpoint" else None
    if closing == "stop":
        return
    if closing == "rotate":
        verdict.notes.append(f"writer {writer} continues in a newer file than {last.path}, not given")
        return
    if not live:
        raise Tampered(
            last.where, "truncated",
            f"writer {writer}'s log ends without its closing checkpoint: it was cut after this record (or the proxy"
            " is still running: pass --live, or was killed)",
        )  # fmt: skip
    if unsigned:
        verdict.notes.append(f"writer {writer}: its last {unsigned} records are not signed yet")


def _note_time(verdict: Verdict, ts: float) -> None:
    verdict.first_ts = ts if verdict.first_ts is None else min(verdict.first_ts, ts)
    verdict.last_ts = ts if verdict.last_ts is None else max(verdict.last_ts, ts)
