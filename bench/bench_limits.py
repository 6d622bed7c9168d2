"""Narrow benchmark: what rate limits add to one call's admission and settlement in the gate.

No proxy and no network: the gate (tests/unit/test_gate's set-up) on a SQLite file and on a local
Redis, a small chat call admitted and settled one at a time, with a key whose policy sets no limit
(the baseline) and one that sets every rate limit and the loop breaker, call by call in turn so both
see the same machine. Prints the median of each and what the limits add; `make bench-limits`.
"""

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from redis_server import RedisServer  # noqa: E402
from test_gate import REAL_KEYS, Clock, Env, answered, call, chat  # noqa: E402

from agentkeys.gate import Gate  # noqa: E402
from agentkeys.ledger import RedisLedger, SqliteLedger  # noqa: E402
from agentkeys.policy import ProxyConfig  # noqa: E402
from agentkeys.pricing import PriceTable, Usage  # noqa: E402
from agentkeys.store import Store  # noqa: E402

CALLS, WARMUP = 2000, 200
LIMITS = {
    "rate_limits": {"requests_per_minute": 10**8, "tokens_per_minute": 10**12, "concurrent_calls": 1000},
    "max_identical_calls": "10000 per 1m",
    "max_calls": 10**8,
}


async def one_call(env: Env, key: str, n: int) -> tuple[float, float]:
    """Seconds to admit the call (on its path) and to settle it (after the agent has its answer)."""
    body = chat(messages=[{"role": "user", "content": f"call {n}"}], max_tokens=20)
    started = time.perf_counter()
    admission = await env.gate.admit(call(key, body))
    admitted = time.perf_counter()
    await env.gate.settle(admission, answered(Usage(12, 20)))
    return admitted - started, time.perf_counter() - admitted


async def measure(env: Env) -> dict:
    env.clock.now = time.time()
    plain, limited = env.issue(budget_usd=1000, ttl=86400), env.issue(budget_usd=1000, ttl=86400, **LIMITS)
    times = {(name, part): [] for name in ("no limits", "limits") for part in ("admit", "settle")}
    for n in range(WARMUP + CALLS):
        for name, key in (("no limits", plain), ("limits", limited)):
            admit, settle = await one_call(env, key, n)
            if n >= WARMUP:
                times[name, "admit"].append(admit)
                times[name, "settle"].append(settle)
    ms = {where: statistics.median(values) * 1000 for where, values in times.items()}
    return {
        f"{part}: median ms without limits, with, added": [
            round(ms["no limits", part], 4), round(ms["limits", part], 4),
            round(ms["limits", part] - ms["no limits", part], 4),
        ]
        for part in ("admit", "settle")
    }  # fmt: skip


def env_on(ledger) -> Env:
    clock = Clock()
    config = ProxyConfig.model_validate({})
    return Env(Gate(config, Store(ledger, clock), PriceTable.bundled()), ledger, clock)


def main() -> None:
    import os

    os.environ.update(REAL_KEYS)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        results["sqlite"] = asyncio.run(measure(env_on(SqliteLedger(Path(directory) / "bench.db"))))
    with RedisServer() as server:
        results["redis"] = asyncio.run(measure(env_on(RedisLedger(server.url))))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
