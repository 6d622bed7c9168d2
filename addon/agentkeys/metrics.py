"""Prometheus series. Labels are provider, model, policy and outcome: never a key or a key id."""

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from agentkeys.audit import CallRecord

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        self.requests = Counter(
            "agentkeys_requests", "Calls seen, by outcome", ["provider", "policy", "outcome"], registry=self.registry
        )
        self.spend = Counter(
            "agentkeys_spend_usd", "Settled spend in USD", ["provider", "model", "policy"], registry=self.registry
        )
        self.tokens = Counter(
            "agentkeys_tokens", "Tokens metered", ["provider", "model", "kind"], registry=self.registry
        )
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

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def _series(self, metric, *labels: str):
        """`metric.labels(*labels)`, looked up once: prometheus-client's lookup is a noticeable part of a call."""
        key = (metric, labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series

    def observe(self, record: CallRecord) -> None:
        provider, model, policy = record.provider or "", record.model or "", record.policy or ""
        outcome = {"allow": "allowed", "pass": "passed"}.get(record.decision, f"denied_{record.status}")
        self._series(self.requests, provider, policy, outcome).inc()
        if record.cost_micros:
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
