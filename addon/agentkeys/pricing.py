"""What a model costs: the bundled table, user overrides, and the cost of a usage.

The bundled table (`data/prices.json`) is derived from LiteLLM's model price map by
`tools/build_prices.py`. Users add or override prices without a release, either with a file in
that same LiteLLM format (`prices_file` in the proxy config) or inline under `prices:`.
A model with no known price cannot be metered, so the gate refuses it (unknown means no).
"""

import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from agentkeys.yamlfile import ConfigError

BUNDLED_SOURCE = "bundled (from LiteLLM's price map)"
DATED_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4})$")
# LiteLLM's provider names -> ours, for the providers whose wire formats we speak.
LITELLM_PROVIDERS = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "azure": "azure",
    "groq": "groq",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "together_ai": "together",
    "openrouter": "openrouter",
}
# `input_cost_per_token_above_200k_tokens` and its siblings: a long-context price band.
LITELLM_TIER_FIELD = re.compile(r"^(?P<field>.+)_above_(?P<thousands>\d+)k_tokens$")
LITELLM_RATE_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
}


class Rates(BaseModel):
    """USD per token in one price band. Cache prices default to the plain input price when absent."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None  # Anthropic's 5-minute cache; OpenAI's automatic cache
    cache_write_1h: float | None = None  # Anthropic's 1-hour cache; defaults to `cache_write`

    @cached_property
    def picos(self) -> "PicoRates":
        """These rates in whole pico-dollars per token, defaults filled in; worked out once per price."""
        return PicoRates(
            input=picos_per_token(self.input),
            cache_read=picos_per_token(self.cache_read, self.input),
            cache_write=picos_per_token(self.cache_write, self.input),
            cache_write_1h=picos_per_token(self.cache_write_1h, self.cache_write, self.input),
            output=picos_per_token(self.output),
        )


class PicoRates(NamedTuple):
    input: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    output: int


class PriceTier(Rates):
    """Long-context pricing: a call whose input exceeds `above_tokens` is billed entirely at these rates."""

    above_tokens: int


class ModelPrice(Rates):
    max_output_tokens: int | None = None
    max_input_tokens: int | None = None  # the context window: bounds input the proxy cannot see
    tiers: list[PriceTier] = Field(default_factory=list)
    # Why this model's calls cost more than their tokens at these rates (per image, per second, per
    # search, …); the gate refuses such a model whatever a policy allows. None: its tokens are all it costs.
    unmeterable: str | None = None
    source: str | None = None

    def rates_for(self, input_tokens: int) -> Rates:
        """The band a call with this many input tokens is billed in."""
        band: Rates = self
        for tier in sorted(self.tiers, key=lambda t: t.above_tokens):
            if input_tokens > tier.above_tokens:
                band = tier
        return band


class ConfigPrice(BaseModel):
    """A price written in the proxy config, in USD per million tokens (as providers publish them)."""

    model_config = ConfigDict(extra="forbid")
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_read_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_1h_per_mtok: float | None = Field(default=None, ge=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)

    def model_price(self, source: str) -> ModelPrice:
        def per_token(per_mtok: float | None) -> float | None:
            return None if per_mtok is None else float(Decimal(str(per_mtok)) / 1_000_000)

        return ModelPrice(
            input=per_token(self.input_per_mtok),
            output=per_token(self.output_per_mtok),
            cache_read=per_token(self.cache_read_per_mtok),
            cache_write=per_token(self.cache_write_per_mtok),
            cache_write_1h=per_token(self.cache_write_1h_per_mtok),
            max_output_tokens=self.max_output_tokens,
            max_input_tokens=self.max_input_tokens,
            source=source,
        )


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, normalised across providers.

    `input_tokens` counts every input token, including those read from or written to a prompt
    cache (`cached_tokens`, `cache_write_tokens` are subsets of it; `cache_write_1h_tokens` is the
    part of the writes kept for an hour). `reasoning_tokens` are a subset of `output_tokens`, as
    providers bill them.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0


# LiteLLM's modes whose calls are billed by their text tokens (and that the proxy's endpoints serve).
TOKEN_MODES = {"chat", "completion", "responses", "embedding"}
# LiteLLM's price fields for what a call is billed beyond text tokens, and what each means.
BEYOND_TOKEN_FIELDS = {
    "output_cost_per_image": "it is billed per image it outputs",
    "output_cost_per_image_token": "it is billed for image output at its own rate",
    "output_cost_per_audio_token": "it is billed for audio output at its own rate",
    "output_cost_per_video_token": "it is billed for video output at its own rate",
    "output_cost_per_second": "it is billed per second of output",
    "input_cost_per_second": "it is billed per second of input",
    "output_cost_per_character": "it is billed per character",
    "input_cost_per_character": "it is billed per character",
}
# Models that search the web on every call, billed per search whatever the request says.
ALWAYS_SEARCHING = re.compile(r"search-preview|search-api|deep-research")


def unmeterable_reason(name: str, entry: dict) -> str | None:
    """Why a model of LiteLLM's map costs more than its text tokens, so that a hold bounded by tokens would
    not bound it; None when its token prices are all it costs."""
    mode = entry.get("mode")
    if mode is not None and mode not in TOKEN_MODES:
        return f"it is a model for {mode.replace('_', ' ')}, billed beyond text tokens"
    # A chat model's image output comes from a hosted image tool (which every format refuses) or is priced
    # by an image field below; audio and video output are billed apart from text whatever the request says.
    outputs = sorted(set(entry.get("supported_output_modalities") or ["text"]) & {"audio", "video"})
    if outputs:
        return f"it can output {' and '.join(outputs)}, priced apart from text tokens"
    if ALWAYS_SEARCHING.search(name):
        return "it searches the web on every call, billed per search"
    return next((why for field, why in BEYOND_TOKEN_FIELDS.items() if entry.get(field)), None)


def price_from_litellm_entry(entry: dict, source: str | None = None, name: str = "") -> ModelPrice | None:
    """One entry of LiteLLM's price map as our ModelPrice; None when it has no token prices."""
    if "input_cost_per_token" not in entry or "output_cost_per_token" not in entry:
        return None
    return ModelPrice(
        **litellm_rates(entry),
        max_output_tokens=int_or_none(entry.get("max_output_tokens")),
        max_input_tokens=int_or_none(entry.get("max_input_tokens")),
        tiers=litellm_tiers(entry),
        unmeterable=unmeterable_reason(name, entry),
        source=source,
    )


def litellm_rates(fields: dict) -> dict:
    return {ours: fields[theirs] for theirs, ours in LITELLM_RATE_FIELDS.items() if fields.get(theirs) is not None}


def litellm_tiers(entry: dict) -> list[PriceTier]:
    """Long-context bands, e.g. `input_cost_per_token_above_200k_tokens`; a band needs input and output prices."""
    bands: dict[int, dict] = {}
    for name, value in entry.items():
        match = LITELLM_TIER_FIELD.match(name)
        if match and match["field"] in LITELLM_RATE_FIELDS and isinstance(value, int | float):
            bands.setdefault(int(match["thousands"]) * 1000, {})[match["field"]] = value
    return [
        PriceTier(above_tokens=above, **litellm_rates(fields))
        for above, fields in sorted(bands.items())
        if "input_cost_per_token" in fields and "output_cost_per_token" in fields
    ]


def int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def litellm_model_name(name: str) -> str:
    """`gemini/gemini-2.5-flash` -> `gemini-2.5-flash`; `azure/eu/gpt-4o` -> `eu/gpt-4o`."""
    prefix, _, rest = name.partition("/")
    return rest if rest and prefix in LITELLM_PROVIDERS else name


class PriceTable:
    """Prices keyed by provider and model, with dated model names resolved to their family."""

    def __init__(self, prices: dict[str, dict[str, ModelPrice]]):
        self._prices = prices

    @classmethod
    def bundled(cls) -> "PriceTable":
        raw = json.loads(resources.files("agentkeys").joinpath("data/prices.json").read_text())
        return cls(
            {
                provider: {model: ModelPrice(**p, source=BUNDLED_SOURCE) for model, p in models.items()}
                for provider, models in raw.items()
            }
        )

    def add(self, provider: str, model: str, price: ModelPrice) -> None:
        self._prices.setdefault(provider, {})[model] = price

    def add_litellm_file(self, path: Path, provider_of: dict[str, str]) -> int:
        """Override prices from a file in LiteLLM's format; returns how many models it set.

        `provider_of` maps LiteLLM provider names to ours; entries for other providers are skipped.
        """
        try:
            entries = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError([f"{path}: cannot read the price file: {e.strerror}"]) from None
        except ValueError as e:
            raise ConfigError([f"{path}: the price file is not valid JSON ({e})"]) from None
        if not isinstance(entries, dict):
            raise ConfigError([f"{path}: a price file maps model names to prices (LiteLLM's format)"])
        count = 0
        for name, entry in entries.items():
            if not isinstance(entry, dict) or entry.get("litellm_provider") not in provider_of:
                continue
            price = price_from_litellm_entry(entry, source=str(path), name=name)
            if price is not None:
                self.add(provider_of[entry["litellm_provider"]], litellm_model_name(name), price)
                count += 1
        return count

    def prices_any(self, pattern: str, *providers: str) -> bool:
        """Whether a model glob names any model these providers' tables price."""
        return any(fnmatch.fnmatchcase(model, pattern) for p in providers for model in self._prices.get(p, {}))

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        match = self.find(model, provider)
        return match.price if match else None

    def find(self, model: str, *providers: str) -> "PriceMatch | None":
        """The first of `providers` whose table prices `model` (or its undated family), and how."""
        for provider in providers:
            models = self._prices.get(provider, {})
            for name in (model, DATED_SUFFIX.sub("", model)):
                if name in models:
                    return PriceMatch(provider, name, models[name])
        return None

    def providers_pricing(self, model: str) -> list[str]:
        """Every provider whose table prices `model` (or its undated family)."""
        return [provider for provider in sorted(self._prices) if self.find(model, provider)]


@dataclass(frozen=True)
class PriceMatch:
    provider: str  # whose table priced the model
    model: str  # the table's name for it: a dated name resolves to its family
    price: ModelPrice


def load_prices(
    prices_file: Path | None, inline: dict[str, dict[str, ConfigPrice]], providers: Iterable[str]
) -> PriceTable:
    """The bundled table, then the user's price file, then the config's own prices (each overriding the last).

    A price file's entries are read for LiteLLM's provider names and for the config's own provider names.
    """
    table = PriceTable.bundled()
    if prices_file is not None:
        table.add_litellm_file(prices_file, {**LITELLM_PROVIDERS, **{name: name for name in providers}})
    for provider, models in inline.items():
        for model, price in models.items():
            table.add(provider, model, price.model_price(source="proxy config (prices:)"))
    return table


PICOS_PER_MICRO = 10**6


def cost_micros(price: ModelPrice, usage: Usage) -> int:
    """The cost of a usage in micro-dollars, rounded up."""
    return micros_of(cost_picos(price.rates_for(usage.input_tokens), usage))


def cost_picos(rates: Rates, usage: Usage) -> int:
    """The cost in pico-dollars (1e-12 USD): whole numbers, so every call's arithmetic is exact and fast."""
    plain_input = max(usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
    short_writes = max(usage.cache_write_tokens - usage.cache_write_1h_tokens, 0)
    picos = rates.picos
    return (
        picos.input * plain_input
        + picos.cache_read * usage.cached_tokens
        + picos.cache_write * short_writes
        + picos.cache_write_1h * usage.cache_write_1h_tokens
        + picos.output * usage.output_tokens
    )


def picos_per_token(*prices: float | None) -> int:
    """The first price given, in pico-dollars per token (exact for every published price; else rounded up)."""
    price = Decimal(str(next(price for price in prices if price is not None)))
    return int((price * 10**12).to_integral_value(rounding=ROUND_CEILING))


def micros_of(picos: int) -> int:
    return -(-picos // PICOS_PER_MICRO)  # rounded up


def worst_case_micros(price: ModelPrice, input_tokens: int, output_tokens: int, cache_writes: bool) -> int:
    """The most a call of at most these many tokens can cost, however its input is cached.

    Cost is linear in how the input splits into plain, cached and (when the call may write a
    cache) written tokens, so the dearest of those extremes bounds every split: every input token
    at the dearest input rate. Every band the input could fall in is tried, so a long-context tier
    cheaper than the base would not undercut it.
    """
    worst = 0
    for band in (price, *(tier for tier in price.tiers if input_tokens > tier.above_tokens)):
        picos = band.picos
        input_rates = [picos.input, picos.cache_read]
        if cache_writes:
            input_rates += [picos.cache_write, picos.cache_write_1h]
        worst = max(worst, max(input_rates) * input_tokens + picos.output * output_tokens)
    return micros_of(worst)


RATE_LABELS = {
    "input": "input",
    "output": "output",
    "cache_read": "cache read",
    "cache_write": "cache write",
    "cache_write_1h": "cache write (1h)",
}


def price_rows(price: ModelPrice) -> list[list[str]]:
    """[what, USD per token, USD per million tokens] for each rate of a price, long-context bands included."""
    bands: list[tuple[str, Rates]] = [("", price)]
    bands += [(f" above {tier.above_tokens:,} input tokens", tier) for tier in price.tiers]
    return [
        [label + band_label, per_token_text(rate), per_mtok_text(rate)]
        for band_label, band in bands
        for name, label in RATE_LABELS.items()
        if (rate := getattr(band, name)) is not None
    ]


def per_token_text(rate: float) -> str:
    return format(Decimal(str(rate)).normalize(), "f")


def per_mtok_text(rate: float) -> str:
    """Per million tokens, as providers publish prices: `0.15`, `3.00`, `0.075`."""
    text = format((Decimal(str(rate)) * 1_000_000).normalize(), "f")
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"
