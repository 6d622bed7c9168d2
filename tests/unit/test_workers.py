"""The supervisor's parts that need no worker: listeners bound once, served from an inherited socket,
and the workers' metrics summed (workers.py)."""

import asyncio
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from agentkeys.workers import InheritedListeners, bind_listeners, merged_families


def exposition(requests: int, latencies: list[float], budget: float, holds: int) -> str:
    """One worker's /metrics text, made by prometheus-client as a worker makes it."""
    registry = CollectorRegistry()
    Counter("agentkeys_requests", "calls", ["outcome"], registry=registry).labels("allowed").inc(requests)
    histogram = Histogram("agentkeys_upstream_latency_seconds", "latency", buckets=(0.01, 0.1), registry=registry)
    for latency in latencies:
        histogram.observe(latency)
    Gauge("agentkeys_holds_open", "holds", registry=registry).set(holds)
    Gauge("agentkeys_budget_remaining_usd", "left", ["policy"], registry=registry).labels("p").set(budget)
    Info("agentkeys_build", "version", registry=registry).info({"version": "1"})
    return generate_latest(registry).decode()


def values(families) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def test_counters_histograms_and_holds_are_summed_and_views_of_the_store_given_once():
    merged = values(
        merged_families([exposition(3, [0.005, 0.05], budget=1.5, holds=2), exposition(4, [0.5], budget=1.5, holds=1)])
    )
    assert merged[("agentkeys_requests_total", (("outcome", "allowed"),))] == 7
    assert merged[("agentkeys_upstream_latency_seconds_bucket", (("le", "0.01"),))] == 1
    assert merged[("agentkeys_upstream_latency_seconds_bucket", (("le", "0.1"),))] == 2
    assert merged[("agentkeys_upstream_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert merged[("agentkeys_upstream_latency_seconds_count", ())] == 3
    assert merged[("agentkeys_holds_open", ())] == 3
    assert merged[("agentkeys_budget_remaining_usd", (("policy", "p"),))] == 1.5, "the store's budget, once"
    assert merged[("agentkeys_build_info", (("version", "1"),))] == 1


def test_a_series_only_one_worker_has_is_kept_and_buckets_stay_in_order():
    first = exposition(1, [0.005], budget=1, holds=0)
    second = first.replace('outcome="allowed"', 'outcome="denied_429"')
    [requests] = [family for family in merged_families([first, second]) if family.name == "agentkeys_requests"]
    assert {sample.labels["outcome"]: sample.value for sample in requests.samples} == {"allowed": 1, "denied_429": 1}
    [latency] = [f for f in merged_families([first, first]) if f.name == "agentkeys_upstream_latency_seconds"]
    bounds = [sample.labels["le"] for sample in latency.samples if sample.name.endswith("_bucket")]
    assert bounds == ["0.01", "0.1", "+Inf"]


def test_the_summed_families_are_exposed_again_as_prometheus_text():
    registry = CollectorRegistry(auto_describe=False)

    class Merged:
        def collect(self):
            return merged_families([exposition(2, [], 1, 0), exposition(5, [], 1, 0)])

    registry.register(Merged())
    assert 'agentkeys_requests_total{outcome="allowed"} 7.0' in generate_latest(registry).decode()


def test_a_port_of_0_is_chosen_once_and_written_into_the_mode():
    modes, sockets = bind_listeners(["regular@127.0.0.1:0", "reverse:http://127.0.0.1:9@127.0.0.1:0"], {})
    try:
        ports = [port for _, port in sockets]
        assert all(ports) and len(set(ports)) == 2
        assert modes == [f"regular@127.0.0.1:{ports[0]}", f"reverse:http://127.0.0.1:9@127.0.0.1:{ports[1]}"]
    finally:
        for listener in sockets.values():
            listener.close()


def test_a_server_asked_for_a_bound_address_accepts_on_the_inherited_socket():
    modes, sockets = bind_listeners(["regular@127.0.0.1:0"], {})
    [(host, port)] = sockets

    async def serve_one() -> bytes:
        async def greet(_reader, writer):
            writer.write(b"from the inherited socket")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, host, port)  # as mitmproxy asks for a listener
        async with server:
            reader, writer = await asyncio.open_connection(host, port)
            answer = await reader.read()
            writer.close()
            return answer

    with asyncio.Runner(loop_factory=lambda: InheritedListeners(sockets)) as runner:
        assert runner.run(serve_one()) == b"from the inherited socket"
    assert sockets[(host, port)].fileno() != -1, "the supervisor's socket stays open for the other workers"
    sockets[(host, port)].close()
    with socket.socket() as other:  # and only it was listening: nothing else bound the port
        assert other.connect_ex((host, port)) != 0
