"""Money as whole micro-dollars.

Budgets, holds and spend are integers of 1e-6 USD so that sums are exact in SQLite, in Redis and
in Python alike. Amounts are always rounded *up* to the next micro-dollar: the proxy may charge a
fraction of a cent too much over a million calls, never too little.
"""

import json
import re
import secrets
from decimal import ROUND_CEILING, Decimal

MICROS_PER_USD = 1_000_000


def usd_to_micros(usd: Decimal | float | int | str) -> int:
    return int((Decimal(str(usd)) * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def remaining_phrase(micros: int) -> str:
    """What is left of a budget, for a message: `$0.0040 remains`, `nothing remains`, or by how much it
    was overspent (a call may cost more than its hold when the provider bills beyond its own limits)."""
    if micros > 0:
        return f"{format_usd(micros)} remains"
    if micros == 0:
        return "nothing remains"
    return f"nothing remains (overspent by {format_usd(-micros)})"


# One money format for every message a person reads: every micro-dollar, always six decimals (`$0.500000`,
# `$0.499932`), as the cost headers and the audit's USD amounts write it; a cheap call is not rounded away.
USD_MESSAGE_FORMAT = re.compile(r"\$-?\d+\.\d{6}(?!\d)")


def format_usd(micros: int) -> str:
    """`$0.012300`, `$0.000062`, `$20.000000`: exact, with the same six decimals whatever the amount."""
    sign = "-" if micros < 0 else ""
    return f"{sign}${abs(micros) // MICROS_PER_USD}.{abs(micros) % MICROS_PER_USD:06d}"


class Usd(float):
    """An amount in USD for people and for JSON: a float (it compares and adds as one) written with its six
    decimals, `0.000005`, never `5e-06`.

    Python writes a float under 0.0001 in exponent notation, in `str` and in `json.dumps` alike, and a
    cheap call costs less than that; `str` and `dumps` write a Usd in plain decimals.
    """

    def __new__(cls, micros: int):
        return super().__new__(cls, micros / MICROS_PER_USD)

    def __str__(self) -> str:
        return f"{float(self):.6f}"


def dumps(value, **kwargs) -> str:
    """`json.dumps`, with each Usd in `value` (in its dicts and lists) a plain decimal number."""
    marker = f"\0usd-{secrets.token_hex(8)}:"  # a string no caller's text can hold by chance
    text = json.dumps(_marked(value, marker), **kwargs)
    quoted_marker = json.dumps(marker)[:-1]  # as it reads inside the JSON text, without its closing quote
    return re.sub(re.escape(quoted_marker) + r'(-?\d+\.\d+)"', lambda found: found[1], text)


def _marked(value, marker: str):
    """`value` with each Usd replaced by a string to find in the JSON text: `json` writes float subclasses itself."""
    if isinstance(value, Usd):
        return f"{marker}{value}"
    if isinstance(value, dict):
        return {name: _marked(item, marker) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_marked(item, marker) for item in value]
    return value
