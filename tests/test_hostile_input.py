"""Hostile and careless input, end to end: what an attacker or a hurried user sends, and what they get.

Each test is a class of input from issue 12: bounded work (request size, token counting, one
stream event, connections), secrets kept out of logs and files, errors a user can act on, and the
CLI refusing bad files and values in one line. The last one is a fuzz test of the request path
through a real proxy.
"""

import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest

import conftest
from agentkeys.audit import AuditLog, CallRecord
from agentkeys.cli import main as agentkeys_main
from agentkeys.keys import issue_key
from agentkeys.ledger.sqlite import SqliteLedger
from agentkeys.policy import load_policy
from conftest import (
    ANTHROPIC_REAL_KEY,
    OPENAI_REAL_KEY,
    OTHER_REAL_KEYS,
    httpx,
    proxy_command,
    start_proxy,
    stop_proxy,
    write_policy,
)

SLOW = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"))


@pytest.fixture()
def key(proxy, policy):
    return proxy.issue(policy, "--budget", "1")


def chat_body(content: str = "Say hello", **fields) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **fields}


def gateway_chat(proxy, api_key: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(
        f"{proxy.gateway_url}/openai/v1/chat/completions", content=content, headers=headers, timeout=30, **kwargs
    )


# ----- denial of service: connections -----


def open_idle(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first_bytes:
            s.sendall(first_bytes)
        sockets.append(s)
    return sockets


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@SLOW
def test_a_flood_of_idle_and_slow_header_connections_is_bounded_while_calls_are_served(mock, tmp_path, policy):
    proxy = start_proxy(tmp_path / "proxy", mock, max_connections=40, header_timeout="2s", idle_timeout="3s")
    try:
        key = proxy.issue(policy)
        slow = open_idle(proxy.gateway_port, 30, b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        idle = open_idle(proxy.proxy_port, 60)  # more than the limit: the oldest waiting ones make room
        for s in slow[:5]:
            s.sendall(b"X-Slow: 1\r\n")  # a header a little at a time never completes
        answers = [gateway_chat(proxy, key["key"], chat_body()) for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not all(closed_by_peer(s) for s in slow + idle):
            time.sleep(0.2)
        still_open = [s for s in slow + idle if not closed_by_peer(s)]
        assert not still_open, f"{len(still_open)} idle or slow-header connections still open"
        assert gateway_chat(proxy, key["key"], chat_body()).status_code == 200
        for s in slow + idle:
            s.close()
    finally:
        stop_proxy(proxy)


# ----- secrets: never in the log -----


def real_keys_in(text: str) -> list[str]:
    return [key for key in (OPENAI_REAL_KEY, ANTHROPIC_REAL_KEY, *OTHER_REAL_KEYS.values()) if key in text]


@SLOW
def test_mitmdump_options_that_print_headers_are_lowered_so_no_real_key_reaches_the_log(
    mock, tmp_path, policy, monkeypatch
):
    def with_verbose_options(*args):
        command = [arg if arg != "flow_detail=0" else "flow_detail=4" for arg in proxy_command(*args)]
        return [*command, "--set", "proxy_debug=true"]

    monkeypatch.setattr(conftest, "proxy_command", with_verbose_options)
    proxy = start_proxy(tmp_path / "proxy", mock, launcher="mitmdump")
    try:
        key = proxy.issue(policy)
        assert gateway_chat(proxy, key["key"], chat_body()).status_code == 200
        assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"  # it was swapped in
    finally:
        stop_proxy(proxy)
    log = proxy.log_path.read_text()
    assert "flow_detail, proxy_debug would print the real provider keys" in log
    assert real_keys_in(log) == []


@SLOW
def test_serve_at_debug_verbosity_prints_no_real_key(mock, tmp_path, policy):
    proxy = start_proxy(tmp_path / "proxy", mock, mitmproxy={"termlog_verbosity": "debug"})
    try:
        key = proxy.issue(policy)
        assert gateway_chat(proxy, key["key"], chat_body()).status_code == 200
        assert gateway_chat(proxy, key["key"], chat_body(), headers={"accept": "text/event-stream"}).status_code == 200
    finally:
        stop_proxy(proxy)
    log = proxy.log_path.read_text()
    assert "DEBUG" in log or "debug" in log.lower()
    assert real_keys_in(log) == []


def test_serve_refuses_proxy_debug_in_its_config(tmp_path, capsys):
    config = tmp_path / "agentkeys.yaml"
    config.write_text("store: sqlite:///agentkeys.db\nmitmproxy:\n  proxy_debug: true\n")
    assert agentkeys_main(["--config", str(config), "serve"]) == 2
    assert f"{config}:2: mitmproxy: proxy_debug: would print the real provider keys" in capsys.readouterr().err


# ----- secrets: state files are the proxy user's own -----


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_owner_only_whatever_the_umask(tmp_path, policy, umask_022):
    config = tmp_path / "agentkeys.yaml"
    config.write_text("store: sqlite:///state/agentkeys.db\naudit_log: logs/audit.jsonl\ncerts_dir: certs\n")
    assert agentkeys_main(["--config", str(config), "ca"]) == 0
    ledger = SqliteLedger(tmp_path / "state" / "agentkeys.db")  # as the proxy holds it: open, in WAL mode
    issue_key(ledger, load_policy(policy))
    audit = AuditLog(tmp_path / "logs" / "audit.jsonl")
    audit.write(CallRecord(None, None, None, None, "GET", "/", None, "deny", "test"))
    audit.close()
    files = [tmp_path / "state" / name for name in ("agentkeys.db", "agentkeys.db-wal", "agentkeys.db-shm")]
    assert {path.name: oct(mode_of(path)) for path in [*files, tmp_path / "logs" / "audit.jsonl"]} == {
        "agentkeys.db": "0o600",
        "agentkeys.db-wal": "0o600",
        "agentkeys.db-shm": "0o600",
        "audit.jsonl": "0o600",
    }
    assert oct(mode_of(tmp_path / "certs")) == "0o700"
