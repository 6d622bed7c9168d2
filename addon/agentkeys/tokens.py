"""Token counts with tiktoken, from encodings shipped inside the package.

Nothing is downloaded at run time: the BPE files live in `data/tiktoken/` and are loaded with
tiktoken's own hash check. The encoding definitions (regex, special tokens) are tiktoken's own:
we call its constructors with the file location redirected to our copy.
"""

import functools
import re
import threading
from collections.abc import Callable
from importlib import resources

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

ENCODING_FILES = {
    "o200k_base": "o200k_base.tiktoken",
    "cl100k_base": "cl100k_base.tiktoken",
}
# Models that predate o200k use cl100k; everything newer (and non-OpenAI models, as an estimate) o200k.
CL100K_MODEL_PREFIXES = ("gpt-4-", "gpt-4", "gpt-3.5", "text-embedding-", "davinci-002", "babbage-002")
O200K_MODEL_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt")

_load_lock = threading.Lock()

EXACT_COUNT_CHARS = 16 * 1024

TextBound = Callable[[str], int]  # a text -> an upper bound on its tokens, for one model


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    """Build one of tiktoken's encodings from the packaged BPE file (hash-checked), when first needed:
    each holds tens of megabytes, and a proxy whose calls never use one never loads it (the figures
    are in docs/performance.md)."""
    path = str(resources.files("agentkeys").joinpath("data/tiktoken", ENCODING_FILES[name]))
    real_loader = tiktoken.load.load_tiktoken_bpe

    def load_packaged(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return real_loader(path, expected_hash=expected_hash)

    with _load_lock:
        openai_public.load_tiktoken_bpe = load_packaged
        try:
            spec = getattr(openai_public, name)()
        finally:
            openai_public.load_tiktoken_bpe = real_loader
    return tiktoken.Encoding(**spec)


def encoding_for_model(model: str) -> tiktoken.Encoding:
    if model.startswith(O200K_MODEL_PREFIXES):
        return encoding("o200k_base")
    if model.startswith(CL100K_MODEL_PREFIXES):
        return encoding("cl100k_base")
    return encoding("o200k_base")


# tiktoken splits a text into pieces (a word, a run of punctuation, of spaces) and merges each piece's
# bytes; the merging grows faster than the piece, so one long piece (megabytes of one letter) takes minutes.
# In both encodings' patterns a piece is whitespace only, or one leading character, then non-whitespace,
# then newlines and slashes: so it can only be long inside a long run of one of those three. `(?<!…)`
# starts a match only where a run starts, so each run is read once. Whitespace is Unicode's White_Space,
# as tiktoken's own regex engine has it (Python's `\s` adds four control characters).
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
LONG_RUN_CHARS = 256
LONG_RUN = re.compile(
    "|".join(f"(?<!{chars}){chars}{{{LONG_RUN_CHARS}}}" for chars in (f"[^{WHITESPACE}]", f"[{WHITESPACE}]", "[\r\n/]"))
)
# A newline followed by anything but whitespace or a slash: no piece spans it in either pattern (a piece
# that trails newlines stops there, and a word's one leading character is never a newline), so the text
# on each side tokenizes exactly as it does inside the whole.
PIECE_BOUNDARY = re.compile(f"[\r\n](?=[^{WHITESPACE}/])")
LAST_PIECE_BOUNDARY = re.compile(f"(?s:.*)[\r\n](?=[^{WHITESPACE}/])")


def count_tokens(text: str, model: str) -> int:
    """The tokens `model` makes of `text`: exact, except that a stretch holding a long run counts a token per
    byte (an upper bound: every token is at least one byte). Linear in the text's length.

    The stretch is the long run widened to the piece boundaries around it, so everything else is
    counted exactly by tiktoken, in pieces of bounded length.
    """
    exact = encoding_for_model(model).encode
    total, done = 0, 0
    while run := LONG_RUN.search(text, done):
        start = last_piece_boundary(text, done, run.start())
        after = PIECE_BOUNDARY.search(text, run.end())
        end = after.end() if after else len(text)
        total += len(exact(text[done:start], disallowed_special=())) + len(text[start:end].encode())
        done = end
    return total + len(exact(text[done:], disallowed_special=()))


def last_piece_boundary(text: str, start: int, end: int) -> int:
    """The last piece boundary in text[start:end] (`start` if there is none)."""
    found = LAST_PIECE_BOUNDARY.match(text, start, end + 1)
    return found.end() if found else start


def is_openai_model(model: str) -> bool:
    return model.startswith(O200K_MODEL_PREFIXES + CL100K_MODEL_PREFIXES)


def token_bound(text: str, model: str, exact: bool = False) -> int:
    """An upper bound on the tokens `model` makes of `text`.

    OpenAI's models: their own tiktoken count, for texts up to EXACT_COUNT_CHARS (or any text, when
    `exact`). Otherwise the UTF-8 bytes plus one: a token is at least one byte in every byte-level
    vocabulary, and the one covers a SentencePiece word prefix. That is the only bound for models
    whose tokenizer we do not ship (Llama, Mistral, Gemini, … behind an OpenAI-compatible host), and
    a cheap one for long texts, which tiktoken counts far more slowly than their bytes (the gate asks
    for `exact` only when the cheap bound of a long text did not fit the budget).
    """
    if is_openai_model(model) and (exact or len(text) <= EXACT_COUNT_CHARS):
        return count_tokens(text, model)
    return len(text.encode()) + 1


def text_bound(model: str, exact: bool = False) -> TextBound:
    """`token_bound` for one model, to hand to the functions that walk a request's texts."""
    return functools.partial(token_bound, model=model, exact=exact)
