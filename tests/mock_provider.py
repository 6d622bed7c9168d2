"""A mock LLM provider speaking the OpenAI and Anthropic wire formats.

Used by the end-to-end tests and the benchmark as the "real" upstream behind
the proxy. It serves, on ``127.0.0.1``:

* ``POST /v1/chat/completions`` (OpenAI; streaming and non-streaming),
* ``POST /v1/responses`` (OpenAI Responses API; streaming events too),
* ``POST /v1/completions`` and ``POST /v1/embeddings`` (OpenAI),
* ``POST /v1/messages`` (Anthropic; streaming and non-streaming; prompt
  caching at ``cache_control`` breakpoints) and ``/v1/messages/count_tokens``,
* ``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent``
  (``?alt=sse``) and ``:countTokens`` (Gemini, key in ``x-goog-api-key``),
* Azure OpenAI's ``/openai/deployments/{deployment}/…?api-version=`` and
  ``/openai/v1/…`` paths (key in ``api-key``; a deployment is its model),
* ``GET /v1/models`` (OpenAI model list; not metered),

answers anything else with a 404 in OpenAI's error shape, and records every
request in ``received`` and the usage it reported for every successful
metered call in ``reported``. Tests can make the next calls fail
(``fail_next``), be slow (``delay_next``), lose their connection mid-stream
(``cut_next_stream``) or report a usage field of their choosing
(``corrupt_next_usage``: a hostile or broken upstream).

The reply to a metered call is ``n`` times "hello" ("hello hello hello"),
where ``n`` is the configured ``output_tokens`` capped by the request's
``max_tokens``; each word is exactly one o200k token. Input tokens are
counted with tiktoken's o200k encoding, loaded from a local file (nothing is
downloaded), unless another counter is injected.

Beyond plain tokens, as the real providers do: a request that asks for
reasoning (``reasoning_effort``, ``reasoning``, a Gemini ``thinkingBudget``)
spends half its output on it; an OpenAI request with a ``prompt_cache_key``
seen before reads half its input from the cache; an Anthropic request writes
the prefix up to its last ``cache_control`` block to the cache (one hour if
its ``ttl`` says so) and reads it on later calls; a Gemini ``cachedContent``
adds ``gemini_cached_tokens`` read from the cache.

Run ``python tests/mock_provider.py --port N`` to serve from another process.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import json
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from unittest.mock import patch

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext import openai_public

# ---------------------------------------------------------------------------
# Token counting
# ---------------------------------------------------------------------------

_O200K_FILE = "o200k_base.tiktoken"


def _tiktoken_dirs() -> list[Path]:
    """Directories searched for ``o200k_base.tiktoken``, in order."""
    dirs = []
    if os.environ.get("AGENTKEYS_TIKTOKEN_DIR"):
        dirs.append(Path(os.environ["AGENTKEYS_TIKTOKEN_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    dirs.append(repo / "addon" / "agentkeys" / "data" / "tiktoken")
    return dirs


@functools.cache
def _o200k() -> tiktoken.Encoding:
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
    return len(_o200k().encode_ordinary(text))


# ---------------------------------------------------------------------------
# Public data
# ---------------------------------------------------------------------------


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
class _Call:
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

    @property
    def pieces(self) -> list[str]:
        """One choice's visible reply, one o200k token per piece: "hello", " hello", ..."""
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


def _sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event, with a compact JSON payload unless ``data`` is a str."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _limited(limit: int | None, output_tokens: int, reasoning: bool) -> tuple[int, int, bool]:
    """(output tokens, of which reasoning, truncated) for a reply of ``output_tokens`` under ``limit``.

    Reasoning, when asked for, takes half the output: it counts against the limit, as providers bill it.
    """
    n = output_tokens if limit is None else min(limit, output_tokens)
    return n, n // 2 if reasoning else 0, n < output_tokens


def _cache_read(body: dict, input_tokens: int, cache: set[str] | None) -> int:
    """OpenAI's automatic prompt cache: a ``prompt_cache_key`` seen before reads half the input."""
    key = body.get("prompt_cache_key")
    if cache is None or not isinstance(key, str):
        return 0
    seen = f"openai:{key}" in cache
    cache.add(f"openai:{key}")
    return input_tokens // 2 if seen else 0


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str)
        )
    return ""


_TEXT_PARTS = ("text", "input_text", "output_text")
# Tokens a Responses API call inherits from the response it continues (`previous_response_id`),
# and a Gemini call from the cached content it names (`cachedContent`): input the proxy cannot see.
PREVIOUS_RESPONSE_TOKENS = 500
GEMINI_CACHED_CONTENT_TOKENS = 1000


# ---------------------------------------------------------------------------
# The two wire formats
# ---------------------------------------------------------------------------


class _OpenAI:
    """OpenAI chat completions: auth, errors, token accounting and replies."""

    name = "openai"

    _ERROR_TYPES: ClassVar[dict[int, tuple[str, str | None]]] = {
        401: ("invalid_request_error", "invalid_api_key"),
        429: ("requests", "rate_limit_exceeded"),
    }

    @staticmethod
    def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
        return _openai_authorized(headers, mock_provider)

    @classmethod
    def error(cls, status: int, message: str) -> dict:
        default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
        kind, code = cls._ERROR_TYPES.get(status, default)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    @staticmethod
    def invalid(body: Any) -> str | None:
        """Why the request body is unacceptable, or None."""
        if not isinstance(body, dict):
            return "We could not parse the JSON body of your request."
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return "Missing required parameter: 'messages'."
        for field in ("max_tokens", "max_completion_tokens"):
            if body.get(field) is not None and not isinstance(body[field], int):
                return f"Invalid type for '{field}': expected an integer."
        return None

    @staticmethod
    def call(body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> _Call:
        # OpenAI's documented formula: 3 tokens per message plus the tokens of
        # its role, content and name (+1 for a name), plus 3 priming the reply.
        input_tokens = 3
        for message in body["messages"]:
            input_tokens += 3 + count(str(message.get("role", ""))) + count(_text_of(message.get("content")))
            if "name" in message:
                input_tokens += 1 + count(str(message["name"]))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        n, reasoning, truncated = _limited(limit, output_tokens, "reasoning_effort" in body)
        return _Call(
            body["model"], input_tokens, n, truncated, body.get("stream") is True,
            cached_tokens=_cache_read(body, input_tokens, cache), reasoning_tokens=reasoning,
        )  # fmt: skip

    @staticmethod
    def usage(call: _Call) -> dict:
        return {
            "prompt_tokens": call.input_tokens,
            "completion_tokens": call.output_tokens,
            "total_tokens": call.input_tokens + call.output_tokens,
            "prompt_tokens_details": {"cached_tokens": call.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": call.reasoning_tokens},
        }

    @classmethod
    def completion(cls, call: _Call, body: dict | None = None) -> dict:
        return {
            "id": f"chatcmpl-mock{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": call.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if call.truncated else "stop",
                }
            ],
            "usage": cls.usage(call),
        }

    @classmethod
    def stream(cls, call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The stream's events as (head, one per output token, tail)."""
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        base = {
            "id": f"chatcmpl-mock{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.model,
        }

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            extra = {"usage": None} if include_usage else {}
            return _sse({**base, "choices": [choice], **extra})

        head = [chunk({"role": "assistant", "content": "", "refusal": None})]
        content = [chunk({"content": piece}) for piece in call.pieces]
        tail = [chunk({}, "length" if call.truncated else "stop")]
        if include_usage:
            tail.append(_sse({**base, "choices": [], "usage": cls.usage(call)}))
        tail.append(_sse("[DONE]"))
        return head, content, tail


class _Anthropic:
    """Anthropic messages: auth, errors, token accounting and replies."""

    name = "anthropic"

    _ERROR_TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }

    @staticmethod
    def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
        # Anthropic takes the key as ``x-api-key`` or, as the 2.x SDK sends it,
        # ``Authorization: Bearer``. Every credential sent must be the real key.
        credentials = []
        if "x-api-key" in headers:
            credentials.append(headers["x-api-key"])
        if "authorization" in headers:
            credentials.append(headers["authorization"].removeprefix("Bearer "))
        return bool(credentials) and all(key == mock_provider.anthropic_key for key in credentials)

    @classmethod
    def error(cls, status: int, message: str) -> dict:
        default = "api_error" if status >= 500 else "invalid_request_error"
        return {"type": "error", "error": {"type": cls._ERROR_TYPES.get(status, default), "message": message}}

    @staticmethod
    def invalid(body: Any) -> str | None:
        """Why the request body is unacceptable, or None."""
        if not isinstance(body, dict):
            return "There was an issue with your request body: invalid JSON"
        for field, kind in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(body.get(field), kind):
                return f"{field}: Field required"
        if not all(isinstance(m, dict) for m in body["messages"]):
            return "messages: Input should be a valid list of objects"
        return None

    @staticmethod
    def input_tokens(body: dict, count: Callable[[str], int]) -> int:
        # Not Anthropic's (unpublished) tokenizer, just deterministic: all text
        # tokens, plus 4 per message, plus 3.
        input_tokens = 3 + count(_text_of(body.get("system")))
        for message in body["messages"]:
            input_tokens += 4 + count(_text_of(message.get("content")))
        return input_tokens

    @classmethod
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> _Call:
        input_tokens = cls.input_tokens(body, count)
        n = min(body["max_tokens"], output_tokens)
        read, written, ttl = cls.cache_split(body, count, cache)
        return _Call(
            body["model"], input_tokens, n, n < output_tokens, body.get("stream") is True, cached_tokens=read,
            cache_write_tokens=written, cache_write_1h_tokens=written if ttl == "1h" else 0,
        )  # fmt: skip

    @classmethod
    def cache_split(cls, body: dict, count: Callable[[str], int], cache: set[str] | None) -> tuple[int, int, str]:
        """(tokens read from the cache, tokens written to it, the write's ttl).

        The prefix is the request up to its last block with ``cache_control``: written the first
        time it is seen, read every time after.
        """
        prefix = cls.cached_prefix(body)
        if prefix is None or cache is None:
            return 0, 0, ""
        marker, ttl = prefix
        key = "anthropic:" + json.dumps(marker, sort_keys=True)
        tokens = cls.input_tokens(marker, count)
        if key in cache:
            return tokens, 0, ""
        cache.add(key)
        return 0, tokens, ttl

    @staticmethod
    def cached_prefix(body: dict) -> tuple[dict, str] | None:
        """The request cut after its last ``cache_control`` block (system first, then messages), and its ttl."""
        found = None
        system = body.get("system")
        for i, block in enumerate(system if isinstance(system, list) else []):
            if isinstance(block, dict) and block.get("cache_control"):
                found = ({"system": system[: i + 1], "messages": []}, block["cache_control"])
        for m, message in enumerate(body["messages"]):
            content = message.get("content")
            for i, block in enumerate(content if isinstance(content, list) else []):
                if isinstance(block, dict) and block.get("cache_control"):
                    cut = [*body["messages"][:m], {**message, "content": content[: i + 1]}]
                    found = ({"system": system, "messages": cut}, block["cache_control"])
        if found is None:
            return None
        prefix, control = found
        return prefix, str(control.get("ttl") or "5m") if isinstance(control, dict) else "5m"

    @staticmethod
    def usage(call: _Call, output_tokens: int) -> dict:
        """Anthropic's usage: ``input_tokens`` leaves out what was read from or written to the cache."""
        return {
            "input_tokens": call.input_tokens - call.cached_tokens - call.cache_write_tokens,
            "cache_creation_input_tokens": call.cache_write_tokens,
            "cache_read_input_tokens": call.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": call.cache_write_tokens - call.cache_write_1h_tokens,
                "ephemeral_1h_input_tokens": call.cache_write_1h_tokens,
            },
            "output_tokens": output_tokens,
        }

    @classmethod
    def completion(cls, call: _Call, body: dict | None = None) -> dict:
        return {
            "id": f"msg_mock{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [{"type": "text", "text": call.text}],
            "stop_reason": "max_tokens" if call.truncated else "end_turn",
            "stop_sequence": None,
            "usage": cls.usage(call, call.output_tokens),
        }

    @classmethod
    def stream(cls, call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The stream's events as (head, one per output token, tail).

        ``body`` is unused here; it is part of the signature shared with ``_OpenAI``.
        """
        message = {
            "id": f"msg_mock{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": cls.usage(call, 1),
        }

        def event(name: str, **data: Any) -> bytes:
            return _sse({"type": name, **data}, event=name)

        head = [
            event("message_start", message=message),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            event("ping"),
        ]
        content = [
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece}) for piece in call.pieces
        ]
        tail = [
            event("content_block_stop", index=0),
            event(
                "message_delta",
                delta={"stop_reason": "max_tokens" if call.truncated else "end_turn", "stop_sequence": None},
                usage={"output_tokens": call.output_tokens},
            ),
            event("message_stop"),
        ]
        return head, content, tail


def _event(kind: str, **data: Any) -> bytes:
    """A typed stream event, ``event: kind`` and ``{"type": kind, ...}``, as the Responses API sends them."""
    return _sse({"type": kind, **data}, event=kind)


class _Responses:
    """OpenAI's Responses API: chat's auth, errors and token counts; input items; typed stream events."""

    name = "openai"
    error = _OpenAI.error

    @staticmethod
    def invalid(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "We could not parse the JSON body of your request."
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        if not isinstance(body.get("input"), str | list) and not body.get("previous_response_id"):
            return "Missing required parameter: 'input'."
        if body.get("max_output_tokens") is not None and not isinstance(body["max_output_tokens"], int):
            return "Invalid type for 'max_output_tokens': expected an integer."
        return None

    @staticmethod
    def call(body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> _Call:
        # As chat: 3 per message plus its role and text, 3 priming the reply; instructions are a system message.
        given = body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
        if isinstance(body.get("instructions"), str):
            items.insert(0, {"role": "system", "content": body["instructions"]})
        input_tokens = 3 + sum(3 + count(str(i.get("role", ""))) + count(_text_of(i.get("content"))) for i in items)
        if body.get("previous_response_id"):
            input_tokens += PREVIOUS_RESPONSE_TOKENS
        n, reasoning, truncated = _limited(body.get("max_output_tokens"), output_tokens, "reasoning" in body)
        return _Call(
            body["model"], input_tokens, n, truncated, body.get("stream") is True,
            cached_tokens=_cache_read(body, input_tokens, cache), reasoning_tokens=reasoning,
        )  # fmt: skip

    @staticmethod
    def usage(call: _Call) -> dict:
        return {
            "input_tokens": call.input_tokens,
            "input_tokens_details": {"cached_tokens": call.cached_tokens},
            "output_tokens": call.output_tokens,
            "output_tokens_details": {"reasoning_tokens": call.reasoning_tokens},
            "total_tokens": call.input_tokens + call.output_tokens,
        }

    @staticmethod
    def message(call: _Call, item_id: str, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @classmethod
    def response(cls, call: _Call, response_id: str, item_id: str, done: bool) -> dict:
        output = []
        if call.reasoning_tokens:
            output.append({"type": "reasoning", "id": f"rs_mock{response_id}", "summary": []})
        if done:
            output.append(cls.message(call, item_id, call.text, "completed"))
        return {
            "id": response_id, "object": "response", "created_at": int(time.time()), "model": call.model,
            "status": ("incomplete" if call.truncated else "completed") if done else "in_progress",
            "incomplete_details": {"reason": "max_output_tokens"} if done and call.truncated else None,
            "error": None, "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": cls.usage(call) if done else None,
        }  # fmt: skip

    @classmethod
    def completion(cls, call: _Call, body: dict | None = None) -> dict:
        return cls.response(call, f"resp_mock{uuid.uuid4().hex}", f"msg_mock{uuid.uuid4().hex}", done=True)

    @classmethod
    def stream(cls, call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        response_id, item_id = f"resp_mock{uuid.uuid4().hex}", f"msg_mock{uuid.uuid4().hex}"
        numbers = iter(range(10**9))
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def event(kind: str, **data: Any) -> bytes:
            return _event(kind, sequence_number=next(numbers), **data)

        head = [
            event("response.created", response=cls.response(call, response_id, item_id, done=False)),
            event("response.in_progress", response=cls.response(call, response_id, item_id, done=False)),
            event("response.output_item.added", output_index=0, item=cls.message(call, item_id, "", "in_progress")),
            event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}),
        ]
        content = [event("response.output_text.delta", **where, delta=piece) for piece in call.pieces]
        done = cls.response(call, response_id, item_id, done=True)
        tail = [
            event("response.output_text.done", **where, text=call.text),
            event("response.content_part.done", **where, part=done["output"][-1]["content"][0]),
            event("response.output_item.done", output_index=0, item=done["output"][-1]),
            event("response.incomplete" if call.truncated else "response.completed", response=done),
        ]
        return head, content, tail


def _one_or_many(given: Any) -> list:
    """OpenAI's `prompt`/`input`: a text, a list of token ids, or a list of either, as a list of items."""
    if isinstance(given, str) or (isinstance(given, list) and given and isinstance(given[0], int)):
        return [given]
    return list(given) if isinstance(given, list) else []


class _Completions:
    """OpenAI's legacy completions: one or more prompts, ``n`` choices each, 16 tokens unless told otherwise."""

    name = "openai"
    error = _OpenAI.error
    usage = _OpenAI.usage

    @staticmethod
    def prompts(body: dict) -> list:
        return _one_or_many(body.get("prompt"))

    @classmethod
    def invalid(cls, body: Any) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        if not cls.prompts(body):
            return "Missing required parameter: 'prompt'."
        return None

    @classmethod
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> _Call:
        prompts = cls.prompts(body)
        input_tokens = sum(count(p) if isinstance(p, str) else len(p) for p in prompts)
        per_choice, _, truncated = _limited(body.get("max_tokens", 16), output_tokens, False)
        choices = len(prompts) * (body.get("n") or 1)
        return _Call(body["model"], input_tokens, per_choice * choices, truncated, body.get("stream") is True,
                     choices=choices)  # fmt: skip

    @staticmethod
    def choice(call: _Call, index: int, text: str, finished: bool) -> dict:
        finish = ("length" if call.truncated else "stop") if finished else None
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    @classmethod
    def completion(cls, call: _Call, body: dict | None = None) -> dict:
        return {
            "id": f"cmpl-mock{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": call.model, "choices": [cls.choice(call, i, call.text, True) for i in range(call.choices)],
            "usage": cls.usage(call),
        }  # fmt: skip

    @classmethod
    def stream(cls, call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        base = {"id": f"cmpl-mock{uuid.uuid4().hex}", "object": "text_completion", "created": 0, "model": call.model}
        content = [
            _sse({**base, "choices": [cls.choice(call, i, piece, False)]})
            for i in range(call.choices)
            for piece in call.pieces
        ]
        tail = [_sse({**base, "choices": [cls.choice(call, i, "", True) for i in range(call.choices)]})]
        if (body.get("stream_options") or {}).get("include_usage") is True:
            tail.append(_sse({**base, "choices": [], "usage": cls.usage(call)}))
        return [], content, [*tail, _sse("[DONE]")]


class _Embeddings:
    """OpenAI's embeddings: input tokens only; vectors as floats or, as the SDK asks by default, base64."""

    name = "openai"
    error = _OpenAI.error
    VECTOR = (0.25, -0.5, 0.125)

    @staticmethod
    def inputs(body: dict) -> list:
        return _one_or_many(body.get("input"))

    @classmethod
    def invalid(cls, body: Any) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        return None if cls.inputs(body) else "Missing required parameter: 'input'."

    @classmethod
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> _Call:
        tokens = sum(count(i) if isinstance(i, str) else len(i) for i in cls.inputs(body))
        return _Call(body["model"], tokens, 0, False, False)

    @classmethod
    def completion(cls, call: _Call, body: dict | None = None) -> dict:
        packed = base64.b64encode(struct.pack(f"<{len(cls.VECTOR)}f", *cls.VECTOR)).decode()
        vector = packed if (body or {}).get("encoding_format") == "base64" else list(cls.VECTOR)
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(cls.inputs(body or {})))]
        usage = {"prompt_tokens": call.input_tokens, "total_tokens": call.input_tokens}
        return {"object": "list", "data": data, "model": call.model, "usage": usage}


class _Gemini:
    """Gemini's generateContent: the model in the path, thinking billed as output, SSE streams."""

    name = "gemini"
    _STATUS: ClassVar[dict[int, str]] = {
        400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
    }  # fmt: skip

    @classmethod
    def error(cls, status: int, message: str) -> dict:
        return {"error": {"code": status, "message": message, "status": cls._STATUS.get(status, "INTERNAL")}}

    @staticmethod
    def invalid(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Invalid JSON payload received."
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents or not all(isinstance(c, dict) for c in contents):
            return "* GenerateContentRequest.contents: contents is not specified"
        return None

    @staticmethod
    def input_tokens(body: dict, count: Callable[[str], int]) -> int:
        """3, plus 4 and the text of each content (system instruction included), 258 per inline image."""
        tokens = 3
        for content in [*body["contents"], *([body["systemInstruction"]] if body.get("systemInstruction") else [])]:
            parts = content.get("parts") or []
            tokens += 4 + sum(count(p["text"]) if "text" in p else 258 for p in parts if isinstance(p, dict))
        return tokens

    @classmethod
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> _Call:
        config = body.get("generationConfig") or {}
        thinking = ((config.get("thinkingConfig") or {}).get("thinkingBudget") or 0) > 0
        n, reasoning, truncated = _limited(config.get("maxOutputTokens"), output_tokens, thinking)
        cached = GEMINI_CACHED_CONTENT_TOKENS if body.get("cachedContent") else 0
        choices = config.get("candidateCount") or 1
        return _Call(
            body["model"], cls.input_tokens(body, count) + cached, n * choices, truncated,
            body.get("stream") is True, cached_tokens=cached, reasoning_tokens=reasoning * choices, choices=choices,
        )  # fmt: skip

    @staticmethod
    def usage(call: _Call) -> dict:
        usage = {
            "promptTokenCount": call.input_tokens,
            "candidatesTokenCount": call.output_tokens - call.reasoning_tokens,
            "totalTokenCount": call.input_tokens + call.output_tokens,
        }
        if call.reasoning_tokens:
            usage["thoughtsTokenCount"] = call.reasoning_tokens
        if call.cached_tokens:
            usage["cachedContentTokenCount"] = call.cached_tokens
        return usage

    @staticmethod
    def candidate(call: _Call, index: int, text: str, finished: bool) -> dict:
        candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": index}
        if finished:
            candidate["finishReason"] = "MAX_TOKENS" if call.truncated else "STOP"
        return candidate

    @classmethod
    def completion(cls, call: _Call, body: dict | None = None) -> dict:
        candidates = [cls.candidate(call, i, call.text, True) for i in range(call.choices)]
        return {"candidates": candidates, "usageMetadata": cls.usage(call), "modelVersion": call.model}

    @classmethod
    def stream(cls, call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Each chunk carries the prompt count so far; only the last has the whole usage and a finish reason."""
        so_far = {"promptTokenCount": call.input_tokens, "totalTokenCount": call.input_tokens}

        def chunk(piece: str) -> bytes:
            return _sse({"candidates": [cls.candidate(call, 0, piece, False)], "usageMetadata": so_far})

        content = [chunk(piece) for piece in call.pieces]
        last = {"candidates": [cls.candidate(call, 0, "", True)], "usageMetadata": cls.usage(call)}
        return [], content, [_sse({**last, "modelVersion": call.model})]


def _openai_authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    keys = (mock_provider.openai_key, *mock_provider.extra_openai_keys)
    return headers.get("authorization") in {f"Bearer {key}" for key in keys}


def _gemini_authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    return headers.get("x-goog-api-key") == mock_provider.gemini_key


def _azure_authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    return headers.get("api-key") == mock_provider.azure_key


def _openai_v1_authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    """`/openai/v1/…`: Azure's v1 API (an `api-key`, or a bearer token), or a host such as Groq mounted there."""
    return _azure_authorized(headers, mock_provider) or _openai_authorized(headers, mock_provider)


_AUTHORIZED = {
    "openai": _openai_authorized,
    "anthropic": _Anthropic.authorized,
    "gemini": _gemini_authorized,
    "azure": _azure_authorized,
    "openai_v1": _openai_v1_authorized,
}
_OPENAI_APIS = {
    "/v1/chat/completions": _OpenAI,
    "/v1/responses": _Responses,
    "/v1/completions": _Completions,
    "/v1/embeddings": _Embeddings,
}
_GEMINI_PATH = re.compile(r"^/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):(?P<action>\w+)$")
_AZURE_DEPLOYMENT = re.compile(
    r"^/openai/deployments/(?P<deployment>[^/]+)(?P<endpoint>/chat/completions|/completions|/embeddings)$"
)


def _corrupted(document: Any, corruption: tuple[str, Any] | None) -> Any:
    """``document`` with every value of the field ``corruption`` names replaced by its value."""
    if corruption is None:
        return document
    field, value = corruption
    if isinstance(document, dict):
        return {k: value if k == field else _corrupted(v, corruption) for k, v in document.items()}
    if isinstance(document, list):
        return [_corrupted(item, corruption) for item in document]
    return document


def _corrupted_event(event: bytes, corruption: tuple[str, Any] | None) -> bytes:
    if corruption is None:
        return event
    lines = event.decode().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("data: ") and line[6:].startswith("{"):
            lines[i] = "data: " + json.dumps(_corrupted(json.loads(line[6:]), corruption), separators=(",", ":"))
    return "\n".join(lines).encode()


@dataclass(frozen=True)
class _Route:
    """Who answers a metered call: the API, whose key it takes, the model its path names (if any)."""

    api: type
    auth: str
    model: str | None = None


def _route(path: str, query: str) -> _Route | None:
    if path in _OPENAI_APIS:
        return _Route(_OPENAI_APIS[path], "openai")
    if path == "/v1/messages":
        return _Route(_Anthropic, "anthropic")
    gemini = _GEMINI_PATH.match(path)
    if gemini and gemini["action"] in ("generateContent", "streamGenerateContent"):
        return _Route(_Gemini, "gemini", gemini["model"])
    azure = _AZURE_DEPLOYMENT.match(path)
    if azure and "api-version=" in query:
        return _Route(_OPENAI_APIS["/v1" + azure["endpoint"]], "azure", azure["deployment"])
    if path.startswith("/openai/v1/") and path.removeprefix("/openai") in _OPENAI_APIS:
        return _Route(_OPENAI_APIS[path.removeprefix("/openai")], "openai_v1")
    return None


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the benchmark opens many connections at once

    def __init__(self, address: tuple[str, int], mock_provider: MockProvider):
        self.mock_provider = mock_provider
        self.connections: set[socket.socket] = set()  # open client connections, closed by stop()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        # A client hanging up mid-response is routine (cancelled streams); stay quiet.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body go out as separate small writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log line on stderr."""

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def _dispatch(self) -> None:
        mock_provider = self.server.mock_provider
        body = self._read_body()
        path, _, query = self.path.partition("?")
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = Received(self.command, path, query, headers, body, parsed)
        mock_provider._record(request)

        route = _route(path, query) if self.command == "POST" else None
        gemini = _GEMINI_PATH.match(path)
        if route is not None:
            self._metered(route, request)
        elif (self.command, path) == ("GET", "/v1/models"):
            self._models(request)
        elif (self.command, path) == ("GET", "/v1/files"):  # an endpoint no proxy can meter
            self._list(request, [])
        elif (self.command, path) == ("POST", "/v1/messages/count_tokens"):
            self._count(request, "anthropic", lambda body, n: {"input_tokens": _Anthropic.input_tokens(body, n)})
        elif self.command == "POST" and gemini and gemini["action"] == "countTokens":
            self._count(request, "gemini", lambda body, n: {"totalTokens": _Gemini.input_tokens(body, n)})
        else:
            self._send_json(404, _OpenAI.error(404, f"Invalid URL ({self.command} {path})"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _read_body(self) -> bytes:
        """The request body, whether sent with Content-Length or chunked."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after the chunk data
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    def _models(self, request: Received) -> None:
        model = {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}
        self._list(request, [model])

    def _list(self, request: Received, data: list) -> None:
        if not _OpenAI.authorized(request.headers, self.server.mock_provider):
            self._send_json(401, _OpenAI.error(401, "Incorrect API key provided."))
            return
        self._send_json(200, {"object": "list", "data": data})

    def _count(self, request: Received, auth: str, answer: Callable[[dict, Callable[[str], int]], dict]) -> None:
        """A free token count (Anthropic's count_tokens, Gemini's countTokens): not billed, not reported."""
        api = _Anthropic if auth == "anthropic" else _Gemini
        if not _AUTHORIZED[auth](request.headers, self.server.mock_provider):
            self._send_json(401, api.error(401, "Incorrect API key provided."))
        elif api.invalid({"model": "m", "max_tokens": 1, **(request.json or {})}):
            self._send_json(400, api.error(400, "invalid count request"))
        else:
            self._send_json(200, answer(request.json, self.server.mock_provider.count_tokens))

    def _metered(self, route: _Route, request: Received) -> None:
        mock_provider, api = self.server.mock_provider, route.api
        if not _AUTHORIZED[route.auth](request.headers, mock_provider):
            self._send_json(401, api.error(401, "Incorrect API key provided."))
            return
        body = request.json
        if route.model and isinstance(body, dict):  # Gemini and Azure deployments name the model in the path
            body = {**body, "model": route.model}
        if api is _Gemini and isinstance(body, dict):  # and Gemini says in the path whether it streams
            body["stream"] = request.path.endswith(":streamGenerateContent")
        problem = api.invalid(body)
        if problem:
            self._send_json(400, api.error(400, problem))
            return
        if api is _Gemini and body["stream"] and "alt=sse" not in request.query:
            self._send_json(400, api.error(400, "this mock streams Gemini only as server-sent events (?alt=sse)"))
            return
        call = api.call(body, mock_provider.count_tokens, mock_provider.output_tokens, mock_provider._prompt_cache)
        echo = mock_provider._take_echo()
        if echo is not None:
            self._send_json(echo, api.error(echo, f"bad request; you sent {request.headers}"), request.headers)
            return
        overrun = mock_provider._take_overrun()
        if overrun is not None:
            call = dataclasses.replace(call, output_tokens=overrun, truncated=False)

        delay, fail_status, cut_after = mock_provider._take_behaviours(call.stream)
        if delay:
            time.sleep(delay)
        if fail_status is not None:
            self._send_json(fail_status, api.error(fail_status, "Mock failure injected by fail_next()."))
            return

        usage = call.report(api.name)
        corruption = mock_provider._take_corruption()
        if not call.stream:
            mock_provider._report(usage)
            self._send_json(200, _corrupted(api.completion(call, body), corruption))
            return

        head, content, tail = (
            [_corrupted_event(event, corruption) for event in part] for part in api.stream(call, body)
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if cut_after is not None:
            self._write_chunks(head + content[:cut_after])
            self._drop_connection()
            return
        stall = mock_provider._take_stall()
        if stall:
            self._write_chunks(head + content[:1])
            time.sleep(stall)
            head, content = [], content[1:]
        self._write_chunks(head + content)
        mock_provider._report(usage)  # before the client can see the end of the stream
        self._write_chunks(tail, last=True)

    def _write_chunks(self, events: list[bytes], last: bool = False) -> None:
        """Send each event as its own HTTP chunk; ``last`` ends the body.

        ``wfile`` is unbuffered, so every write goes straight to the socket.
        """
        for i, event in enumerate(events):
            data = b"%x\r\n%s\r\n" % (len(event), event)
            if last and i == len(events) - 1:
                data += b"0\r\n\r\n"
            self.wfile.write(data)

    def _drop_connection(self) -> None:
        """Close the TCP connection mid-body: no terminator, no zero chunk.

        A shutdown (FIN) rather than a reset, so the events already sent are
        reliably delivered before the client sees the truncated body.
        """
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send_json(self, status: int, payload: Any, echoed: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        for name, value in (echoed or {}).items():
            self.send_header(f"x-echo-{name}", value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------------------
# The mock provider
# ---------------------------------------------------------------------------


class MockProvider:
    """An in-process mock of the OpenAI and Anthropic APIs.

    Usage::

        mock = MockProvider().start()
        client = openai.OpenAI(api_key=mock.openai_key, base_url=mock.url + "/v1")
        ...
        mock.stop()
    """

    def __init__(
        self,
        openai_key: str = "sk-test-real-openai",
        anthropic_key: str = "sk-ant-test-real-anthropic",
        output_tokens: int = 12,
        count_tokens: Callable[[str], int] | None = None,
        gemini_key: str = "test-real-gemini-key",
        azure_key: str = "test-real-azure-key",
        extra_openai_keys: tuple[str, ...] = (),
    ):
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self.gemini_key = gemini_key
        self.azure_key = azure_key
        self.extra_openai_keys = extra_openai_keys  # OpenAI-compatible hosts' keys, for the same endpoints
        self._prompt_cache: set[str] = set()  # prompt-cache entries, kept until reset()
        self.output_tokens = output_tokens
        if count_tokens is None:
            _o200k()  # load now: fail fast, and keep it out of the first request's latency
            count_tokens = count_o200k_tokens
        self.count_tokens = count_tokens
        self.received: list[Received] = []
        self.reported: list[dict] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._clear_behaviours()

    # -- lifecycle ----------------------------------------------------------

    def start(self, port: int = 0) -> MockProvider:
        """Serve on 127.0.0.1 (a free port unless ``port`` is given) in a daemon thread."""
        self._server = _Server(("127.0.0.1", port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="mock-provider",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open client connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._server.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        self._thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("MockProvider is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test controls ------------------------------------------------------

    def reset(self) -> None:
        """Forget received requests, reported usage and pending behaviours."""
        with self._lock:
            self.received.clear()
            self.reported.clear()
            self._prompt_cache.clear()
            self._clear_behaviours()

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` metered calls with ``status`` and the provider's error body."""
        with self._lock:
            self._fail_status, self._fail_count = status, count

    def cut_next_stream(self, after_chunks: int) -> None:
        """Drop the next streaming call's connection after ``after_chunks`` content events."""
        with self._lock:
            self._cut_after = after_chunks

    def delay_next(self, seconds: float) -> None:
        """Sleep ``seconds`` before answering the next metered call."""
        with self._lock:
            self._delay = seconds

    def echo_next_error(self, status: int) -> None:
        """Answer the next metered call with ``status``, echoing its request headers in a response header
        and in the error body (as some upstreams' error pages do)."""
        with self._lock:
            self._echo_status = status

    def overrun_next(self, output_tokens: int) -> None:
        """Answer the next metered call with ``output_tokens``, whatever its max_tokens (a provider that
        does not keep to the limit)."""
        with self._lock:
            self._overrun_output = output_tokens

    def stall_next_stream(self, seconds: float) -> None:
        """Pause the next stream for ``seconds`` after its first content event (a model still thinking)."""
        with self._lock:
            self._stall = seconds

    def corrupt_next_usage(self, field: str, value: Any) -> None:
        """Make the next metered call report ``value`` wherever its answer (whole or streamed) has a usage
        ``field``; what it bills (``reported``) stays the real figure."""
        with self._lock:
            self._corruption = (field, value)

    # -- used by the handler ------------------------------------------------

    def _clear_behaviours(self) -> None:
        self._fail_status = 0
        self._fail_count = 0
        self._cut_after: int | None = None
        self._delay = 0.0
        self._stall = 0.0
        self._overrun_output: int | None = None
        self._corruption: tuple[str, Any] | None = None
        self._echo_status: int | None = None

    def _take_echo(self) -> int | None:
        with self._lock:
            echo, self._echo_status = self._echo_status, None
            return echo

    def _take_overrun(self) -> int | None:
        with self._lock:
            overrun, self._overrun_output = self._overrun_output, None
            return overrun

    def _take_stall(self) -> float:
        with self._lock:
            stall, self._stall = self._stall, 0.0
            return stall

    def _take_corruption(self) -> tuple[str, Any] | None:
        with self._lock:
            corruption, self._corruption = self._corruption, None
            return corruption

    def _take_behaviours(self, stream: bool) -> tuple[float, int | None, int | None]:
        """Consume the behaviours pending for a metered call: (delay, fail status, cut after).

        A cut is only consumed by a streaming call that is not failed.
        """
        with self._lock:
            delay, self._delay = self._delay, 0.0
            fail_status = None
            if self._fail_count > 0:
                fail_status = self._fail_status
                self._fail_count -= 1
            cut_after = None
            if stream and fail_status is None:
                cut_after, self._cut_after = self._cut_after, None
            return delay, fail_status, cut_after

    def _record(self, request: Received) -> None:
        with self._lock:
            self.received.append(request)

    def _report(self, usage: dict) -> None:
        with self._lock:
            self.reported.append(usage)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the mock LLM provider until killed.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--output-tokens", type=int, default=12, help="reply length in tokens")
    args = parser.parse_args()
    mock_provider = MockProvider(output_tokens=args.output_tokens).start(args.port)
    print(f"listening on {mock_provider.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        mock_provider.stop()


if __name__ == "__main__":
    main()
