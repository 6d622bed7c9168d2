"""Egress: the proxy is the only way to a provider, and every tunnel it passes or refuses is audited."""

import socket
import ssl

import pytest
from cryptography import x509

from conftest import httpx, running_proxy, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "egress")


@pytest.fixture(scope="module", params=["passthrough", "allowlist"])
def proxy(mock, tmp_path_factory, request):
    with running_proxy(tmp_path_factory.mktemp(request.param), mock, egress=request.param) as running:
        running.egress = request.param
        yield running


def connect(proxy, target: str) -> tuple[socket.socket, bytes]:
    raw = socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10)
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = raw.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    while len(body) < length:
        body += raw.recv(4096)
    return raw, head + b"\r\n\r\n" + body


def egress_records(proxy, host: str) -> list[dict]:
    return [record for record in proxy.audit() if record.get("host") == host]


@pytest.mark.parametrize("port", [22, 80, 8443])
def test_a_provider_host_is_reached_on_its_own_port_only(proxy, mock, port):
    raw, answer = connect(proxy, f"api.openai.com:{port}")
    raw.close()
    assert answer.startswith(b"HTTP/1.1 403") and b"port 443 only" in answer
    record = egress_records(proxy, "api.openai.com")[-1]
    assert (record["decision"], record["port"], record["method"]) == ("deny", port, "CONNECT")
    assert record["client"].startswith("127.0.0.1:")


def test_a_made_up_sni_on_a_provider_tunnel_is_intercepted_not_passed(proxy, mock, policy):
    """The ClientHello names another host; the tunnel still goes to the provider, so it is opened up,
    and the request inside, which names that other host, is refused."""
    raw, answer = connect(proxy, "api.openai.com:443")
    assert answer.startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(proxy.ca_bundle))
    context.check_hostname = False
    with context.wrap_socket(raw, server_hostname="exfil.example") as tls:
        issuer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).issuer.rfc4514_string()
        assert "mitmproxy" in issuer, "the proxy answered the handshake itself"
        key = proxy.issue(policy)["key"]
        tls.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: exfil.example\r\nContent-Length: 2\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n\r\n{}"
        )
        assert tls.recv(4096).startswith(b"HTTP/1.1 400")
    assert not mock.received


def test_plain_http_is_routed_by_its_target_and_a_foreign_host_header_refused(proxy, mock, policy):
    key = proxy.issue(policy)["key"]
    answer = httpx.post(
        "http://api.openai.com/v1/chat/completions",
        headers={"host": "example.com", "authorization": f"Bearer {key}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        proxy=proxy.proxy_url,
        timeout=10,
    )
    assert answer.status_code == 400 and "Host header" in answer.text
    assert not mock.received


def test_a_tunnel_to_another_host_is_audited_as_passed_or_refused(proxy, mock):
    raw, answer = connect(proxy, "127.0.0.2:9")  # nothing listens there: only the decision matters
    raw.close()
    [record] = egress_records(proxy, "127.0.0.2")
    if proxy.egress == "allowlist":
        assert answer.startswith(b"HTTP/1.1 403") and record["decision"] == "deny"
    else:
        assert answer.startswith(b"HTTP/1.1 200") and record["decision"] == "pass"
    assert record["port"] == 9 and record["client"].startswith("127.0.0.1:")


def test_a_tunnel_to_an_llm_host_nobody_configured_is_opened_up_or_refused_by_egress(proxy, mock):
    """A catalogued LLM API host is intercepted so its calls can be audited; `allowlist` still refuses it,
    and the refusal names its vendor."""
    raw, answer = connect(proxy, "api.mistral.ai:443")
    raw.close()
    records = egress_records(proxy, "api.mistral.ai")
    if proxy.egress == "allowlist":
        assert answer.startswith(b"HTTP/1.1 403")
        assert (records[-1]["decision"], records[-1]["llm_host"]) == ("deny", "mistral")
    else:
        assert answer.startswith(b"HTTP/1.1 200"), "opened up: its requests are what is audited"
        assert [record for record in records if record["method"] == "CONNECT"] == []
