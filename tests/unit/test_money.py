"""money.py: amounts as users read them."""

import pytest

from agentkeys.money import remaining_phrase


@pytest.mark.parametrize(
    "micros, phrase",
    [(4000, "$0.0040 remains"), (0, "nothing remains"), (-501_023, "nothing remains (overspent by $0.501023)")],
)
def test_remaining_phrase(micros, phrase):
    assert remaining_phrase(micros) == phrase
