"""One JSONL record per call. Never a key, never a prompt: only ids, names, counts and timings."""

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CallRecord:
    key_id: str | None
    key_name: str | None
    policy: str | None
    provider: str | None
    method: str
    path: str
    model: str | None
    decision: str  # "allow" | "deny"
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
    identity: dict | None = None  # the job or pod the key was minted for, from its OIDC token (keyless keys)
    ts: float = 0.0


class AuditLog:
    """Appends records to a file, one line each, flushed as written so a crash loses none."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def write(self, record: CallRecord) -> None:
        record.ts = record.ts or time.time()
        if self._file is None:
            return
        line = json.dumps(vars(record), separators=(",", ":")) + "\n"  # flat: no need for asdict's deep copy
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
