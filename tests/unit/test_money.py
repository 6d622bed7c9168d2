"""money.py: amounts as users read them, and JSON in plain decimals."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkeys.money import Usd, dumps, remaining_phrase


@pytest.mark.parametrize(
    "micros, phrase",
    [(4000, "$0.0040 remains"), (0, "nothing remains"), (-501_023, "nothing remains (overspent by $0.501023)")],
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
