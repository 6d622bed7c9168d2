"""Alerts: the signature a receiver checks, delivery from a thread of its own with retries and backoff
(a slow or dead receiver never makes `send` wait), and which alerts a key raises, once each."""

import asyncio
import dataclasses
import re
import threading
import time
from collections import Counter

import pytest
from alert_receiver import AlertReceiver

from agentkeys.alerts import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    Alerts,
    WebhookSender,
    sender_for,
    sign,
    verify,
)
from agentkeys.calls import Denial
from agentkeys.ledger import AccountRecord, KeyRecord, SqliteLedger
from agentkeys.ledger.periods import Calendar
from agentkeys.policy import AlertsConfig, ProxyConfig, load_config
from agentkeys.providers.base import DenyKind
from agentkeys.store import Store
from agentkeys.yamlfile import ConfigError

SECRET = "alert-secret-0123456789"
NOW = 1_700_000_000.0


class Outcomes:
    """What the sender counted, as the metric would, with a way to wait for it."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.changed = threading.Condition()

    def __call__(self, event: str, outcome: str) -> None:
        with self.changed:
            self.counts[event, outcome] += 1
            self.changed.notify_all()

    def wait_for(self, event: str, outcome: str, count: int = 1, timeout: float = 10) -> int:
        with self.changed:
            self.changed.wait_for(lambda: self.counts[event, outcome] >= count, timeout)
            return self.counts[event, outcome]


def spec(url: str, **fields) -> AlertsConfig:
    made = AlertsConfig.model_validate({"url": url, "secret_env": "AGENTKEYS_TEST_ALERT_SECRET", **fields})
    return made.model_copy(update={"retry_backoff": 0.05})  # fast retries for the tests


@pytest.fixture
def receiver():
    with AlertReceiver() as running:
        yield running


@pytest.fixture
def outcomes():
    return Outcomes()


def sender(receiver_url: str, outcomes: Outcomes, **fields) -> WebhookSender:
    return WebhookSender(spec(receiver_url, **fields), SECRET, outcomes)


# ----- the signature -----


def test_a_signature_verifies_only_for_its_body_secret_and_time():
    body, when = b'{"event": "loop_broken"}', int(NOW)
    signature = sign(SECRET.encode(), when, body)
    assert verify(SECRET.encode(), signature, body, NOW)
    assert not verify(SECRET.encode(), signature, body + b" ", NOW)
    assert not verify(b"another secret", signature, body, NOW)
    assert not verify(SECRET.encode(), signature, body, NOW + 301)  # an old delivery replayed
    assert not verify(SECRET.encode(), "v1=abc", body, NOW)


# ----- delivery -----


def test_an_alert_is_posted_as_signed_json(receiver, outcomes):
    delivering = sender(receiver.url, outcomes)
    delivering.send("budget_threshold", {"threshold_percent": 50})
    assert outcomes.wait_for("budget_threshold", "delivered") == 1
    [received] = receiver.received
    assert received.headers[EVENT_HEADER] == "budget_threshold"
    assert received.json["event"] == "budget_threshold" and received.json["threshold_percent"] == 50
    assert received.json["delivery"] == received.headers[DELIVERY_HEADER]
    assert verify(SECRET.encode(), received.headers[SIGNATURE_HEADER], received.body, time.time())
    delivering.close()


def test_a_failed_delivery_is_retried_with_the_same_id_until_it_passes(receiver, outcomes):
    receiver.failures = 2
    delivering = sender(receiver.url, outcomes, attempts=3)
    delivering.send("loop_broken", {})
    assert outcomes.wait_for("loop_broken", "delivered") == 1
    assert len(receiver.received) == 3
    assert len({r.headers[DELIVERY_HEADER] for r in receiver.received}) == 1
    delivering.close()


def test_waits_between_attempts_double(receiver, outcomes, monkeypatch):
    receiver.failures = 3
    waits = []
    delivering = sender(receiver.url, outcomes, attempts=4)
    monkeypatch.setattr(delivering._closing, "wait", lambda seconds: waits.append(seconds) or False)
    delivering.send("loop_broken", {})
    outcomes.wait_for("loop_broken", "delivered")
    assert waits == [0.05, 0.1, 0.2]
    delivering.close()


def test_a_dead_receiver_is_counted_as_failed_after_every_attempt(outcomes):
    with AlertReceiver() as gone:
        url = gone.url
    delivering = sender(url, outcomes, attempts=2)
    delivering.send("loop_broken", {})
    assert outcomes.wait_for("loop_broken", "failed") == 1
    delivering.close()


def test_send_never_waits_for_a_slow_receiver_and_drops_what_does_not_fit(receiver, outcomes):
    receiver.delay = 1.0
    delivering = sender(receiver.url, outcomes, queue_size=3)
    started = time.perf_counter()
    for n in range(10):
        delivering.send("budget_threshold", {"n": n})
    assert time.perf_counter() - started < 0.1  # ten sends, each a put on a queue
    assert outcomes.wait_for("budget_threshold", "dropped", 6) >= 6  # one in delivery, three waiting
    delivering.close(timeout=0)


# ----- which alerts a key raises -----


class Sent:
    def __init__(self):
        self.alerts: list[tuple[str, dict]] = []

    def send(self, event: str, payload: dict) -> None:
        self.alerts.append((event, payload))


@pytest.fixture
def store(tmp_path):
    opened = Store(SqliteLedger(tmp_path / "alerts.db"), lambda: NOW)
    yield opened
    opened.close()


def key(store: Store, spent: int, budget: int = 1_000_000, key_id: str = "k1") -> KeyRecord:
    record = KeyRecord(key_id, "hash", "agent", "test", "{}", NOW, NOW + 3600, budget, spent_micros=spent)
    if store.ledger.get_key(key_id) is None:
        store.ledger.create_key(record)
    else:
        store.ledger._db.execute("UPDATE keys SET spent_micros = ? WHERE key_id = ?", (spent, key_id))
    return record


def alerts_on(store: Store, **fields) -> tuple[Alerts, Sent]:
    sent = Sent()
    return Alerts(spec("http://127.0.0.1:9/hook", **fields), store, sent, Calendar("UTC")), sent


def test_each_threshold_is_alerted_once_when_the_spend_reaches_it(store):
    alerts, sent = alerts_on(store)
    asyncio.run(alerts.after_settlement(key(store, 400_000), 1))
    assert sent.alerts == []
    asyncio.run(alerts.after_settlement(key(store, 500_000), 1))
    asyncio.run(alerts.after_settlement(key(store, 600_000), 1))
    asyncio.run(alerts.after_settlement(key(store, 850_000), 1))
    assert [payload["threshold_percent"] for _, payload in sent.alerts] == [50, 80]
    event, payload = sent.alerts[0]
    assert event == "budget_threshold" and payload["key"]["id"] == "k1" and not payload["exhausted"]
    assert (float(payload["spent_usd"]), float(payload["budget_usd"])) == (0.5, 1.0)


def test_a_budget_that_refuses_a_call_is_at_100_percent_once(store):
    alerts, sent = alerts_on(store, budget_thresholds=[80, 100])
    record = key(store, 990_000)
    for _ in range(3):
        asyncio.run(alerts.after_refusal(Denial(DenyKind.BUDGET, "budget exhausted", record)))
    assert [(p["threshold_percent"], p["exhausted"]) for _, p in sent.alerts] == [(80, True), (100, True)]


def test_a_broken_loop_is_alerted_once_an_hour(store):
    alerts, sent = alerts_on(store)
    record, loop = key(store, 0), "agentkeys: loop broken: …"
    for _ in range(3):
        asyncio.run(alerts.after_refusal(Denial(DenyKind.LOOP, loop, record)))
    assert [(event, payload["reason"]) for event, payload in sent.alerts] == [("loop_broken", loop)]
    store.clock = lambda: NOW + 3601
    asyncio.run(alerts.after_refusal(Denial(DenyKind.LOOP, loop, record)))
    assert len(sent.alerts) == 2


def test_loops_false_raises_no_loop_alert(store):
    alerts, sent = alerts_on(store, loops=False)
    asyncio.run(alerts.after_refusal(Denial(DenyKind.LOOP, "agentkeys: loop broken: …", key(store, 0))))
    assert sent.alerts == []


def test_other_refusals_and_free_calls_raise_nothing(store):
    alerts, sent = alerts_on(store)
    record = key(store, 900_000)
    asyncio.run(alerts.after_refusal(Denial(DenyKind.RATE_LIMITED, "rate limit", record)))
    asyncio.run(alerts.after_settlement(record, 0))
    assert sent.alerts == []


def test_an_accounts_period_is_alerted_at_each_threshold_once_a_period(store):
    """Every key of the account adds to it; a top-up raises the period's budget; the next day starts afresh."""
    alerts, sent = alerts_on(store)
    store.ledger.create_account(AccountRecord("acme", "Acme", "pro", "day", 1_000, NOW))
    first = KeyRecord("k1", "h1", "a", "test", "{}", NOW, NOW + 10 * 86_400, 10_000, account_id="acme")
    second = dataclasses.replace(first, key_id="k2", key_hash="h2")
    for record, spend in ((first, 300), (second, 300), (first, 100)):
        if store.ledger.get_key(record.key_id) is None:
            store.ledger.create_key(record)
        hold = store.ledger.reserve(record.key_id, spend, NOW)
        store.ledger.settle(hold.hold_id, spend)
        asyncio.run(alerts.after_settlement(record, spend))
    day = Calendar("UTC").period("day", NOW).period_id
    account_alerts = [p for _, p in sent.alerts if "account" in p]
    assert [(p["threshold_percent"], p["account"]["period"]) for p in account_alerts] == [(50, day)]
    store.ledger.top_up("acme", 1_000, NOW)  # 700 of 2,000: below 50% again, nothing new
    hold = store.ledger.reserve("k2", 950, NOW)
    store.ledger.settle(hold.hold_id, 950)
    asyncio.run(alerts.after_settlement(second, 950))  # 1,650 of 2,000
    assert [p["threshold_percent"] for _, p in sent.alerts if "account" in p] == [50, 80]
    store.clock = lambda: NOW + 86_400
    hold = store.ledger.reserve("k1", 600, NOW + 86_400)
    store.ledger.settle(hold.hold_id, 600)
    asyncio.run(alerts.after_settlement(first, 600))  # a new day: 600 of 1,000
    assert [p["threshold_percent"] for _, p in sent.alerts if "account" in p] == [50, 80, 50]


# ----- the config -----


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["alerts:", "  url: ftp://x", "  secret_env: S"], ":2: alerts.url: 'ftp://x' is not an http(s)"),
        (
            ["alerts:", "  url: http://127.0.0.1:1/h", "  secret_env: S", "  budget_thresholds: [50, 120]"],
            ":4: alerts.budget_thresholds: [120]: a threshold is a percentage of the budget",
        ),
        (["alerts:", "  url: http://127.0.0.1:1/h"], ":1: alerts.secret_env: Field required"),
        (["alerts:", "  url: http://127.0.0.1:1/h", "  secret_env: S", "  attempts: 0"], ":4: alerts.attempts:"),
    ],
    ids=["not-http", "over-100", "no-secret-env", "no-attempts"],
)
def test_a_bad_alerts_section_names_file_line_and_field(tmp_path, lines, expected):
    path = tmp_path / "agentkeys.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_alerts_whose_secret_is_not_set_are_refused_saying_which_variable(monkeypatch):
    monkeypatch.delenv("AGENTKEYS_TEST_ALERT_SECRET", raising=False)
    alerts = {"url": "http://127.0.0.1:1/h", "secret_env": "AGENTKEYS_TEST_ALERT_SECRET"}
    config = ProxyConfig.model_validate({"alerts": alerts})
    with pytest.raises(ConfigError, match="alerts: secret_env: AGENTKEYS_TEST_ALERT_SECRET is not set"):
        sender_for(config, Outcomes())
