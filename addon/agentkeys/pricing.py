"""What a model costs: the bundled table, user overrides, and the cost of a usage.

The bundled table (`data/prices.json`) is derived from LiteLLM's model price map by
`tools/build_prices.py`. Users add or override prices without a release, either with a file in
that same LiteLLM format (`prices_file` in the proxy config) or inline under `prices:`.
A model with no known price cannot be metered, so the gate refuses it (unknown means no).
"""

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path

from pydantic import BaseModel

from agentkeys.money import usd_to_micros

DATED_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4})$")


class ModelPrice(BaseModel):
    """USD per token. Cache prices default to the plain input price when a provider has none."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    max_output_tokens: int | None = None
    source: str | None = None


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, normalised across providers.

    `input_tokens` counts every input token, including those read from or written to a prompt
    cache (`cached_tokens`, `cache_write_tokens` are subsets of it). `reasoning_tokens` are a
    subset of `output_tokens`, as providers bill them.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


def price_from_litellm_entry(entry: dict, source: str | None = None) -> ModelPrice | None:
    """One entry of LiteLLM's price map as our ModelPrice; None when it has no token prices."""
    if "input_cost_per_token" not in entry or "output_cost_per_token" not in entry:
        return None
    max_output = entry.get("max_output_tokens")
    return ModelPrice(
        input=entry["input_cost_per_token"],
        output=entry["output_cost_per_token"],
        cache_read=entry.get("cache_read_input_token_cost"),
        cache_write=entry.get("cache_creation_input_token_cost"),
        max_output_tokens=max_output if isinstance(max_output, int) else None,
        source=source,
    )


class PriceTable:
    """Prices keyed by provider and model, with dated model names resolved to their family."""

    def __init__(self, prices: dict[str, dict[str, ModelPrice]]):
        self._prices = prices

    @classmethod
    def bundled(cls) -> "PriceTable":
        raw = json.loads(resources.files("agentkeys").joinpath("data/prices.json").read_text())
        return cls(
            {
                provider: {model: ModelPrice(**p, source="bundled") for model, p in models.items()}
                for provider, models in raw.items()
            }
        )

    def add(self, provider: str, model: str, price: ModelPrice) -> None:
        self._prices.setdefault(provider, {})[model] = price

    def add_litellm_file(self, path: Path, provider_of: dict[str, str]) -> int:
        """Override prices from a file in LiteLLM's format; returns how many models it set.

        `provider_of` maps LiteLLM provider names to ours; entries for other providers are skipped.
        """
        count = 0
        for name, entry in json.loads(path.read_text()).items():
            if not isinstance(entry, dict) or entry.get("litellm_provider") not in provider_of:
                continue
            price = price_from_litellm_entry(entry, source=str(path))
            if price is not None:
                self.add(provider_of[entry["litellm_provider"]], name.split("/")[-1], price)
                count += 1
        return count

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        models = self._prices.get(provider, {})
        if model in models:
            return models[model]
        undated = DATED_SUFFIX.sub("", model)
        return models.get(undated)


def cost_micros(price: ModelPrice, usage: Usage) -> int:
    """The cost of a usage in micro-dollars, rounded up."""
    cache_read = price.input if price.cache_read is None else price.cache_read
    cache_write = price.input if price.cache_write is None else price.cache_write
    plain_input = max(usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
    usd = (
        Decimal(str(price.input)) * plain_input
        + Decimal(str(cache_read)) * usage.cached_tokens
        + Decimal(str(cache_write)) * usage.cache_write_tokens
        + Decimal(str(price.output)) * usage.output_tokens
    )
    return usd_to_micros(usd)
