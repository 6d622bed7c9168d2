"""Operating the proxy: SIGTERM drains calls in flight before it stops; SIGHUP reloads the config."""

import signal
import socket
import threading
import time

import openai
import pytest
import yaml

from conftest import assert_ledger_matches_audit, httpx, start_proxy, stop_proxy, write_policy


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
        assert assert_ledger_matches_audit(proxy, key["id"]).spent_micros == record["cost_micros"]
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


def wait_for_log(proxy, text: str, after: int) -> None:
    deadline = time.monotonic() + 10
    while text not in proxy.log_path.read_text()[after:]:
        assert time.monotonic() < deadline, proxy.log_path.read_text()
        time.sleep(0.1)


def test_tightening_a_policy_file_reaches_issued_keys_and_loosening_only_new_ones(mock, tmp_path):
    folder = tmp_path / "policy-files"
    folder.mkdir()
    policy_file = write_policy(folder, "team", models=["gpt-4o-mini*", "claude-haiku-4-5*"])
    proxy = start_proxy(folder / "proxy", mock, policies=[str(policy_file)])
    try:
        old = proxy.issue(policy_file)
        old_key = old["key"]

        def ask(key: str, model: str) -> int:
            client = openai.OpenAI(api_key=key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
            try:
                client.chat.completions.create(model=model, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
            except openai.APIStatusError as e:
                return e.status_code
            return 200

        assert ask(old_key, "gpt-4o-mini") == 200
        first_revision = proxy.records_for(old["id"])[-1]["policy_revision"]

        write_policy(folder, "team", models=["claude-haiku-4-5*"])  # tightened: no OpenAI model left
        log_size = len(proxy.log_path.read_text())
        proxy.process.send_signal(signal.SIGHUP)
        wait_for_log(proxy, "reloaded", log_size)
        assert ask(old_key, "gpt-4o-mini") == 403
        refused = proxy.records_for(old["id"], count=2)[-1]
        assert refused["decision"] == "deny" and refused["policy_revision"] not in (None, first_revision)

        write_policy(folder, "team", models=["gpt-4o*", "claude-haiku-4-5*"])  # loosened beyond the first
        log_size = len(proxy.log_path.read_text())
        proxy.process.send_signal(signal.SIGHUP)
        wait_for_log(proxy, "reloaded", log_size)
        assert ask(old_key, "gpt-4o-mini") == 200, "back within both the issued copy and the file"
        assert ask(old_key, "gpt-4o") == 403, "the key keeps the scope it was issued with"
        assert ask(proxy.issue(policy_file)["key"], "gpt-4o") == 200, "a new key gets the loosened file"
    finally:
        stop_proxy(proxy)
