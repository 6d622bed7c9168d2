"""Token counts and bounds (tokens.py)."""

import pytest

from agentkeys.tokens import count_tokens, token_bound

TEXT = "Summarise: " + " ".join(f"fact {i}: ünïcödé 数据 🙂" for i in range(300))


@pytest.mark.parametrize("model", ["llama-3.3-70b-versatile", "mistral-large-latest", "gemini-2.5-flash"])
def test_a_model_with_a_tokenizer_we_do_not_ship_is_bounded_by_bytes(model):
    assert token_bound(TEXT, model) == len(TEXT.encode()) + 1
    assert token_bound(TEXT, "gpt-4o-mini") == count_tokens(TEXT, "gpt-4o-mini")
