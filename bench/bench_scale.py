"""Benchmark: what workers and streams give, in the same run, against the same mock. Only 127.0.0.1.

Set-ups: the mock provider itself ("direct"), bare mitmdump streaming every response ("bare"),
`agentkeys serve --workers 1` and `--workers 2`, each on its own SQLite file. The load generator is
bench.py's minimal HTTP/1.1 client.

Measured, in rounds that go through every set-up in turn (the median round is reported):
  * requests/s of small chat calls over 16 connections, one worker against two (target: >= 1.7x);
  * a 4,000-event stream (one event per token, the mock answering at once), one after another:
    what each event costs through bare mitmdump and through one worker, above direct (target: the
    worker's per-event cost within 1.2x of bare's);
  * events/s through 16 such streams at once, on one worker and on two (and per worker);
  * N streams at once of 40 events 50 ms apart (2 s each, as a model writes), N = 200 and 800: how
    long until all have ended, on one worker and on two.
Then it checks that every call got a 200 and that each proxy's ledger equals its audit log.
Results are printed and written to bench/results-scale.json; the exit status is 1 if a check failed.
"""

import asyncio
import contextlib
import io
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench
from bench import Connection, Target, conftest, start_mock, stop

RESULTS_PATH = Path(__file__).with_name("results-scale.json")
ROUNDS = 3
MOCK_KEY = "sk-test-real-openai"  # the mock's default OpenAI key, for calls straight to it
LONG_STREAM_EVENTS = 4000
LONG_STREAM = {**bench.SMALL_CHAT, "max_tokens": LONG_STREAM_EVENTS, "stream": True}
LONG_STREAM_CALLS, LONG_STREAM_WARMUP = 6, 1
PARALLEL_STREAMS, PARALLEL_STREAM_CALLS = 16, 32
PACED = {**bench.SMALL_CHAT, "max_tokens": 40, "stream": True}
PACED_INTERVAL = 0.05  # seconds between events: 40 events take 2 s
PACED_COUNTS = (200, 800)
TARGET_WORKERS_SPEED_UP = 1.7
TARGET_EVENT_COST_RATIO = 1.2


def paced_request(target: Target) -> bytes:
    """The paced stream's request: the mock spaces its events by the interval this header asks for."""
    request = target.request(PACED)
    return request.replace(
        b"\r\nContent-Type:", f"\r\nX-Mock-Event-Interval: {PACED_INTERVAL}\r\nContent-Type:".encode()
    )


async def one_stream_at_a_time(targets: list[Target]) -> dict[str, float]:
    """Median ms of a LONG_STREAM_EVENTS-event stream through each target, alternating call by call."""
    replies = await bench.alternating(targets, LONG_STREAM, LONG_STREAM_WARMUP, LONG_STREAM_CALLS, sse=True)
    return {name: statistics.median(reply.ms for reply in got) for name, got in replies.items()}


async def streams_in_parallel(target: Target) -> float:
    """Events/s through PARALLEL_STREAMS connections streaming long streams back to back."""
    connections = [await Connection.open(target) for _ in range(PARALLEL_STREAMS)]
    request = target.request(LONG_STREAM)
    remaining = PARALLEL_STREAM_CALLS

    async def worker(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await connection.call(request, sse=True)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(connection) for connection in connections))
        elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
    return PARALLEL_STREAM_CALLS * (LONG_STREAM_EVENTS + 2) / elapsed


async def paced_streams(target: Target, count: int) -> float:
    """Seconds until `count` paced streams, all opened at once, have all ended."""
    request = paced_request(target)

    async def one() -> None:
        connection = await Connection.open(target)
        try:
            await connection.call(request, sse=True)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - started


def start_streaming_mitmdump(work: Path, mock_url: str) -> tuple[subprocess.Popen, int]:
    """mitmdump in reverse mode to the mock, passing every response on as it arrives (as the addon does)."""
    port, log_path = conftest.free_port(), work / "bare-mitmdump.log"
    args = [str(conftest.MITMDUMP), "--mode", f"reverse:{mock_url}@127.0.0.1:{port}"]
    for option in ("flow_detail=0", "connection_strategy=lazy", "stream_large_bodies=1", f"confdir={work / 'bc'}"):
        args += ["--set", option]
    process = subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    conftest.wait_for_port(port, process, log_path, bench.START_TIMEOUT)
    return process, port


def start_workers(running: contextlib.ExitStack, work: Path, mock, workers: int) -> Target:
    name = f"workers-{workers}"
    with contextlib.redirect_stdout(io.StringIO()):
        proxy = conftest.start_proxy(work / name, mock, workers=workers, max_connections=4000)
    running.callback(conftest.stop_proxy, proxy)
    key = proxy.issue(bench.write_policy(work), "--budget", "100000", "--name", name)
    setup = f"agentkeys serve --workers {workers}, one SQLite file"
    path = "/openai/v1/chat/completions"
    return Target(name, setup, [proxy.gateway_port], path, key["key"], [proxy], key["id"], [proxy.process.pid])


def rss_mb(pid: int) -> float:
    """Resident size of a process and its children (a supervisor's workers), in MB."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * 4096 for p in pids) / 2**20


async def measure(direct: Target, bare: Target, one: Target, two: Target) -> dict:
    rounds = []
    for number in range(1, ROUNDS + 1):
        bench.progress(f"round {number}/{ROUNDS}: small calls at 16 connections")
        figures = {"rps": {target.name: (await bench.concurrent(target))["rps"] for target in (one, two)}}
        bench.progress(f"round {number}/{ROUNDS}: {LONG_STREAM_EVENTS}-event streams, one at a time")
        figures["stream_ms"] = await one_stream_at_a_time([direct, bare, one])
        bench.progress(f"round {number}/{ROUNDS}: {PARALLEL_STREAMS} long streams at once")
        figures["events_per_s"] = {target.name: await streams_in_parallel(target) for target in (one, two)}
        rounds.append(figures)
    paced = {}
    for count in PACED_COUNTS:
        for target in (one, two):
            bench.progress(f"{count} paced 2-second streams at once through {target.name}")
            paced[f"{target.name}/{count}"] = await paced_streams(target, count)
    return {"rounds": rounds, "paced_seconds": paced}


def median_of(rounds: list[dict], measure: str, name: str) -> float:
    return statistics.median(figures[measure][name] for figures in rounds)


def report(results: dict) -> list[tuple[str, str, bool]]:
    rounds = results["rounds"]
    rps_one, rps_two = median_of(rounds, "rps", "workers-1"), median_of(rounds, "rps", "workers-2")
    direct, bare, one = (median_of(rounds, "stream_ms", name) for name in ("direct", "bare", "workers-1"))
    events = LONG_STREAM_EVENTS + 2
    bare_us, one_us = (bare - direct) * 1000 / events, (one - direct) * 1000 / events
    eps_one, eps_two = median_of(rounds, "events_per_s", "workers-1"), median_of(rounds, "events_per_s", "workers-2")
    print(f"\nsmall calls, 16 connections: 1 worker {rps_one:,.0f} req/s, 2 workers {rps_two:,.0f} req/s")
    print(
        f"a {LONG_STREAM_EVENTS}-event stream: direct {direct:.0f} ms, bare mitmdump {bare:.0f} ms,"
        f" 1 worker {one:.0f} ms; per event above direct: bare {bare_us:.1f} µs, 1 worker {one_us:.1f} µs"
    )
    print(f"events/s, {PARALLEL_STREAMS} streams at once: 1 worker {eps_one:,.0f}; 2 workers {eps_two:,.0f}"
          f" ({eps_two / 2:,.0f} per worker)")  # fmt: skip
    for count in PACED_COUNTS:
        one_s, two_s = (results["paced_seconds"][f"workers-{n}/{count}"] for n in (1, 2))
        print(f"{count} streams of 40 events at 50 ms (2 s each), all ended after: 1 worker {one_s:.1f} s,"
              f" 2 workers {two_s:.1f} s")  # fmt: skip
    print(f"resident size: {', '.join(f'{name} {mb:.0f} MB' for name, mb in results['rss_mb'].items())}")
    results["summary"] = {
        "rps": {"workers-1": rps_one, "workers-2": rps_two},
        "per_event_us": {"bare": bare_us, "workers-1": one_us},
        "events_per_s": {"workers-1": eps_one, "workers-2": eps_two},
    }
    return [
        (f"2 workers: {rps_two / rps_one:.2f}x one worker's requests/s", f">= {TARGET_WORKERS_SPEED_UP}x",
         rps_two / rps_one >= TARGET_WORKERS_SPEED_UP),
        (f"per-event cost: {one_us / bare_us:.2f}x bare mitmdump's", f"<= {TARGET_EVENT_COST_RATIO}x",
         one_us / bare_us <= TARGET_EVENT_COST_RATIO),
    ]  # fmt: skip


def main() -> int:
    signal.signal(signal.SIGTERM, bench.interrupt)
    with tempfile.TemporaryDirectory(prefix="agentkeys-bench-scale-") as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        mock = start_mock(work, output_tokens=LONG_STREAM_EVENTS)
        running.callback(stop, mock.process)
        bare_process, bare_port = start_streaming_mitmdump(work, mock.url)
        running.callback(stop, bare_process)
        mock_port = int(mock.url.rsplit(":", 1)[1])
        direct = Target("direct", "the mock itself", [mock_port], "/v1/chat/completions", MOCK_KEY)
        bare = Target("bare", "bare mitmdump, streaming", [bare_port], "/v1/chat/completions", MOCK_KEY)
        one, two = start_workers(running, work, mock, 1), start_workers(running, work, mock, 2)
        results = asyncio.run(measure(direct, bare, one, two))
        results["rss_mb"] = {target.name: rss_mb(target.pids[0]) for target in (one, two)}
        targets = report(results)
        checks = [bench.check_statuses(target) for target in (direct, bare)]
        for target in (one, two):
            checks += bench.check_accounting(target)
    print("\ntargets (median of rounds):")
    for what, target, met in targets:
        print(f"  {'met' if met else 'NOT MET':8} {what} (target {target})")
    print("checks:")
    for what, ok in checks:
        print(f"  {'ok' if ok else 'FAILED':8} {what}")
    RESULTS_PATH.write_text(json.dumps({**results, "targets": targets, "checks": checks}, indent=1))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
