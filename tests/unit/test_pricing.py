"""Prices and costs (pricing.py): the bundled table, long-context bands, cache reads and writes, the
worst case a hold assumes, rounding up to the micro-dollar, and user price files and config prices."""

import fnmatch
import json
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.money import MICROS_PER_USD, usd_to_micros
from agentkeys.policy import ProxyConfig
from agentkeys.pricing import (
    ConfigPrice,
    ModelPrice,
    PriceTable,
    PriceTier,
    Usage,
    cost_micros,
    litellm_model_name,
    litellm_tiers,
    load_prices,
    micros_of,
    picos_per_token,
    price_from_litellm_entry,
    price_rows,
    unmeterable_reason,
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


def test_a_litellm_entry_becomes_exactly_its_price():
    entry = {
        "input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6, "cache_read_input_token_cost": 1e-7,
        "cache_creation_input_token_cost": 1.25e-6, "cache_creation_input_token_cost_above_1hr": 2e-6,
        "max_input_tokens": 1_000, "max_output_tokens": 100, "mode": "chat",
        "input_cost_per_token_above_400k_tokens": 3e-6, "output_cost_per_token_above_400k_tokens": 5e-6,
        "input_cost_per_token_above_200k_tokens": 2e-6, "output_cost_per_token_above_200k_tokens": 6e-6,
    }  # fmt: skip
    assert price_from_litellm_entry(entry, source="file.json", name="m") == ModelPrice(
        input=1e-6, output=4e-6, cache_read=1e-7, cache_write=1.25e-6, cache_write_1h=2e-6,
        max_input_tokens=1_000, max_output_tokens=100, source="file.json",
        tiers=[PriceTier(above_tokens=200_000, input=2e-6, output=6e-6),
               PriceTier(above_tokens=400_000, input=3e-6, output=5e-6)],
    )  # fmt: skip


@pytest.mark.parametrize(
    "entry",
    [{"input_cost_per_token": 1e-6}, {"output_cost_per_token": 1e-6}, {"mode": "chat"}],
)
def test_a_litellm_entry_without_both_token_prices_has_no_price(entry):
    assert price_from_litellm_entry(entry) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"input_cost_per_token_above_200k_tokens": 2e-6},  # a band needs both prices
        {"output_cost_per_token_above_200k_tokens": 2e-6},
        {"input_cost_per_token_above_200k_tokens": "2e-6", "output_cost_per_token_above_200k_tokens": "3e-6"},
        {"input_cost_per_token_above_200ktokens": 2e-6, "output_cost_per_token_above_200ktokens": 3e-6},
        {"context_cost_above_200k_tokens": 2e-6, "output_cost_per_token_above_200k_tokens": 3e-6},
    ],
)
def test_a_long_context_band_needs_both_numeric_prices_under_litellm_s_names(fields):
    assert litellm_tiers({"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6, **fields}) == []


@pytest.mark.parametrize(("value", "read"), [(100, 100), (True, None), (100.0, None), ("100", None), (None, None)])
def test_only_an_integer_is_a_token_limit(value, read):
    entry = {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6, "max_output_tokens": value,
             "max_input_tokens": value}  # fmt: skip
    price = price_from_litellm_entry(entry)
    assert (price.max_output_tokens, price.max_input_tokens) == (read, read)


def test_a_price_file_sets_each_usable_entry_of_the_providers_asked_for(tmp_path):
    entry = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({
        "elsewhere": {"litellm_provider": "bedrock", **entry},  # skipped entries first: the rest are still read
        "not-an-entry": ["litellm_provider", "openai"],
        "gpt-x": {"litellm_provider": "openai", **entry},
        "no-prices": {"litellm_provider": "openai", "mode": "chat"},
        "gemini/gemini-x": {"litellm_provider": "gemini", **entry},
    }))  # fmt: skip
    table = PriceTable({})
    assert table.add_litellm_file(path, {"openai": "openai", "gemini": "google"}) == 2
    assert table.lookup("openai", "gpt-x") == ModelPrice(input=1e-6, output=2e-6, source=str(path))
    assert table.lookup("google", "gemini-x") == ModelPrice(input=1e-6, output=2e-6, source=str(path))
    assert table.lookup("openai", "no-prices") is None


@pytest.mark.parametrize(
    ("name", "ours"),
    [("gemini/gemini-2.5-flash", "gemini-2.5-flash"), ("azure/eu/gpt-4o", "eu/gpt-4o"), ("gpt-4o", "gpt-4o"),
     ("unknown/x", "unknown/x"), ("openai/", "openai/")],
)  # fmt: skip
def test_a_litellm_name_loses_only_a_known_provider_prefix(name, ours):
    assert litellm_model_name(name) == ours


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the price file: No such file or directory"),
        ("{not json", "the price file is not valid JSON (Expecting property name enclosed in double quotes"),
        ("[1]", "a price file maps model names to prices (LiteLLM's format)"),
    ],
)
def test_an_unusable_price_file_says_why(tmp_path, content, message):
    path = tmp_path / "prices.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        PriceTable({}).add_litellm_file(path, {})
    assert str(refused.value).startswith(f"{path}: {message}")


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


def test_a_config_price_is_exactly_its_rates_per_token():
    config = ConfigPrice(input_per_mtok=3, output_per_mtok=15, cache_read_per_mtok=0.3, cache_write_per_mtok=3.75,
                         cache_write_1h_per_mtok=6, max_output_tokens=64, max_input_tokens=200)  # fmt: skip
    assert config.model_price("config") == ModelPrice(
        input=3e-6, output=1.5e-5, cache_read=3e-7, cache_write=3.75e-6, cache_write_1h=6e-6,
        max_output_tokens=64, max_input_tokens=200, source="config",
    )  # fmt: skip
    assert ConfigPrice(input_per_mtok=1, output_per_mtok=2).model_price("c") == ModelPrice(
        input=1e-6, output=2e-6, source="c"
    )


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


REPO = Path(__file__).resolve().parents[2]

# ----- long-context bands -----


def test_a_dearer_long_context_band_raises_the_worst_case_above_its_threshold():
    price = ModelPrice(input=1e-6, output=2e-6, tiers=[PriceTier(above_tokens=500, input=3e-6, output=5e-6)])
    assert worst_case_micros(price, 500, 10, cache_writes=False) == 500 + 20  # at the threshold: the base band
    assert worst_case_micros(price, 501, 10, cache_writes=False) == 1503 + 50  # above it: all at the dearer band
    assert worst_case_micros(price, 1000, 10, cache_writes=False) == cost_micros(price, Usage(1000, 10))


def test_the_dearest_of_several_bands_bounds_the_call():
    tiers = [PriceTier(above_tokens=100, input=2e-6, output=2e-6), PriceTier(above_tokens=200, input=4e-6, output=8e-6)]
    price = ModelPrice(input=1e-6, output=1e-6, tiers=tiers)
    assert worst_case_micros(price, 150, 10, cache_writes=False) == 300 + 20
    assert worst_case_micros(price, 250, 10, cache_writes=False) == 1000 + 80


def test_a_band_s_cache_write_price_counts_when_the_call_may_write():
    tier = PriceTier(above_tokens=100, input=1e-6, output=1e-6, cache_write=9e-6)
    price = ModelPrice(input=1e-6, output=1e-6, cache_write=2e-6, tiers=[tier])
    assert worst_case_micros(price, 200, 0, cache_writes=True) == 1800
    assert worst_case_micros(price, 200, 0, cache_writes=False) == 200


# ----- unmeterable models -----


@pytest.mark.parametrize(
    ("name", "entry", "reason"),
    [
        ("gpt-4o-mini-search-preview", {"mode": "chat"}, "searches the web"),
        ("gpt-5-search-api", {"mode": "chat"}, "searches the web"),
        ("o3-deep-research", {"mode": "responses"}, "searches the web"),
        ("gemini-2.5-flash-image", {"mode": "image_generation", "output_cost_per_image": 0.039}, "image generation"),
        ("gpt-image-1", {"mode": "image_generation"}, "image generation"),
        ("gpt-4o-mini-tts", {"mode": "audio_speech"}, "audio speech"),
        ("gpt-4o-transcribe", {"mode": "audio_transcription"}, "audio transcription"),
        ("gpt-realtime", {"mode": "realtime"}, "realtime"),
        ("sora-2", {"mode": "video_generation"}, "video generation"),
        ("omni-moderation-latest", {"mode": "moderation"}, "moderation"),
        ("gpt-audio", {"mode": "chat", "supported_output_modalities": ["text", "audio"]}, "output audio"),
        ("veo-x", {"mode": "chat", "supported_output_modalities": ["video"]}, "output video"),
        ("some-chat", {"mode": "chat", "output_cost_per_image": 0.04}, "per image"),
        ("some-chat", {"mode": "chat", "output_cost_per_audio_token": 1e-5}, "audio output"),
        ("some-chat", {"mode": "chat", "output_cost_per_second": 0.1}, "per second"),
        ("some-chat", {"mode": "chat", "input_cost_per_second": 0.1}, "per second"),
        ("some-chat", {"mode": "chat", "output_cost_per_character": 1e-6}, "per character"),
        ("some-chat", {"mode": "chat", "output_cost_per_video_token": 1e-6}, "video output"),
        ("some-chat", {"mode": "chat", "output_cost_per_image_token": 1e-6}, "image output"),
    ],
)
def test_a_model_billed_beyond_its_tokens_is_unmeterable_and_says_why(name, entry, reason):
    found = unmeterable_reason(name, entry)
    assert found is not None and reason in found
    price = price_from_litellm_entry({"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6, **entry}, name=name)
    assert price.unmeterable == found


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("gpt-4o-mini", {"mode": "chat", "search_context_cost_per_query": {"search_context_size_low": 0.03}}),
        ("gpt-5.1", {"mode": "chat", "supported_output_modalities": ["text", "image"]}),  # only via the hosted tool
        ("text-embedding-3-small", {"mode": "embedding"}),
        ("gpt-3.5-turbo-instruct", {"mode": "completion"}),
        ("gemini-2.5-flash", {"mode": "chat", "supported_output_modalities": ["text"]}),
        ("custom-model", {}),
    ],
)
def test_a_model_billed_by_its_tokens_is_meterable(name, entry):
    assert unmeterable_reason(name, entry) is None


BUNDLED = PriceTable.bundled()


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-4o-mini-search-preview"),
        ("openai", "gpt-4o-mini-search-preview-2025-03-11"),
        ("openai", "gpt-4o-search-preview"),
        ("openai", "gpt-4o-mini-tts"),
        ("openai", "gpt-4o-mini-transcribe"),
        ("openai", "gpt-4o-mini-realtime-preview-2024-12-17"),
        ("openai", "gpt-4o-mini-audio-preview-2024-12-17"),
        ("openai", "gpt-realtime"),
        ("openai", "gpt-image-1.5"),
        ("openai", "o3-deep-research"),
        ("gemini", "gemini-2.5-flash-image"),
        ("gemini", "gemini-2.5-flash-preview-tts"),
        ("gemini", "gemini-2.5-flash-native-audio-latest"),
    ],
)
def test_the_bundled_table_marks_models_billed_beyond_tokens(provider, model):
    assert BUNDLED.lookup(provider, model).unmeterable


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-4o-mini"), ("openai", "gpt-4.1"), ("openai", "gpt-5.1"), ("anthropic", "claude-haiku-4-5"),
     ("gemini", "gemini-2.5-flash"), ("gemini", "gemini-2.5-pro"), ("openai", "text-embedding-3-small")],
)  # fmt: skip
def test_the_bundled_table_keeps_text_models_meterable(provider, model):
    assert BUNDLED.lookup(provider, model).unmeterable is None


def shipped_policies() -> list[Path]:
    return sorted((REPO / "policies").glob("*.yaml"))


@pytest.mark.parametrize("path", shipped_policies(), ids=lambda path: path.name)
def test_shipped_policies_admit_no_unmeterable_model(path):
    policy = yaml.safe_load(path.read_text())
    table = json.loads(resources.files("agentkeys").joinpath("data/prices.json").read_text())
    admitted = [
        f"{provider}/{model}"
        for provider in policy["providers"]
        for model, price in table.get(provider, {}).items()
        if price.get("unmeterable") and any(fnmatch.fnmatchcase(model, glob) for glob in policy["models"])
    ]
    assert admitted == []
    meterable = [model for model in table["openai"] if any(fnmatch.fnmatchcase(model, g) for g in policy["models"])]
    assert meterable, "the policy still admits the text models it names"


def test_a_price_file_entry_is_classified_like_the_bundle(tmp_path):
    entries = {
        "my-search": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-6,
                      "output_cost_per_token": 1e-6},
        "gpt-4o-mini-search-preview": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-6,
                                       "output_cost_per_token": 1e-6},
    }  # fmt: skip
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(entries))
    table = PriceTable.bundled()
    table.add_litellm_file(path, {"openai": "openai"})
    assert table.lookup("openai", "my-search").unmeterable is None
    assert "searches the web" in table.lookup("openai", "gpt-4o-mini-search-preview").unmeterable


def test_a_price_written_in_the_config_covers_the_model():
    """The operator who writes a model's price says its tokens are all it costs."""
    price = ConfigPrice(input_per_mtok=1, output_per_mtok=1).model_price("config")
    assert price.unmeterable is None


# ----- properties: the hold bounds what the provider bills; money is rounded up -----

rates = st.one_of(st.none(), st.decimals(min_value=0, max_value=Decimal("0.001"), places=12).map(float))
required_rates = st.decimals(min_value=0, max_value=Decimal("0.001"), places=12).map(float)


@st.composite
def prices(draw) -> ModelPrice:
    def band() -> dict:
        return {"input": draw(required_rates), "output": draw(required_rates), "cache_read": draw(rates),
                "cache_write": draw(rates), "cache_write_1h": draw(rates)}  # fmt: skip

    thresholds = draw(st.lists(st.integers(1, 2_000_000), max_size=3, unique=True))
    return ModelPrice(**band(), tiers=[PriceTier(above_tokens=above, **band()) for above in thresholds])


@st.composite
def shape_and_usage(draw):
    """A request's bounds (input, output per choice, choices, may it write a cache) and a usage within them."""
    input_bound = draw(st.integers(0, 3_000_000))
    max_output = draw(st.integers(0, 200_000))
    choices = draw(st.integers(1, 8))
    cache_writes = draw(st.booleans())
    input_tokens = draw(st.integers(0, input_bound))
    cached = draw(st.integers(0, input_tokens))
    written = draw(st.integers(0, input_tokens - cached)) if cache_writes else 0
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=draw(st.integers(0, max_output * choices)),
        cached_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=draw(st.integers(0, written)),
    )
    return input_bound, max_output * choices, cache_writes, usage


@settings(max_examples=400, deadline=None)
@given(price=prices(), drawn=shape_and_usage())
def test_no_usage_within_the_request_s_limits_costs_more_than_its_hold(price, drawn):
    input_bound, output_bound, cache_writes, usage = drawn
    assert cost_micros(price, usage) <= worst_case_micros(price, input_bound, output_bound, cache_writes)


@settings(max_examples=300, deadline=None)
@given(price=prices(), drawn=shape_and_usage())
def test_the_cost_is_never_below_the_exact_price(price, drawn):
    _, _, _, usage = drawn
    rates = price.rates_for(usage.input_tokens)
    plain = usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens
    short_writes = usage.cache_write_tokens - usage.cache_write_1h_tokens

    def exact(*candidates):
        return Fraction(str(next(rate for rate in candidates if rate is not None)))

    usd = (
        exact(rates.input) * plain
        + exact(rates.cache_read, rates.input) * usage.cached_tokens
        + exact(rates.cache_write, rates.input) * short_writes
        + exact(rates.cache_write_1h, rates.cache_write, rates.input) * usage.cache_write_1h_tokens
        + exact(rates.output) * usage.output_tokens
    )
    charged = cost_micros(price, usage)
    assert Fraction(charged, MICROS_PER_USD) >= usd
    assert Fraction(charged - 1, MICROS_PER_USD) < usd or charged == 0  # and less than a micro-dollar above


@given(st.integers(0, 10**18))
def test_picos_round_up_to_micros(picos):
    micros = micros_of(picos)
    assert micros * 10**6 >= picos > (micros - 1) * 10**6 or picos == micros == 0


@given(st.decimals(min_value=0, max_value=10**9, places=9, allow_nan=False))
def test_usd_rounds_up_to_micros(usd):
    micros = usd_to_micros(usd)
    assert Decimal(micros) >= usd * MICROS_PER_USD > Decimal(micros - 1)


@given(st.decimals(min_value=0, max_value=Decimal("0.01"), places=15))
def test_a_per_token_price_never_rounds_down(price):
    assert Fraction(picos_per_token(float(price))) >= Fraction(str(float(price))) * 10**12


@pytest.mark.parametrize(
    ("name", "entry", "reason"),
    [
        ("x-search-preview", {"mode": "chat"}, "it searches the web on every call, billed per search"),
        ("gpt-audio", {"mode": "chat", "supported_output_modalities": ["video", "text", "audio"]},
         "it can output audio and video, priced apart from text tokens"),
        ("tts", {"mode": "audio_speech"}, "it is a model for audio speech, billed beyond text tokens"),
        ("chat", {"mode": "chat", "output_cost_per_image": 0.04}, "it is billed per image it outputs"),
    ],
)  # fmt: skip
def test_an_unmeterable_model_says_why_in_words(name, entry, reason):
    assert unmeterable_reason(name, entry) == reason


def test_a_provider_without_prices_prices_no_glob():
    assert PRICES.prices_any("gpt-4o*", "nobody") is False
    assert PRICES.prices_any("gpt-4o*", "nobody", "openai") is True


def test_nothing_at_all_has_a_worst_case_of_nothing():
    assert worst_case_micros(ModelPrice(input=1e-6, output=2e-6), 0, 0, cache_writes=True) == 0
    assert worst_case_micros(ModelPrice(input=0, output=0), 100, 100, cache_writes=False) == 0


def test_a_price_found_says_which_provider_and_name_priced_it():
    match = PRICES.find("claude-haiku-4-5-20991231", "nobody", "anthropic")
    assert (match.provider, match.model) == ("anthropic", "claude-haiku-4-5")
