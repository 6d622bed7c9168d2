"""Token counts and bounds (tokens.py)."""

import subprocess
import sys
import time

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys import tokens
from agentkeys.tokens import count_tokens, token_bound


def long_run_texts():
    """Texts of runs, some long: one letter, accented letters, punctuation, slashes, newlines, spaces, digits."""
    run = st.tuples(st.sampled_from(["a", "e\u0301", "!", "/\n", "\n", " ", "7", "ab", "中", "\t", "\x1c", "x "]),
                    st.integers(1, 400))  # fmt: skip
    return st.lists(run, max_size=8).map(lambda runs: "".join(piece * count for piece, count in runs))


@settings(max_examples=150, deadline=None)
@given(text=long_run_texts(), model=st.sampled_from(["gpt-4o", "gpt-4"]))
def test_token_count_is_an_upper_bound_and_exact_without_long_runs(text, model):
    exact = len(tokens.encoding_for_model(model).encode(text, disallowed_special=()))
    counted = tokens.count_tokens(text, model)
    assert counted >= exact
    if not tokens.LONG_RUN.search(text):
        assert counted == exact


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=2000), model=st.sampled_from(["gpt-4o", "gpt-4"]))
def test_token_count_is_exact_on_ordinary_text(text, model):
    exact = len(tokens.encoding_for_model(model).encode(text, disallowed_special=()))
    assert tokens.count_tokens(text, model) == exact or tokens.LONG_RUN.search(text)


def test_token_counting_never_hands_tiktoken_a_long_piece(monkeypatch):
    """The work is linear: tiktoken (whose merging grows faster than a piece) only ever sees text without a
    long run, and no more text than it was given."""
    given = []
    real_encode = tiktoken.Encoding.encode

    def recording_encode(self, text, **kwargs):
        given.append(text)
        return real_encode(self, text, **kwargs)

    monkeypatch.setattr(tiktoken.Encoding, "encode", recording_encode)
    prose = "The quick brown fox jumps over the lazy dog.\n" * 2000
    for text in ("a" * 2_000_000, prose + "b" * 500_000 + "\n" + prose, " " * 1_000_000, "!" + "/\n" * 500_000):
        given.clear()
        assert tokens.count_tokens(text, "gpt-4o") >= len(text.encode()) // 10
        assert sum(map(len, given)) <= len(text)
        assert not any(tokens.LONG_RUN.search(piece) for piece in given)


def seconds_to(fn, *args) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - started)
    return best


def test_one_repeated_character_costs_no_more_than_as_much_prose():
    size = 1_000_000
    prose = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    repeated = "a" * size
    tokens.count_tokens("warm up", "gpt-4o")
    assert seconds_to(tokens.count_tokens, repeated, "gpt-4o") < 2 * seconds_to(tokens.count_tokens, prose, "gpt-4o")


TEXT = "Summarise: " + " ".join(f"fact {i}: ünïcödé 数据 🙂" for i in range(300))


@pytest.mark.parametrize("model", ["llama-3.3-70b-versatile", "mistral-large-latest", "gemini-2.5-flash"])
def test_a_model_with_a_tokenizer_we_do_not_ship_is_bounded_by_bytes(model):
    assert token_bound(TEXT, model) == len(TEXT.encode()) + 1
    assert token_bound(TEXT, "gpt-4o-mini") == count_tokens(TEXT, "gpt-4o-mini")


LOAD_THE_PROXY = """
import asyncio, sys
from mitmproxy import options
from agentkeys import tokens
from agentkeys.server import ProxyMaster

async def main():
    proxy = ProxyMaster(options.Options())
    proxy.options.update(agentkeys_config=sys.argv[1])
    print(tokens.encoding.cache_info().currsize)
    tokens.token_bound("hello", "gpt-4o-mini")
    print(tokens.encoding.cache_info().currsize)

asyncio.run(main())
"""


def test_a_configured_proxy_loads_a_tokenizer_only_when_a_call_first_needs_it(tmp_path):
    """Each encoding holds tens of megabytes: a proxy loads the one a call needs, when it needs it."""
    config = tmp_path / "agentkeys.yaml"
    config.write_text("store: sqlite:///agentkeys.db\naudit_log: audit.jsonl\ncerts_dir: certs\n")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_THE_PROXY, str(config)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["0", "1"], "none at start, then only the one the model uses"
