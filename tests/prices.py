"""Expected costs worked out from named prices, so that no test states a cost as a bare number.

`expected_cost("gpt-4o-mini", input=10, output=20)` reads the model's rates from the bundled price
table (or from a `price` given), then adds up tokens × rate in exact decimals and rounds up to the
micro-dollar: the arithmetic is this module's own, so a test using it checks pricing.cost_micros
rather than repeating it. Token counts are disjoint, as a provider bills them: `input` is plain
input only, apart from cache reads and the 5-minute and 1-hour cache writes.
"""

from decimal import ROUND_CEILING, Decimal

from agentkeys.pricing import ModelPrice, PriceTable

BUNDLED = PriceTable.bundled()


def price_of(model: str, provider: str | None = None) -> ModelPrice:
    """The bundled price of `model` at `provider` (by default, the one provider whose table has it)."""
    providers = [provider] if provider else BUNDLED.providers_pricing(model)
    assert providers, f"the bundled table has no price for {model}"
    price = BUNDLED.lookup(providers[0], model)
    assert price is not None, f"the bundled table has no price for {model} at {providers[0]}"
    return price


def expected_cost(
    model: str | None = None,
    provider: str | None = None,
    *,
    price: ModelPrice | None = None,
    input: int = 0,
    output: int = 0,
    cache_read: int = 0,
    cache_write: int = 0,
    cache_write_1h: int = 0,
) -> int:
    """Micro-dollars, rounded up, for these tokens at `model`'s price (or at `price`).

    The band is the one the whole input falls in (long-context prices); a cache rate the price does
    not name costs what the providers charge then: the plain input rate (a 1-hour write, the 5-minute one).
    """
    if price is None:
        price = price_of(model, provider)
    band = price.rates_for(input + cache_read + cache_write + cache_write_1h)
    usd = (
        input * first(band.input)
        + cache_read * first(band.cache_read, band.input)
        + cache_write * first(band.cache_write, band.input)
        + cache_write_1h * first(band.cache_write_1h, band.cache_write, band.input)
        + output * first(band.output)
    )
    return int((usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def first(*rates: float | None) -> Decimal:
    """The first rate that is set, as an exact decimal (a float's shortest text, as pricing reads it)."""
    return Decimal(str(next(rate for rate in rates if rate is not None)))
