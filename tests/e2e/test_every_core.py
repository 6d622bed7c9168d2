"""`agentkeys serve --workers 2`: one proxy on every core, as a team runs it.

The workers share the listeners, the store and the metrics port; each writes its own audit chain;
signals reach them all; a worker that dies comes back and its holds follow the crash rule.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml

from agentkeys.auditfiles import audit_files
from conftest import (
    PROXY_PYTHON,
    assert_ledger_matches_audit,
    free_port,
    running_proxy,
    start_proxy,
    stop_proxy,
    write_policy,
)

CALLS = 60


def ask(proxy, key, max_tokens: int = 5, **kwargs):
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0, **kwargs)
    try:
        return client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=max_tokens, messages=[{"role": "user", "content": "hello"}]
        )
    finally:
        client.close()


def ask_many(proxy, key, count: int, connections: int = 8) -> None:
    """`count` calls over `connections` clients at once, each with connections of its own (so the
    kernel spreads them over the workers)."""
    clients = [
        openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
        for _ in range(connections)
    ]

    def calls(client, share: int):
        for _ in range(share):
            answer = client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
            )
            assert answer.choices[0].message.content

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    try:
        with ThreadPoolExecutor(connections) as pool:
            list(pool.map(calls, clients, shares))
    finally:
        for client in clients:
            client.close()


def get(proxy, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def metric(proxy, name: str, **labels: str) -> float:
    """The value of one series on the proxy's metrics port (0 if it has none yet)."""
    wanted = ",".join(f'{label}="{value}"' for label, value in sorted(labels.items()))
    series = f"{name}{{{wanted}}}" if wanted else name
    for line in get(proxy, "/metrics")[1].decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def workers_of(proxy) -> list[int]:
    """The process ids of the supervisor's children: its workers."""
    pid = proxy.process.pid
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_until(condition, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    """Two workers writing audit records to their files and to stdout (the proxy's log) alike."""
    with running_proxy(tmp_path_factory.mktemp("workers"), mock, workers=2, audit_sinks=["file", "stdout"]) as running:
        yield running


def test_calls_spread_over_the_workers_and_each_chain_verifies(proxy, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "spread"))
    ask_many(proxy, key, CALLS)
    records = proxy.records_for(key["id"], CALLS)
    assert len(records) == CALLS
    assert_ledger_matches_audit(proxy, key["id"])
    writers = {
        file.slot for file in audit_files(proxy.audit_path) if '"kind":"call"' in file.path.read_text()
    }  # fmt: skip
    assert writers == {1, 2}, "both workers served calls, each into its own audit file"
    assert proxy.cli("audit", "verify", "--live") == 0, "each worker's chain verifies"


def test_audit_records_on_the_shared_stdout_are_whole_lines(proxy, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "stdout"))
    ask_many(proxy, key, CALLS)
    proxy.records_for(key["id"], CALLS)
    wait_until(lambda: proxy.log_path.read_text().count(key["id"]) >= 2 * CALLS, what="the stdout records")
    on_stdout = [line for line in proxy.log_path.read_text().splitlines() if line.startswith('{"kind":"call"')]
    parsed = [json.loads(line) for line in on_stdout]  # a torn or interleaved line would not parse
    mine = [record for record in parsed if record["key_id"] == key["id"]]
    assert len(mine) == CALLS
    assert len({record["writer"] for record in mine}) == 2, "both workers wrote to the one stdout"


def test_the_metrics_port_sums_the_workers(proxy, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "summed"))
    ask_many(proxy, key, CALLS)
    proxy.records_for(key["id"], CALLS)
    assert metric(proxy, "agentkeys_requests_total", outcome="allowed", policy="summed", provider="openai") == CALLS
    assert metric(proxy, "agentkeys_workers") == 2
    text = get(proxy, "/metrics")[1].decode()
    assert text.count("agentkeys_build_info{") == 1 and 'version="' in text
    wait_until(lambda: keys_active(proxy) >= 1, what="a books pass counting the new key")
    time.sleep(2.5)  # two more passes (purge_interval 1s): by now every worker has counted it
    assert keys_active(proxy) == 1, "a view of the store is given once, not summed over the workers"
    status, body = get(proxy, "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {"worker 1": "ok", "worker 2": "ok"}
    assert get(proxy, "/healthz")[0] == 200


def keys_active(proxy) -> float:
    return metric(proxy, "agentkeys_keys_active", policy="summed")


def test_sighup_reloads_every_worker(proxy):
    before = proxy.log_path.read_text().count("reloaded the config")
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.log_path.read_text().count("reloaded the config") == before + 2, what="two reloads")


def test_a_killed_worker_comes_back_its_hold_follows_the_crash_rule_and_sigterm_drains_them_all(mock, tmp_path):
    proxy = start_proxy(tmp_path / "proxy", mock, workers=2, stale_hold_after="2s", shutdown_grace="20s")
    try:
        key = proxy.issue(write_policy(tmp_path))
        mock.delay_next(10)
        caller = threading.Thread(target=lambda: pytest.raises(openai.APIConnectionError, ask, proxy, key))
        caller.start()
        wait_until(lambda: mock.received, what="the call reaching the provider")
        killed = workers_of(proxy)
        for pid in killed:  # whichever holds the call
            os.kill(pid, signal.SIGKILL)
        caller.join(15)
        wait_until(lambda: metric(proxy, "agentkeys_worker_restarts_total") == 2, what="both workers restarted")
        wait_until(lambda: get(proxy, "/readyz")[0] == 200, timeout=60, what="the new workers ready")
        assert not set(workers_of(proxy)) & set(killed)
        assert "starting it again" in proxy.log_path.read_text()

        wait_until(lambda: proxy.ledger().get_key(key["id"]).held_micros == 0, what="the stale hold swept")
        [swept] = proxy.records_for(key["id"])
        assert swept["metering"] == "held" and "stopped before settling it" in swept["reason"]
        assert_ledger_matches_audit(proxy, key["id"])

        mock.reset()
        mock.delay_next(1.5)
        answered = []
        caller = threading.Thread(target=lambda: answered.append(ask(proxy, key, timeout=30)))
        caller.start()
        wait_until(lambda: mock.received, what="the call reaching the provider")
        proxy.process.send_signal(signal.SIGTERM)
        caller.join(30)
        assert answered and answered[0].choices[0].message.content, "the call in flight finished"
        assert proxy.process.wait(30) == 0
        assert_ledger_matches_audit(proxy, key["id"])
        assert proxy.log_path.read_text().count("calls in flight have 20s to finish") == 2
    finally:
        stop_proxy(proxy)


def test_workers_stop_when_their_supervisor_is_killed(mock, tmp_path):
    proxy = start_proxy(tmp_path / "proxy", mock, workers=2)
    workers = workers_of(proxy)
    os.kill(proxy.process.pid, signal.SIGKILL)
    proxy.process.wait()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), what="the workers stopping")


def test_a_taken_metrics_port_stops_serve_before_any_worker_starts(tmp_path):
    metrics_port = free_port()
    config = tmp_path / "agentkeys.yaml"
    ports = {"proxy_port": free_port(), "gateway_port": free_port(), "metrics_port": metrics_port}
    config.write_text(yaml.safe_dump({"listen_host": "127.0.0.1", **ports, "store": "sqlite:///k.db"}))
    command = [str(PROXY_PYTHON), "-m", "agentkeys.cli", "--config", str(config), "serve", "--workers", "2"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1
    assert f"the metrics port 127.0.0.1:{metrics_port}" in done.stderr and "in use" in done.stderr


def test_a_worker_that_cannot_start_stops_serve_with_its_status(mock, tmp_path):
    config = tmp_path / "agentkeys.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen_host": "127.0.0.1",
                "proxy_port": free_port(),
                "gateway_port": free_port(),
                "store": "sqlite:///agentkeys.db",
                "certs_dir": "certs",
                "providers": {"openai": {"upstream": mock.url}},
                "mitmproxy": {"no_such_option": 1},
            }
        )
    )
    command = [str(PROXY_PYTHON), "-m", "agentkeys.cli", "--config", str(config), "serve", "--workers", "2"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, done
    assert "no such mitmproxy option in agentkeys serve: no_such_option" in done.stderr
    assert "worker 1 could not start" in done.stderr or "worker 2 could not start" in done.stderr


def test_a_purge_logs_how_many_keys_never_which(proxy, tmp_path):
    """A purge may be of a hundred thousand keys: its log line stays one short line (a count)."""
    policy = write_policy(tmp_path, "short")
    ids = [proxy.issue(policy, "--ttl", "1s")["id"] for _ in range(3)]
    wait_until(lambda: all(proxy.ledger().get_key(key_id) is None for key_id in ids), what="the keys purged")
    purges = [line for line in proxy.log_path.read_text().splitlines() if "expired keys" in line]
    counts = [int(line.split("purged ")[1].split()[0]) for line in purges]
    assert sum(counts) >= 3
    assert not any(key_id in line for line in purges for key_id in ids)


def test_a_burst_of_connections_is_spread_over_the_workers(proxy, tmp_path):
    """Agents open their connections at once and keep them: none may end up all on one worker."""
    key = proxy.issue(write_policy(tmp_path, "burst"))
    clients = [
        openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0) for _ in range(16)
    ]
    try:
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda client: client.chat.completions.create(
                        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
                    ),
                    clients,
                )
            )
    finally:
        for client in clients:
            client.close()
    writers = Counter(record["writer"] for record in proxy.records_for(key["id"], 16))
    assert len(writers) == 2 and min(writers.values()) >= 3, writers
