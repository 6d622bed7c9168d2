"""What the proxy says in its log: one line per call, and JSON lines for log collectors.

A call's line is built from its audit record, so the log and the audit log never disagree; like the
audit record it names the key by its id, never the key. With `log_format: json` every line the proxy
writes (mitmproxy's own too) is one JSON object: `time`, `level`, `message` and `fields`.
"""

import json
import logging
from datetime import UTC, datetime

from agentkeys.audit import CallRecord

calls = logging.getLogger("agentkeys.calls")


def log_call(record: CallRecord) -> None:
    """One line at info level: what was called, with which key, what it answered, cost and took."""
    if not calls.isEnabledFor(logging.INFO):
        return
    fields = call_fields(record)
    text = " ".join(f"{name}={value}" for name, value in fields.items() if name not in ("method", "path"))
    calls.info("%s %s %s", record.method or "-", record.path or "-", text, extra={"fields": fields})


def call_fields(record: CallRecord) -> dict:
    fields = {
        "method": record.method,
        "path": record.path,
        "key_id": record.key_id,
        "provider": record.provider,
        "model": record.model,
        "status": record.status,
        "decision": record.decision,
        "cost_usd": f"{record.cost_micros / 1_000_000:.6f}",
        "latency_ms": record.upstream_latency_ms,
    }
    if record.decision != "allow":
        fields["reason"] = record.reason
    return fields


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", None) or {})
        client = getattr(record, "client", None)  # mitmproxy's records about a connection name its peer
        if client:
            fields["client"] = f"{client[0]}:{client[1]}"
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json_line(record.created, record.levelname, record.getMessage(), fields)


def json_line(created: float, level: str, message: str, fields: dict) -> str:
    return json.dumps(
        {
            "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
            "level": level.lower(),
            "message": message,
            "fields": fields,
        },
        separators=(",", ":"),
    )
