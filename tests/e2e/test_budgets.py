"""Budgets, refusals and failures end to end, through a real mitmdump with the official SDKs."""

import re
import socket
import ssl
import threading

import anthropic
import openai
import pytest

from agentkeys.money import USD_MESSAGE_FORMAT
from conftest import (
    assert_ledger_matches_audit,
    free_port,
    httpx,
    running_proxy,
    start_proxy,
    stop_proxy,
    write_policy,
)

DEAD_PORT = free_port()  # nothing listens here: calls to the "deadai" provider cannot connect


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    """This module's proxy also knows a provider whose upstream is down."""
    with running_proxy(
        tmp_path_factory.mktemp("proxy"),
        mock,
        providers={
            "openai": {"upstream": mock.url},
            "anthropic": {"upstream": mock.url},
            "deadai": {"format": "openai", "upstream": f"http://127.0.0.1:{DEAD_PORT}", "key_env": "OPENAI_API_KEY"},
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policies")
    return {
        "chat": write_policy(folder, "chat", providers=["openai", "anthropic", "deadai"]),
        "files": write_policy(folder, "files", endpoints=["GET /v1/files", "POST /v1/chat/completions"]),
    }


def openai_gateway(proxy, key, provider="openai", max_retries=0):
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/{provider}/v1", max_retries=max_retries)


def anthropic_gateway(proxy, key, max_retries=0):
    return anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=max_retries)


def ask(client, model="gpt-4o-mini", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}], **kwargs)


def test_budget_exhaustion_is_refused_in_openai_shape_and_not_retried(proxy, mock, policies):
    key = proxy.issue(policies["chat"], "--budget", "0.00001")
    client = openai_gateway(proxy, key, max_retries=3)
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, max_tokens=1000)
    error = refused.value
    assert error.response.headers["x-should-retry"] == "false"
    assert error.body["code"] == "insufficient_quota"
    assert "budget exhausted: this call could cost up to $0.0006" in error.message
    assert "$0.000010 remains" in error.message
    assert error.response.headers["x-agentkeys-budget-remaining"] == "0.000010"
    assert mock.received == []
    assert len(proxy.records_for(key["id"])) == 1, "the SDK retried a refusal it was told not to retry"


def test_budget_exhaustion_in_anthropic_shape(proxy, mock, policies):
    key = proxy.issue(policies["chat"], "--budget", "0.00001")
    with pytest.raises(anthropic.APIStatusError) as refused:
        anthropic_gateway(proxy, key, max_retries=3).messages.create(
            model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 402
    assert refused.value.body["error"]["type"] == "billing_error"
    assert refused.value.response.headers["x-agentkeys-budget-remaining"] == "0.000010"
    assert mock.received == [] and len(proxy.records_for(key["id"])) == 1


def test_every_amount_in_a_refusal_is_written_one_way(proxy, mock, policies):
    """Budget refusals in both shapes, a refused child key, an overrun's audit reason: every dollar amount an
    agent or an operator reads has six decimals (`$0.500000`, `$0.499932`), never `$0.5000` beside `$0.499932`."""
    key = proxy.issue(policies["chat"], "--budget", "0.5")
    messages = []
    with pytest.raises(openai.RateLimitError) as refused:  # nothing spent yet: $0.500000 remains
        ask(openai_gateway(proxy, key), max_tokens=2_000_000)
    messages.append(refused.value.message)
    ask(openai_gateway(proxy, key), max_tokens=5)  # spends a few micro-dollars: $0.49999x remains
    mock.overrun_next(output_tokens=400)
    ask(openai_gateway(proxy, key), max_tokens=5)  # the provider bills beyond the hold: an overrun reason
    with pytest.raises(anthropic.APIStatusError) as refused:
        anthropic_gateway(proxy, key).messages.create(
            model="claude-haiku-4-5", max_tokens=200_000, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    messages.append(refused.value.message)
    child = httpx.post(
        f"{proxy.gateway_url}/_agentkeys/v1/keys", headers={"authorization": f"Bearer {key['key']}"},
        json={"name": "greedy", "ttl": "5m", "budget_usd": 0.49999}, timeout=10,
    )  # fmt: skip
    messages.append(child.json()["error"]["message"])
    reasons = [record["reason"] for record in proxy.records_for(key["id"], 5) if "$" in (record["reason"] or "")]
    amounts = re.findall(r"-?\$[\d.,]+\d", " ".join(messages + reasons))
    assert len(amounts) >= 7, (messages, reasons)
    assert [amount for amount in amounts if not USD_MESSAGE_FORMAT.fullmatch(amount)] == [], amounts
    assert_ledger_matches_audit(proxy, key["id"])


def test_spending_down_a_budget_never_overshoots(proxy, mock, policies):
    """Calls go through until the next worst case no longer fits; spend stays within the budget."""
    key = proxy.issue(policies["chat"], "--budget", "0.0002")  # 200 micro-dollars
    client = openai_gateway(proxy, key)
    allowed = 0
    for _ in range(60):
        try:
            ask(client, max_tokens=50)  # worst case ~32 micro-dollars, actual ~9
            allowed += 1
        except openai.RateLimitError:
            break
    else:
        pytest.fail("the budget never ran out")
    proxy.records_for(key["id"], allowed + 1)
    record = assert_ledger_matches_audit(proxy, key["id"])
    assert allowed == len(mock.reported) >= 10
    assert record.spent_micros <= record.budget_micros
    assert record.budget_micros - record.spent_micros < 32, "refused although the worst case still fitted"
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, max_tokens=50)
    told = refused.value.response.headers["x-agentkeys-budget-remaining"]
    assert told == f"{(record.budget_micros - record.spent_micros) / 1e6:.6f}"


def test_upstream_error_releases_the_hold(proxy, mock, policies):
    key = proxy.issue(policies["chat"])
    mock.fail_next(500)
    with pytest.raises(openai.InternalServerError):
        ask(openai_gateway(proxy, key), max_tokens=5)
    [record] = proxy.records_for(key["id"])
    assert record["status"] == 500 and record["cost_micros"] == 0 and record["metering"] == "none"
    assert assert_ledger_matches_audit(proxy, key["id"]).spent_micros == 0


def test_unreachable_upstream_releases_the_hold(proxy, policies):
    key = proxy.issue(policies["chat"])
    with pytest.raises(openai.APIStatusError) as failed:
        ask(openai_gateway(proxy, key, provider="deadai"), max_tokens=5)
    assert failed.value.status_code == 502
    [record] = proxy.records_for(key["id"])
    assert record["cost_micros"] == 0 and record["reason"].startswith("error:")
    assert assert_ledger_matches_audit(proxy, key["id"]).spent_micros == 0


def test_an_agent_that_gives_up_after_the_call_reached_the_provider_is_charged_the_full_hold(proxy, mock, policies):
    """The provider finishes and bills a call whose client went away, so the hold is not freed."""
    key = proxy.issue(policies["chat"])
    mock.delay_next(2)
    impatient = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        ask(impatient, max_tokens=5)
    [record] = proxy.records_for(key["id"])
    assert record["reason"].startswith("error: Client disconnected.") and record["metering"] == "held"
    assert record["cost_micros"] == record["hold_micros"] > 0
    assert_ledger_matches_audit(proxy, key["id"])


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_stream_cut_short_is_charged_its_full_hold(proxy, mock, policies, sdk):
    """What was streamed says nothing of what the provider bills (it may have reasoned at length)."""
    key = proxy.issue(policies["chat"])
    mock.cut_next_stream(after_chunks=3)
    with pytest.raises((openai.APIConnectionError, anthropic.APIConnectionError, httpx.HTTPError)):
        if sdk == "openai":
            list(ask(openai_gateway(proxy, key), max_tokens=50, stream=True))
        else:
            with anthropic_gateway(proxy, key).messages.stream(
                model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                list(stream.text_stream)
    [record] = proxy.records_for(key["id"])
    assert record["metering"] == "held" and "broke off" in record["reason"]
    assert record["cost_micros"] == record["hold_micros"] > 0
    assert_ledger_matches_audit(proxy, key["id"])


def test_endpoint_and_model_not_allowed_name_what_is(proxy, mock, policies):
    key = proxy.issue(policies["chat"])
    client = openai_gateway(proxy, key)
    with pytest.raises(openai.PermissionDeniedError) as wrong_endpoint:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert "POST /v1/embeddings is not allowed" in wrong_endpoint.value.message
    assert "POST /v1/chat/completions" in wrong_endpoint.value.message
    with pytest.raises(openai.PermissionDeniedError) as wrong_model:
        ask(client, model="gpt-4o", max_tokens=5)
    assert "model gpt-4o is not allowed" in wrong_model.value.message and "gpt-4o-mini*" in wrong_model.value.message
    assert mock.received == []


def test_an_unmeterable_endpoint_is_refused_even_if_the_policy_allows_it(proxy, mock, policies):
    key = proxy.issue(policies["files"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        openai_gateway(proxy, key).files.list()
    assert "cannot be metered" in refused.value.message and "unmetered_endpoints" in refused.value.message
    assert mock.received == []


def test_unknown_model_price_is_refused(proxy, mock, policies, tmp_path):
    key = proxy.issue(write_policy(tmp_path, "anything", models=["*"]))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        ask(openai_gateway(proxy, key), model="my-finetune-without-a-price", max_tokens=5)
    assert "no price is known for model my-finetune-without-a-price" in refused.value.message
    assert mock.received == []


@pytest.mark.parametrize(
    "body, complaint",
    [
        (b"{not json", "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "names no 'model'"),
        (b'{"model": "gpt-4o-mini", "messages": []}', "'messages' must be a non-empty list"),
        (b'{"model": "gpt-4o-mini", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}', "positive"),
        (b'{"model": "gpt-4o-mini", "max_tokens": "9", "messages": [{"role": "user", "content": "x"}]}', "positive"),
        (b'{"model": 4, "messages": [{"role": "user", "content": "x"}]}', "names no 'model'"),
        (b'{"model": "gpt-4o-mini", "messages": "hi"}', "'messages' must be a non-empty list"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'{"model": "gpt-4o-mini", "messages": [\xff\xfe]}', "not valid JSON"),
        (b"", "must be a JSON object"),
    ],
)
def test_malformed_request_gets_a_400_saying_what_is_wrong(proxy, mock, policies, body, complaint):
    key = proxy.issue(policies["chat"])
    response = httpx.post(
        f"{proxy.gateway_url}/openai/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {key['key']}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert complaint in response.json()["error"]["message"]
    assert mock.received == []


def test_unknown_gateway_prefix_is_a_404(proxy):
    response = httpx.get(f"{proxy.gateway_url}/nowhere/v1/models")
    assert response.status_code == 404 and "/openai" in response.json()["error"]["message"]


def test_metrics_and_audit_never_show_a_key_or_a_prompt(proxy, mock, policies):
    key = proxy.issue(policies["chat"])
    ask(openai_gateway(proxy, key), max_tokens=3)
    proxy.records_for(key["id"])
    metrics = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics").text
    assert 'agentkeys_requests_total{outcome="allowed",policy="chat",provider="openai"}' in metrics
    assert "agentkeys_spend_usd_total" in metrics and "agentkeys_proxy_overhead_seconds_bucket" in metrics
    audit = proxy.audit_path.read_text()
    for secret in (key["key"], "sk-test-real-openai", "sk-ant-test-real-anthropic", "Say hello"):
        assert secret not in metrics and secret not in audit
    assert key["id"] not in metrics, "key ids are unbounded: they must not be metric labels"
    record = proxy.audit()[-1]
    for field in ("ts", "key_id", "key_name", "policy", "provider", "method", "path", "model", "decision",
                  "reason", "status", "input_tokens", "output_tokens", "cached_tokens", "cost_usd",
                  "upstream_latency_ms", "ttft_ms", "proxy_overhead_ms"):  # fmt: skip
        assert field in record


def test_other_hosts_pass_through_as_an_untouched_tls_tunnel(proxy, tmp_path):
    """A host that is not a provider keeps its own certificate: the proxy does not intercept it."""
    from mitmproxy.certs import CertStore

    store = CertStore.from_store(tmp_path, "other", 2048)
    entry = store.get_cert("localhost", [])
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(entry.cert.to_pem())
    key_file.write_bytes(key_to_pem(entry.privatekey))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one():
        connection, _ = listener.accept()
        with server_context.wrap_socket(connection, server_side=True) as tls:
            tls.sendall(b"hello from the real server")

    threading.Thread(target=serve_one, daemon=True).start()
    with socket.create_connection(("127.0.0.1", proxy.proxy_port)) as raw:
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        client_context = ssl.create_default_context()
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE  # we compare the certificate itself below
        with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(cert_file.read_text())
            assert tls.recv(100) == b"hello from the real server"
    listener.close()


def key_to_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def test_egress_allowlist_refuses_other_hosts(mock, tmp_path):
    strict = start_proxy(tmp_path / "strict", mock, egress="allowlist")
    try:
        with socket.create_connection(("127.0.0.1", strict.proxy_port)) as raw:
            raw.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            raw.settimeout(5)
            answer = b""
            while b"not allowed" not in answer and (chunk := raw.recv(4096)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 403") and b"egress to example.com is not allowed" in answer
    finally:
        stop_proxy(strict)
