"""One JSONL record per call. Never a key, never a prompt: only ids, names, counts and timings.

Each line is chained to the one before it and checkpoints are signed at intervals (`auditchain`);
each writer owns its files (`auditfiles`). A record goes, as the same line, to every sink: the
file, and stdout for log collectors.
"""

import asyncio
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from heapq import merge
from pathlib import Path

from agentkeys import auditfiles
from agentkeys.auditchain import GENESIS, Signer, chain_fields, line_hash, signing_key
from agentkeys.policy import ProxyConfig

log = logging.getLogger(__name__)


@dataclass
class CallRecord:
    key_id: str | None
    key_name: str | None
    policy: str | None
    provider: str | None
    method: str
    path: str
    model: str | None
    decision: str  # "allow" | "deny" | "would_deny" (shadow mode: forwarded) | "pass" (not a governed call)
    reason: str
    status: int | None = None
    # "usage" | "overrun" (usage above the hold, charged in full) | "held" (charged the full hold)
    # | "none" | "free" | "unmetered"
    metering: str = "none"
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    cost_micros: int = 0
    hold_micros: int = 0
    upstream_latency_ms: float | None = None
    ttft_ms: float | None = None
    proxy_overhead_ms: float | None = None
    policy_revision: str | None = None  # of the policy file that narrowed the key's scope, if the proxy has one
    host: str | None = None  # of traffic that is not a provider call (a tunnel passed through, egress refused)
    port: int | None = None
    client: str | None = None  # the agent's address, for traffic the proxy passed or refused by host
    deny_kind: str | None = None  # why a call was refused, as a word (budget, forbidden, …), for reports
    identity: dict | None = None  # the job or pod the key was minted for, from its OIDC token (keyless keys)
    account_id: str | None = None  # the account (plans.md) whose period budget also bounds the key
    would_deny: list[str] | None = None  # shadow mode: the policy rules a forwarded call broke (shadow.Rule)
    real_key: str | None = None  # a real provider key's fingerprint (realkeys.fingerprint), never the key
    llm_host: str | None = None  # the catalogue entry of an LLM host no provider is configured for
    request_bytes: int | None = None  # of a call passed on untouched (a real key's, an unconfigured LLM host's)
    response_bytes: int | None = None
    ts: float = 0.0


@dataclass(frozen=True)
class AuditSettings:
    """Where records go and when files turn over, read once from the config."""

    path: Path | None  # slot 1's live file; None: no file sink
    stdout: bool = False
    rotate_bytes: int | None = None
    rotate_seconds: float | None = None
    checkpoint_seconds: float = 10

    @classmethod
    def of(cls, config: ProxyConfig) -> "AuditSettings":
        sinks = config.audit_sinks_used
        return cls(
            path=config.path(config.audit_log) if "file" in sinks else None,
            stdout="stdout" in sinks,
            rotate_bytes=config.audit_rotate_bytes,
            rotate_seconds=config.audit_rotate_interval,
            checkpoint_seconds=config.audit_checkpoint_interval,
        )

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.stdout


def audit_log_for(config: ProxyConfig, current: "AuditLog | None") -> "AuditLog":
    """The audit log `config` asks for: on a reload that changes none of its settings, the one already
    open (its file, its slot and its chain go on); else a new one."""
    settings = AuditSettings.of(config)
    if current is not None and current.settings == settings:
        return current
    return open_audit_log(config, settings)


def open_audit_log(config: ProxyConfig, settings: AuditSettings) -> "AuditLog":
    """The proxy's audit log, signing with the key beside its CA, checkpointing on the running loop."""
    signer = signing_key(config.path(config.certs_dir)) if settings.enabled else None
    audit = AuditLog(settings, signer)
    try:
        audit.start_checkpoints(asyncio.get_running_loop())
    except RuntimeError:
        log.warning("agentkeys: no event loop: the audit log is signed only when a file closes")
    return audit


class AuditLog:
    """Appends chained records to its sinks, one line each, written at once so a crash loses none."""

    def __init__(self, settings: AuditSettings, signer: Signer | None):
        self.settings = settings
        self._signer = signer
        self._lock = threading.Lock()
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._file: int | None = None  # the live file's descriptor
        self._slot_lock: int | None = None
        self._slot = 0
        self._file_bytes = 0
        self._file_opened = 0.0
        self._cut_short = False  # the last write to the file failed, perhaps half-way
        self._unsigned = 0  # records since the last checkpoint
        self.writer, self._seq, self._head, started = secrets.token_hex(4), 0, GENESIS, "new"
        if settings.path is not None:
            started = self._open_slot(settings.path)
        if settings.enabled:
            self._start(started)

    @property
    def path(self) -> Path | None:
        """The live file this process writes."""
        return auditfiles.slot_path(self.settings.path, self._slot) if self.settings.path else None

    # ----- writing -----

    def write(self, record: CallRecord) -> None:
        record.ts = record.ts or time.time()
        if not self.settings.enabled:
            return
        fields = json.dumps(vars(record), separators=(",", ":"))  # flat: no need for asdict's deep copy
        with self._lock:
            if self._closed:
                log.error("agentkeys: an audit record came after the audit log closed; here it is: %s", fields)
                return
            if self._due_for_rotation(record.ts):
                self._rotate()
            self._append('{"kind":"call",' + fields[1:-1])

    def checkpoint(self) -> None:
        """Sign what was written since the last checkpoint, if anything was."""
        with self._lock:
            if not self._closed and self._unsigned:
                self._checkpoint(closing=None)

    def start_checkpoints(self, loop: asyncio.AbstractEventLoop) -> None:
        """Checkpoint every `checkpoint_seconds` on `loop`, off any call's path."""
        if self.settings.enabled:
            self._timer = loop.call_later(self.settings.checkpoint_seconds, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.checkpoint()
        except Exception:
            log.exception("agentkeys: writing an audit checkpoint failed; will try again")
        if not self._closed:
            self.start_checkpoints(loop)

    def close(self) -> None:
        """Seal the file with a closing checkpoint and let the slot go. Later records are logged as errors."""
        with self._lock:
            if self._closed:
                return
            if self._timer:
                self._timer.cancel()
            if self.settings.enabled:
                self._checkpoint(closing="stop")
            self._closed = True
            if self._file is not None:
                os.close(self._file)
                os.close(self._slot_lock)
            if self.settings.stdout:
                sys.stdout.flush()

    # ----- the chain (called with the lock held) -----

    def _append(self, unchained: str) -> None:
        """Write one record: `unchained` is its JSON object without the closing brace."""
        self._seq += 1
        line = unchained + chain_fields(self.writer, self._seq, self._head)
        self._emit(line)
        self._unsigned += 1

    def _start(self, how: str, previous_file: str | None = None) -> None:
        """The record that opens a file, or a process's stretch of one: who writes, and what came before."""
        fields = {
            "ts": time.time(),
            "started": how,  # "new" chain, "restart" of a process, "rotate" into a new file
            "previous_file": previous_file,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "checkpoint_interval": self.settings.checkpoint_seconds,
            "public_key": self._signer.public_key_text,
        }
        self._append('{"kind":"start",' + json.dumps(fields, separators=(",", ":"))[1:-1])

    def _checkpoint(self, closing: str | None) -> None:
        fields = {"ts": time.time(), "signer": self._signer.fingerprint, "closing": closing}
        self._seq += 1
        unsigned = '{"kind":"checkpoint",' + json.dumps(fields, separators=(",", ":"))[1:-1]
        unsigned += chain_fields(self.writer, self._seq, self._head)
        self._emit(self._signer.signed(unsigned))
        self._unsigned = 0

    def _emit(self, line: str) -> None:
        """Write the line to every sink. One that fails logs the whole line, so the record is not lost."""
        data = line.encode() + b"\n"
        if self._file is not None:
            try:
                _write_all(self._file, b"\n" + data if self._cut_short else data)
            except OSError as e:
                self._cut_short = True  # part of the line may be on disk: the next one starts on a line of its own
                log.error("agentkeys: the audit file could not be written (%s); the record: %s", e, line)
                return  # the chain goes on from the last line the file has: `verify` shows the record missing
            self._cut_short = False
            self._file_bytes += len(data)
        if self.settings.stdout:
            try:
                sys.stdout.write(line + "\n")  # through sys.stdout, as the log is: never in a log line's middle
                sys.stdout.flush()
            except OSError as e:
                log.error("agentkeys: stdout could not take the audit record (%s): %s", e, line)
        self._head = line_hash(data[:-1])

    # ----- files -----

    def _open_slot(self, base: Path) -> str:
        """Take a free slot and continue its chain; returns how this process's stretch starts."""
        self._slot, self._slot_lock = auditfiles.claim_slot(base)
        started = "new"
        for file in reversed(auditfiles.slot_files(base, self._slot)):
            last = auditfiles.last_chain_record(file.path)
            if last is not None:
                line, record = last
                self.writer, self._seq, self._head = record["writer"], record["seq"], line_hash(line)
                started = "restart"
                break
        self._open_live_file()
        return started

    def _open_live_file(self) -> None:
        path = self.path
        self._file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if not auditfiles.ends_with_newline(path):
            _write_all(self._file, b"\n")  # a line cut short (a power loss) stays its own, visibly broken, line
        self._file_bytes = os.fstat(self._file).st_size
        self._file_opened = time.time()

    def _due_for_rotation(self, now: float) -> bool:
        if self._file is None:
            return False
        rotate_bytes, rotate_seconds = self.settings.rotate_bytes, self.settings.rotate_seconds
        return bool(
            (rotate_bytes and self._file_bytes >= rotate_bytes)
            or (rotate_seconds and now - self._file_opened >= rotate_seconds)
        )

    def _rotate(self) -> None:
        """Close the live file with a signed checkpoint, number it, and start a new one that names it."""
        self._checkpoint(closing="rotate")
        os.close(self._file)
        numbers = [file.number or 0 for file in auditfiles.slot_files(self.settings.path, self._slot)]
        rotated = auditfiles.rotated_path(self.settings.path, self._slot, max(numbers, default=0) + 1)
        os.rename(self.path, rotated)
        self._open_live_file()
        self._start("rotate", rotated.name)


def _write_all(descriptor: int, data: bytes) -> None:
    """One write for the whole line (O_APPEND puts it at the end); more only if the kernel takes less."""
    while data:
        data = data[os.write(descriptor, data) :]


def read_records(path: Path) -> list[dict]:
    """The call records of the log `path` names (every slot, rotated files too), oldest first."""
    per_file = [auditfiles.call_records([file.path]) for file in auditfiles.audit_files(Path(path))]
    return list(merge(*per_file, key=lambda record: record["ts"]))
