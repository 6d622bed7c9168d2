"""Prices and costs (pricing.py): the bundled table, long-context bands, cache reads and writes, the
worst case a hold assumes, rounding up to the micro-dollar, and user price files and config prices."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.policy import ProxyConfig
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
from agentkeys.yamlfile import ConfigError
from prices import expected_cost

PRICES = PriceTable.bundled()


# ----- the bundled table -----


@pytest.mark.parametrize(
    ("provider", "dated", "family"),
    [
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-4o-mini-2099-01-01", "gpt-4o-mini"),
        ("openai", "gpt-4o-2099-12-31", "gpt-4o"),
        ("anthropic", "claude-haiku-4-5-20991231", "claude-haiku-4-5"),
    ],
)
def test_dated_model_names_resolve_to_their_family_price(provider, dated, family):
    family_price = PRICES.lookup(provider, family)
    assert family_price is not None
    price = PRICES.lookup(provider, dated)
    assert (price.input, price.output) == (family_price.input, family_price.output)


def test_unknown_model_has_no_price():
    assert PRICES.lookup("openai", "gpt-unknown-9") is None
    assert PRICES.lookup("nosuchprovider", "gpt-4o-mini") is None


# ----- cost -----


def test_cost_prices_cache_reads_and_writes_separately():
    price = ModelPrice(input=1e-6, output=2e-6, cache_read=1e-7, cache_write=1.25e-6)
    usage = Usage(input_tokens=1000, output_tokens=10, cached_tokens=400, cache_write_tokens=100)
    # 500 plain × 1e-6 + 400 read × 1e-7 + 100 written × 1.25e-6 + 10 out × 2e-6 = $0.000685
    assert cost_micros(price, usage) == 685


def test_cache_tokens_cost_the_input_price_when_the_model_has_no_cache_price():
    price = ModelPrice(input=1e-6, output=2e-6)
    assert cost_micros(price, Usage(input_tokens=1000, cached_tokens=400, cache_write_tokens=100)) == 1000


@pytest.mark.parametrize(
    ("usage", "micros"),
    [
        (Usage(input_tokens=1), 1),  # $0.00000015 rounds up to one micro-dollar
        (Usage(input_tokens=7), 2),  # $0.00000105
        (Usage(input_tokens=20), 3),  # exactly $0.000003: no rounding
        (Usage(), 0),
    ],
)
def test_cost_rounds_up_to_the_next_micro_dollar(usage, micros):
    assert cost_micros(ModelPrice(input=1.5e-7, output=6e-7), usage) == micros


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


# ----- the worst case -----


def test_the_worst_case_is_the_dearest_way_the_input_can_be_billed():
    price = ModelPrice(input=1e-6, output=2e-6, cache_read=1e-7, cache_write=1.25e-6, cache_write_1h=2e-6)
    assert worst_case_micros(price, 1000, 10, cache_writes=False) == 1000 + 20
    assert worst_case_micros(price, 1000, 10, cache_writes=True) == 2000 + 20
    cheaper_band = price.model_copy(update={"tiers": [PriceTier(above_tokens=500, input=5e-7, output=1e-6)]})
    assert worst_case_micros(cheaper_band, 1000, 10, cache_writes=False) == 1000 + 20, "never below the base band"


# ----- price files and config prices -----


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


# ----- the bundled table's own prices -----

PRO = PRICES.lookup("gemini", "gemini-2.5-pro")
[PRO_LONG] = PRO.tiers
HAIKU = PRICES.lookup("anthropic", "claude-haiku-4-5")
MINI = PRICES.lookup("openai", "gpt-4o-mini")


def band_price(tier: PriceTier) -> ModelPrice:
    """A long-context band's rates as a price of its own, to work out what the band charges."""
    return ModelPrice(**tier.model_dump(exclude={"above_tokens"}))


def test_a_bundled_long_context_band_prices_every_token_of_a_call_above_it():
    at_threshold, above = PRO_LONG.above_tokens, PRO_LONG.above_tokens + 1
    assert cost_micros(PRO, Usage(at_threshold, 10)) == expected_cost(price=PRO, input=at_threshold, output=10)
    assert cost_micros(PRO, Usage(above, 10)) == expected_cost(price=band_price(PRO_LONG), input=above, output=10)
    assert PRO_LONG.input > PRO.input and PRO_LONG.output > PRO.output, "the band is the dearer one"
    cached = Usage(above, 10, cached_tokens=100_000)
    expected = expected_cost(price=band_price(PRO_LONG), input=above - 100_000, cache_read=100_000, output=10)
    assert cost_micros(PRO, cached) == expected, "cache reads in the band are priced at the band's cache rate"


def test_cache_writes_are_priced_by_how_long_they_are_kept():
    usage = Usage(1_000, 20, cache_write_tokens=600, cache_write_1h_tokens=200)
    expected = expected_cost("claude-haiku-4-5", input=400, cache_write=400, cache_write_1h=200, output=20)
    assert cost_micros(HAIKU, usage) == expected
    assert HAIKU.cache_write_1h > HAIKU.cache_write > HAIKU.input > HAIKU.cache_read


def test_a_one_hour_write_without_its_own_price_costs_the_five_minute_price():
    price = ModelPrice(input=1e-6, output=2e-6, cache_write=1.25e-6)
    one_hour = Usage(1_000, 0, cache_write_tokens=1_000, cache_write_1h_tokens=1_000)
    five_minutes = Usage(1_000, 0, cache_write_tokens=1_000)
    assert (
        cost_micros(price, one_hour)
        == cost_micros(price, five_minutes)
        == expected_cost(price=price, cache_write=1_000)
    )


usages = st.builds(
    lambda plain, read, written, one_hour, output: Usage(
        plain + read + written + one_hour, output, read, written + one_hour, 0, one_hour
    ),
    *(st.integers(0, 300_000) for _ in range(4)),
    st.integers(0, 100_000),
)


@settings(max_examples=200, deadline=None)
@given(usage=usages, model=st.sampled_from([("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5"),
                                            ("gemini", "gemini-2.5-pro")]))  # fmt: skip
def test_a_cost_is_every_token_at_its_rate_summed_then_rounded_up_once(usage, model):
    plain = usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens
    expected = expected_cost(
        price=PRICES.lookup(*model), input=plain, cache_read=usage.cached_tokens, output=usage.output_tokens,
        cache_write=usage.cache_write_tokens - usage.cache_write_1h_tokens, cache_write_1h=usage.cache_write_1h_tokens,
    )  # fmt: skip
    assert cost_micros(PRICES.lookup(*model), usage) == expected


@settings(max_examples=200, deadline=None)
@given(usage=usages, model=st.sampled_from([("anthropic", "claude-haiku-4-5"), ("gemini", "gemini-2.5-pro")]))
def test_the_worst_case_covers_every_way_the_input_can_be_billed(usage, model):
    price = PRICES.lookup(*model)
    worst = worst_case_micros(price, usage.input_tokens, usage.output_tokens, cache_writes=True)
    assert cost_micros(price, usage) <= worst
    if usage.cache_write_tokens == 0:
        no_writes = worst_case_micros(price, usage.input_tokens, usage.output_tokens, cache_writes=False)
        assert cost_micros(price, usage) <= no_writes <= worst


def test_the_worst_case_of_a_model_with_a_cache_write_premium_is_every_token_written_for_an_hour():
    worst = worst_case_micros(HAIKU, 10_000, 100, cache_writes=True)
    assert worst == expected_cost("claude-haiku-4-5", cache_write_1h=10_000, output=100)
    assert worst_case_micros(HAIKU, 10_000, 100, cache_writes=False) == expected_cost(
        "claude-haiku-4-5", input=10_000, output=100
    )
