"""LLM traffic nobody configured: a call to a catalogued LLM API host that no provider covers is audited
(host, path, bytes, client) and refused, passed with a warning, or passed, per `unknown_llm_hosts`.

Nothing here leaves the machine: the catalogue is extended (by config, as a user would) with the mock
provider's loopback address, which plays an in-house LLM that nobody configured as a provider, and the
shipped hosts (api.mistral.ai, *.openai.azure.com) are only called while they are refused, which the
proxy answers itself before dialling anything."""

import re
import signal
import ssl
import time
from urllib.parse import urlsplit

import openai
import pytest
import yaml

from conftest import OPENAI_REAL_KEY, httpx, running_proxy


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    inhouse = urlsplit(mock.url).hostname
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, llm_hosts={"inhouse": [inhouse]}) as running:
        yield running
    assert not re.search(r'File ".*/agentkeys/', running.log_path.read_text()), "the addon raised"


def use_setting(proxy, setting: str) -> None:
    """Switch `unknown_llm_hosts` with a reload (SIGHUP), as an operator would."""
    config = yaml.safe_load(proxy.config_path.read_text())
    if config.get("unknown_llm_hosts", "audit") == setting:
        return
    reloads = proxy.log_path.read_text().count("reloaded the config")
    proxy.config_path.write_text(yaml.safe_dump({**config, "unknown_llm_hosts": setting}))
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log_path.read_text().count("reloaded the config") == reloads:
        assert time.monotonic() < deadline, proxy.log_path.read_text()
        time.sleep(0.1)


def inhouse_chat(proxy, mock) -> openai.types.chat.ChatCompletion:
    """The OpenAI SDK, through the proxy (HTTP_PROXY), straight at the unconfigured in-house host."""
    client = openai.OpenAI(
        api_key=OPENAI_REAL_KEY, base_url=f"{mock.url}/v1", max_retries=0,
        http_client=httpx.Client(proxy=proxy.proxy_url, timeout=10),
    )  # fmt: skip
    messages = [{"role": "user", "content": "hi"}]
    return client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=messages)


def llm_records(proxy, vendor: str) -> list[dict]:
    return [record for record in proxy.audit() if record.get("llm_host") == vendor]


def unknown_llm_calls(proxy, vendor: str, decision: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10).text
    prefix = f'agentkeys_unknown_llm_calls_total{{decision="{decision}",vendor="{vendor}"}} '
    return next((float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)), 0.0)


@pytest.mark.parametrize("setting", ["audit", "pass"])
def test_a_call_to_an_unconfigured_llm_host_is_audited_and_passed(proxy, mock, setting):
    use_setting(proxy, setting)
    before, warnings = unknown_llm_calls(proxy, "inhouse", "pass"), proxy.log_path.read_text().count("LLM traffic")
    reply = inhouse_chat(proxy, mock)
    assert reply.choices[0].message.content and len(mock.received) == 1
    record = llm_records(proxy, "inhouse")[-1]
    assert (record["decision"], record["host"], record["path"], record["method"]) == (
        "pass", urlsplit(mock.url).hostname, "/v1/chat/completions", "POST",
    )  # fmt: skip
    assert record["request_bytes"] == len(mock.received[0].body) > 0
    assert record["client"].startswith("127.0.0.1:") and f"unknown_llm_hosts: {setting}" in record["reason"]
    assert record["key_id"] is None and record["cost_micros"] == 0
    assert unknown_llm_calls(proxy, "inhouse", "pass") == before + 1
    warned = proxy.log_path.read_text().count("LLM traffic") - warnings
    assert warned == (1 if setting == "audit" and before == 0 else 0), "audit warns, once per host; pass does not"


def test_refused_per_the_setting_over_plain_http(proxy, mock):
    use_setting(proxy, "refuse")
    with pytest.raises(openai.PermissionDeniedError):
        inhouse_chat(proxy, mock)
    assert mock.received == []
    record = llm_records(proxy, "inhouse")[-1]
    assert (record["decision"], record["status"], record["deny_kind"]) == ("deny", 403, "unknown_llm_host")
    assert record["path"] == "/v1/chat/completions" and record["request_bytes"] > 0


@pytest.mark.parametrize(
    ("host", "vendor"), [("api.mistral.ai", "mistral"), ("contoso.openai.azure.com", "azure-openai")]
)
def test_a_shipped_llm_host_over_https_is_opened_up_audited_and_refused(proxy, mock, host, vendor):
    use_setting(proxy, "refuse")
    answer = httpx.post(
        f"https://{host}/v1/chat/completions?key=not-for-the-log",
        json={"model": "mistral-small", "messages": [{"role": "user", "content": "hi"}]},
        proxy=proxy.proxy_url, verify=ssl.create_default_context(cafile=proxy.ca_bundle), timeout=10,
    )  # fmt: skip
    assert answer.status_code == 403 and "no provider is configured for" in answer.text
    record = llm_records(proxy, vendor)[-1]
    assert (record["host"], record["port"], record["path"]) == (host, 443, "/v1/chat/completions")
    assert record["decision"] == "deny" and record["client"].startswith("127.0.0.1:")
    assert "not-for-the-log" not in proxy.audit_path.read_text()
    assert unknown_llm_calls(proxy, vendor, "deny") >= 1


def test_a_client_that_does_not_trust_the_proxys_ca_is_audited_for_trying(proxy, mock):
    """Its calls cannot be seen; the attempt to reach an LLM host nobody configured still shows."""
    with pytest.raises(httpx.ConnectError):
        httpx.post("https://api.deepseek.com/chat/completions", json={}, proxy=proxy.proxy_url, timeout=10)
    deadline = time.monotonic() + 10
    while not llm_records(proxy, "deepseek") and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = llm_records(proxy, "deepseek")
    assert (record["method"], record["host"], record["port"]) == ("TLS", "api.deepseek.com", 443)
    assert record["decision"] == "deny"
    assert "does not trust the proxy's CA" in record["reason"] and record["client"].startswith("127.0.0.1:")
