"""logs.py: a call's log line from its audit record, and JSON lines a collector can read."""

import json
import logging
import sys

from agentkeys.audit import CallRecord
from agentkeys.logs import JsonFormatter, call_fields

RECORD = CallRecord(
    key_id="abc123", key_name="job", policy="ci", provider="openai", method="POST", path="/v1/chat/completions",
    model="gpt-4o-mini", decision="allow", reason="ok", status=200, cost_micros=5, upstream_latency_ms=12.5,
)  # fmt: skip


def test_a_calls_fields_name_what_an_operator_filters_on_with_cost_in_fixed_decimals():
    fields = call_fields(RECORD)
    assert fields == {
        "method": "POST", "path": "/v1/chat/completions", "key_id": "abc123", "provider": "openai",
        "model": "gpt-4o-mini", "status": 200, "decision": "allow", "cost_usd": "0.000005", "latency_ms": 12.5,
    }  # fmt: skip
    refused = call_fields(CallRecord(**{**vars(RECORD), "decision": "deny", "reason": "budget exhausted"}))
    assert refused["reason"] == "budget exhausted"


def test_json_lines_have_time_level_message_and_fields_and_fold_a_traceback_in():
    formatter = JsonFormatter()
    record = logging.LogRecord("agentkeys.calls", logging.INFO, __file__, 1, "POST %s", ("/v1/x",), None)
    record.fields = {"key_id": "abc123"}
    line = json.loads(formatter.format(record))
    assert line["level"] == "info" and line["message"] == "POST /v1/x" and line["fields"] == {"key_id": "abc123"}
    assert line["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    written = formatter.format(failed)
    assert "\n" not in written and "ValueError: boom" in json.loads(written)["fields"]["exception"]
