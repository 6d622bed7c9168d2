"""`agentkeys audit report` and `audit tail`: the audit log read for people and spreadsheets.

Both read call records only (start records and checkpoints are the chain's own), and tolerate
fields they do not know: a newer proxy's records (say a `host`, or a `would_deny` decision) are
grouped and filtered like any other.
"""

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agentkeys import auditfiles
from agentkeys.auditfiles import CALL_PREFIXES
from agentkeys.money import format_usd, micros_to_usd

GROUPINGS = {
    "key": lambda record: record.get("key_id") or "(no key)",
    "policy": lambda record: record.get("policy") or "(none)",
    "model": lambda record: record.get("model") or "(none)",
    "provider": lambda record: record.get("provider") or "(none)",
    "host": lambda record: record.get("host") or "(none)",
    "decision": lambda record: record.get("decision") or "(none)",
}
COLUMNS = ["calls", "allowed", "refused", "input_tokens", "output_tokens", "cost_usd", "refusals"]


@dataclass
class Group:
    calls: int = 0
    allowed: int = 0
    refused: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    refusals: Counter = field(default_factory=Counter)

    def add(self, record: dict) -> None:
        self.calls += 1
        self.input_tokens += record.get("input_tokens") or 0
        self.output_tokens += record.get("output_tokens") or 0
        self.cost_micros += record.get("cost_micros") or 0
        decision = record.get("decision")
        if decision in ("allow", "pass"):  # a provider call let through; traffic passed on by host
            self.allowed += 1
            return
        self.refused += decision == "deny"
        self.refusals.update(refusal_reasons(record))

    def as_dict(self) -> dict:
        return {
            "calls": self.calls, "allowed": self.allowed, "refused": self.refused,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "cost_usd": micros_to_usd(self.cost_micros), "refusals": dict(self.refusals.most_common()),
        }  # fmt: skip


def refusal_reasons(record: dict) -> list[str]:
    """A refusal's reason as one word (the gate's kind); a would-be refusal's (shadow mode), each rule it
    broke, marked as such."""
    reason = record.get("deny_kind") or (f"http_{record['status']}" if record.get("status") else "other")
    if record.get("decision") == "deny":
        return [reason]
    return [f"{rule} ({record.get('decision')})" for rule in record.get("would_deny") or [reason]]


def report(records: Iterator[dict], by: str) -> dict[str, Group]:
    """Records summed per value of the `by` field, largest cost first."""
    group_of = GROUPINGS[by]
    groups: dict[str, Group] = {}
    for record in records:
        name = group_of(record)
        group = groups.get(name)
        if group is None:
            group = groups[name] = Group()
        group.add(record)
    return dict(sorted(groups.items(), key=lambda item: (-item[1].cost_micros, -item[1].calls, item[0])))


def report_rows(groups: dict[str, Group]) -> list[list[str]]:
    """Rows of text for a table or CSV, in `COLUMNS` order after the group's name."""
    rows = []
    for name, group in groups.items():
        values = group.as_dict()
        refusals = ", ".join(f"{reason} {count}" for reason, count in values["refusals"].items())
        rows.append([name, *(str(values[c]) for c in COLUMNS[:5]), f"{values['cost_usd']:.6f}", refusals])
    return rows


REAL_KEY_COLUMNS = ["provider", "calls", "clients", "hosts", "first_seen", "last_seen", "input_tokens",
                    "output_tokens", "cost_usd"]  # fmt: skip


@dataclass
class RealKeyUse:
    """One real key's calls (`real_keys: audit`): from where, how often, at what cost."""

    provider: str = ""
    calls: int = 0
    clients: Counter = field(default_factory=Counter)  # by address without the port: one machine, many connections
    hosts: Counter = field(default_factory=Counter)
    first_seen: float = 0.0
    last_seen: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0

    def add(self, record: dict) -> None:
        ts = record.get("ts", 0)
        self.provider = record.get("provider") or ""
        self.calls += 1
        self.clients[(record.get("client") or "").rpartition(":")[0] or "(unknown)"] += 1
        self.hosts[record.get("host") or "(unknown)"] += 1
        self.first_seen = min(self.first_seen or ts, ts)
        self.last_seen = max(self.last_seen, ts)
        self.input_tokens += record.get("input_tokens") or 0
        self.output_tokens += record.get("output_tokens") or 0
        self.cost_micros += record.get("cost_micros") or 0

    def as_dict(self) -> dict:
        return {
            "provider": self.provider, "calls": self.calls, "clients": dict(self.clients.most_common()),
            "hosts": dict(self.hosts.most_common()), "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen), "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": micros_to_usd(self.cost_micros),
        }  # fmt: skip


def real_key_report(records: Iterator[dict]) -> dict[str, RealKeyUse]:
    """The real keys still in use, by fingerprint, most recently used first: the list of what to migrate."""
    uses: dict[str, RealKeyUse] = {}
    for record in records:
        if record.get("real_key"):
            uses.setdefault(record["real_key"], RealKeyUse()).add(record)
    return dict(sorted(uses.items(), key=lambda item: (-item[1].last_seen, item[0])))


def real_key_rows(uses: dict[str, RealKeyUse]) -> list[list[str]]:
    rows = []
    for fingerprint, use in uses.items():
        values = use.as_dict()
        values["clients"] = ", ".join(f"{client} ({n})" for client, n in values["clients"].items())
        values["hosts"] = ", ".join(values["hosts"])
        values["cost_usd"] = f"{values['cost_usd']:.6f}"
        rows.append([fingerprint, *(str(values[column]) for column in REAL_KEY_COLUMNS)])
    return rows


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RecordFilter:
    """`audit tail`'s filters; None matches anything. `key` matches a key's id or its name."""

    key: str | None = None
    policy: str | None = None
    decision: str | None = None
    host: str | None = None

    def matches(self, record: dict) -> bool:
        return (
            (self.key is None or self.key in (record.get("key_id"), record.get("key_name")))
            and (self.policy is None or record.get("policy") == self.policy)
            and (self.decision is None or record.get("decision") == self.decision)
            and (self.host is None or record.get("host") == self.host)
        )


def last_records(base: Path, count: int, wanted: RecordFilter) -> list[dict]:
    """The last `count` matching call records of the log `base` names, read from the end of each slot."""
    slots = {file.slot for file in auditfiles.audit_files(base)}
    found = [record for slot in slots for record in _last_of_slot(base, slot, count, wanted)]
    return sorted(found, key=lambda record: record.get("ts", 0))[-count:] if count else []


def _last_of_slot(base: Path, slot: int, count: int, wanted: RecordFilter) -> Iterator[dict]:
    found = 0
    for file in reversed(auditfiles.slot_files(base, slot)):
        for line in auditfiles.lines_backwards(file.path):
            if found >= count:
                return
            if line.startswith(CALL_PREFIXES):
                record = json.loads(line)
                if wanted.matches(record):
                    found += 1
                    yield record


class Follower:
    """New call records of a log as they are written: every slot's live file, through rotations.

    Files are followed by inode: a live file renamed by rotation is read to its end under its new
    name, and any file that appeared since we started (even one rotated out between two polls) from
    its start. Files already rotated out when we started are history, left to `last_records`.
    """

    def __init__(self, base: Path, wanted: RecordFilter):
        self.base, self.wanted = base, wanted
        self._offsets: dict[int, int] = {}
        self._history: set[int] = set()
        for file in auditfiles.audit_files(base):
            status = file.path.stat()
            if file.number is None:
                self._offsets[status.st_ino] = status.st_size
            else:
                self._history.add(status.st_ino)

    def poll(self) -> list[dict]:
        found = []
        for file in auditfiles.audit_files(self.base):
            try:
                inode = file.path.stat().st_ino
            except FileNotFoundError:
                continue  # rotated while we looked: it is read next time under its new name
            if inode not in self._history:
                found.extend(self._read_new(file.path, inode))
        return sorted(found, key=lambda record: record.get("ts", 0))

    def _read_new(self, path: Path, inode: int) -> list[dict]:
        with open(path, "rb") as opened:
            if os.fstat(opened.fileno()).st_ino != inode:
                return []
            opened.seek(self._offsets.get(inode, 0))
            data = opened.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offsets[inode] = self._offsets.get(inode, 0) + len(complete)
        records = (json.loads(line) for line in complete.splitlines() if line.startswith(CALL_PREFIXES))
        return [record for record in records if self.wanted.matches(record)]

    def follow(self, interval: float = 0.25) -> Iterator[dict]:
        while True:
            yield from self.poll()
            time.sleep(interval)


def describe(record: dict) -> str:
    """One line for a person: when, who, what, the outcome and the cost."""
    when = datetime.fromtimestamp(record.get("ts", 0), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    key = record.get("key_id") or "-"
    if record.get("key_name"):
        key += f" ({record['key_name']})"
    call = f"{record.get('method', '')} {record.get('path', '')}"
    tokens = f"{record.get('input_tokens', 0)}→{record.get('output_tokens', 0)} tokens"
    cost = format_usd(record.get("cost_micros") or 0)
    outcome = f"{record.get('decision', '?')} {record.get('status') or '-'}"
    who = [key, record.get("policy") or "-", record.get("provider") or "-", record.get("model") or "-"]
    parts = [when, *who, call, outcome, tokens, cost, record.get("reason", "")]
    return "  ".join(parts)
