"""Benchmark against peers: `agentkeys serve` (one worker and two) beside Portkey's open-source gateway
and bare mitmdump, on the same mock, in the same run. Only 127.0.0.1 traffic.

Portkey's gateway (`@portkey-ai/gateway`, Node) forwards calls and enforces no keys or budgets; the
Agent Keys set-ups check a scoped key, hold the worst case against its budget, meter and audit every
call. `make bench-peers` installs the gateway from npm into a temporary folder and passes it here
(`--portkey DIR`). Measured in rounds that take every set-up in turn (the median round is reported):
small chat calls over 16 connections (requests/s and median latency), and one after another (median
latency). Checks: every call answered 200, and each Agent Keys ledger equals its audit log.
Results are printed as a table and written to bench/results-peers.json.
"""

import argparse
import asyncio
import contextlib
import io
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bench
from bench import Target, conftest, start_bare_mitmdump, start_mock, stop

RESULTS_PATH = Path(__file__).with_name("results-peers.json")
ROUNDS = 3
MOCK_KEY = "sk-test-real-openai"


@dataclass
class PortkeyTarget(Target):
    """Portkey's gateway names the provider and its host in headers of each call."""

    upstream: str = ""

    def request(self, body: dict) -> bytes:
        headers = f"\r\nx-portkey-provider: openai\r\nx-portkey-custom-host: {self.upstream}\r\nContent-Type:"
        return super().request(body).replace(b"\r\nContent-Type:", headers.encode())


def start_portkey(work: Path, package: Path, mock_url: str) -> tuple[subprocess.Popen, Target]:
    port, log_path = conftest.free_port(), work / "portkey.log"
    command = ["node", str(package / "build" / "start-server.js"), f"--port={port}", "--headless"]
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    conftest.wait_for_port(port, process, log_path, bench.START_TIMEOUT)
    target = PortkeyTarget(
        "portkey", "Portkey gateway (Node), no keys or budgets", [port], "/v1/chat/completions", MOCK_KEY,
        upstream=f"{mock_url}/v1",
    )  # fmt: skip
    return process, target


def start_agentkeys(running: contextlib.ExitStack, work: Path, mock, workers: int) -> Target:
    name = f"agentkeys-{workers}w"
    with contextlib.redirect_stdout(io.StringIO()):
        proxy = conftest.start_proxy(work / name, mock, workers=workers)
    running.callback(conftest.stop_proxy, proxy)
    key = proxy.issue(bench.write_policy(work), "--budget", "100000", "--name", name)
    setup = f"agentkeys serve --workers {workers} (SQLite): keys, budgets, metering, audit"
    path = "/openai/v1/chat/completions"
    return Target(name, setup, [proxy.gateway_port], path, key["key"], [proxy], key["id"], [proxy.process.pid])


async def measure(targets: list[Target]) -> list[dict]:
    rounds = []
    for number in range(1, ROUNDS + 1):
        figures = {}
        for target in targets:
            bench.progress(f"round {number}/{ROUNDS}: {target.name}")
            concurrent = await bench.concurrent(target)
            one_at_a_time = await bench.sequential(target, 200, 20)
            figures[target.name] = {**concurrent, "sequential_ms": statistics.median(one_at_a_time)}
        rounds.append(figures)
    return rounds


def table(targets: list[Target], rounds: list[dict]) -> list[dict]:
    rows = []
    for target in targets:
        rps = statistics.median(figures[target.name]["rps"] for figures in rounds)
        median = statistics.median(figures[target.name]["median_ms"] for figures in rounds)
        sequential = statistics.median(figures[target.name]["sequential_ms"] for figures in rounds)
        rows.append({"setup": target.setup, "name": target.name, "rps": rps, "median_ms": median, "one_ms": sequential})
    portkey = next((row["rps"] for row in rows if row["name"] == "portkey"), None)
    print("\n| set-up | req/s at 16 connections | vs Portkey | median ms | one at a time, median ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['rps'] / portkey:.2f}x" if portkey else "-"
        print(f"| {row['setup']} | {row['rps']:,.0f} | {ratio} | {row['median_ms']:.1f} | {row['one_ms']:.2f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portkey", type=Path, required=True, help="the installed @portkey-ai/gateway package")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, bench.interrupt)
    with tempfile.TemporaryDirectory(prefix="agentkeys-bench-peers-") as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        mock = start_mock(work)
        running.callback(stop, mock.process)
        bare_process, bare_port, _ = start_bare_mitmdump(work, mock.url)
        running.callback(stop, bare_process)
        portkey_process, portkey = start_portkey(work, args.portkey, mock.url)
        running.callback(stop, portkey_process)
        bare = Target("bare", "bare mitmdump (reverse proxy, no addon)", [bare_port], "/v1/chat/completions", MOCK_KEY)
        agentkeys = [start_agentkeys(running, work, mock, workers) for workers in (1, 2)]
        targets = [*agentkeys, portkey, bare]
        rounds = asyncio.run(measure(targets))
        rows = table(targets, rounds)
        checks = [bench.check_statuses(target) for target in (portkey, bare)]
        for target in agentkeys:
            checks += bench.check_accounting(target)
    print("\nchecks:")
    for what, ok in checks:
        print(f"  {'ok' if ok else 'FAILED':8} {what}")
    RESULTS_PATH.write_text(json.dumps({"rows": rows, "rounds": rounds, "checks": checks}, indent=1))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
