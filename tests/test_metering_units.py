"""Metering without mitmproxy: the new endpoints' request facts, stream meters and usage; prices
(long-context bands, cache writes, user overrides); the gate's clamp, unmetered endpoints, unseen
input and Azure deployments; and, for many shapes of request, a hold never below the mock's bill.
"""

import asyncio
import json

import pytest

from agentkeys import credentials
from agentkeys.calls import CallRequest, Denial
from agentkeys.gate import Admission, Gate
from agentkeys.ledger import KeyRecord, SqliteLedger
from agentkeys.money import usd_to_micros
from agentkeys.policy import Policy, ProxyConfig
from agentkeys.pricing import (
    ConfigPrice,
    ModelPrice,
    PriceTable,
    PriceTier,
    Usage,
    cost_micros,
    load_prices,
    price_from_litellm_entry,
    price_rows,
    worst_case_micros,
)
from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, SseSplitter, Unmeterable, set_output_cap
from agentkeys.store import Store
from agentkeys.tokens import count_tokens, token_bound
from agentkeys.yamlfile import ConfigError
from mock_provider import _Anthropic, _Completions, _Embeddings, _Gemini, _OpenAI, _Responses, count_o200k_tokens

OPENAI, ANTHROPIC, GEMINI, AZURE = (FORMATS[name] for name in ("openai", "anthropic", "gemini", "azure"))
PRICES = PriceTable.bundled()
REAL_KEYS = {"OPENAI_API_KEY": "sk-real-o", "ANTHROPIC_API_KEY": "sk-real-a", "GEMINI_API_KEY": "real-g"}
REAL_KEYS["AZURE_OPENAI_API_KEY"] = "real-az"
AZURE_PROVIDER = {
    "format": "azure",
    "upstream": "https://myres.openai.azure.com",
    "key_env": "AZURE_OPENAI_API_KEY",
    "deployments": {"prod-mini": "gpt-4o-mini"},
}
POLICY = {
    "name": "units",
    "budget_usd": 1.0,
    "providers": ["openai", "anthropic", "gemini", "azure"],
    "endpoints": ["* /**"],
    "models": ["*"],
    "default_max_output_tokens": 256,
}


def sse(data, event=None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def feed(meter, events: list[bytes]) -> None:
    for event in SseSplitter().feed(b"".join(events)):
        meter.feed(event)


# ----- the gate, with a real SQLite ledger -----


async def admit_or_denial(gate: Gate, call: CallRequest) -> Admission | Denial:
    try:
        return await gate.admit(call)
    except Denial as denial:
        return denial


class Env:
    def __init__(self, tmp_path, monkeypatch):
        for name, value in REAL_KEYS.items():
            monkeypatch.setenv(name, value)
        self.ledger = SqliteLedger(tmp_path / "units.db")
        config = ProxyConfig.model_validate({"providers": {"azure": AZURE_PROVIDER}})
        self.gate = Gate(config, Store(self.ledger, clock=lambda: 1_700_000_000.0), PriceTable.bundled())

    def issue(self, budget_usd: float = 1.0, **policy_fields) -> str:
        policy = Policy.model_validate({**POLICY, **policy_fields})
        minted = credentials.mint()
        self.ledger.create_key(
            KeyRecord(
                key_id=minted.key_id, key_hash=minted.key_hash, name="units", policy_name=policy.name,
                policy_json=policy.model_dump_json(), created_at=1_699_999_000.0, expires_at=1_800_000_000.0,
                budget_micros=usd_to_micros(budget_usd),
            )
        )  # fmt: skip
        return minted.key

    def admit(self, key: str, provider: str, path: str, body, method: str = "POST", query: str = ""):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        call = CallRequest(provider, method, path, {"authorization": f"Bearer {key}"}, raw, query=query)
        return asyncio.run(admit_or_denial(self.gate, call))

    def admitted(self, *args, **kwargs) -> Admission:
        result = self.admit(*args, **kwargs)
        assert isinstance(result, Admission), result
        return result


@pytest.fixture
def env(tmp_path, monkeypatch):
    made = Env(tmp_path, monkeypatch)
    yield made
    made.ledger.close()


# ----- the hold never falls below what the provider bills -----

TEXT = "Summarise: " + " ".join(f"fact {i}: ünïcödé 数据 🙂" for i in range(300))
SCHEMA = {"type": "json_schema", "name": "out", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
CACHED_SYSTEM = [{"type": "text", "text": TEXT, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]

# (provider, path, mock API, body): each billed by the mock at the longest reply the request allows.
SHAPES = {
    "responses-text": ("openai", "/v1/responses", _Responses, {"model": "gpt-4o-mini", "input": TEXT}),
    "responses-items": (
        "openai", "/v1/responses", _Responses,
        {"model": "gpt-4o-mini", "instructions": "Be brief.", "max_output_tokens": 50, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": TEXT}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "earlier answer"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]},
    ),
    "responses-schema-tools": (
        "openai", "/v1/responses", _Responses,
        {"model": "gpt-4o-mini", "input": "hi", "text": {"format": SCHEMA},
         "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
    ),
    "responses-reasoning": (
        "openai", "/v1/responses", _Responses,
        {"model": "o4-mini", "input": TEXT, "reasoning": {"effort": "high"}, "max_output_tokens": 300},
    ),
    "responses-previous": (
        "openai", "/v1/responses", _Responses,
        {"model": "gpt-4o-mini", "input": "and then?", "previous_response_id": "resp_1", "max_output_tokens": 20},
    ),
    "completions-text": (
        "openai", "/v1/completions", _Completions, {"model": "gpt-3.5-turbo-instruct", "prompt": TEXT},
    ),
    "completions-many": (
        "openai", "/v1/completions", _Completions,
        {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", TEXT, "c"], "n": 3, "max_tokens": 40},
    ),
    "completions-token-arrays": (
        "openai", "/v1/completions", _Completions,
        {"model": "gpt-3.5-turbo-instruct", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 7},
    ),
    "embeddings-text": ("openai", "/v1/embeddings", _Embeddings, {"model": "text-embedding-3-small", "input": TEXT}),
    "embeddings-list": (
        "openai", "/v1/embeddings", _Embeddings, {"model": "text-embedding-3-small", "input": [TEXT, "b", "🙂" * 50]},
    ),
    "embeddings-tokens": (
        "openai", "/v1/embeddings", _Embeddings, {"model": "text-embedding-3-small", "input": [7] * 90},
    ),
    "anthropic-cache-write-1h": (
        "anthropic", "/v1/messages", _Anthropic,
        {"model": "claude-haiku-4-5", "max_tokens": 100, "system": CACHED_SYSTEM,
         "messages": [{"role": "user", "content": "hi"}]},
    ),
    "anthropic-cache-in-message": (
        "anthropic", "/v1/messages", _Anthropic,
        {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": [
            {"type": "text", "text": TEXT, "cache_control": {"type": "ephemeral"}}]}]},
    ),
    "gemini-text": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", _Gemini,
        {"contents": [{"role": "user", "parts": [{"text": TEXT}]}],
         "systemInstruction": {"parts": [{"text": "Be brief"}]}},
    ),
    "gemini-thinking-candidates": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", _Gemini,
        {"contents": [{"parts": [{"text": TEXT}]}], "generationConfig": {
            "maxOutputTokens": 200, "candidateCount": 2, "thinkingConfig": {"thinkingBudget": 150}}},
    ),
    "gemini-image": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", _Gemini,
        {"contents": [{"parts": [
            {"text": "what is it?"}, {"inlineData": {"mimeType": "image/png", "data": "iVBOR"}}]}]},
    ),
    "gemini-cached-content": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", _Gemini,
        {"contents": [{"parts": [{"text": "go on"}]}], "cachedContent": "cachedContents/x",
         "generationConfig": {"maxOutputTokens": 10}},
    ),
    "azure-deployment": (
        "azure", "/openai/deployments/prod-mini/chat/completions", _OpenAI,
        {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 30},
    ),
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_hold_covers_what_the_mock_bills(env, shape):
    provider, path, api, body = SHAPES[shape]
    admission = env.admitted(env.issue(), provider, path, body)
    sent = json.loads(admission.upstream_body) if admission.upstream_body else body
    if api is _Gemini:
        sent = {**sent, "model": admission.facts.model}
    elif provider == "azure":
        sent = {**sent, "model": "prod-mini"}
    call = api.call(sent, count_o200k_tokens, 10**6, set())  # the longest reply allowed; a cold cache
    usage = Usage(
        call.input_tokens, call.output_tokens, call.cached_tokens, call.cache_write_tokens, call.reasoning_tokens,
        call.cache_write_1h_tokens,
    )  # fmt: skip
    assert cost_micros(admission.price, usage) <= admission.hold_micros
    assert call.input_tokens <= admission.facts.input_token_bound


def test_a_cache_write_is_held_at_its_premium(env):
    """Writing the whole prompt to Anthropic's one-hour cache costs twice the input price."""
    body = SHAPES["anthropic-cache-write-1h"][3]
    admission = env.admitted(env.issue(), "anthropic", "/v1/messages", body)
    bound = admission.facts.input_token_bound
    haiku = PRICES.lookup("anthropic", "claude-haiku-4-5")
    all_written = Usage(bound, 100, cache_write_tokens=bound, cache_write_1h_tokens=bound)
    assert admission.hold_micros == cost_micros(haiku, all_written) > cost_micros(haiku, Usage(bound, 100))
    uncached = env.admitted(env.issue(), "anthropic", "/v1/messages", {**body, "system": "plain"})
    assert uncached.facts.may_write_cache is False


# ----- request facts -----


@pytest.mark.parametrize(
    ("wire", "method", "path", "kind"),
    [
        (GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", "metered"),
        (GEMINI, "POST", "/v1/models/gemini-2.5-flash:streamGenerateContent", "metered"),
        (GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", "free"),
        (GEMINI, "GET", "/v1beta/models", "free"),
        (GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:embedContent", None),
        (GEMINI, "POST", "/upload/v1beta/files", None),
        (AZURE, "POST", "/openai/deployments/d1/chat/completions", "metered"),
        (AZURE, "POST", "/openai/deployments/d1/embeddings", "metered"),
        (AZURE, "POST", "/openai/v1/responses", "metered"),
        (AZURE, "GET", "/openai/v1/models", "free"),
        (AZURE, "POST", "/openai/deployments/d1/audio/transcriptions", None),
        (OPENAI, "POST", "/v1/responses/input_tokens", "free"),
        (OPENAI, "DELETE", "/v1/responses/resp_1", "free"),
        (OPENAI, "POST", "/v1/responses/resp_1/cancel", None),
    ],
)
def test_endpoint_kinds_of_the_new_formats(wire, method, path, kind):
    assert wire.endpoint_kind(method, path) == kind


def test_gemini_reads_snake_case_and_writes_the_cap_where_the_client_put_it():
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"candidate_count": 2}})
    facts = GEMINI.request_facts("POST", "/v1beta/models/gemini-2.5-flash:generateContent", body.encode())
    assert (facts.model, facts.choices, facts.max_output_tokens, facts.stream) == ("gemini-2.5-flash", 2, None, False)
    sent = json.loads(GEMINI.upstream_body(facts, body.encode(), 77))
    assert sent["generation_config"] == {"candidate_count": 2, "max_output_tokens": 77}
    assert "generationConfig" not in sent


def test_a_gemini_stream_must_be_server_sent_events():
    body = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert GEMINI.request_facts("POST", path, body, "alt=sse&key=x").stream
    with pytest.raises(Exception, match="alt=sse"):
        GEMINI.request_facts("POST", path, body, "")


def test_the_cap_overwrites_every_limit_the_client_set():
    data = {"max_tokens": 900, "max_completion_tokens": 800}
    set_output_cap(data, 50, ("max_completion_tokens", "max_tokens"))
    assert data == {"max_tokens": 50, "max_completion_tokens": 50}
    fresh = {}
    set_output_cap(fresh, 50, ("max_completion_tokens", "max_tokens"))
    assert fresh == {"max_completion_tokens": 50}


def test_an_azure_deployment_path_names_the_model_whatever_the_body_says():
    body = b'{"model": "cheap-model", "messages": [{"role": "user", "content": "hi"}]}'
    facts = AZURE.request_facts("POST", "/openai/deployments/prod-4o/chat/completions", body, "api-version=x")
    assert facts.model == "prod-4o" and facts.endpoint == "/v1/chat/completions"
    assert AZURE.real_key_header("real") == ("api-key", "real")


@pytest.mark.parametrize(
    ("wire", "path", "body", "complaint"),
    [
        (OPENAI, "/v1/chat/completions", {"web_search_options": {}}, "web search"),
        (OPENAI, "/v1/chat/completions", {"modalities": ["text", "audio"]}, "audio"),
        (OPENAI, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}]}]}, "audio"),
        (OPENAI, "/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        (OPENAI, "/v1/responses", {"tools": [{"type": "file_search"}]}, "'file_search'"),
        (OPENAI, "/v1/responses", {"tools": [{"type": "mcp", "server_url": "x"}]}, "'mcp'"),
        (ANTHROPIC, "/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "w"}]}, "web_search"),
        (ANTHROPIC, "/v1/messages", {"mcp_servers": [{"url": "x"}]}, "MCP"),
        (AZURE, "/openai/deployments/d/chat/completions", {"data_sources": [{"type": "azure_search"}]}, "On Your Data"),
        (GEMINI, "/v1beta/models/m:generateContent", {"tools": [{"code_execution": {}}]}, "codeExecution"),
    ],
    ids=["chat-web-search", "chat-audio-out", "chat-audio-in", "chat-prediction", "file-search", "mcp",
         "anthropic-web-search", "anthropic-mcp", "azure-on-your-data", "gemini-code-execution"],
)  # fmt: skip
def test_tools_billed_beyond_tokens_cannot_be_metered(wire, path, body, complaint):
    base = {
        "model": "m", "max_tokens": 10, "input": "hi", "messages": [{"role": "user", "content": "hi"}],
        "contents": [{"parts": [{"text": "hi"}]}],
    }  # fmt: skip
    with pytest.raises(Unmeterable, match=complaint):
        wire.request_facts("POST", path, json.dumps({**base, **body}).encode())


def test_client_tools_are_counted_not_refused():
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}, {"type": "bash_20250124", "name": "bash"}]
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools,
    }
    assert ANTHROPIC.request_facts("POST", "/v1/messages", json.dumps(body).encode()).input_token_bound > 1000


@pytest.mark.parametrize("model", ["llama-3.3-70b-versatile", "mistral-large-latest", "gemini-2.5-flash"])
def test_a_model_with_a_tokenizer_we_do_not_ship_is_bounded_by_bytes(model):
    assert token_bound(TEXT, model) == len(TEXT.encode()) + 1
    assert token_bound(TEXT, "gpt-4o-mini") == count_tokens(TEXT, "gpt-4o-mini")


# ----- usage and stream meters -----


def test_responses_usage_reads_cached_and_reasoning_tokens():
    usage = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 64}, "output_tokens": 30,
             "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 130}  # fmt: skip
    body = json.dumps({"object": "response", "usage": usage}).encode()
    assert OPENAI.usage_from_response(body) == Usage(100, 30, cached_tokens=64, reasoning_tokens=20)


def responses_events(end: str | None = "response.completed") -> list[bytes]:
    usage = {"input_tokens": 9, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}}
    events = [
        sse({"type": "response.created", "response": {"usage": None}}, "response.created"),
        sse({"type": "response.output_text.delta", "delta": "Hel"}, "response.output_text.delta"),
        sse({"type": "response.function_call_arguments.delta", "delta": '{"a":'}, "x"),
        sse({"type": "response.audio.delta", "delta": "AAAAAAAA"}, "response.audio.delta"),
    ]
    if end:
        events.append(sse({"type": end, "response": {"usage": usage}}, end))
    return events


@pytest.mark.parametrize("end", ["response.completed", "response.incomplete"])
def test_the_responses_meter_takes_usage_from_the_final_event(end):
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/responses", b'{"model": "o4-mini", "input": "x"}'))
    feed(meter, responses_events(end))
    result = meter.result()
    assert result.complete and result.usage == Usage(9, 3, reasoning_tokens=1)
    assert result.streamed_text == 'Hel{"a":', "text deltas only: audio is not text"


def test_a_responses_stream_cut_short_has_only_its_text():
    meter = OPENAI.stream_meter(OPENAI.request_facts("POST", "/v1/responses", b'{"model": "o4-mini", "input": "x"}'))
    feed(meter, responses_events(end=None))
    assert (meter.result().usage, meter.result().complete) == (None, False)


def gemini_chunk(text: str, finish: str | None = None, **usage) -> bytes:
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return sse({"candidates": [candidate], "usageMetadata": {"promptTokenCount": 7, **usage}})


def test_the_gemini_meter_bills_thoughts_as_output_and_waits_for_the_finish():
    meter = GEMINI.stream_meter(None)
    feed(meter, [gemini_chunk("Hi"), gemini_chunk(" there")])
    cut = meter.result()
    assert (cut.usage, cut.complete, cut.streamed_text, cut.input_tokens_seen) == (None, False, "Hi there", 7)
    feed(meter, [gemini_chunk("", "STOP", candidatesTokenCount=2, thoughtsTokenCount=5, cachedContentTokenCount=4)])
    assert meter.result().usage == Usage(7, 7, cached_tokens=4, reasoning_tokens=5)


def test_anthropic_one_hour_cache_writes_are_told_apart():
    usage = {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 0,
             "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}}  # fmt: skip
    parsed = ANTHROPIC.usage_from_response(json.dumps({"usage": usage}).encode())
    assert parsed == Usage(305, 1, cache_write_tokens=300, cache_write_1h_tokens=200)
    haiku = PRICES.lookup("anthropic", "claude-haiku-4-5")
    # 5 plain × $1/M + 100 written for 5 minutes × $1.25/M + 200 for an hour × $2/M + 1 out × $5/M
    assert cost_micros(haiku, parsed) == 535


# ----- prices -----

LONG_CONTEXT_ENTRY = {
    "litellm_provider": "gemini",
    "input_cost_per_token": 1e-6,
    "output_cost_per_token": 4e-6,
    "input_cost_per_token_above_200k_tokens": 2e-6,
    "output_cost_per_token_above_200k_tokens": 6e-6,
    "cache_read_input_token_cost_above_200k_tokens": 5e-7,
    "input_cost_per_token_above_200k_tokens_priority": 9e-6,  # another service tier: not ours
    "max_input_tokens": 1_000_000,
    "max_output_tokens": 1000,
}


def test_long_context_prices_apply_to_the_whole_call_above_their_threshold():
    price = price_from_litellm_entry(LONG_CONTEXT_ENTRY)
    assert price.tiers == [PriceTier(above_tokens=200_000, input=2e-6, output=6e-6, cache_read=5e-7)]
    assert price.max_input_tokens == 1_000_000
    assert cost_micros(price, Usage(200_000, 10)) == 200_000 + 40
    assert cost_micros(price, Usage(200_001, 10)) == 400_002 + 60
    assert cost_micros(price, Usage(300_000, 0, cached_tokens=100_000)) == 400_000 + 50_000


def test_the_worst_case_is_the_dearest_way_the_input_can_be_billed():
    price = ModelPrice(input=1e-6, output=2e-6, cache_read=1e-7, cache_write=1.25e-6, cache_write_1h=2e-6)
    assert worst_case_micros(price, 1000, 10, cache_writes=False) == 1000 + 20
    assert worst_case_micros(price, 1000, 10, cache_writes=True) == 2000 + 20
    cheaper_band = price.model_copy(update={"tiers": [PriceTier(above_tokens=500, input=5e-7, output=1e-6)]})
    assert worst_case_micros(cheaper_band, 1000, 10, cache_writes=False) == 1000 + 20, "never below the base band"


def test_config_prices_are_per_million_tokens():
    price = ConfigPrice(input_per_mtok=0.15, output_per_mtok=0.6, cache_read_per_mtok=0.075).model_price("config")
    assert (price.input, price.output, price.cache_read) == (1.5e-7, 6e-7, 7.5e-8)
    assert price_rows(price) == [
        ["input", "0.00000015", "0.15"],
        ["output", "0.0000006", "0.60"],
        ["cache read", "0.000000075", "0.075"],
    ]
    with pytest.raises(ValueError):
        ConfigPrice(input_per_mtok=1, output_per_mtok=2, input=3)


def test_a_price_file_overrides_the_bundle_and_the_config_overrides_the_file(tmp_path):
    entry = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    (tmp_path / "prices.json").write_text(json.dumps({
        "gpt-4o-mini": {"litellm_provider": "openai", **entry},
        "gemini/gemini-9": {"litellm_provider": "gemini", **entry},
        "local-model": {"litellm_provider": "local-vllm", **entry},
        "bedrock-only": {"litellm_provider": "bedrock", **entry},
    }))  # fmt: skip
    inline = {"openai": {"gpt-4o-mini": ConfigPrice(input_per_mtok=9, output_per_mtok=9)}}
    table = load_prices(tmp_path / "prices.json", inline, ["openai", "local-vllm"])
    assert table.lookup("openai", "gpt-4o-mini").input == 9e-6
    assert table.lookup("openai", "gpt-4o-mini").source == "proxy config (prices:)"
    assert table.lookup("gemini", "gemini-9").source == str(tmp_path / "prices.json")
    assert table.lookup("local-vllm", "local-model").input == 1e-6, "a configured provider's own name works"
    assert table.providers_pricing("bedrock-only") == []
    assert table.lookup("openai", "gpt-4o").source.startswith("bundled")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", None], ids=["bad-json", "not-a-map", "missing"])
def test_an_unusable_price_file_is_a_config_error(tmp_path, content):
    path = tmp_path / "prices.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="prices.json"):
        load_prices(path, {}, [])


def test_the_config_names_its_price_file_relative_to_itself(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"x-model": {"litellm_provider": "openai", "input_cost_per_token": 1,
                                                             "output_cost_per_token": 1}}))  # fmt: skip
    config = ProxyConfig.model_validate({"prices_file": "p.json", "base_dir": tmp_path})
    config.base_dir = tmp_path
    assert config.price_table().lookup("openai", "x-model") is not None


# ----- the gate -----


def test_an_unmeterable_endpoint_is_refused_unless_listed_as_unmetered(env):
    refused = env.admit(env.issue(endpoints=["* /v1/*"]), "openai", "/v1/files", b"", method="GET")
    assert isinstance(refused, Denial) and refused.kind is DenyKind.FORBIDDEN
    assert "unmetered_endpoints" in refused.message
    key = env.issue(endpoints=["POST /v1/chat/completions"], unmetered_endpoints=["GET /v1/files/*"])
    admission = env.admitted(key, "openai", "/v1/files/file-1", b"", method="GET")
    assert (admission.unmetered, admission.hold_id, admission.remaining_micros) == (True, None, 1_000_000)


def test_unmetered_endpoints_never_unmeter_a_metered_one(env):
    key = env.issue(endpoints=["GET /v1/models"], unmetered_endpoints=["* /v1/**"])
    refused = env.admit(key, "openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user"}]})
    assert isinstance(refused, Denial) and "not allowed" in refused.message


def chat(max_tokens: int | None = 1000, **fields) -> dict:
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], **limit, **fields}


def test_clamp_finds_the_largest_output_limit_that_fits(env):
    key = env.issue(budget_usd=0.0002, clamp_max_tokens=True)
    admission = env.admitted(key, "openai", "/v1/chat/completions", chat())
    clamped = admission.clamped_to
    assert json.loads(admission.upstream_body)["max_tokens"] == clamped
    price = PRICES.lookup("openai", "gpt-4o-mini")
    bound = admission.facts.input_token_bound
    assert admission.hold_micros == cost_micros(price, Usage(bound, clamped)) <= 200
    assert cost_micros(price, Usage(bound, clamped + 1)) > 200


def test_clamp_multiplies_by_every_choice(env):
    key = env.issue(budget_usd=0.0002, clamp_max_tokens=True)
    admission = env.admitted(key, "openai", "/v1/chat/completions", chat(n=4))
    price = PRICES.lookup("openai", "gpt-4o-mini")
    assert admission.hold_micros == cost_micros(
        price, Usage(admission.facts.input_token_bound, 4 * admission.clamped_to)
    )


def test_clamp_refuses_when_not_even_one_token_fits(env):
    key = env.issue(budget_usd=0.000001, clamp_max_tokens=True)
    refused = env.admit(key, "openai", "/v1/chat/completions", chat(messages=[{"role": "user", "content": TEXT}]))
    assert isinstance(refused, Denial) and refused.kind is DenyKind.BUDGET


def test_a_fitting_call_is_not_clamped(env):
    admission = env.admitted(env.issue(clamp_max_tokens=True), "openai", "/v1/chat/completions", chat(max_tokens=10))
    assert admission.clamped_to is None and admission.upstream_body is None


def test_unseen_input_needs_a_known_context_window(env):
    key = env.issue()
    body = {"model": "gpt-4o-mini", "previous_response_id": "resp_1", "max_output_tokens": 5}
    admission = env.admitted(key, "openai", "/v1/responses", body)
    assert admission.facts.input_token_bound == 128_000
    no_window = PRICES.lookup("openai", "gpt-4o-mini").model_copy(update={"max_input_tokens": None})
    env.gate.prices.add("openai", "gpt-4o-mini", no_window)
    refused = env.admit(key, "openai", "/v1/responses", body)
    assert isinstance(refused, Denial) and "previous_response_id" in refused.message


def test_an_azure_deployment_is_matched_and_priced_as_the_model_it_runs(env):
    key = env.issue(models=["gpt-4o-mini*"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    admission = env.admitted(
        key, "azure", "/openai/deployments/prod-mini/chat/completions", body, query="api-version=1"
    )
    assert admission.facts.model == "gpt-4o-mini" and admission.price == PRICES.lookup("azure", "gpt-4o-mini")
    refused = env.admit(key, "azure", "/openai/deployments/other/chat/completions", body, query="api-version=1")
    assert isinstance(refused, Denial) and "model other is not allowed" in refused.message


def test_a_key_in_the_query_string_counts_as_a_credential(env):
    key = env.issue()
    path, body = "/v1beta/models/gemini-2.5-flash:generateContent", b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    call = CallRequest("gemini", "POST", path, {}, body, query=f"alt=sse&key={key}")
    assert isinstance(asyncio.run(admit_or_denial(env.gate, call)), Admission)
    real = CallRequest("gemini", "POST", path, {}, body, query="key=real-g")
    refused = asyncio.run(admit_or_denial(env.gate, real))
    assert isinstance(refused, Denial) and "real provider key" in refused.message


def test_query_credentials_are_stripped_and_the_rest_kept_as_sent():
    query = "alt=sse&key=ak_x_y&k%65y=second&keys=1&x=a%20b"
    assert credentials.credentials_in_query(query) == ["ak_x_y", "second"]
    assert credentials.without_query_credentials(query) == "alt=sse&keys=1&x=a%20b"
