"""Benchmark of the audit log on its own (no proxy): what chaining and signing add to each record
written on a call's path, and how long `audit report`, `audit verify` and `audit tail` take on a
log of a million records.

Per-record cost: records written one after another, as the proxy writes them, by the writer as it
was before the chain (one JSON line appended and flushed) and by today's `AuditLog` (chained, with
a signed checkpoint every CHECKPOINT_EVERY records, far more often than the proxy's default of
every 10 s at any realistic rate); median of ROUNDS rounds, alternating. Times are the process's
CPU time (user + system), which a machine busy with other work inflates less than the wall clock.

The million-record log is written by `AuditLog` with rotation at 100 MB, as a proxy would leave it.
Figures are printed and written to bench/audit-results.json. Usage: `make bench-audit`
(`--records N` for a smaller log).
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

from agentkeys.audit import AuditLog, AuditSettings, CallRecord
from agentkeys.auditchain import signing_key
from agentkeys.auditfiles import audit_files
from agentkeys.cli import main as agentkeys

ROUNDS = 7
RECORDS_PER_ROUND = 20_000
CHECKPOINT_EVERY = 1_000
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "gemini-2.0-flash"]


def a_call(i: int) -> CallRecord:
    """A realistic record: the fields a settled chat call carries."""
    return CallRecord(
        key_id=f"k{i % 500:05d}abcdef", key_name=f"agent-{i % 500}", policy=f"policy-{i % 7}",
        provider="openai", method="POST", path="/v1/chat/completions", model=MODELS[i % len(MODELS)],
        decision="allow" if i % 20 else "deny", reason="ok" if i % 20 else "agentkeys: budget exhausted",
        deny_kind=None if i % 20 else "budget", status=200 if i % 20 else 402, metering="usage",
        input_tokens=120 + i % 50, output_tokens=30 + i % 20, cost_usd=0.000036, cost_micros=36,
        hold_micros=160, upstream_latency_ms=1.234, proxy_overhead_ms=0.512,
    )  # fmt: skip


class PlainWriter:
    """The audit writer before the chain, as the baseline: one JSON line appended and flushed."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: CallRecord) -> None:
        record.ts = record.ts or time.time()
        self.file.write(json.dumps(vars(record), separators=(",", ":")) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def per_record_seconds(make_writer, records: list[CallRecord], checkpoint: bool) -> float:
    writer = make_writer()
    started = time.process_time()
    for i, record in enumerate(records):
        record.ts = 0.0
        writer.write(record)
        if checkpoint and i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
            writer.checkpoint()
    elapsed = time.process_time() - started
    writer.close()
    return elapsed / len(records)


def write_cost(work: Path) -> dict:
    signer = signing_key(work / "certs")
    records = [a_call(i) for i in range(RECORDS_PER_ROUND)]
    plain, chained = [], []
    for n in range(ROUNDS):
        plain.append(per_record_seconds(lambda n=n: PlainWriter(work / f"plain{n}.jsonl"), records, False))
        settings = AuditSettings(work / f"chained{n}" / "audit.jsonl")
        chained.append(per_record_seconds(lambda s=settings: AuditLog(s, signer), records, True))
    before, after = statistics.median(plain) * 1e6, statistics.median(chained) * 1e6
    return {"plain_us": round(before, 2), "chained_us": round(after, 2), "added_us": round(after - before, 2)}


def million(work: Path, count: int) -> dict:
    base = work / "million" / "audit.jsonl"
    log = AuditLog(AuditSettings(base, rotate_bytes=100_000_000), signing_key(work / "certs"))
    for i in range(count):
        log.write(a_call(i))
        if i % 8000 == 7999:  # a checkpoint every 10 s at 800 calls/s
            log.checkpoint()
    log.close()
    files = [str(file.path) for file in audit_files(base)]
    size = sum(os.path.getsize(path) for path in files)
    figures = {"records": count, "files": len(files), "megabytes": round(size / 1e6, 1)}
    commands = {
        "report_by_model_s": ["audit", "report", "--by", "model", *files],
        "report_since_1h_by_key_csv_s": ["audit", "report", "--by", "key", "--since", "1h", "--csv", *files],
        "verify_s": ["audit", "verify", *files],
        "tail_20_s": ["audit", "tail", "-n", "20", str(base)],
    }
    for name, argv in commands.items():
        started, cpu = time.perf_counter(), time.process_time()
        with redirect_stdout(io.StringIO()) as out:
            status = agentkeys(argv)
        figures[name] = round(time.perf_counter() - started, 2)
        figures[f"{name.removesuffix('_s')}_cpu_s"] = round(time.process_time() - cpu, 2)
        if status != 0:
            raise SystemExit(f"{' '.join(argv[:2])} failed:\n{out.getvalue()}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        results = {"write_per_record": write_cost(work)}
        print(f"per record written: {json.dumps(results['write_per_record'])}", flush=True)
        results["log"] = million(work, args.records)
        print(f"log: {json.dumps(results['log'])}")
    results["python"] = sys.version.split()[0]
    (Path(__file__).parent / "audit-results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
