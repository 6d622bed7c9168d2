"""Anthropic's messages API: prompt caching at ``cache_control`` breakpoints, typed stream events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from mock_provider.call import Call, sse, text_of

if TYPE_CHECKING:
    from mock_provider.server import MockProvider


def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    """Anthropic takes the key as ``x-api-key`` or, as the 2.x SDK sends it, ``Authorization: Bearer``.

    Every credential sent must be the real key.
    """
    credentials = []
    if "x-api-key" in headers:
        credentials.append(headers["x-api-key"])
    if "authorization" in headers:
        credentials.append(headers["authorization"].removeprefix("Bearer "))
    return bool(credentials) and all(key == mock_provider.anthropic_key for key in credentials)


class Messages:
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
        input_tokens = 3 + count(text_of(body.get("system")))
        for message in body["messages"]:
            input_tokens += 4 + count(text_of(message.get("content")))
        return input_tokens

    @classmethod
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        input_tokens = cls.input_tokens(body, count)
        n = min(body["max_tokens"], output_tokens)
        read, written, ttl = cls.cache_split(body, count, cache)
        return Call(
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
    def usage(call: Call, output_tokens: int) -> dict:
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

    @staticmethod
    def stop_reason(call: Call) -> str:
        return "tool_use" if call.tool_call else "max_tokens" if call.truncated else "end_turn"

    @staticmethod
    def tool_use(call: Call, whole: bool = True) -> dict:
        name, arguments = call.tool_call
        block_id = f"toolu_mock{uuid.uuid4().hex[:16]}"
        return {"type": "tool_use", "id": block_id, "name": name, "input": json.loads(arguments) if whole else {}}

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        return {
            "id": f"msg_mock{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [cls.tool_use(call) if call.tool_call else {"type": "text", "text": call.text}],
            "stop_reason": cls.stop_reason(call),
            "stop_sequence": None,
            "usage": cls.usage(call, call.output_tokens),
        }

    @classmethod
    def stream(cls, call: Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The stream's events as (head, one per output token, tail).

        ``body`` is unused here; it is part of the signature shared with OpenAI's ``Chat``.
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
            return sse({"type": name, **data}, event=name)

        block = cls.tool_use(call, whole=False) if call.tool_call else {"type": "text", "text": ""}
        head = [
            event("message_start", message=message),
            event("content_block_start", index=0, content_block=block),
            event("ping"),
        ]
        content = [
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece}) for piece in call.pieces
        ]
        if call.tool_call:
            delta = {"type": "input_json_delta", "partial_json": call.tool_call[1]}
            content = [event("content_block_delta", index=0, delta=delta)]
        tail = [
            event("content_block_stop", index=0),
            event(
                "message_delta",
                delta={"stop_reason": cls.stop_reason(call), "stop_sequence": None},
                usage={"output_tokens": call.output_tokens},
            ),
            event("message_stop"),
        ]
        return head, content, tail
