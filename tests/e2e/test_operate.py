"""Operating the proxy: SIGTERM drains calls in flight before it stops; SIGHUP reloads the config."""

import signal
import socket
import threading
import time

import openai
import pytest
import yaml

from conftest import httpx, start_proxy, stop_proxy, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "operate")


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_sigterm_lets_a_stream_in_flight_finish_and_audits_it(mock, tmp_path, policy):
    proxy = start_proxy(tmp_path / "drain", mock, shutdown_grace="20s")
    try:
        key = proxy.issue(policy)
        mock.stall_next_stream(2)
        received: list[str] = []
        first_chunk = threading.Event()

        def agent():
            with httpx.stream(
                "POST", f"{proxy.gateway_url}/openai/v1/chat/completions", timeout=30,
                headers={"authorization": f"Bearer {key['key']}"},
                json={"model": "gpt-4o-mini", "max_tokens": 20, "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]},
            ) as response:  # fmt: skip
                for line in response.iter_lines():
                    received.append(line)
                    first_chunk.set()

        streaming = threading.Thread(target=agent)
        streaming.start()
        assert first_chunk.wait(15)
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert refuses_connections(proxy.gateway_port), "no new connections once stopping"
        streaming.join(30)
        assert any("[DONE]" in line for line in received), "the stream ran to its end"
        assert proxy.process.wait(30) == 0
        [record] = proxy.records_for(key["id"])
        assert record["metering"] == "usage" and record["cost_micros"] > 0
        ledger = proxy.ledger()
        try:
            assert ledger.get_key(key["id"]).spent_micros == record["cost_micros"]
        finally:
            ledger.close()
        assert "I/O operation on closed file" not in proxy.log_path.read_text()
    finally:
        stop_proxy(proxy)


def test_sighup_reloads_prices_and_a_bad_file_keeps_the_running_config(mock, tmp_path, policy):
    proxy = start_proxy(tmp_path / "reload", mock)
    try:
        client = openai.OpenAI(api_key=proxy.issue(policy)["key"], base_url=f"{proxy.gateway_url}/openai/v1")

        def cost_of_a_call() -> float:
            answer = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
            return float(answer.headers["x-agentkeys-cost"])

        before = cost_of_a_call()
        config = yaml.safe_load(proxy.config_path.read_text())
        dearer = {"input_per_mtok": 150, "output_per_mtok": 600}  # a thousand times the bundled price
        config["prices"] = {"openai": {"gpt-4o-mini": dearer}}
        proxy.config_path.write_text(yaml.safe_dump(config))
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in proxy.log_path.read_text():
            assert time.monotonic() < deadline, proxy.log_path.read_text()
            time.sleep(0.1)
        after = cost_of_a_call()
        assert after > before * 100

        proxy.config_path.write_text(proxy.config_path.read_text() + "\nno_such_field: 1\n")
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in proxy.log_path.read_text():
            assert time.monotonic() < deadline, proxy.log_path.read_text()
            time.sleep(0.1)
        assert "no_such_field" in proxy.log_path.read_text()
        assert proxy.process.poll() is None, "still running"
        assert cost_of_a_call() == after, "the running config stays"
    finally:
        stop_proxy(proxy)
