"""The Grafana dashboard against a real Prometheus: `make dashboard-check`.

Starts Prometheus (Debian's `prometheus`) on 127.0.0.1, scraping a real `agentkeys serve` every
second, puts a short, bounded load through the proxy (allowed, streamed and refused calls on two
providers), then runs every query of every panel of deploy/grafana/agentkeys.json through
Prometheus' HTTP API: each must return data. Skipped unless AGENTKEYS_DASHBOARD_CHECK is set: it
needs the prometheus binary and takes most of a minute.
"""

import json
import math
import os
import shutil
import subprocess
import time

import anthropic
import openai
import pytest
import yaml

from conftest import REPO, free_port, httpx, start_proxy, stop_proxy, write_policy

DASHBOARD = REPO / "deploy" / "grafana" / "agentkeys.json"
SCRAPE_SECONDS = 1
# Grafana replaces $__rate_interval with a window several scrapes long; so does the check.
RATE_INTERVAL = "1m"

pytestmark = pytest.mark.skipif(
    not os.environ.get("AGENTKEYS_DASHBOARD_CHECK"), reason="make dashboard-check runs it (needs prometheus)"
)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("proxy"), mock)
    yield running
    stop_proxy(running)


@pytest.fixture(scope="module")
def prometheus(proxy, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "no prometheus on PATH: make dashboard-check installs Debian's"
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
                "scrape_configs": [
                    {"job_name": "agentkeys", "static_configs": [{"targets": [f"127.0.0.1:{proxy.metrics_port}"]}]}
                ],
            }
        )
    )
    port = free_port()
    log = folder / "prometheus.log"
    process = subprocess.Popen(
        [
            binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def put_load(proxy, tmp_path, rounds: int = 8) -> None:
    """Allowed calls (whole and streamed) on two providers, and refusals of three kinds, over a few scrapes."""
    key = proxy.issue(write_policy(tmp_path, "research", budget_usd=5))
    poor = proxy.issue(write_policy(tmp_path, "ci"), "--budget", "0.000001")
    gone = proxy.issue(write_policy(tmp_path, "ci"))
    assert proxy.cli("keys", "revoke", gone["id"]) == 0
    gateway = proxy.gateway_url
    chat = chat_of(gateway, key)
    messages = anthropic.Anthropic(api_key=key["key"], base_url=f"{gateway}/anthropic", max_retries=0).messages
    hi = [{"role": "user", "content": "hello"}]
    poor_chat, gone_chat = chat_of(gateway, poor), chat_of(gateway, gone)
    refusals = [
        (openai.PermissionDeniedError, lambda: chat.create(model="gpt-4o", max_tokens=5, messages=hi)),
        (openai.RateLimitError, lambda: poor_chat.create(model="gpt-4o-mini", max_tokens=5, messages=hi)),
        (openai.AuthenticationError, lambda: gone_chat.create(model="gpt-4o-mini", messages=hi)),
    ]
    for _ in range(rounds):
        chat.create(model="gpt-4o-mini", max_tokens=5, messages=hi)
        for _chunk in chat.create(model="gpt-4o-mini", max_tokens=5, messages=hi, stream=True):
            pass
        messages.create(model="claude-haiku-4-5", max_tokens=5, messages=hi)
        for error, call in refusals:
            with pytest.raises(error):
                call()
        time.sleep(SCRAPE_SECONDS)


def chat_of(gateway: str, key: dict):
    return openai.OpenAI(api_key=key["key"], base_url=f"{gateway}/openai/v1", max_retries=0).chat.completions


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


def test_every_panel_query_returns_data_from_a_real_prometheus(proxy, prometheus, tmp_path):
    queries = panel_queries()
    assert len(queries) >= 15
    put_load(proxy, tmp_path)
    time.sleep(3 * SCRAPE_SECONDS)  # the last calls settle, their budgets are read, Prometheus scrapes them
    empty = []
    for title, expr in queries:
        result = query(prometheus, expr.replace("$__rate_interval", RATE_INTERVAL))
        values = [float(sample["value"][1]) for sample in result]
        if not values or not any(math.isfinite(value) for value in values):
            empty.append(f"{title}: {expr} -> {result}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)
