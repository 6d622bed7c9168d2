"""Alerts through a real proxy: a key spending its budget raises one signed webhook per threshold, a
broken loop raises one, and a receiver that takes seconds to answer never slows a call down."""

import os
import time

import openai
import pytest
from alert_receiver import AlertReceiver

from agentkeys.alerts import EVENT_HEADER, SIGNATURE_HEADER, verify
from conftest import assert_ledger_matches_audit, httpx, running_proxy, write_policy

SECRET_ENV, SECRET = "AGENTKEYS_TEST_ALERT_SECRET", "e2e-alert-secret-0123456789"
PROMPT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def receiver():
    with AlertReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def proxy(mock, receiver, tmp_path_factory):
    os.environ[SECRET_ENV] = SECRET  # the proxy's environment is this process's
    alerts = {"url": receiver.url, "secret_env": SECRET_ENV, "budget_thresholds": [50, 80, 100], "attempts": 2}
    try:
        with running_proxy(tmp_path_factory.mktemp("alerts"), mock, alerts=alerts) as running:
            yield running
    finally:
        del os.environ[SECRET_ENV]


@pytest.fixture(autouse=True)
def _clear_receiver(receiver):
    receiver.clear()


def alerts_for(receiver: AlertReceiver, key_id: str, count: int, timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in receiver.received if r.json["key"]["id"] == key_id]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return [r for r in receiver.received if r.json["key"]["id"] == key_id]


def test_spending_a_budget_raises_each_threshold_once_and_a_slow_receiver_delays_no_call(proxy, receiver, tmp_path):
    receiver.delay = 2.0  # each delivery takes two seconds to be answered
    key = proxy.issue(write_policy(tmp_path, "spender"), "--budget", "0.0002")
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    slowest, refused = 0.0, False
    for _ in range(40):
        started = time.monotonic()
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=20)
        except openai.RateLimitError:
            refused = True
            break
        finally:
            slowest = max(slowest, time.monotonic() - started)
    assert refused, "the budget should have run out"
    assert slowest < 1.5, f"a call took {slowest:.2f}s while alerts waited on the receiver"
    alerts = alerts_for(receiver, key["id"], 3)
    assert sorted(alert.json["threshold_percent"] for alert in alerts) == [50, 80, 100]
    for alert in alerts:
        assert alert.headers[EVENT_HEADER] == "budget_threshold"
        assert verify(SECRET.encode(), alert.headers[SIGNATURE_HEADER], alert.body, time.time())
    assert [a.json["exhausted"] for a in alerts if a.json["threshold_percent"] == 100] == [True]
    assert_ledger_matches_audit(proxy, key["id"])
    delivered = 'agentkeys_alerts_total{event="budget_threshold",outcome="delivered"}'
    assert metric(proxy, delivered, at_least=3) >= 3  # counted once the receiver has answered


def test_a_broken_loop_raises_one_alert_naming_it(proxy, receiver, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "looping", max_identical_calls="1 per 1h"))
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=5)
    for _ in range(3):
        with pytest.raises(openai.RateLimitError, match="loop broken"):
            client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=5)
    [alert] = alerts_for(receiver, key["id"], 1)
    time.sleep(0.5)  # no second one follows
    assert len(alerts_for(receiver, key["id"], 2, timeout=0)) == 1
    assert alert.json["event"] == "loop_broken" and "this same request 1 times within 1h" in alert.json["reason"]
    assert verify(SECRET.encode(), alert.headers[SIGNATURE_HEADER], alert.body, time.time())


def metric(proxy, series: str, at_least: float, timeout: float = 10) -> float:
    """The series' value, once it is `at_least` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10).text
        value = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)
