"""Money as whole micro-dollars.

Budgets, holds and spend are integers of 1e-6 USD so that sums are exact in SQLite, in Redis and
in Python alike. Amounts are always rounded *up* to the next micro-dollar: the proxy may charge a
fraction of a cent too much over a million calls, never too little.
"""

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


def format_usd(micros: int) -> str:
    """`$0.0123`, or as many decimals as it takes to be exact (`$0.000062`): small calls are cheap."""
    text = f"{micros / MICROS_PER_USD:.6f}"
    whole, fraction = text.split(".")
    return f"${whole}.{fraction.rstrip('0').ljust(4, '0')}"
