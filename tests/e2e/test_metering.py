"""Every OpenAI and Anthropic endpoint metered right, end to end: official SDKs → mitmdump → mock.

Each test checks the ledger, the audit record and the response headers against the usage the mock
reported (and billed). One proxy for the module, with price overrides from a file and from the config.
"""

import json
from decimal import Decimal

import anthropic
import openai
import pytest

from agentkeys.money import usd_to_micros
from agentkeys.pricing import PriceTable, Usage, cost_micros
from conftest import assert_metered, billed, httpx, running_proxy, settled, write_policy

PRICES = PriceTable.bundled()
USER_X = [{"role": "user", "content": "x"}]
FILE_PRICE = {"input_cost_per_token": 2e-6, "output_cost_per_token": 8e-6, "max_output_tokens": 1000}
MODELS = ["gpt-4o-mini*", "o4-mini*", "gpt-3.5-turbo-instruct", "text-embedding-3-small", "claude-haiku-4-5*", "my-*"]
ENDPOINTS = [
    "POST /v1/chat/completions",
    "POST /v1/responses",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
]


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy")
    prices_file = folder / "my-prices.json"
    prices_file.write_text(json.dumps({"my-file-model": {"litellm_provider": "openai", **FILE_PRICE}}))
    with running_proxy(
        folder,
        mock,
        prices_file="my-prices.json",
        prices={"openai": {"my-config-model": {"input_per_mtok": 3, "output_per_mtok": 15, "max_output_tokens": 500}}},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policies")
    return {
        "all": write_policy(folder, "all", endpoints=ENDPOINTS, models=MODELS),
        "files": write_policy(
            folder, "files", endpoints=ENDPOINTS, models=MODELS, unmetered_endpoints=["GET /v1/files"]
        ),
        "clamp": write_policy(folder, "clamp", endpoints=ENDPOINTS, models=MODELS, clamp_max_tokens=True),
    }


@pytest.fixture()
def key(proxy, policies):
    return proxy.issue(policies["all"], "--budget", "1")


def client(proxy, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)


def claude(proxy, key) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)


def assert_cost_headers(headers, record: dict, budget_micros: int = 1_000_000) -> None:
    assert headers["x-agentkeys-cost"] == f"{record['cost_micros'] / 1e6:.6f}"
    assert headers["x-agentkeys-budget-remaining"] == f"{(budget_micros - record['cost_micros']) / 1e6:.6f}"


# ----- the Responses API -----


def test_responses_create_is_metered_from_its_usage(proxy, mock, key):
    raw = client(proxy, key).responses.with_raw_response.create(
        model="gpt-4o-mini", instructions="Be brief.", input="Say hello", max_output_tokens=5
    )
    assert raw.parse().output_text == "hello hello hello hello hello"
    usage = billed(mock)
    record = settled(proxy, key)
    assert_metered(record, usage, cost_micros(PRICES.lookup("openai", "gpt-4o-mini"), usage))
    assert_cost_headers(raw.headers, record)


def test_responses_stream_is_metered_from_its_completed_event(proxy, mock, key):
    events = list(
        client(proxy, key).responses.create(model="gpt-4o-mini", input="Say hello", max_output_tokens=4, stream=True)
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "hello hello hello hello"
    assert events[-1].type == "response.incomplete"  # cut at max_output_tokens, and billed all the same
    assert events[-1].response.usage.output_tokens == 4
    usage = billed(mock)
    assert_metered(settled(proxy, key), usage, cost_micros(PRICES.lookup("openai", "gpt-4o-mini"), usage))


def test_a_responses_stream_cut_short_is_charged_its_full_hold(proxy, mock, key):
    mock.cut_next_stream(after_chunks=3)
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        list(client(proxy, key).responses.create(model="gpt-4o-mini", input="Say hello", stream=True))
    record = settled(proxy, key)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0


def test_cached_input_and_reasoning_are_priced_as_billed(proxy, mock, key):
    """o4-mini bills reasoning as output and cache reads at a tenth of the input price."""
    openai_client = client(proxy, key)
    for _ in range(2):
        openai_client.responses.create(
            model="o4-mini", input="Think, then say hello", reasoning={"effort": "low"}, prompt_cache_key="agent-7"
        )
    usage = billed(mock)
    assert usage.cached_tokens > 0 and usage.reasoning_tokens > 0, "the mock should read the cache the second time"
    record = settled(proxy, key, 2)
    price = PRICES.lookup("openai", "o4-mini")
    assert_metered(record, usage, cost_micros(price, usage))
    uncached = cost_micros(price, Usage(usage.input_tokens, usage.output_tokens))
    assert record["cost_micros"] < uncached


def test_a_previous_response_is_held_at_the_context_window(proxy, mock, key):
    """The proxy cannot see what `previous_response_id` brings in, so it holds the model's whole context window."""
    reply = client(proxy, key).responses.create(
        model="gpt-4o-mini", previous_response_id="resp_earlier", input="And then?", max_output_tokens=3
    )
    assert reply.output_text == "hello hello hello"
    usage = billed(mock)
    record = settled(proxy, key)
    price = PRICES.lookup("openai", "gpt-4o-mini")
    assert record["hold_micros"] == cost_micros(price, Usage(price.max_input_tokens, 3))
    assert_metered(record, usage, cost_micros(price, usage))


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "hosted tool 'web_search'"),
        ({"service_tier": "priority"}, "service tier 'priority'"),
    ],
    ids=["background", "hosted-tool", "priority-tier"],
)
def test_what_cannot_be_metered_is_refused_saying_why(proxy, mock, key, fields, complaint):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(proxy, key).responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=5, **fields)
    assert complaint in refused.value.message and "cannot meter" in refused.value.message
    assert mock.received == []


# ----- legacy completions, embeddings -----


def test_legacy_completions_default_to_sixteen_tokens_and_say_so_upstream(proxy, mock, key):
    reply = client(proxy, key).completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello")
    assert reply.choices[0].text == " ".join(["hello"] * 12)
    assert mock.received[-1].json["max_tokens"] == 16, "the limit the hold assumed is written out"
    usage = billed(mock)
    record = settled(proxy, key)
    price = PRICES.lookup("openai", "gpt-3.5-turbo-instruct")
    assert record["hold_micros"] >= cost_micros(price, Usage(usage.input_tokens, 16))
    assert_metered(record, usage, cost_micros(price, usage))


def test_legacy_completions_hold_every_prompt_and_choice(proxy, mock, key):
    reply = client(proxy, key).completions.create(
        model="gpt-3.5-turbo-instruct", prompt=["one", "two"], n=2, max_tokens=3
    )
    assert len(reply.choices) == 4
    usage = billed(mock)
    assert usage.output_tokens == 12
    assert_metered(settled(proxy, key), usage, cost_micros(PRICES.lookup("openai", "gpt-3.5-turbo-instruct"), usage))


def test_a_legacy_completion_stream_hides_the_usage_chunk_it_asked_for(proxy, mock, key):
    chunks = list(
        client(proxy, key).completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=3, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello hello hello"
    assert all(c.choices for c in chunks) and mock.received[-1].json["stream_options"] == {"include_usage": True}
    usage = billed(mock)
    assert_metered(settled(proxy, key), usage, cost_micros(PRICES.lookup("openai", "gpt-3.5-turbo-instruct"), usage))


def test_embeddings_are_metered_on_their_input(proxy, mock, key):
    raw = client(proxy, key).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["hello world", "a second text, a little longer"]
    )
    assert [e.embedding for e in raw.parse().data] == [[0.25, -0.5, 0.125]] * 2
    usage = billed(mock)
    assert usage.output_tokens == 0 and usage.input_tokens > 5
    record = settled(proxy, key)
    assert_metered(record, usage, cost_micros(PRICES.lookup("openai", "text-embedding-3-small"), usage))
    assert_cost_headers(raw.headers, record)


# ----- headers -----


def test_a_stream_carries_what_remains_after_its_hold(proxy, mock, key):
    body = {"model": "gpt-4o-mini", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream(
        "POST", f"{proxy.gateway_url}/openai/v1/chat/completions", json=body, headers=bearer(key), timeout=30
    ) as response:
        headers = response.headers
        list(response.iter_lines())
    record = settled(proxy, key)
    assert "x-agentkeys-cost" not in headers, "a stream's cost is known only after its headers left: see the audit log"
    assert headers["x-agentkeys-budget-remaining"] == f"{(1_000_000 - record['hold_micros']) / 1e6:.6f}"


def test_free_calls_cost_nothing_and_say_what_remains(proxy, mock, key):
    openai_client = client(proxy, key)
    openai_client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "x"}]
    )
    spent = settled(proxy, key)["cost_micros"]
    raw = claude(proxy, key).messages.with_raw_response.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "How many tokens is this?"}]
    )
    assert raw.parse().input_tokens > 5
    record = settled(proxy, key, 2)
    assert (record["metering"], record["cost_micros"]) == ("free", 0)
    assert raw.headers["x-agentkeys-cost"] == "0.000000"
    assert raw.headers["x-agentkeys-budget-remaining"] == f"{(1_000_000 - spent) / 1e6:.6f}"


def bearer(key) -> dict:
    return {"authorization": f"Bearer {key['key']}"}


# ----- unmetered endpoints -----


def test_an_unmeterable_endpoint_a_policy_allows_is_forwarded_unmetered(proxy, mock, policies):
    key = proxy.issue(policies["files"], "--budget", "1")
    raw = client(proxy, key).files.with_raw_response.list()
    assert raw.parse().data == []
    assert mock.received[-1].headers["authorization"] == "Bearer sk-test-real-openai"
    record = settled(proxy, key)
    assert (record["decision"], record["metering"], record["cost_micros"]) == ("allow", "unmetered", 0)
    assert "x-agentkeys-cost" not in raw.headers, "what an unmetered call costs is the provider's to say"
    assert raw.headers["x-agentkeys-budget-remaining"] == "1.000000"


# ----- clamp_max_tokens -----


def test_clamp_lowers_max_tokens_to_what_the_budget_can_pay(proxy, mock, policies):
    """$0.0002 cannot hold 1,000 output tokens of gpt-4o-mini ($0.0006); it can hold a few hundred."""
    key = proxy.issue(policies["clamp"], "--budget", "0.0002")
    raw = client(proxy, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=1000, messages=[{"role": "user", "content": "Say hello"}]
    )
    clamped = int(raw.headers["x-agentkeys-max-tokens-clamped"])
    assert 100 < clamped < 1000 and mock.received[-1].json["max_tokens"] == clamped
    record = settled(proxy, key)
    assert "lowered to" in record["reason"] and record["hold_micros"] <= 200
    price = PRICES.lookup("openai", "gpt-4o-mini")
    assert record["hold_micros"] + cost_micros(price, Usage(output_tokens=1)) > 200, "the largest limit that fits"


def test_without_clamp_the_same_call_is_refused(proxy, mock, policies):
    key = proxy.issue(policies["all"], "--budget", "0.0002")
    with pytest.raises(openai.RateLimitError):
        client(proxy, key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=1000, messages=[{"role": "user", "content": "Say hello"}]
        )
    assert mock.received == []


def test_anthropic_max_tokens_is_clamped_too(proxy, mock, policies):
    key = proxy.issue(policies["clamp"], "--budget", "0.001")  # haiku: 1,000 output tokens cost $0.005
    message = claude(proxy, key).messages.create(
        model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert message.content[0].text.startswith("hello")
    assert mock.received[-1].json["max_tokens"] < 200
    assert settled(proxy, key)["hold_micros"] <= 1000


# ----- Anthropic prompt caching -----

LONG_SYSTEM = "You are a careful assistant. " * 200


def cached_system(ttl: str | None = None) -> list[dict]:
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return [{"type": "text", "text": LONG_SYSTEM, "cache_control": control}]


@pytest.mark.parametrize("ttl", [None, "1h"], ids=["5m", "1h"])
def test_anthropic_cache_writes_then_reads_are_priced_apart(proxy, mock, key, ttl):
    haiku = PRICES.lookup("anthropic", "claude-haiku-4-5")
    for _ in range(2):
        claude(proxy, key).messages.create(
            model="claude-haiku-4-5",
            max_tokens=5,
            system=cached_system(ttl),
            messages=[{"role": "user", "content": "hi"}],
        )
    write, read = billed(mock, 0), billed(mock, 1)
    assert write.cache_write_tokens > 1000 and read.cached_tokens == write.cache_write_tokens
    first, second = proxy.records_for(key["id"], 2)
    write_price = haiku.cache_write_1h if ttl == "1h" else haiku.cache_write
    written = Decimal(str(write_price)) * write.cache_write_tokens
    plain = Decimal(str(haiku.input)) * (write.input_tokens - write.cache_write_tokens)
    assert first["cost_micros"] == usd_to_micros(written + plain + Decimal(str(haiku.output)) * write.output_tokens)
    assert first["cost_micros"] <= first["hold_micros"], "a cache write costs more than input: the hold must cover it"
    assert_metered(second, read, cost_micros(haiku, read))
    assert second["cost_micros"] < first["cost_micros"] / 5


def test_an_anthropic_stream_reports_its_cache_tokens(proxy, mock, key):
    for _ in range(2):
        with claude(proxy, key).messages.stream(
            model="claude-haiku-4-5", max_tokens=4, system=cached_system(), messages=[{"role": "user", "content": "x"}]
        ) as stream:
            assert "".join(stream.text_stream) == "hello hello hello hello"
    usage = billed(mock)
    assert usage.cached_tokens > 1000
    assert_metered(settled(proxy, key, 2), usage, cost_micros(PRICES.lookup("anthropic", "claude-haiku-4-5"), usage))


# ----- user prices -----


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [("my-file-model", "0.000002", "0.000008"), ("my-config-model", "0.000003", "0.000015")],
    ids=["prices_file", "inline"],
)
def test_user_prices_meter_models_the_bundle_does_not_know(proxy, mock, key, model, input_price, output_price):
    client(proxy, key).chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "x"}])
    usage = billed(mock)
    cost = usd_to_micros(Decimal(input_price) * usage.input_tokens + Decimal(output_price) * usage.output_tokens)
    assert_metered(settled(proxy, key), usage, cost)


def test_prices_show_says_what_a_model_costs_and_where_that_comes_from(proxy, capsys):
    assert proxy.cli("prices", "show", "my-config-model") == 0
    shown = capsys.readouterr().out
    assert "openai" in shown and "3.00" in shown and "15.00" in shown and "proxy config" in shown
    assert proxy.cli("prices", "show", "my-file-model", "--provider", "openai") == 0
    assert "my-prices.json" in capsys.readouterr().out
    assert proxy.cli("prices", "show", "gpt-4o-mini-2024-07-18", "--provider", "openai") == 0
    shown = capsys.readouterr().out
    assert "0.15" in shown and "0.60" in shown and "bundled" in shown and "gpt-4o-mini" in shown
    assert proxy.cli("prices", "show", "no-such-model") == 1
