"""Prometheus series (metrics.py): each one moves when a call's record is observed, and no label
carries a key or a key id."""

import pytest

from agentkeys.audit import CallRecord
from agentkeys.metrics import Metrics

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
