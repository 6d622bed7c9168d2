"""metrics.py: what the series say about calls and keys, and what they never carry (a key, a message)."""

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
