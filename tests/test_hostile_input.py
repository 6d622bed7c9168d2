"""Hostile and careless input, end to end: what an attacker or a hurried user sends, and what they get.

Each test is a class of input from issue 12: bounded work (request size, token counting, one
stream event, connections), secrets kept out of logs and files, errors a user can act on, and the
CLI refusing bad files and values in one line. The last one is a fuzz test of the request path
through a real proxy.
"""

import json
import socket
import time

import pytest

from conftest import httpx, start_proxy, stop_proxy, write_policy

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
