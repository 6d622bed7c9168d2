"""Money as integer micro-dollars (money.py): rounded up, formatted in one place."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkeys.money import format_usd, micros_to_usd, usd_to_micros


@pytest.mark.parametrize(
    ("usd", "micros"),
    [(0, 0), (1, 1_000_000), ("0.0000001", 1), (0.0000011, 2), (Decimal("1.5"), 1_500_000), (2.000001, 2_000_001)],
)
def test_usd_to_micros_rounds_up(usd, micros):
    assert usd_to_micros(usd) == micros


def test_format_usd():
    assert format_usd(12_300) == "$0.0123"


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "$0.0000"), (62, "$0.000062"), (12_300, "$0.0123"), (1_500_000, "$1.5000"), (2_499_991, "$2.499991")],
)
def test_format_usd_shows_four_decimals_or_as_many_as_it_takes_to_be_exact(micros, text):
    assert format_usd(micros) == text


@given(st.integers(min_value=0, max_value=10**12))
def test_a_formatted_amount_reads_back_as_the_same_micro_dollars(micros):
    assert usd_to_micros(format_usd(micros).removeprefix("$")) == micros
    assert micros_to_usd(micros) == pytest.approx(micros / 1_000_000)


@given(st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False))
def test_usd_to_micros_never_rounds_down_and_rounds_up_by_less_than_one(usd):
    micros = usd_to_micros(usd)
    assert usd * 1_000_000 <= micros < usd * 1_000_000 + 1
