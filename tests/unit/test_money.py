"""Money as integer micro-dollars (money.py): rounded up, formatted in one place."""

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkeys import money
from agentkeys.money import (
    USD_MESSAGE_FORMAT,
    Usd,
    dumps,
    format_usd,
    micros_to_usd,
    remaining_phrase,
    usd_to_micros,
)


@pytest.mark.parametrize(
    "micros, phrase",
    [(4000, "$0.004000 remains"), (1, "$0.000001 remains"), (0, "nothing remains"),
     (-501_023, "nothing remains (overspent by $0.501023)")],
)
def test_remaining_phrase(micros, phrase):
    assert remaining_phrase(micros) == phrase


def test_small_amounts_are_never_written_in_exponent_notation():
    assert str(Usd(5)) == f"{Usd(5)}" == "0.000005"
    assert dumps({"spent": Usd(5), "rows": [{"left": Usd(2_500_000)}], "note": "5e-06"}) == (
        '{"spent": 0.000005, "rows": [{"left": 2.500000}], "note": "5e-06"}'
    )


@given(st.integers(min_value=-(10**12), max_value=10**12), st.text())
def test_dumps_reads_back_as_the_same_numbers_and_leaves_text_alone(micros, text):
    written = dumps({"usd": Usd(micros), "text": text}, indent=2)
    read = json.loads(written)
    assert read == {"usd": micros / 1_000_000, "text": text}
    assert "e-" not in written.split('"text"')[0]


@pytest.mark.parametrize(
    ("usd", "micros"),
    [(0, 0), (1, 1_000_000), ("0.0000001", 1), (0.0000011, 2), (Decimal("1.5"), 1_500_000), (2.000001, 2_000_001)],
)
def test_usd_to_micros_rounds_up(usd, micros):
    assert usd_to_micros(usd) == micros


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.000000"), (62, "$0.000062"), (12_300, "$0.012300"), (500_000, "$0.500000"),
        (499_932, "$0.499932"), (20_000_000, "$20.000000"), (-1_500_000, "-$1.500000"),
    ],
)  # fmt: skip
def test_format_usd_writes_every_amount_with_six_decimals(micros, text):
    assert format_usd(micros) == text
    assert USD_MESSAGE_FORMAT.fullmatch(text.lstrip("-"))


@given(st.integers(min_value=0, max_value=10**12))
def test_a_formatted_amount_reads_back_as_the_same_micro_dollars(micros):
    assert usd_to_micros(format_usd(micros).removeprefix("$")) == micros
    assert micros == 0 or Decimal(format_usd(micros).removeprefix("$")) * 1_000_000 == micros
    assert micros_to_usd(micros) == pytest.approx(micros / 1_000_000)


@given(st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False))
def test_usd_to_micros_never_rounds_down_and_rounds_up_by_less_than_one(usd):
    micros = usd_to_micros(usd)
    assert usd * 1_000_000 <= micros < usd * 1_000_000 + 1


def test_no_message_writes_a_dollar_amount_but_through_format_usd():
    """The class of the bug, in the source: a `$` written before a value in an f-string bypasses format_usd."""
    package = Path(money.__file__).parent
    bypasses = [
        f"{path.name}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name != "money.py"
        for line in path.read_text().splitlines()
        if re.search(r"\$\{(?!format_usd)", line)
    ]
    assert bypasses == []


def test_dumps_passes_json_options_on():
    assert dumps({"b": Usd(5), "a": [Usd(1_500_000)]}, sort_keys=True, indent=1) == (
        '{\n "a": [\n  1.500000\n ],\n "b": 0.000005\n}'
    )
