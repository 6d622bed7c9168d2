"""What every wire format shares: a request as received, one metered call's numbers, and event framing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Received:
    """One request as the mock received it."""

    method: str
    path: str  # without the query string
    query: str  # raw query string, "" if none
    headers: dict[str, str]  # lower-cased names
    body: bytes
    json: Any | None  # parsed JSON body, None if absent or not JSON


@dataclass(frozen=True)
class Call:
    """The parameters of one metered call, derived from its request body."""

    model: str
    input_tokens: int  # every input token, cache reads and writes included
    output_tokens: int  # every output token, reasoning and every choice included
    truncated: bool  # output capped by the request's max_tokens
    stream: bool
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    choices: int = 1
    reply: str | None = None  # JSON shaped by the request's schema, in place of "hello hello …" (replies.py)
    tool_call: tuple[str, str] | None = None  # (name, JSON arguments): the reply is a call of this tool

    @property
    def pieces(self) -> list[str]:
        """One choice's visible reply: one o200k token per piece, "hello", " hello", ...; a JSON reply in
        pieces of a few characters; nothing when the reply is a tool call."""
        if self.tool_call is not None:
            return []
        if self.reply is not None:
            return [self.reply[i : i + 8] for i in range(0, len(self.reply), 8)]
        visible = (self.output_tokens - self.reasoning_tokens) // self.choices
        return ["hello" if i == 0 else " hello" for i in range(visible)]

    def report(self, provider: str) -> dict:
        """What the mock bills for this call, in ``MockProvider.reported``."""
        return {
            "provider": provider,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "stream": self.stream,
        }

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event, with a compact JSON payload unless ``data`` is a str."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def limited(limit: int | None, output_tokens: int, reasoning: bool) -> tuple[int, int, bool]:
    """(output tokens, of which reasoning, truncated) for a reply of ``output_tokens`` under ``limit``.

    Reasoning, when asked for, takes half the output: it counts against the limit, as providers bill it.
    """
    n = output_tokens if limit is None else min(limit, output_tokens)
    return n, n // 2 if reasoning else 0, n < output_tokens


def text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str)
        )
    return ""


TEXT_PARTS = ("text", "input_text", "output_text")
