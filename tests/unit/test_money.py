"""Money as integer micro-dollars (money.py): rounded up, formatted in one place."""

from decimal import Decimal

import pytest

from agentkeys.money import format_usd, usd_to_micros


@pytest.mark.parametrize(
    ("usd", "micros"),
    [(0, 0), (1, 1_000_000), ("0.0000001", 1), (0.0000011, 2), (Decimal("1.5"), 1_500_000), (2.000001, 2_000_001)],
)
def test_usd_to_micros_rounds_up(usd, micros):
    assert usd_to_micros(usd) == micros


def test_format_usd():
    assert format_usd(12_300) == "$0.0123"
