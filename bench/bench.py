"""Benchmark: `agentkeys serve` against bare mitmproxy, and what its store and replicas change.
Only 127.0.0.1 traffic.

The servers run each in its own process: the mock provider (apart, so its work does not share a
GIL with the load generator), a bare `mitmdump` reverse proxy to the mock, and the proxy with the
addon, started exactly as the end-to-end tests start it (tests/conftest.py `start_proxy`), in five
set-ups: `agentkeys serve` on its SQLite file ("addon", the one the targets are about), on a Redis
("redis"), three of them sharing that Redis ("redis-x3") or one SQLite file ("sqlite-x3"), and the
addon loaded as a script into a full `mitmdump` ("script"). `agentkeys serve` runs mitmproxy's
proxy core without the thirty-odd addons mitmdump adds (see agentkeys/server.py), which is about a
third of bare mitmdump's time per call: "script" shows what the addon itself costs, and "addon"
what a user of `agentkeys serve` gets. Each set-up has its own key.

This process is the load generator: a minimal HTTP/1.1 client on asyncio streams, because an SDK
or httpx would spend more per call than the proxy overhead being measured.
Its connections to a set-up of three take the three gateways in turn.

Measured through every target:
  * a small chat call, one at a time: median and p90 latency;
  * 16 connections at once: requests/s and median latency.
Measured bare vs addon only:
  * a ~400 KB prompt: the latency of that call, and what such calls add to small calls beside them;
  * a streaming call: time to the first `data:` line. (Bare mitmdump buffers a stream, the addon
    relays it event by event; the mock sends a whole stream at once, so the two compare fairly.)
The machine is small and noisy, so the small-call measures run in rounds that go through every
target in turn, and the median round is reported; the one-off measures alternate call by call.
Three proxies on a machine of two cores compete for them (and with the mock and the load generator),
though they may gain on one proxy, which uses one core at most: the replica figures show that shared
stores stay correct under contention, not how replicas scale out.

The audit log's chain and signatures, narrowly: the time to write one call's record by today's
chained, signed `AuditLog` against the writer before the chain (bench_audit.write_cost), which is
what chaining and signing add to each call (one record per call).

Then it checks that every call got a 200 and, for each set-up, that the ledger's spend for its key
equals the sum of its audit records' cost_micros over all its proxies, with nothing left held.
Results are printed and written to bench/results.json; the exit status is 1 if a check failed.
"""

import asyncio
import contextlib
import io
import itertools
import json
import os
import platform
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the proxy set-up is the end-to-end tests' own

import bench_audit  # noqa: E402 (beside this file)
from mitmproxy.version import VERSION as MITMPROXY_VERSION  # noqa: E402
from redis_server import RedisServer  # noqa: E402

import conftest  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results.json")

ROUNDS = 5
SEQUENTIAL_WARMUP, SEQUENTIAL_CALLS = 30, 300
WORKERS, CONCURRENT_CALLS = 16, 1600
LARGE_PROMPT_BYTES, LARGE_WARMUP, LARGE_CALLS = 400_000, 1, 5
LOADED_WARMUP, LOADED_CALLS = 10, 200
TTFT_WARMUP, TTFT_CALLS = 5, 50
CALL_TIMEOUT = 30  # seconds: a stuck call fails the run instead of hanging it
START_TIMEOUT = 30

TARGET_ADDED_MS = 0.2  # the addon adds less than this to the median small call
TARGET_RPS_SHARE = 0.85  # and keeps at least this share of bare mitmproxy's requests/s
TARGET_AUDIT_CHAIN_MS = 0.05  # chaining and signing add at most this to a call (its one audit record)

SMALL_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5}
STREAMING_CHAT = {**SMALL_CHAT, "stream": True}


def large_chat() -> dict:
    """A chat call with ~LARGE_PROMPT_BYTES of varied English words (varied, so tokenizing it is real work)."""
    words = (
        "the of and to in is that for it as with was on be by at this are from or have an they which one"
        " you were all we can her has there been if more when will would who so no agent budget proxy key"
        " model token stream policy ledger audit provider request response latency money limit call"
    ).split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(LARGE_PROMPT_BYTES // 4))[:LARGE_PROMPT_BYTES]
    return {**SMALL_CHAT, "messages": [{"role": "user", "content": text}]}


# ----- the client -----


@dataclass
class Target:
    """One way to reach the mock: its listeners (one per proxy), the chat path there, the API key it
    expects and, behind an addon set-up, its proxies and the key's id, for the checks.

    Every call's status is counted here, so the run can check afterwards that none failed.
    """

    name: str
    setup: str  # what serves it, for the report
    ports: list[int]
    path: str
    api_key: str
    proxies: list[conftest.Proxy] = field(default_factory=list)
    key_id: str | None = None
    pids: list[int] = field(default_factory=list)  # the proxy processes, whose CPU time is measured
    statuses: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._next_ports = itertools.cycle(self.ports)

    def next_port(self) -> int:
        """The listener for a new connection: each in turn, so load spreads evenly over replicas."""
        with self._lock:  # the background load opens its connection from its own thread
            return next(self._next_ports)

    def request(self, body: dict) -> bytes:
        """The whole HTTP/1.1 request, built once and sent many times, through any of the listeners
        (so its Host names none: the gateway and bare mitmdump route by path alone)."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {self.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload

    def count(self, status: int) -> None:
        with self._lock:  # the background load counts from its own thread
            self.statuses[status] += 1


@dataclass(frozen=True)
class Reply:
    status: int
    ms: float
    first_data_ms: float | None  # when the first `data:` bytes arrived, if any did
    early_ends: int  # chunked bodies that ended before the stream's `data: [DONE]`


class Connection:
    """One keep-alive HTTP/1.1 connection, reading just what the mock and mitmproxy send back:
    a Content-Length or a chunked body."""

    def __init__(self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.target, self.reader, self.writer = target, reader, writer

    @classmethod
    async def open(cls, target: Target) -> "Connection":
        reader, writer = await asyncio.open_connection("127.0.0.1", target.next_port())
        return cls(target, reader, writer)

    def close(self) -> None:
        self.writer.close()

    async def call(self, request: bytes, sse: bool = False) -> Reply:
        """Send one request and read its whole reply.

        With `sse`, reading a 200 goes on up to `data: [DONE]`, which the mock always sends last: a
        chunked body that ends before it is counted in `early_ends` and the rest of the stream read
        after it, so the stream is timed whole and the connection stays usable.
        """
        async with asyncio.timeout(CALL_TIMEOUT):
            started = time.perf_counter()
            self.writer.write(request)
            await self.writer.drain()
            status, headers = parse_head(await self.reader.readuntil(b"\r\n\r\n"))
            first_data_ms, pieces, early_ends = None, [], 0
            while True:
                async for piece in self._body(headers):
                    if first_data_ms is None and b"data:" in piece:
                        first_data_ms = (time.perf_counter() - started) * 1000
                    pieces.append(piece)
                if not sse or status != 200 or b"data: [DONE]" in b"".join(pieces):
                    break
                early_ends += 1
            ms = (time.perf_counter() - started) * 1000
        self.target.count(status)
        return Reply(status, ms, first_data_ms, early_ends)

    async def _body(self, headers: dict[str, str]):
        """The body's pieces as they arrive: one per chunk when chunked, so a stream's first event shows."""
        if "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                yield await self.reader.readexactly(size)
                await self.reader.readexactly(2)  # the CRLF after each chunk
            while await self.reader.readline() not in (b"\r\n", b""):
                pass  # trailers
        else:
            raise RuntimeError(f"{self.target.name}: a response with neither Content-Length nor chunking")


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


class LargePromptLoad:
    """Large-prompt calls in a loop, from a thread with its own event loop, while the main loop measures.

    Its own thread, so that sending 400 KB never delays the measuring loop's calls in this process.
    """

    def __init__(self, target: Target):
        self.target = target
        self.calls = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="large-prompt-load", daemon=True)

    def __enter__(self) -> "LargePromptLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT)
        if self._error is not None and exc_info[0] is None:
            raise RuntimeError(f"the large-prompt load on {self.target.name} failed") from self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._loop())
        except BaseException as e:
            self._error = e

    async def _loop(self) -> None:
        connection = await Connection.open(self.target)
        request = self.target.request(large_chat())
        try:
            while not self._stop.is_set():
                await connection.call(request)
                self.calls += 1
        finally:
            connection.close()


# ----- the measures -----


async def sequential(target: Target, calls: int, warmup: int) -> list[float]:
    """Latencies (ms) of small calls sent one after another on one keep-alive connection."""
    connection = await Connection.open(target)
    request = target.request(SMALL_CHAT)
    try:
        for _ in range(warmup):
            await connection.call(request)
        return [(await connection.call(request)).ms for _ in range(calls)]
    finally:
        connection.close()


async def concurrent(target: Target) -> dict:
    """Throughput of WORKERS connections each sending small calls back to back, CONCURRENT_CALLS in all."""
    connections = [await Connection.open(target) for _ in range(WORKERS)]
    request = target.request(SMALL_CHAT)
    latencies: list[float] = []
    remaining = CONCURRENT_CALLS

    async def worker(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append((await connection.call(request)).ms)

    try:
        await asyncio.gather(*(connection.call(request) for connection in connections))  # all connected upstream
        started = time.perf_counter()
        await asyncio.gather(*(worker(connection) for connection in connections))
        elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
    return {"rps": len(latencies) / elapsed, "median_ms": statistics.median(latencies)}


async def alternating(targets: list[Target], body: dict, warmup: int, calls: int, sse: bool = False):
    """Replies to one call after another through each target in turn, so drift on a noisy machine hits
    all alike; one keep-alive connection per target."""
    connections = [await Connection.open(target) for target in targets]
    requests = {target.name: target.request(body) for target in targets}
    replies: dict[str, list[Reply]] = {target.name: [] for target in targets}
    try:
        for connection in connections:
            for _ in range(warmup):
                await connection.call(requests[connection.target.name], sse)
        for _ in range(calls):
            for connection in connections:
                name = connection.target.name
                replies[name].append(await connection.call(requests[name], sse))
    finally:
        for connection in connections:
            connection.close()
    return replies


async def beside_large_prompts(target: Target) -> dict:
    """Median small-call latency without, then with, large-prompt calls running through the same proxy."""
    quiet = await sequential(target, LOADED_CALLS, LOADED_WARMUP)
    with LargePromptLoad(target) as load:
        loaded = await sequential(target, LOADED_CALLS, LOADED_WARMUP)  # the warm-up lets the load start
        background_calls = load.calls
    return {
        "quiet_median_ms": statistics.median(quiet),
        "loaded_median_ms": statistics.median(loaded),
        "added_ms": statistics.median(loaded) - statistics.median(quiet),
        "background_calls": background_calls,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def summary(latencies: list[float]) -> dict:
    return {"median_ms": statistics.median(latencies), "p90_ms": statistics.quantiles(latencies, n=10)[8]}


def median_round(rounds: list[dict], key: str) -> dict:
    return sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_measures(bare: Target, addon: Target, others: list[Target]) -> dict:
    """The small-call rounds through every target; the one-off measures through bare and addon only."""
    targets = [bare, addon, *others]
    rounds: dict[str, dict[str, list[dict]]] = {t.name: {"sequential": [], "concurrent": []} for t in targets}
    for number in range(1, ROUNDS + 1):
        for target in targets:
            opened = time.time()
            latencies = await sequential(target, SEQUENTIAL_CALLS, SEQUENTIAL_WARMUP)
            result = {**summary(latencies), "window": [opened, time.time()]}
            rounds[target.name]["sequential"].append(result)
            progress(f"round {number}/{ROUNDS}  sequential  {target.name:9}  median {result['median_ms']:.3f} ms")
        for target in targets:
            opened, cpu_before = time.time(), cpu_seconds(target.pids)
            result = await concurrent(target)
            cpu_ms = (cpu_seconds(target.pids) - cpu_before) * 1000 / CONCURRENT_CALLS
            result |= {"proxy_cpu_ms_per_call": cpu_ms, "window": [opened, time.time()]}
            rounds[target.name]["concurrent"].append(result)
            progress(
                f"round {number}/{ROUNDS}  {WORKERS} concurrent  {target.name:9}  {result['rps']:.0f} requests/s,"
                f" proxy CPU {cpu_ms:.2f} ms per call"
            )

    results = {
        target.name: {
            "setup": target.setup,
            "sequential": median_round(rounds[target.name]["sequential"], "median_ms"),
            "concurrent": median_round(rounds[target.name]["concurrent"], "rps"),
            "rounds": rounds[target.name],
        }
        for target in targets
    }

    one_off = [bare, addon]
    progress("large prompts, one at a time")
    large = await alternating(one_off, large_chat(), LARGE_WARMUP, LARGE_CALLS)
    progress("small calls beside large prompts")
    beside = {target.name: await beside_large_prompts(target) for target in one_off}
    for name, result in beside.items():
        progress(f"  {name:5}  {result['background_calls']} large calls ran beside the small ones")
    progress("streaming: time to first data")
    streams = await alternating(one_off, STREAMING_CHAT, TTFT_WARMUP, TTFT_CALLS, sse=True)
    for target in one_off:
        results[target.name] |= {
            "large_prompt_median_ms": statistics.median(reply.ms for reply in large[target.name]),
            "beside_large_prompts": beside[target.name],
            "ttft_median_ms": statistics.median(  # a failed call has no data; the checks report it
                reply.first_data_ms for reply in streams[target.name] if reply.first_data_ms is not None
            ),
            "streams": len(streams[target.name]),
            "streams_ended_early": sum(reply.early_ends > 0 for reply in streams[target.name]),
        }
    return results


# ----- the processes -----


@dataclass
class MockProcess:
    """The mock provider in its own process. `url` is all that conftest.start_proxy reads of a mock."""

    process: subprocess.Popen
    url: str


def start_mock(work: Path, output_tokens: int = 12) -> MockProcess:
    """`python -m mock_provider --port N` in tests/, ready once it prints its "listening on" line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mock_provider", "--port", str(conftest.free_port()),
         "--output-tokens", str(output_tokens)],  # fmt: skip
        cwd=REPO / "tests",
        stdout=subprocess.PIPE,
        stderr=open(work / "mock.log", "w"),
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"the mock provider did not start: {line!r}\n{(work / 'mock.log').read_text()}")
    return MockProcess(process, line.removeprefix("listening on ").strip())


def start_bare_mitmdump(work: Path, mock_url: str) -> tuple[subprocess.Popen, int, Path]:
    """mitmdump in reverse mode to the mock, no addon: the baseline the addon is compared with."""
    port, log_path = conftest.free_port(), work / "bare-mitmdump.log"
    args = [str(conftest.MITMDUMP), "--mode", f"reverse:{mock_url}@127.0.0.1:{port}"]
    # confdir: its CA goes in the temp dir, not ~/.mitmproxy.
    for option in ("flow_detail=0", "connection_strategy=lazy", f"confdir={work / 'bare-certs'}"):
        args += ["--set", option]
    process = subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    conftest.wait_for_port(port, process, log_path, START_TIMEOUT)
    return process, port, log_path


def start_addon(
    running: contextlib.ExitStack,
    work: Path,
    mock: MockProcess,
    name: str,
    replicas: int,
    store: str,
    launcher: str = "serve",
) -> Target:
    """`replicas` addon proxies sharing one store, each in its own folder (its audit log, its certs),
    and a key for this set-up alone, minted through the first. Stopped when `running` closes."""
    proxies = []
    for number in range(replicas):
        with contextlib.redirect_stdout(io.StringIO()):  # its `agentkeys ca` prints an agent's environment
            proxy = conftest.start_proxy(work / f"{name}-{number}", mock, launcher, store=store)
        running.callback(conftest.stop_proxy, proxy)
        proxies.append(proxy)
    key = proxies[0].issue(write_policy(work), "--budget", "1000", "--name", name)
    kind = "Redis" if store.startswith("redis://") else "SQLite file"
    how = "agentkeys serve" if launcher == "serve" else "mitmdump -s addon.py"
    setup = f"{replicas} x {how}, one {kind}"
    ports = [proxy.gateway_port for proxy in proxies]
    pids = [proxy.process.pid for proxy in proxies]
    return Target(name, setup, ports, "/openai/v1/chat/completions", key["key"], proxies, key["id"], pids)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def interrupt(signum, frame):
    """SIGTERM as Ctrl-C, so the servers are shut down either way."""
    raise KeyboardInterrupt


# ----- checks and report -----


def audit_records(target: Target, timeout: float = 10) -> list[list[dict]]:
    """The target's key's audit records, proxy by proxy, once there is one for each of its calls.

    A record is written just after its response, so the last ones may lag the calls by a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = [[r for r in proxy.audit() if r["key_id"] == target.key_id] for proxy in target.proxies]
        if sum(map(len, records)) >= target.statuses.total() or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def check_statuses(target: Target) -> tuple[str, bool]:
    return f"{target.name}: every call answered 200 ({dict(target.statuses)})", set(target.statuses) == {200}


def check_accounting(target: Target) -> list[tuple[str, bool]]:
    """Every call answered 200; the key's audit records are all there, from every proxy of the set-up;
    the ledger's spend equals their summed cost, with nothing left held."""
    calls = target.statuses.total()
    by_proxy = audit_records(target)
    records = [r for records in by_proxy for r in records]
    with contextlib.closing(target.proxies[0].ledger()) as ledger:  # the store is shared: any proxy's will do
        record = ledger.get_key(target.key_id)
    audited = sum(r["cost_micros"] for r in records)
    spread = f" ({' + '.join(str(len(r)) for r in by_proxy)} by proxy)" if len(by_proxy) > 1 else ""
    return [
        check_statuses(target),
        (
            f"{target.name}: audit records {len(records)}{spread}, all allowed with status 200 (calls: {calls})",
            len(records) == calls
            and all(by_proxy)
            and all(r["decision"] == "allow" and r["status"] == 200 for r in records),
        ),
        (
            f"{target.name}: ledger spent {record.spent_micros} µ$ = audit sum of cost_micros {audited} µ$;"
            f" held {record.held_micros}",
            record.spent_micros == audited and record.held_micros == 0,
        ),
    ]


def check_streams(results: dict) -> list[tuple[str, bool]]:
    """A stream must reach the client whole: its chunked body may end only after `data: [DONE]`."""
    return [
        (
            f"{name}: streams whose chunked body ended before data: [DONE]: {r['streams_ended_early']}/{r['streams']}",
            r["streams_ended_early"] == 0,
        )
        for name, r in results.items()
        if "streams" in r  # the targets of the one-off measures
    ]


def check_logs(addons: list[Target], bare_log: Path, work: Path) -> list[tuple[str, bool]]:
    """What the test fixture checks of a proxy's log, and no traceback from the others either."""
    checks = []
    for target in addons:
        logs = "".join(proxy.log_path.read_text() for proxy in target.proxies)
        clean = all(text not in logs for text in ("Traceback", conftest.OPENAI_REAL_KEY, conftest.ANTHROPIC_REAL_KEY))
        checks.append((f"{target.name}: proxy logs: no traceback, no real key", clean))
    return checks + [
        (
            "bare mitmdump and mock logs: no traceback",
            "Traceback" not in bare_log.read_text() + (work / "mock.log").read_text(),
        ),
    ]


def overhead_figures(target: Target, rounds: dict[str, list[dict]]) -> dict:
    """The addon's own account of its time per call (audit `proxy_overhead_ms`) in the sequential and
    the concurrent phases, told apart by the records' timestamps.

    Under load it includes waiting: for the event loop, and for the ledger's single worker thread.
    """
    records = [r for proxy in target.proxies for r in proxy.audit() if r["key_id"] == target.key_id]
    figures = {}
    for phase, results in rounds.items():
        windows = [result["window"] for result in results]
        figures[phase] = summary(
            [r["proxy_overhead_ms"] for r in records if any(a <= r["ts"] <= b for a, b in windows)]
        )
    return figures


def comparison_rows(results: dict) -> list[tuple[str, float, float, str]]:
    bare, addon = results["bare"], results["addon"]

    def added(b: float, a: float) -> str:
        return f"{a - b:+.3f} ms"

    rows = [
        ("small call, sequential: median (ms)", bare["sequential"]["median_ms"], addon["sequential"]["median_ms"]),
        ("small call, sequential: p90 (ms)", bare["sequential"]["p90_ms"], addon["sequential"]["p90_ms"]),
        (f"{WORKERS} concurrent: requests/s", bare["concurrent"]["rps"], addon["concurrent"]["rps"]),
        (f"{WORKERS} concurrent: median latency (ms)",
         bare["concurrent"]["median_ms"], addon["concurrent"]["median_ms"]),
        (f"{WORKERS} concurrent: proxy CPU per call (ms)",
         bare["concurrent"]["proxy_cpu_ms_per_call"], addon["concurrent"]["proxy_cpu_ms_per_call"]),
        ("400 KB prompt: median (ms)  [added to its own call]",
         bare["large_prompt_median_ms"], addon["large_prompt_median_ms"]),
        ("small call, quiet: median (ms)",
         bare["beside_large_prompts"]["quiet_median_ms"], addon["beside_large_prompts"]["quiet_median_ms"]),
        ("small call beside 400 KB calls: median (ms)",
         bare["beside_large_prompts"]["loaded_median_ms"], addon["beside_large_prompts"]["loaded_median_ms"]),
        ("  added to others (beside - quiet, ms)",
         bare["beside_large_prompts"]["added_ms"], addon["beside_large_prompts"]["added_ms"]),
        ("streaming: time to first data: (ms)", bare["ttft_median_ms"], addon["ttft_median_ms"]),
    ]  # fmt: skip
    return [(label, b, a, f"{a / b:.0%} of bare" if "requests/s" in label else added(b, a)) for label, b, a in rows]


def store_figures(results: dict) -> dict:
    """Every target's small-call figures beside bare mitmproxy's: what the store and the replicas change."""
    bare = results["bare"]
    return {
        name: {
            "setup": r["setup"],
            "sequential_median_ms": r["sequential"]["median_ms"],
            "sequential_added_ms": r["sequential"]["median_ms"] - bare["sequential"]["median_ms"],
            "rps": r["concurrent"]["rps"],
            "rps_share_of_bare": r["concurrent"]["rps"] / bare["concurrent"]["rps"],
            "concurrent_median_ms": r["concurrent"]["median_ms"],
            "concurrent_added_ms": r["concurrent"]["median_ms"] - bare["concurrent"]["median_ms"],
            "proxy_cpu_ms_per_call": r["concurrent"]["proxy_cpu_ms_per_call"],
        }
        for name, r in results.items()
    }


def paired(results: dict, phase: str, measure, target: str = "addon") -> list[float]:
    """`measure(bare's round, the target's round)` for each round. The two ran one after the other, so
    a change in the machine's speed between rounds (this one is shared and noisy) cancels out."""
    bare, other = results["bare"]["rounds"][phase], results[target]["rounds"][phase]
    return [measure(b, a) for b, a in zip(bare, other, strict=True)]


def targets_met(results: dict, audit: dict) -> list[tuple[str, str, bool | None]]:
    """Each target judged on the median over rounds of the paired figure; the rounds' range beside it.
    The same figures for the addon inside a full mitmdump follow, for reference (None: not a target);
    then what the audit chain and its signatures add to a call."""
    judged = []
    for target, how in (("addon", "agentkeys serve"), ("script", "mitmdump -s addon.py")):
        added = paired(results, "sequential", lambda b, a: a["median_ms"] - b["median_ms"], target)
        shares = paired(results, "concurrent", lambda b, a: a["rps"] / b["rps"], target)
        added_ms, share = statistics.median(added), statistics.median(shares)
        is_target = target == "addon"
        judged += [
            (f"{how} adds < {TARGET_ADDED_MS} ms to the median small call",
             f"{added_ms:+.3f} ms (rounds {min(added):+.3f} to {max(added):+.3f})",
             added_ms < TARGET_ADDED_MS if is_target else None),
            (f"{how} keeps >= {TARGET_RPS_SHARE:.0%} of bare requests/s at {WORKERS} concurrent",
             f"{share:.0%} (rounds {min(shares):.0%} to {max(shares):.0%})",
             share >= TARGET_RPS_SHARE if is_target else None),
        ]  # fmt: skip
    judged.append((
        f"the audit chain and its signatures add <= {TARGET_AUDIT_CHAIN_MS} ms to a call (its record written)",
        f"{audit['added_us'] / 1000:+.4f} ms ({audit['plain_us']} µs before the chain, {audit['chained_us']} µs now)",
        audit["added_us"] / 1000 <= TARGET_AUDIT_CHAIN_MS,
    ))  # fmt: skip
    return judged


def print_report(rows, stores: dict, targets, overhead: dict, checks: list[tuple[str, bool]]) -> None:
    width = max(len(row[0]) for row in rows)
    print()
    print(f"{'measure':<{width}}  {'bare':>9}  {'addon':>9}  addon vs bare")
    for label, bare, addon, versus in rows:
        print(f"{label:<{width}}  {bare:>9.3f}  {addon:>9.3f}  {versus}")

    setup_width = max(len(f["setup"]) for f in stores.values())
    print(f"\nstores and replicas: small calls, median of {ROUNDS} rounds")
    print(f"{'':<{12 + setup_width}}  {'sequential':^21}  {f'{WORKERS} concurrent':^51}".rstrip())
    print(f"{'target':<10}  {'set-up':<{setup_width}}  {'median ms':>10}  {'added ms':>9}"
          f"  {'requests/s':>10}  {'of bare':>7}  {'median ms':>9}  {'added ms':>8}  {'CPU ms':>6}")  # fmt: skip
    for name, f in stores.items():
        print(
            f"{name:<10}  {f['setup']:<{setup_width}}"
            f"  {f['sequential_median_ms']:>10.3f}  {f['sequential_added_ms']:>+9.3f}"
            f"  {f['rps']:>10.0f}  {f['rps_share_of_bare']:>7.0%}"
            f"  {f['concurrent_median_ms']:>9.2f}  {f['concurrent_added_ms']:>+8.2f}"
            f"  {f['proxy_cpu_ms_per_call']:>6.2f}"
        )
    print(
        f"  x3: three proxies share this machine's {os.cpu_count()} cores with the mock and this load generator."
        "\n  One proxy uses one core at most, so three can gain on one by using the others: these rows"
        "\n  show a shared store staying correct under contention, not how replicas scale out."
        "\n  CPU ms: CPU time of the proxy processes (all replicas) per call, from /proc."
    )

    print("\naddon's own time per call, from the audit log (proxy_overhead_ms)")
    for name, phases in overhead.items():
        for phase, figures in phases.items():
            print(f"  {name:<10}  {phase:<10}  median {figures['median_ms']:.3f} ms, p90 {figures['p90_ms']:.3f} ms")
    print("\ntargets (the addon in a full mitmdump for reference: it runs the same code beside mitmdump's own addons)")
    for label, value, met in targets:
        verdict = "reference" if met is None else "met" if met else "NOT MET"
        print(f"  {label:<70} {value:>8}  {verdict}")
    print("\nchecks")
    for label, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {label}")


def write_policy(work: Path) -> Path:
    return conftest.write_policy(
        work, name="bench", providers=["openai"], endpoints=["POST /v1/chat/completions"], models=["gpt-4o-mini*"]
    )


def main() -> int:
    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentkeys-bench-") as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        mock = start_mock(work)
        running.callback(stop, mock.process)
        bare_process, bare_port, bare_log = start_bare_mitmdump(work, mock.url)
        running.callback(stop, bare_process)
        redis_url = running.enter_context(RedisServer()).url  # entered before the proxies, so stopped after

        def sqlite_file(name: str) -> str:
            return f"sqlite:///{work / name}.db"  # absolute: a relative one is each proxy's own file

        addons = [
            start_addon(running, work, mock, "addon", 1, sqlite_file("addon")),
            start_addon(running, work, mock, "redis", 1, redis_url),
            start_addon(running, work, mock, "redis-x3", 3, redis_url),
            start_addon(running, work, mock, "sqlite-x3", 3, sqlite_file("sqlite-x3")),
            start_addon(running, work, mock, "script", 1, sqlite_file("script"), launcher="mitmdump"),
        ]
        bare = Target("bare", "bare mitmdump", [bare_port], "/v1/chat/completions", conftest.OPENAI_REAL_KEY)
        bare.pids.append(bare_process.pid)
        results = asyncio.run(run_measures(bare, addons[0], addons[1:]))

        checks = [check_statuses(bare)]
        for target in addons:
            checks += check_accounting(target)
        checks += check_streams(results)
        overhead = {target.name: overhead_figures(target, results[target.name]["rounds"]) for target in addons}
        running.close()  # stop the servers before reading their logs whole
        checks += check_logs(addons, bare_log, work)

        with tempfile.TemporaryDirectory(dir=work) as audit_work:
            audit_cost = bench_audit.write_cost(Path(audit_work))

    rows, stores, targets = comparison_rows(results), store_figures(results), targets_met(results, audit_cost)
    print_report(rows, stores, targets, overhead, checks)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "environment": {
                    "python": platform.python_version(),
                    "mitmproxy": MITMPROXY_VERSION,
                    "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.monotonic() - started, 1),
                },
                "results": results,
                "stores_and_replicas": stores,
                "addon_overhead_from_audit": overhead,
                "audit_write_per_record": audit_cost,
                "targets": [{"target": label, "value": value, "met": met} for label, value, met in targets],
                "checks": [{"check": label, "ok": ok} for label, ok in checks],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten to {RESULTS_PATH.relative_to(REPO)} in {time.monotonic() - started:.0f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the servers were stopped", file=sys.stderr)
        sys.exit(130)
