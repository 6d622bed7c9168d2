"""Benchmark: a store holding many expired keys, purged while calls go on, on SQLite and on Redis.
Only 127.0.0.1 traffic.

For each store: KEYS keys (one million by default) that expired a moment ago are written straight
into it, then `agentkeys serve` starts on it with a short `purge_interval`, and small chat calls go
one after another through it, with a live key, until every expired key is gone. Reported: the time
the purge took, the calls' median, p99 and worst latency while it ran against the same figures
before it began, the proxy's resident size, and how long `serve` took to answer /readyz.
Target: the purge adds at most 50 ms to any call.
"""

import argparse
import asyncio
import contextlib
import io
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

import bench
from agentkeys.ledger import KeyRecord, open_ledger
from agentkeys.ledger.sqlite import SqliteLedger
from bench import Connection, RedisServer, Target, conftest, start_mock, stop

RESULTS_PATH = Path(__file__).with_name("results-purge.json")
PURGE_INTERVAL = 15  # seconds after start before the first purge: the calls before it are the baseline
WATCH_SECONDS = 0.5
TARGET_ADDED_MS = 50
WRITE_BATCH = 2_000


def expired_keys(count: int, now: float):
    for i in range(count):
        yield KeyRecord(f"old{i:07d}", f"hash{i}", f"old {i}", "bench", "{}", now - 3600, now - 1, 1_000_000)


def fill_sqlite(url: str, count: int, now: float) -> None:
    SqliteLedger(url.removeprefix("sqlite:///")).close()  # the schema
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        columns = "key_id, key_hash, name, policy_name, policy_json, created_at, expires_at, budget_micros"
        rows = (
            (r.key_id, r.key_hash, r.name, r.policy_name, r.policy_json, r.created_at, r.expires_at, r.budget_micros)
            for r in expired_keys(count, now)
        )
        db.executemany(f"INSERT INTO keys ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.commit()


def fill_redis(url: str, count: int, now: float) -> None:
    ledger, client = open_ledger(url), redis.Redis.from_url(url)  # a client without the ledger's short timeouts
    try:
        records = expired_keys(count, now)
        while batch := [record for _, record in zip(range(WRITE_BATCH), records, strict=False)]:
            with client.pipeline(transaction=False) as pipe:  # the ledger's own script, many per round trip
                for record in batch:
                    ledger._create(args=[record.key_id, *bench_fields(record)], client=pipe)
                pipe.execute()
    finally:
        client.close()
        ledger.close()


def bench_fields(record: KeyRecord) -> list:
    from agentkeys.ledger.redis import field_pairs

    return field_pairs(record)


def remaining(store: str, url: str) -> int:
    """Expired keys still in the store, counted without reading them."""
    if store == "sqlite":
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            return db.execute("SELECT count(*) FROM keys WHERE key_id LIKE 'old%'").fetchone()[0]
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        return client.zcount("agentkeys:expiry", "-inf", time.time())


async def calls_during_purge(target: Target, store: str, url: str, count: int) -> dict:
    """Latencies of calls one after another, split at the purge: before its first batch, and from
    then until no expired key is left. The store is counted every half second beside the calls."""
    connection = await Connection.open(target)
    request = target.request(bench.SMALL_CHAT)
    calls: list[tuple[float, float]] = []  # (when it ended, ms)
    began = ended = None

    async def watch():
        nonlocal began, ended
        while ended is None:
            left = await asyncio.to_thread(remaining, store, url)
            now = time.monotonic()
            if began is None and left < count:
                began = now - WATCH_SECONDS  # it began since the last look
            if left == 0:
                ended = now
            await asyncio.sleep(WATCH_SECONDS)

    watching = asyncio.create_task(watch())
    try:
        while ended is None:
            reply = await connection.call(request)
            calls.append((time.monotonic(), reply.ms))
    finally:
        connection.close()
        await watching
    return {
        "before": [ms for at, ms in calls if at < began],
        "during": [ms for at, ms in calls if began <= at <= ended],
        "purge_seconds": ended - began,
    }


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * share))]


def ready_after(proxy, launched: float) -> float:
    url = f"http://127.0.0.1:{proxy.metrics_port}/readyz"
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                return time.monotonic() - launched
        time.sleep(0.02)


def run_store(work: Path, mock, store: str, url: str, count: int) -> dict:
    bench.progress(f"{store}: writing {count:,} expired keys")
    now = time.time()
    (fill_sqlite if store == "sqlite" else fill_redis)(url, count, now)
    bench.progress(f"{store}: starting the proxy and calling through it while it purges")
    launched = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        proxy = conftest.start_proxy(work / store, mock, store=url, purge_interval=f"{PURGE_INTERVAL}s")
    try:
        started_in = ready_after(proxy, launched)
        key = proxy.issue(bench.write_policy(work), "--budget", "1000", "--name", store)
        target = Target(store, store, [proxy.gateway_port], "/openai/v1/chat/completions", key["key"])
        figures = asyncio.run(calls_during_purge(target, store, url, count))
        rss = bench_rss(proxy.process.pid)
    finally:
        conftest.stop_proxy(proxy)
    before, during = figures["before"], figures["during"]
    return {
        "keys": count,
        "start_seconds": started_in,
        "purge_seconds": figures["purge_seconds"],
        "rss_mb": rss,
        "before": {"calls": len(before), "median": statistics.median(before), "p99": percentile(before, 0.99),
                   "max": max(before)},
        "during": {"calls": len(during), "median": statistics.median(during), "p99": percentile(during, 0.99),
                   "max": max(during)},
    }  # fmt: skip


def bench_rss(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="expired keys in the store")
    parser.add_argument("--store", choices=["sqlite", "redis"], action="append", help="only this store (default: both)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="agentkeys-bench-purge-") as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        mock = start_mock(work)
        running.callback(stop, mock.process)
        redis_url = running.enter_context(RedisServer()).url
        stores = {"sqlite": f"sqlite:///{work / 'keys.db'}", "redis": redis_url}
        for store, url in stores.items():
            if args.store and store not in args.store:
                continue
            results[store] = run_store(work, mock, store, url, args.keys)
            report(store, results[store])
    RESULTS_PATH.write_text(json.dumps(results, indent=1))
    added = [figures["during"]["max"] - figures["before"]["p99"] for figures in results.values()]
    return 0 if all(ms <= TARGET_ADDED_MS for ms in added) else 1


def report(store: str, figures: dict) -> None:
    before, during = figures["before"], figures["during"]
    print(
        f"{store}: {figures['keys']:,} expired keys purged in {figures['purge_seconds']:.1f} s;"
        f" calls before: median {before['median']:.2f} ms, p99 {before['p99']:.2f}, max {before['max']:.1f}"
        f" ({before['calls']}); during: median {during['median']:.2f} ms, p99 {during['p99']:.2f},"
        f" max {during['max']:.1f} ({during['calls']}); worst call {during['max'] - before['p99']:+.1f} ms over"
        f" the p99 before (target <= {TARGET_ADDED_MS} ms); serve ready in {figures['start_seconds']:.1f} s;"
        f" resident {figures['rss_mb']:.0f} MB",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
