"""Hostile and careless input through a real proxy: what an attacker or a hurried user sends, and what
they get (issue 12).

Bounded work (request size, one stream event, connections), secrets kept out of logs and files,
errors an agent can act on, and a fuzz test of the request path: never a 5xx, never a real key in
an answer, nothing forwarded when the proxy refuses, and the proxy keeps serving.
"""

import json
import os
import socket
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import conftest
from agentkeys.addon import StreamRelay
from agentkeys.audit import AuditLog, AuditSettings, CallRecord
from agentkeys.auditchain import signing_key
from agentkeys.cli import main as agentkeys_main
from agentkeys.keys import issue_key
from agentkeys.ledger.sqlite import SqliteLedger
from agentkeys.policy import load_policy
from agentkeys.providers import FORMATS
from agentkeys.providers.base import RequestFacts, SseSplitter
from agentkeys.seal import RecordSeal
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
    return write_policy(tmp_path_factory.mktemp("policies"), max_child_depth=1)


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


# ----- bounded work: request size, token counts, stream events -----


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    """This module's proxy, with small limits so that going over them is cheap."""
    running = start_proxy(tmp_path_factory.mktemp("proxy"), mock, max_request_bytes="256k")
    yield running
    stop_proxy(running)
    assert real_keys_in(running.log_path.read_text()) == []


@pytest.mark.parametrize(
    "route, body, shape",
    [
        ("/openai/v1/chat/completions", chat_body, lambda b: b["error"]["code"] == "request_too_large"),
        (
            "/anthropic/v1/messages",
            lambda text: {
                "model": "claude-haiku-4-5",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": text}],
            },
            lambda b: b["type"] == "error" and b["error"]["type"] == "request_too_large",
        ),
    ],
)
def test_a_body_over_max_request_bytes_is_413_in_the_providers_shape(proxy, mock, key, route, body, shape):
    answer = httpx.post(
        proxy.gateway_url + route,
        json=body("a" * 300_000),
        headers={"authorization": f"Bearer {key['key']}", "x-api-key": key["key"]},
        timeout=30,
    )
    assert answer.status_code == 413, answer.text
    assert shape(answer.json()) and "max_request_bytes" in answer.text
    assert mock.received == []
    small = httpx.post(proxy.gateway_url + route, json=body("a" * 1000), headers={"x-api-key": key["key"]}, timeout=30)
    assert small.status_code == 200, small.text


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
    issue_key(ledger, load_policy(policy), seal=RecordSeal(b"test"))
    audit = AuditLog(AuditSettings(tmp_path / "logs" / "audit.jsonl"), signing_key(tmp_path / "certs"))
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


# ----- bounded work: one stream event -----


def test_an_event_over_the_limit_passes_the_stream_through_unmetered_and_charged():
    facts = RequestFacts(metered=True, endpoint="/v1/chat/completions", model="gpt-4o-mini", stream=True)
    meter = FORMATS["openai"].stream_meter(facts)
    relay = StreamRelay(meter, SseSplitter(max_event_bytes=10_000))
    first = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
    huge = b"data: " + b"x" * 50_000 + b"\n\n"
    stream = first + huge + b"data: [DONE]\n\n"
    passed = [piece for i in range(0, len(stream), 4096) for piece in relay(stream[i : i + 4096])]
    passed += relay(b"")
    assert b"".join(passed) == stream  # every byte, once, in order
    assert relay.broken  # settled at its full hold
    assert all(passed)


# ----- errors a user meets -----


@pytest.mark.parametrize(
    "credential",
    [b"Bearer ak_0123abcd_s\xffcret", b"Bearer ak_\xc3\xa9t\xc3\xa9_secret", b"Bearer \xff\xfe", b"Bearer ak_broken"],
)
def test_a_key_with_bytes_that_are_not_a_key_is_401_never_500(proxy, mock, credential):
    answer = httpx.post(
        f"{proxy.gateway_url}/openai/v1/chat/completions",
        content=json.dumps(chat_body()).encode(),
        headers=[(b"authorization", credential), (b"content-type", b"application/json")],
        timeout=30,
    )
    assert answer.status_code == 401, answer.text
    if credential.startswith(b"Bearer ak_"):
        assert "malformed agent key" in answer.json()["error"]["message"]
    assert mock.received == []


def test_a_known_key_id_with_a_secret_that_is_not_utf8_is_401(proxy, mock, key):
    for route in ("/openai/v1/chat/completions", "/_agentkeys/v1/keys/self"):
        answer = httpx.post(
            proxy.gateway_url + route,
            content=json.dumps(chat_body()).encode(),
            headers=[(b"authorization", f"Bearer ak_{key['id']}_".encode() + b"s\xffcret")],
            timeout=30,
        )
        assert answer.status_code in (401, 404), answer.text  # 404: no POST on /keys/self
    answer = httpx.get(
        f"{proxy.gateway_url}/_agentkeys/v1/keys/self",
        headers=[(b"authorization", f"Bearer ak_{key['id']}_".encode() + b"s\xffcret")],
        timeout=30,
    )
    assert answer.status_code == 401, answer.text
    assert mock.received == []


def test_the_control_api_says_what_a_credential_is_not(proxy):
    def mint_with(credential: bytes) -> httpx.Response:
        return httpx.post(
            f"{proxy.gateway_url}/_agentkeys/v1/keys",
            json={"policy": "test", "ttl": "5m", "budget_usd": 0.1, "name": "x"},
            headers=[(b"authorization", b"Bearer " + credential)],
            timeout=30,
        )

    wrong_token = mint_with(b"not-the-issuer-token")
    assert wrong_token.status_code == 401
    assert "not an agent key or issuer token" in wrong_token.json()["error"]["message"]
    assert mint_with("t\u00f6ken".encode()).status_code == 401  # not ASCII: compared, not crashed on
    malformed = mint_with(b"ak_broken")
    assert malformed.status_code == 401 and "malformed agent key" in malformed.json()["error"]["message"]


def overspend(proxy, key_id: str, by_micros: int) -> None:
    """What a provider billing beyond a call's hold leaves behind: spend over the budget."""
    with sqlite3.connect(proxy.dir / "agentkeys.db") as db:
        db.execute("UPDATE keys SET spent_micros = budget_micros + ? WHERE key_id = ?", (by_micros, key_id))


def test_an_overspent_budget_is_told_as_exhausted_never_as_a_negative_remainder(proxy, key):
    overspend(proxy, key["id"], 501_023)
    answer = gateway_chat(proxy, key["key"], chat_body())
    assert answer.status_code == 429
    message = answer.json()["error"]["message"]
    assert "$-" not in message
    assert "nothing remains (overspent by $0.501023)" in message


def test_a_child_keys_refusal_names_its_own_narrowed_policy(proxy, key):
    child = httpx.post(
        f"{proxy.gateway_url}/_agentkeys/v1/keys",
        json={"name": "worker", "budget_usd": 0.01, "ttl": "5m", "models": ["gpt-4o-mini"]},
        headers={"authorization": f"Bearer {key['key']}"},
        timeout=30,
    )
    assert child.status_code == 201, child.text
    answer = gateway_chat(proxy, child.json()["key"], chat_body(model="gpt-4o-mini-2024-07-18"))
    assert answer.status_code == 403
    assert "policy test, narrowed for child key worker" in answer.json()["error"]["message"]


# ----- fuzz: the request path through the real proxy -----

ROUTES = [
    "/openai/v1/chat/completions",
    "/openai/v1/responses",
    "/openai/v1/embeddings",
    "/openai/v1/models",
    "/anthropic/v1/messages",
    "/anthropic/v1/messages/count_tokens",
    "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
    "/_agentkeys/v1/keys",
    "/_agentkeys/v1/keys/self",
    "/nosuch/v1/x",
]
HEADER_SAFE = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile_requests(draw, valid_key: str):
    method = draw(st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = draw(st.sampled_from(ROUTES) | st.text(alphabet="/abcxyz_:.%?=&-0123456789", max_size=40).map("/".__add__))
    credential = draw(
        st.sampled_from([valid_key, OPENAI_REAL_KEY, "ak_broken", "ak_x_y", "", valid_key[:-3]]).map(str.encode)
        | HEADER_SAFE
    )
    header_name = draw(st.sampled_from([b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key", b"x-other"]))
    value = b"Bearer " + credential if header_name == b"authorization" and draw(st.booleans()) else credential
    fields = {
        "model": draw(st.sampled_from(["gpt-4o-mini", "claude-haiku-4-5", "gpt-4o", "nosuch"]) | JSON_VALUES),
        "messages": draw(st.just([{"role": "user", "content": "hi"}]) | JSON_VALUES),
        "max_tokens": draw(st.sampled_from([1, 5]) | JSON_VALUES | st.sampled_from([1e29, 10**30, -1, 0, "5"])),
        **draw(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=3)),
    }
    body = draw(
        st.just(json.dumps(fields).encode())
        | st.binary(max_size=200)
        | JSON_VALUES.map(lambda value: json.dumps(value).encode())
        | st.sampled_from([b"[" * 5000, b'{"a":' * 5000, b"\xff\xfe", b""])
    )
    headers = [(header_name, value), (b"content-type", draw(st.sampled_from([b"application/json", b"text/plain"])))]
    return method, path, headers, body


@pytest.fixture(scope="module")
def fuzz_key(proxy, policy):
    return proxy.issue(policy, "--budget", "100")


@SLOW
def test_fuzz_the_request_path(proxy, mock, fuzz_key):
    # A connection per request: a request the proxy refuses at the protocol level closes its connection.
    client = httpx.Client(base_url=proxy.gateway_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request=hostile_requests(fuzz_key["key"]))
    def one_request(request):
        method, path, headers, body = request
        received = len(mock.received)
        try:
            answer = client.request(method, path, headers=headers, content=body)
        except httpx.LocalProtocolError:
            reject()  # not even HTTP: the client would not send it
        assert answer.status_code < 500, (request, answer.status_code, answer.text)
        assert real_keys_in(answer.text + str(answer.headers)) == [], (request, answer.text)
        if b"agentkeys:" in answer.content:  # the proxy answered: nothing reached the provider
            assert len(mock.received) == received, (request, answer.text)

    one_request()
    assert gateway_chat(proxy, fuzz_key["key"], chat_body()).status_code == 200  # and it keeps serving
