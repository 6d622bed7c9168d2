"""Prometheus series. Labels are provider, model, policy, outcome and reason: never a key or a key id.

`reason` is the kind of a refusal (`budget`, `forbidden`, …: `DenyKind`), never its message, so the
label set stays small whatever the calls were.
"""

import platform
from collections import defaultdict
from collections.abc import Callable, Iterable

import mitmproxy.version
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

import agentkeys
from agentkeys.audit import CallRecord
from agentkeys.ledger import KeyRecord

# The `outcome` label of a decision that is not a refusal (a refusal's is `denied_<status>`).
OUTCOMES = {"allow": "allowed", "would_deny": "would_deny", "pass": "passed"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# A `_created` series per counter and histogram doubles what Prometheus stores and says nothing an
# operator alerts on.
prometheus_client.disable_created_metrics()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        self.requests = Counter(
            "agentkeys_requests", "Calls seen, by outcome", ["provider", "policy", "outcome"], registry=self.registry
        )
        self.refusals = Counter(
            "agentkeys_refusals", "Calls refused, by the kind of refusal", ["provider", "policy", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.would_deny = Counter(
            "agentkeys_would_deny", "Calls forwarded in shadow mode that enforcement would refuse, by the rule broken",
            ["provider", "policy", "reason"], registry=self.registry,
        )  # fmt: skip
        self.real_key_calls = Counter(
            "agentkeys_real_key_calls", "Calls with a real provider key passed on untouched (real_keys: audit)",
            ["provider"], registry=self.registry,
        )  # fmt: skip
        self.unknown_llm_calls = Counter(
            "agentkeys_unknown_llm_calls", "Calls to catalogued LLM API hosts no provider is configured for",
            ["vendor", "decision"], registry=self.registry,
        )  # fmt: skip
        self.spend = Counter(
            "agentkeys_spend_usd", "Settled spend in USD", ["provider", "model", "policy"], registry=self.registry
        )
        self.tokens = Counter(
            "agentkeys_tokens", "Tokens metered", ["provider", "model", "kind"], registry=self.registry
        )
        self.store_errors = Counter(
            "agentkeys_store_errors", "Key store operations that failed (unreachable, locked too long, refused)",
            registry=self.registry,
        )  # fmt: skip
        self.holds_open = Gauge(
            "agentkeys_holds_open", "Calls in flight on this proxy holding budget", registry=self.registry
        )
        self.budgets = PolicyBudgets(self.registry)
        self.upstream_latency = Histogram(
            "agentkeys_upstream_latency_seconds", "Time to the provider's response headers",
            ["provider"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "agentkeys_time_to_first_token_seconds", "Time to the first streamed bytes",
            ["provider"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.overruns = Counter(
            "agentkeys_overruns", "Calls the provider billed above their hold (it ignored the output limit)",
            ["provider", "model", "policy"], registry=self.registry,
        )  # fmt: skip
        self.overhead = Histogram(
            "agentkeys_proxy_overhead_seconds", "Time spent in the addon for one call",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.alerts = Counter(
            "agentkeys_alerts", "Alert webhooks, by event and how each ended: delivered, failed (every attempt"
            " failed), dropped (too many waiting)", ["event", "outcome"], registry=self.registry,
        )  # fmt: skip
        Info("agentkeys_build", "The running version", registry=self.registry).info(
            {
                "version": agentkeys.__version__,
                "mitmproxy": mitmproxy.version.VERSION,
                "python": platform.python_version(),
            }
        )

    def watch_holds(self, holds_open: Callable[[], int]) -> None:
        """Where the holds gauge reads its figure when scraped (the current store's open holds)."""
        self.holds_open.set_function(holds_open)

    def _series(self, metric, *labels: str):
        """`metric.labels(*labels)`, looked up once: prometheus-client's lookup is a noticeable part of a call."""
        key = (metric, labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series

    def observe(self, record: CallRecord) -> None:
        provider, model, policy = record.provider or "", record.model or "", record.policy or ""
        outcome = OUTCOMES.get(record.decision, f"denied_{record.status}")
        self._series(self.requests, provider, policy, outcome).inc()
        if record.llm_host:
            self._series(self.unknown_llm_calls, record.llm_host, record.decision).inc()
        for rule in record.would_deny or ():
            self._series(self.would_deny, provider, policy, rule).inc()
        if record.real_key:  # the key's owner pays the provider: no spend of ours
            self._series(self.real_key_calls, provider).inc()
        elif record.cost_micros:
            self._series(self.spend, provider, model, policy).inc(record.cost_micros / 1_000_000)
        if record.metering == "overrun":
            self._series(self.overruns, provider, model, policy).inc()
        for kind in ("input", "output", "cached"):
            count = getattr(record, f"{kind}_tokens")
            if count:
                self._series(self.tokens, provider, model, kind).inc(count)
        if record.upstream_latency_ms is not None:
            self._series(self.upstream_latency, provider).observe(record.upstream_latency_ms / 1000)
        if record.ttft_ms is not None:
            self._series(self.ttft, provider).observe(record.ttft_ms / 1000)
        if record.proxy_overhead_ms is not None:
            self.overhead.observe(record.proxy_overhead_ms / 1000)

    def refused(self, provider: str, policy: str | None, reason: str) -> None:
        """A call the proxy answered itself; `reason` is the kind of refusal (a DenyKind value)."""
        self._series(self.refusals, provider, policy or "", reason).inc()

    def store_error(self) -> None:
        self.store_errors.inc()

    def alert(self, event: str, outcome: str) -> None:
        """An alert's end (called from the alerts' own thread)."""
        self._series(self.alerts, event, outcome).inc()


class PolicyBudgets:
    """`agentkeys_budget_remaining_usd` and `agentkeys_keys_active` per policy, from the last look at the store.

    A series per policy, never per key: thousands of short-lived keys would each leave a series behind.
    Replaced whole at each look, so a policy whose last key ended disappears rather than staying at its
    last value.
    """

    def __init__(self, registry: CollectorRegistry):
        self._by_policy: dict[str, tuple[int, int]] = {}  # policy -> (remaining micros, active keys)
        registry.register(self)

    def update(self, keys: Iterable[KeyRecord], now: float) -> None:
        totals = defaultdict(lambda: [0, 0])
        for key in keys:
            if key.status(now) == "active":
                total = totals[key.policy_name]
                total[0] += max(key.remaining_micros, 0)
                total[1] += 1
        self._by_policy = {policy: (remaining, count) for policy, (remaining, count) in totals.items()}

    def collect(self):
        remaining = GaugeMetricFamily(
            "agentkeys_budget_remaining_usd", "Budget left on active keys, summed per policy", labels=["policy"]
        )
        active = GaugeMetricFamily("agentkeys_keys_active", "Active keys per policy", labels=["policy"])
        for policy, (micros, count) in sorted(self._by_policy.items()):
            remaining.add_metric([policy], micros / 1_000_000)
            active.add_metric([policy], count)
        return [remaining, active]
