"""Prometheus series (metrics.py): each one moves when a call's record is observed, and no label
carries a key or a key id."""

import pytest
from prometheus_client import generate_latest

from agentkeys.audit import CallRecord
from agentkeys.ledger import KeyRecord
from agentkeys.metrics import Metrics

NOW = 1_000_000.0


def call(**fields) -> CallRecord:
    defaults = dict(
        key_id="k1", key_name="k", policy="p", provider="openai", method="POST", path="/v1/chat/completions",
        model="gpt-4o-mini", decision="allow", reason="ok", status=200,
    )  # fmt: skip
    return CallRecord(**{**defaults, **fields})


def key(key_id: str, policy: str, budget: int, spent: int = 0, held: int = 0, **fields) -> KeyRecord:
    return KeyRecord(key_id=key_id, key_hash="h", name=key_id, policy_name=policy, policy_json="{}",
                     created_at=NOW - 10, expires_at=fields.pop("expires_at", NOW + 3600), budget_micros=budget,
                     spent_micros=spent, held_micros=held, **fields)  # fmt: skip


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_an_overrun_is_counted_by_provider_model_and_policy():
    metrics = Metrics()
    metrics.observe(call(cost_micros=120, hold_micros=100, metering="overrun"))
    metrics.observe(call(cost_micros=100, hold_micros=100, metering="usage"))
    labels = {"provider": "openai", "model": "gpt-4o-mini", "policy": "p"}
    assert sample(metrics, "agentkeys_overruns_total", **labels) == 1


def test_refusals_are_counted_by_kind_with_no_message_or_key():
    metrics = Metrics()
    metrics.refused("openai", "p", "budget")
    metrics.refused("openai", None, "unauthenticated")
    text = generate_latest(metrics.registry).decode()
    assert sample(metrics, "agentkeys_refusals_total", provider="openai", policy="p", reason="budget") == 1
    assert sample(metrics, "agentkeys_refusals_total", provider="openai", policy="", reason="unauthenticated") == 1
    assert "k1" not in text and "_created" not in text


def test_budgets_are_summed_per_policy_over_active_keys_only():
    metrics = Metrics()
    metrics.budgets.update(
        [
            key("a", "research", 1_000_000, spent=250_000, held=50_000),
            key("b", "research", 500_000),
            key("c", "ci", 2_000_000, revoked_at=NOW - 1),
            key("d", "ci", 2_000_000, expires_at=NOW - 1),
            key("e", "ci", 300_000, spent=300_000),
        ],
        NOW,
    )
    assert sample(metrics, "agentkeys_budget_remaining_usd", policy="research") == 1.2
    assert sample(metrics, "agentkeys_keys_active", policy="research") == 2
    assert sample(metrics, "agentkeys_budget_remaining_usd", policy="ci") == 0
    assert sample(metrics, "agentkeys_keys_active", policy="ci") == 1
    metrics.budgets.update([key("b", "research", 500_000)], NOW)
    assert sample(metrics, "agentkeys_keys_active", policy="ci") is None, "a policy with no key left disappears"


def test_holds_open_is_read_when_scraped():
    metrics, holds = Metrics(), {1, 2}
    metrics.watch_holds(lambda: len(holds))
    assert sample(metrics, "agentkeys_holds_open") == 2
    holds.clear()
    assert sample(metrics, "agentkeys_holds_open") == 0


def test_build_info_names_the_version():
    import agentkeys

    labels = {s.labels["version"] for s in Metrics().registry.collect() for s in s.samples if s.name.endswith("_info")}
    assert labels == {agentkeys.__version__}


KEY_ID = "3f9c01a2b4c6"


def allowed(**fields) -> CallRecord:
    return CallRecord(
        **{
            "key_id": KEY_ID, "key_name": "agent", "policy": "research", "provider": "openai",
            "method": "POST", "path": "/v1/chat/completions", "model": "gpt-4o-mini", "decision": "allow",
            "reason": "ok", "status": 200, "metering": "usage", "input_tokens": 120, "output_tokens": 30,
            "cached_tokens": 64, "cost_micros": 42, "upstream_latency_ms": 250.0, "ttft_ms": 80.0,
            "proxy_overhead_ms": 1.5, **fields,
        }
    )  # fmt: skip


def value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def metrics():
    return Metrics()


def test_an_allowed_call_moves_every_series(metrics):
    metrics.observe(allowed())
    assert value(metrics, "agentkeys_requests_total", provider="openai", policy="research", outcome="allowed") == 1
    spend = value(metrics, "agentkeys_spend_usd_total", provider="openai", model="gpt-4o-mini", policy="research")
    assert spend == pytest.approx(42 / 1_000_000)
    for kind, count in (("input", 120), ("output", 30), ("cached", 64)):
        assert value(metrics, "agentkeys_tokens_total", provider="openai", model="gpt-4o-mini", kind=kind) == count
    assert value(metrics, "agentkeys_upstream_latency_seconds_sum", provider="openai") == pytest.approx(0.25)
    assert value(metrics, "agentkeys_time_to_first_token_seconds_sum", provider="openai") == pytest.approx(0.08)
    assert value(metrics, "agentkeys_proxy_overhead_seconds_sum") == pytest.approx(0.0015)
    assert value(metrics, "agentkeys_proxy_overhead_seconds_count") == 1


def test_series_add_up_over_calls(metrics):
    metrics.observe(allowed())
    metrics.observe(allowed(cost_micros=8, output_tokens=5))
    labels = {"provider": "openai", "model": "gpt-4o-mini"}
    assert value(metrics, "agentkeys_requests_total", provider="openai", policy="research", outcome="allowed") == 2
    assert value(metrics, "agentkeys_spend_usd_total", policy="research", **labels) == pytest.approx(50 / 1_000_000)
    assert value(metrics, "agentkeys_tokens_total", kind="output", **labels) == 35
    assert value(metrics, "agentkeys_upstream_latency_seconds_count", provider="openai") == 2


def test_a_refusal_counts_by_its_status_and_moves_nothing_else(metrics):
    refused = allowed(
        decision="deny", status=429, metering="none", input_tokens=0, output_tokens=0, cached_tokens=0,
        cost_micros=0, upstream_latency_ms=None, ttft_ms=None,
    )  # fmt: skip
    metrics.observe(refused)
    assert value(metrics, "agentkeys_requests_total", provider="openai", policy="research", outcome="denied_429") == 1
    assert value(metrics, "agentkeys_requests_total", provider="openai", policy="research", outcome="allowed") == 0
    assert value(metrics, "agentkeys_spend_usd_total", provider="openai", model="gpt-4o-mini", policy="research") == 0
    assert value(metrics, "agentkeys_upstream_latency_seconds_count", provider="openai") == 0
    assert value(metrics, "agentkeys_time_to_first_token_seconds_count", provider="openai") == 0


def test_a_call_with_no_key_or_provider_is_counted_under_empty_labels(metrics):
    metrics.observe(allowed(key_id=None, policy=None, provider=None, model=None, decision="deny", status=401))
    assert value(metrics, "agentkeys_requests_total", provider="", policy="", outcome="denied_401") == 1


def test_no_label_names_a_key(metrics):
    metrics.observe(allowed())
    labels = [
        value for family in metrics.registry.collect() for sample in family.samples for value in sample.labels.values()
    ]
    assert labels and KEY_ID not in labels and "agent" not in labels


def record(**fields) -> CallRecord:
    base = dict(key_id="k1", key_name="n", policy="p", provider="openai", method="POST", path="/v1/chat/completions",
                model="gpt-4o-mini", decision="allow", reason="ok", status=200, cost_micros=1500)  # fmt: skip
    return CallRecord(**{**base, **fields})


def test_tokens_are_counted_by_kind():
    metrics = Metrics()
    metrics.observe(record(input_tokens=100, output_tokens=20, cached_tokens=40))
    metrics.observe(record(input_tokens=1, output_tokens=2))
    labels = {"provider": "openai", "model": "gpt-4o-mini"}
    assert sample(metrics, "agentkeys_tokens_total", kind="input", **labels) == 101
    assert sample(metrics, "agentkeys_tokens_total", kind="output", **labels) == 22
    assert sample(metrics, "agentkeys_tokens_total", kind="cached", **labels) == 40


def test_calls_and_spend_are_counted():
    metrics = Metrics()
    metrics.observe(record())
    metrics.observe(record(decision="deny", status=429, cost_micros=0))
    assert sample(metrics, "agentkeys_requests_total", provider="openai", policy="p", outcome="allowed") == 1
    assert sample(metrics, "agentkeys_requests_total", provider="openai", policy="p", outcome="denied_429") == 1
    assert sample(metrics, "agentkeys_spend_usd_total", provider="openai", model="gpt-4o-mini", policy="p") == 0.0015


def test_no_series_names_a_key():
    metrics = Metrics()
    metrics.observe(record(input_tokens=3))
    exposed = [sample.labels for family in metrics.registry.collect() for sample in family.samples]
    assert exposed and not any("k1" in labels.values() for labels in exposed)


def test_a_would_deny_call_counts_each_rule_and_its_spend(metrics):
    metrics.observe(allowed(decision="would_deny", would_deny=["model", "budget"]))
    metrics.observe(allowed(decision="would_deny", would_deny=["budget"]))
    budget = value(metrics, "agentkeys_would_deny_total", provider="openai", policy="research", reason="budget")
    model = value(metrics, "agentkeys_would_deny_total", provider="openai", policy="research", reason="model")
    assert (budget, model) == (2, 1)
    assert value(metrics, "agentkeys_requests_total", provider="openai", policy="research", outcome="would_deny") == 2
    spend = value(metrics, "agentkeys_spend_usd_total", provider="openai", model="gpt-4o-mini", policy="research")
    assert spend == pytest.approx(84 / 1_000_000)


def test_a_real_key_call_is_counted_apart_from_the_spend_of_scoped_keys(metrics):
    metrics.observe(allowed(key_id=None, policy=None, decision="pass", metering="real_key", real_key="openai:ab…WXYZ"))
    assert value(metrics, "agentkeys_real_key_calls_total", provider="openai") == 1
    assert value(metrics, "agentkeys_spend_usd_total", provider="openai", model="gpt-4o-mini", policy="") == 0
    assert value(metrics, "agentkeys_requests_total", provider="openai", policy="", outcome="passed") == 1
