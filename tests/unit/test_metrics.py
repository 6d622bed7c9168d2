"""Prometheus series from audit records: calls, spend and tokens, labelled without keys."""

from agentkeys.audit import CallRecord
from agentkeys.metrics import Metrics


def record(**fields) -> CallRecord:
    base = dict(key_id="k1", key_name="n", policy="p", provider="openai", method="POST", path="/v1/chat/completions",
                model="gpt-4o-mini", decision="allow", reason="ok", status=200, cost_micros=1500)  # fmt: skip
    return CallRecord(**{**base, **fields})


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


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
