"""Prices: the worst case a hold takes, the cost a usage settles at, and models no token price can meter.

The property tests draw random prices, request shapes and provider usage within the request's limits:
what the provider bills never exceeds the hold, and money is never rounded down.
"""

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
from agentkeys.pricing import (
    ConfigPrice,
    ModelPrice,
    PriceTable,
    PriceTier,
    Usage,
    cost_micros,
    micros_of,
    picos_per_token,
    price_from_litellm_entry,
    unmeterable_reason,
    worst_case_micros,
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
