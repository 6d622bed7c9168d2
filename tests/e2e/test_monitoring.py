"""Watching the proxy, end to end: the probes and metrics on the metrics port, and what the log says.

A platform team watches the proxy through `/healthz`, `/readyz` and `/metrics` and reads its log in a
collector; these tests do the same against a real `agentkeys serve` and the mock provider.
"""

import json
import re
import sqlite3
import threading
import time

import openai
import pytest

from conftest import httpx, start_proxy, stop_proxy, write_policy


def metrics_get(proxy, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{proxy.metrics_port}{path}", timeout=10)


def wait_ready(proxy, timeout: float = 15) -> httpx.Response:
    """/readyz once it answers 200 (the metrics port opens a moment after the listeners)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = metrics_get(proxy, "/readyz")
            if answer.status_code == 200 or time.monotonic() > deadline:
                return answer
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def series(proxy, name: str) -> dict[str, float]:
    """Every sample of one metric family, by its label text: {'{policy="a"}': 1.0}."""
    samples = {}
    for line in metrics_get(proxy, "/metrics").text.splitlines():
        match = re.fullmatch(rf"{name}(\{{.*\}})? (\S+)", line)
        if match:
            samples[match[1] or ""] = float(match[2])
    return samples


def client(proxy, key: dict) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)


def chat(proxy, key: dict, model: str = "gpt-4o-mini", **kwargs):
    return client(proxy, key).chat.completions.create(
        model=model, max_tokens=5, messages=[{"role": "user", "content": "hello"}], **kwargs
    )


# ----- probes -----


def test_ready_and_alive_with_each_check_named(proxy):
    ready = wait_ready(proxy)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"listeners": "ok", "ca": "ok", "store": "ok"}}
    alive = metrics_get(proxy, "/healthz")
    assert alive.status_code == 200 and alive.json()["alive"] is True


@pytest.mark.parametrize("path", ["/", "/metricsx", "/healthz/extra", "/favicon.ico"])
def test_the_metrics_port_answers_404_off_its_three_paths(proxy, path):
    wait_ready(proxy)
    assert metrics_get(proxy, path).status_code == 404


def test_the_gateway_does_not_pretend_to_be_a_probe(proxy):
    """Probes belong on the metrics port; on the gateway /healthz is a path like any other."""
    assert httpx.get(f"{proxy.gateway_url}/healthz", timeout=10).status_code == 404


def test_a_store_locked_past_its_timeout_makes_the_proxy_unready_then_ready_again(proxy):
    wait_ready(proxy)
    errors_before = series(proxy, "agentkeys_store_errors_total")[""]
    blocker = sqlite3.connect(proxy.dir / "agentkeys.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        unready = metrics_get(proxy, "/readyz")
        alive = metrics_get(proxy, "/healthz")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert unready.status_code == 503
    checks = unready.json()["checks"]
    assert checks["listeners"] == "ok" and checks["ca"] == "ok" and "locked" in checks["store"], checks
    assert alive.status_code == 200, "a slow store is not a dead process: restarting would not help"
    assert series(proxy, "agentkeys_store_errors_total")[""] > errors_before
    assert wait_ready(proxy).status_code == 200


# ----- metrics -----


def test_metrics_name_the_build_and_leave_out_created_series(proxy):
    wait_ready(proxy)
    text = metrics_get(proxy, "/metrics").text
    assert re.search(r'agentkeys_build_info\{.*version="\d+\.\d+\.\d+".*\} 1\.0', text)
    assert "_created" not in text


def test_refusals_by_kind_holds_and_budget_per_policy(proxy, tmp_path):
    wait_ready(proxy)
    team = proxy.issue(write_policy(tmp_path, "team-a", budget_usd=0.5))
    other = proxy.issue(write_policy(tmp_path, "team-b", budget_usd=2))
    poor = proxy.issue(write_policy(tmp_path, "team-a"), "--budget", "0.000001")
    gone = proxy.issue(write_policy(tmp_path, "team-a"))
    assert proxy.cli("keys", "revoke", gone["id"]) == 0
    chat(proxy, team)
    with pytest.raises(openai.PermissionDeniedError):
        chat(proxy, team, model="gpt-4o")  # not in the policy
    with pytest.raises(openai.RateLimitError):
        chat(proxy, poor)  # the budget
    with pytest.raises(openai.AuthenticationError):
        chat(proxy, gone)  # revoked

    refusals = series(proxy, "agentkeys_refusals_total")
    assert refusals['{policy="team-a",provider="openai",reason="forbidden"}'] == 1
    assert refusals['{policy="team-a",provider="openai",reason="budget"}'] == 1
    assert refusals['{policy="team-a",provider="openai",reason="unauthenticated"}'] == 1
    assert not any("agentkeys:" in labels or team["id"] in labels for labels in refusals), "a message or key id"
    assert series(proxy, "agentkeys_holds_open") == {"": 0.0}
    assert series(proxy, "agentkeys_overruns_total") == {}

    [record] = [r for r in proxy.records_for(team["id"], count=2) if r["decision"] == "allow"]
    remaining_a = (500_000 - record["cost_micros"] + 1) / 1e6  # team's, and poor's one micro-dollar; not gone's
    deadline = time.monotonic() + 10  # the budgets are read from the store at each purge interval (1s here)
    budgets = series(proxy, "agentkeys_budget_remaining_usd")
    while budgets.get('{policy="team-a"}') != pytest.approx(remaining_a) and time.monotonic() < deadline:
        time.sleep(0.2)
        budgets = series(proxy, "agentkeys_budget_remaining_usd")
    assert budgets['{policy="team-a"}'] == pytest.approx(remaining_a, abs=1e-9)
    assert budgets['{policy="team-b"}'] == 2
    assert series(proxy, "agentkeys_keys_active")['{policy="team-a"}'] == 2
    assert not any(key["id"] in labels for key in (team, other, poor) for labels in budgets), "a series per key"


def test_a_call_in_flight_shows_as_a_hold_open(proxy, mock, tmp_path):
    wait_ready(proxy)
    key = proxy.issue(write_policy(tmp_path))
    mock.delay_next(3)
    call = threading.Thread(target=chat, args=(proxy, key))
    call.start()
    try:
        deadline = time.monotonic() + 10
        while series(proxy, "agentkeys_holds_open")[""] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert series(proxy, "agentkeys_holds_open")[""] == 1
    finally:
        call.join(timeout=30)
    assert series(proxy, "agentkeys_holds_open")[""] == 0


# ----- logs -----


def log_lines_naming(proxy, key_id: str, count: int = 1, timeout: float = 10) -> list[str]:
    """The proxy's log lines naming a key, once there are `count` (each follows its call's audit record)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proxy.log_path.read_text().splitlines() if key_id in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_each_call_is_one_info_line_with_key_id_provider_model_status_cost_and_latency(proxy, tmp_path):
    key = proxy.issue(write_policy(tmp_path))
    chat(proxy, key)
    [record] = proxy.records_for(key["id"])
    [line] = log_lines_naming(proxy, key["id"])
    assert "POST /v1/chat/completions" in line and f"key_id={key['id']}" in line
    assert "provider=openai model=gpt-4o-mini status=200 decision=allow" in line
    assert f"cost_usd={record['cost_micros'] / 1e6:.6f}" in line
    assert f"latency_ms={record['upstream_latency_ms']}" in line
    assert key["key"] not in proxy.log_path.read_text()


def test_the_banner_names_the_metrics_url_and_the_agentkeys_command(proxy):
    log = proxy.log_path.read_text()
    assert f"http://127.0.0.1:{proxy.metrics_port}/metrics" in log
    command = re.search(r"Issue a key: +(\S+) keys issue", log)[1]
    assert command.startswith("/") and command.endswith("/agentkeys"), command


@pytest.fixture(scope="module")
def json_proxy(mock, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("json-proxy"), mock, log_format="json")
    yield running
    stop_proxy(running)


def test_json_logs_are_one_object_a_line_with_the_call_in_fields(json_proxy, tmp_path):
    key = json_proxy.issue(write_policy(tmp_path))
    chat(json_proxy, key)
    with pytest.raises(openai.PermissionDeniedError):
        chat(json_proxy, key, model="gpt-4o")
    log_lines_naming(json_proxy, key["id"], count=2)
    lines = json_proxy.log_path.read_text().splitlines()
    objects = [json.loads(line) for line in lines]  # every line, mitmproxy's own too
    assert all(set(o) == {"time", "level", "message", "fields"} for o in objects)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", o["time"]) for o in objects)
    banner = objects[0]["fields"]
    assert banner["metrics"] == f"http://127.0.0.1:{json_proxy.metrics_port}/metrics"
    assert banner["command"].endswith("/agentkeys")
    calls = [o for o in objects if o["fields"].get("key_id") == key["id"]]
    allowed, refused = sorted(calls, key=lambda o: o["fields"]["decision"])
    assert allowed["level"] == "info" and allowed["message"].startswith("POST /v1/chat/completions")
    fields = allowed["fields"]
    assert (fields["method"], fields["path"], fields["provider"], fields["model"], fields["status"]) == (
        "POST", "/v1/chat/completions", "openai", "gpt-4o-mini", 200
    )  # fmt: skip
    assert re.fullmatch(r"0\.\d{6}", fields["cost_usd"]) and fields["latency_ms"] > 0
    assert refused["fields"]["status"] == 403 and "not allowed" in refused["fields"]["reason"]
    assert key["key"] not in "\n".join(lines)


def test_a_draining_proxy_is_unready_while_its_calls_finish(mock, tmp_path):
    """SIGTERM closes the listeners first: /readyz says so at once, so a load balancer stops sending calls."""
    draining = start_proxy(tmp_path / "proxy", mock)
    try:
        key = draining.issue(write_policy(tmp_path))
        assert wait_ready(draining).status_code == 200
        mock.delay_next(4)
        call = threading.Thread(target=chat, args=(draining, key))
        call.start()
        deadline = time.monotonic() + 10
        while not mock.received and time.monotonic() < deadline:  # the call reached the provider
            time.sleep(0.02)
        draining.process.terminate()
        deadline = time.monotonic() + 3
        while (unready := metrics_get(draining, "/readyz")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unready.status_code == 503 and unready.json()["checks"]["listeners"] != "ok", unready.text
        assert metrics_get(draining, "/healthz").status_code == 200, "draining is not dead"
        call.join(timeout=30)
        assert draining.records_for(key["id"]), "the call in flight finished and was audited"
    finally:
        stop_proxy(draining)
