"""Routing without mitmproxy: listener mode + host + request target → a route."""

import pytest

from agentkeys.policy import ProxyConfig
from agentkeys.routing import (
    CONTROL_HOST,
    BadPath,
    ControlRoute,
    NoEndpoint,
    NoProvider,
    OtherHost,
    ProviderRoute,
    Router,
    UnknownLlmHost,
    Upstream,
)

GROQ = {"format": "openai", "upstream": "https://api.groq.com/openai", "hosts": ["api.groq.com"], "key_env": "G"}


def router(**config) -> Router:
    return Router(ProxyConfig.model_validate({"providers": {"groq": GROQ}, **config}))


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/openai/v1/chat/completions", ProviderRoute("openai", "/v1/chat/completions", "")),
        ("/gemini/v1beta/models/m:generate?alt=sse", ProviderRoute("gemini", "/v1beta/models/m:generate", "alt=sse")),
        ("/anthropic", ProviderRoute("anthropic", "/", "")),
        ("/nosuch/v1/chat/completions", NoProvider("nosuch")),
        ("/_agentkeys/v1/keys/self", ControlRoute("/_agentkeys/v1/keys/self", "")),
    ],
)  # fmt: skip
def test_the_gateway_routes_by_the_first_path_segment(target, route):
    assert router().route(gateway=True, host="127.0.0.1", target=target) == route


def test_proxy_mode_routes_by_host_and_keeps_the_path():
    route = router().route(gateway=False, host="api.anthropic.com", target="/v1/messages?beta=true")
    assert route == ProviderRoute("anthropic", "/v1/messages", "beta=true")


def test_a_host_whose_api_lives_under_a_path_drops_that_path():
    """Groq's API is at /openai/v1: policies name /v1/... as for OpenAI."""
    route = router().route(gateway=False, host="api.groq.com", target="/openai/v1/chat/completions")
    assert route == ProviderRoute("groq", "/v1/chat/completions", "")


def test_proxy_mode_leaves_other_hosts_to_egress():
    assert router().route(gateway=False, host="pypi.org", target="/simple/") == OtherHost("pypi.org")


@pytest.mark.parametrize("host", ["api.openai.com", CONTROL_HOST])
def test_the_control_api_answers_through_the_proxy_at_provider_hosts_and_its_own(host):
    route = router().route(gateway=False, host=host, target="/_agentkeys/v1/keys/self")
    assert route == ControlRoute("/_agentkeys/v1/keys/self", "")


def test_the_control_api_is_not_answered_for_other_hosts():
    assert router().route(gateway=False, host="example.com", target="/_agentkeys/v1/keys") == OtherHost("example.com")


@pytest.mark.parametrize(("egress", "allowed"), [("passthrough", True), ("allowlist", False)])
def test_egress_to_other_hosts_follows_the_config(egress, allowed):
    routes = router(egress=egress)
    assert routes.egress_allowed("example.com") is allowed
    assert routes.egress_allowed("api.openai.com") is True
    assert routes.intercepts("api.openai.com") and not routes.intercepts("example.com")
    # Redirected TLS (transparent mode) had no CONNECT to refuse: refused egress is opened up to be answered.
    assert routes.intercepts_redirected("api.openai.com")
    assert routes.intercepts_redirected("example.com") is not allowed


@pytest.mark.parametrize(
    ("url", "host", "port", "base_path", "authority"),
    [
        ("https://api.openai.com", "api.openai.com", 443, "", b"api.openai.com"),
        ("http://127.0.0.1:8999/v1/", "127.0.0.1", 8999, "/v1", b"127.0.0.1:8999"),
        ("https://[::1]:8443", "::1", 8443, "", b"[::1]:8443"),
        ("https://bücher.example", "bücher.example", 443, "", b"xn--bcher-kva.example"),
    ],
)
def test_an_upstream_url_is_split_once(url, host, port, base_path, authority):
    upstream = Upstream.parse(url)
    assert (upstream.host, upstream.port, upstream.base_path, upstream.authority) == (host, port, base_path, authority)


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/anthropic/messages", ProviderRoute("anthropic", "/v1/messages", "")),
        ("/anthropic/v1/messages", ProviderRoute("anthropic", "/v1/messages", "")),
        ("/openai/chat/completions", ProviderRoute("openai", "/v1/chat/completions", "")),
        ("/openai/responses?x=1", ProviderRoute("openai", "/v1/responses", "x=1")),
        ("/gemini/v1/models/m:generateContent", ProviderRoute("gemini", "/v1/models/m:generateContent", "")),
        ("/anthropic/nothing-here", NoEndpoint("anthropic", "/nothing-here")),
    ],
)
def test_a_gateway_base_url_with_or_without_the_api_version_reaches_the_same_endpoint(target, route):
    """The Anthropic SDK wants ANTHROPIC_BASE_URL=…/anthropic, the AI SDK reads it and sends /messages."""
    assert router().route(gateway=True, host="127.0.0.1", target=target) == route


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("gateway", "host", "target", "route"),
    [
        (True, "127.0.0.1", "/openai/v1/files/../chat/completions", ProviderRoute("openai", CHAT, "")),
        (True, "127.0.0.1", "/openai/v1/files/%2e%2e/chat/completions?x=1",
         ProviderRoute("openai", CHAT, "x=1")),
        (True, "127.0.0.1", "/openai//v1/./models/", ProviderRoute("openai", "/v1/models", "")),
        (False, "api.openai.com", "/v1/files/.%2E/chat/completions", ProviderRoute("openai", CHAT, "")),
        (False, "api.groq.com", "/openai/v1/x/../chat/completions", ProviderRoute("groq", CHAT, "")),
    ],
)  # fmt: skip
def test_a_provider_path_is_routed_in_its_normal_form(gateway, host, target, route):
    """What the policy matches is what is forwarded: the path as the provider will read it."""
    assert router().route(gateway=gateway, host=host, target=target) == route


@pytest.mark.parametrize(
    ("gateway", "host", "target", "provider"),
    [
        (True, "127.0.0.1", "/openai/v1/files%2f..%2fchat/completions", "openai"),
        (True, "127.0.0.1", "/openai/../anthropic/v1/messages", "openai"),
        (False, "api.anthropic.com", "/v1/../../v1/messages", "anthropic"),
        (False, "api.groq.com", "/openai/v1/%5c", "groq"),
    ],
)
def test_a_path_with_no_single_meaning_is_refused_in_its_provider_s_name(gateway, host, target, provider):
    route = router().route(gateway=gateway, host=host, target=target)
    assert isinstance(route, BadPath) and route.provider == provider


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("api.mistral.ai", UnknownLlmHost("api.mistral.ai", "mistral")),
        ("contoso.openai.azure.com", UnknownLlmHost("contoso.openai.azure.com", "azure-openai")),
        ("api.groq.com", ProviderRoute("groq", "/v1/chat/completions", "")),  # configured: its provider's
        ("pypi.org", OtherHost("pypi.org")),
    ],
)
def test_proxy_mode_tells_llm_hosts_nobody_configured_from_providers_and_other_hosts(host, route):
    routes = router()
    assert routes.route(gateway=False, host=host, target="/openai/v1/chat/completions") == route
    assert routes.intercepts(host) is not isinstance(route, OtherHost), "an LLM host is opened up to be audited"


@pytest.mark.parametrize(
    ("setting", "egress", "refused"),
    [("refuse", "passthrough", "no provider is configured for (unknown_llm_hosts: refuse)"),
     ("audit", "passthrough", None), ("pass", "passthrough", None),
     ("pass", "allowlist", "egress to api.mistral.ai is not allowed")],
)  # fmt: skip
def test_a_call_to_an_unconfigured_llm_host_is_refused_per_the_setting_and_egress(setting, egress, refused):
    refusal = router(unknown_llm_hosts=setting, egress=egress).llm_host_refusal("api.mistral.ai", "mistral")
    if refused is None:
        assert refusal is None
    else:
        assert refused in refusal


def test_a_configured_providers_host_is_never_an_unknown_llm_host():
    routes = router()
    assert routes.unknown_llm_vendor("api.groq.com") is None and routes.unknown_llm_vendor("api.openai.com") is None
    assert routes.unknown_llm_vendor("api.mistral.ai") == "mistral"
