"""Token counting: tiktoken's o200k encoding, loaded from the repository's own copy (nothing is downloaded)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from unittest.mock import patch

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext import openai_public

_O200K_FILE = "o200k_base.tiktoken"


def _tiktoken_dirs() -> list[Path]:
    """Directories searched for ``o200k_base.tiktoken``, in order."""
    dirs = []
    if os.environ.get("AGENTKEYS_TIKTOKEN_DIR"):
        dirs.append(Path(os.environ["AGENTKEYS_TIKTOKEN_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    dirs.append(repo / "addon" / "agentkeys" / "data" / "tiktoken")
    return dirs


@functools.cache
def o200k() -> tiktoken.Encoding:
    """Load the o200k_base encoding from the first local copy found.

    tiktoken's own o200k definition is used for the regex and special tokens,
    with its loader pointed at the local file (the expected hash is still
    checked), so nothing is fetched from the network.
    """
    for directory in _tiktoken_dirs():
        path = directory / _O200K_FILE
        if path.is_file():
            break
    else:
        tried = ", ".join(str(d) for d in _tiktoken_dirs())
        raise FileNotFoundError(f"{_O200K_FILE} not found in any of: {tried}")

    def load_local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return load_tiktoken_bpe(str(path), expected_hash=expected_hash)

    with patch.object(openai_public, "load_tiktoken_bpe", load_local):
        params = openai_public.o200k_base()
    return tiktoken.Encoding(**params)


def count_o200k_tokens(text: str) -> int:
    """Number of o200k tokens in ``text`` (special-token text counts as plain text)."""
    return len(o200k().encode_ordinary(text))
